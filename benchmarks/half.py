"""Mixed precision: onnxopt `--fp16` / `--bf16` against onnxconverter-common's float16 converter.

    python benchmarks/half.py [--light] [--bf16] [--models NAME[=PATH[:NPZ]] ...]   # here (CPU)
    python benchmarks/half.py --quick             # the embedded default only, < 1 min
    python3 benchmarks/half.py --ep cuda --models NAME=PATH[:NPZ] ... --light \\
        --batches 1,16,64 --json OUT.json          # on a CUDA machine (the device)
    python benchmarks/half.py --export DIR        # the real models + their inputs (<= 5 MB each)
                                                  # for a machine without rapidocr (the device)
    python benchmarks/half.py --render FILE.json  # reprint a saved run

Models: the embedded default (`digits_resnet`, with its 256 bundled labelled digits), the real
models of benchmarks/real_models.py (ppocr_det, ppocr_rec, ppocr_cls, minilm_ts) when that module
and rapidocr are here, and with `--light` onnx's light models (resnet50, densenet121,
inception_v2, squeezenet, vgg19, shufflenet, zfnet512 from the installed onnx package's
backend/test/data/light; their weights are ConstantOfShape of 0.02, so activations grow large).
`--models` takes names (those above), `NAME=PATH`, `NAME=PATH:NPZ` or a bare `.onnx` path.
Inputs: the model's realistic .npz (the batching rule of `onnxopt --inputs`), the digits for
the default, else generated from the declared shapes by `onnxopt.inputs.generate` (normal(0,1)
floats, seed `--seed`, default 0; dims that had to be guessed are recorded).

Variants per model, each converted from the same original file:
  * fp32: the original;
  * onnxopt-fp16 (and onnxopt-bf16 with `--bf16`): `onnxopt.api.optimize(src, dst,
    OptimizeOptions(bench=(), half=HalfOptions(dtype, target="ort-cuda")), feeds=<the inputs>)`:
    the exact passes, then half where the budget (every output cosine >= 0.999, no NaN/Inf) holds
    on those inputs; report.half says what stayed float32 and why;
  * anchor-fp16: onnxconverter-common's `convert_float_to_float16(model, keep_io_types=True)`.

Fidelity, per half variant against fp32 on the same inputs (the reference is always fp32 on ORT's
CPU provider, graph optimizations off, exact): per output the worst cosine over the batches, max
abs error and SQNR (dB) over all of them, and the count of NaN/Inf where fp32 is finite.
  * `--ep cpu` (here): the half models are judged through `onnxopt.precision.emulate.emulated()`,
    float32 arithmetic with every half tensor rounded where the half model stores it ("judged":
    "emulation"). ORT CPU itself would compute many fp16 ops in float32 between Casts it inserts,
    which hides overflow. The anchor is emulated the same way (its fp16 Constant /
    ConstantOfShape attributes become float32 first: they hold half values, exact in float32).
    Task metrics (`real_models.metrics(name, path)`, on sets disjoint from the fidelity inputs)
    of fp32 and of each emulated file; ppocr_det has no task metric there, so its binarised-map
    IoU with fp32 (`real_models.agreement`) is given. digits_resnet: top-1 on its 256 digits.
  * `--ep cuda`: the half models run for real on CUDA (ORT graph optimizations on, TF32 off so
    float32 nodes kept by the converters compute exactly; "judged": "cuda"); a control row
    `fp32-tf32` is the float32 original on CUDA with ORT's default TF32. Task metrics need
    rapidocr and the CPU, so on CUDA only digits_resnet's top-1 is measured.

Latency (`--batches`; default on cuda 1,16,64, on cpu none; `--quick`: batch 1, 1 s): per model
and batch, fp32 (twice: an A/A control), onnxopt half and the anchor, all sessions of one model in
one process, timed interleaved (`onnxopt.measure.bench.measure_runners`, rotating order, auto
warm-up, spinning off, IO binding on CUDA), ORT graph optimizations on, CUDA's TF32 left at ORT's
default (on) for every session; each ratio is p50(variant) / p50(fp32) with a bootstrap 95% CI
(`bench.ratio_ci`), plus onnxopt / anchor. Inputs at batch b: the first batch tiled along axis 0
to b; a model whose inputs fix the batch dim cannot take b: "fixed batch", skipped.

Verdicts (issue 17): no NaN/Inf ever (onnxopt); worst cosine >= 0.999 or the model stays float32;
on CUDA never measurably slower than fp32 (CI above 1) at any batch; at batch 64 not measurably
slower than the anchor; at batch 64 >= 1.4x fp32 (ratio <= 0.714) on ppocr_det, ppocr_rec and
digits_resnet.

Output: a table on stdout (rich when installed), and JSON (`--json`, default
benchmarks/results/half-<date>.json; --quick: benchmarks/work/half-quick.json) written after
every model, with versions, the onnxopt commit when git can tell, the machine and the settings.
A variant that fails is a row with its error in one line; the others go on.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from onnxopt import api, inputs
from onnxopt.measure import bench, runtime, verify
from onnxopt.precision.emulate import HALF, emulated
from onnxopt.precision.half import HalfOptions

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
try:  # needs only numpy to import; its models need rapidocr (absent on the device)
    import real_models
except Exception:  # noqa: BLE001 (any import problem means: no real models here)
    real_models = None

DEFAULT = "digits_resnet"
REAL = ("ppocr_det", "ppocr_rec", "ppocr_cls", "minilm_ts")
LIGHT = ("resnet50", "densenet121", "inception_v2", "squeezenet", "vgg19", "shufflenet",
         "zfnet512")
SPEEDUP_MODELS = ("ppocr_det", "ppocr_rec", DEFAULT)  # issue 17: >= 1.4x fp32 at batch 64
MIN_COSINE, MIN_SPEEDUP, BIG_BATCH = 0.999, 1.4, 64
VARIANT = {"float16": "onnxopt-fp16", "bfloat16": "onnxopt-bf16"}
EXPORT_BYTES = 5 << 20  # --export: input batches per model up to this (det: 1 page of 4.9 MB)
MAX_BATCHES = 8  # fidelity batches per .npz or generated model (digits: all 32 batches of 8)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    if "FAIL : " in text:  # ORT's "<source path> <C++ signature> ... FAIL : <the reason>"
        text = text.rsplit("FAIL : ", 1)[1]
    lines = text.splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


# ---------------------------------------------------------------- models and inputs


@dataclasses.dataclass
class Case:
    name: str
    path: Path
    feeds: list  # batches for fidelity (and the first one for timing)
    inputs: str  # where they came from
    labels: np.ndarray | None = None  # digits_resnet: top-1 labels of the feeds
    metric: str | None = None  # real_models name whose task metric applies


def light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def parse_spec(text: str) -> tuple[str, Path | None, Path | None]:
    """NAME | NAME=PATH | NAME=PATH:NPZ | PATH.onnx -> (name, path, npz)."""
    if "=" not in text:
        if text.endswith(".onnx"):
            return Path(text).stem, Path(text), None
        return text, None, None
    name, rest = text.split("=", 1)
    npz = None
    if rest.endswith(".npz") and ":" in rest:
        rest, npz = rest.rsplit(":", 1)
        npz = Path(npz)
    return name, Path(rest), npz


def default_specs(args) -> list[tuple[str, Path | None, Path | None]]:
    if args.quick:
        return [(DEFAULT, None, None)]
    specs = [parse_spec(t) for t in args.models] if args.models else [(DEFAULT, None, None)]
    if not args.models and real_models is not None:
        specs += [(n, None, None) for n in REAL if real_models.MODELS[n].available()]
    if args.light:
        specs += [(n, light_dir() / f"light_{n}.onnx", None) for n in LIGHT]
    return specs


def load_case(name: str, path: Path | None, npz: Path | None, seed: int) -> Case:
    if path is None and name == DEFAULT:
        with np.load(api.default_samples_path()) as data:
            images = data["image"].astype(np.float32)
            labels = data["label"].astype(np.int64)
        feeds = [{"image": images[i:i + 8]} for i in range(0, len(images), 8)]
        return Case(name, api.default_model_path(), feeds,
                    f"{len(images)} bundled digits, batches of 8", labels)
    if path is None:
        if real_models is None or name not in real_models.MODELS:
            raise ValueError(f"{name}: unknown model name; give NAME=PATH[:NPZ]")
        path, npz = real_models.ensure(name, say), real_models.inputs_path(name)
    metric = name if real_models is not None and name in real_models.MODELS else None
    model = ir.load(path)
    if npz is not None:
        feeds = inputs.load_npz(npz, model)
        source = f"{npz.name}: {len(feeds)} batches"
    else:
        guessed: list[str] = []
        feeds = inputs.generate(model, batches=2, seed=seed, warnings=guessed)
        source = f"generated from declared shapes, normal(0,1), seed {seed}, 2 batches" + (
            f"; {'; '.join(guessed)}" if guessed else "")
    if len(feeds) > MAX_BATCHES:
        source += f" (first {MAX_BATCHES} used)"
    return Case(name, Path(path), feeds[:MAX_BATCHES], source, metric=metric)


def input_shapes(feeds: dict) -> dict:
    return {k: list(v.shape) for k, v in feeds.items()}


# ---------------------------------------------------------------- the variants


def onnxopt_half(case: Case, dtype: str, dst: Path, feeds: list | None = None, *,
                 check_speed: bool = True) -> tuple[dict, ir.Model]:
    """`optimize --fp16/--bf16` judged (and, on CUDA, timed) on `feeds` (default: the case's
    inputs; --deploy-batch: the first batch tiled to that batch size). `check_speed=False`:
    the half model even where it is slower (--allow-slower)."""
    start = time.perf_counter()
    options = api.OptimizeOptions(bench=(), half=HalfOptions(dtype=dtype, target="ort-cuda",
                                                             check_speed=check_speed))
    model, report = api.optimize(case.path, dst, options, feeds=feeds or case.feeds)
    half = dict(report.half or {})
    kept = half.pop("kept_float32", {}) or {}
    row = {"file": str(dst), "seconds": round(time.perf_counter() - start, 1), **half,
           "kept_float32_count": len(kept), "kept_float32_reasons": reason_summary(kept),
           "kept_float32": kept, "notes": list(report.notes)}
    stage = next((r for r in report.passes if r.name == "to-half"), None)
    if stage is not None and stage.reverted:
        row["undone"] = stage.reason
    return row, model


def reason_summary(kept: dict[str, str]) -> dict[str, int]:
    """Why nodes stayed float32, counted, with op names folded into one class per reason."""
    folded = collections.Counter(
        re.sub(r"(no (?:float16|bfloat16)) \w+ kernel", r"\1 <op> kernel", why)
        for why in kept.values())
    return dict(folded.most_common())


def anchor_half(case: Case, dst: Path) -> tuple[dict, ir.Model]:
    from onnxconverter_common import float16

    start = time.perf_counter()
    model = onnx.load(str(case.path))
    row = {"tool": f"onnxconverter-common {version('onnxconverter-common')} "
                   "convert_float_to_float16(keep_io_types=True)"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = float16.convert_float_to_float16(model, keep_io_types=True)
        if model.ir_version < 4 and (problem := load_problem(half)):
            # IR < 4 lists the initializers as graph inputs; keep_io_types keeps those inputs
            # float32 while the initializers become float16, which ORT refuses. onnxopt starts
            # by moving such a model to IR 4; the anchor gets the same start.
            row["as_given"] = f"does not load in ONNX Runtime: {problem}"
            row["input"] = "IR 3 -> 4 (initializers removed from the graph inputs), as onnxopt"
            upgraded = ir.serde.deserialize_model(model)
            common.RemoveInitializersFromInputsPass()(upgraded)
            upgraded.ir_version = 4
            caught.clear()
            half = float16.convert_float_to_float16(ir.to_proto(upgraded), keep_io_types=True)
    onnx.save(half, str(dst))
    clipped = collections.Counter(str(w.message).split(" will be truncated to ")[-1]
                                  for w in caught if "truncated" in str(w.message))
    row.update({"file": str(dst), "seconds": round(time.perf_counter() - start, 1),
                "converted": True, "casts": sum(n.op_type == "Cast" for n in half.graph.node),
                "nodes": len(half.graph.node), "values_clamped": dict(clipped)})
    return row, ir.serde.deserialize_model(half)


def load_problem(model: onnx.ModelProto) -> str:
    """Why ORT's CPU provider cannot load `model`, or "" (the session is dropped at once)."""
    try:
        runtime.make_session(model.SerializeToString(), ep="cpu", optimize=False)
    except Exception as error:  # noqa: BLE001
        return one_line(error).split(": ", 1)[-1]
    return ""


def emulable(model: ir.Model) -> ir.Model:
    """The half model as emulated() reads it: element types on every value, and half tensors
    held in attributes (the anchor's Constant / ConstantOfShape) as float32 (exact), since
    emulated() computes every half node in float32 and those nodes' types come from the
    attribute."""
    from onnxopt.passes.to_half import fill_dtypes

    model = model.clone()
    fill_dtypes(model)
    for node in model.graph:
        for attr in list(node.attributes.values()):
            if attr.type == ir.AttributeType.TENSOR and attr.value.dtype in HALF:
                data = np.asarray(attr.value.numpy()).astype(np.float32)
                node.attributes[attr.name] = ir.AttrTensor(attr.name, ir.tensor(data))
                if node.op_type in ("Constant", "ConstantOfShape"):
                    for output in node.outputs:
                        output.type = ir.TensorType(ir.DataType.FLOAT)
    return emulated(model)


# ---------------------------------------------------------------- fidelity


def outputs_of(model: ir.Model, feeds: list, ep: str, *, optimize: bool) -> list[dict]:
    outputs, ran, note = verify.provider_outputs(model, feeds, optimize=optimize, ep=ep)
    if ran != ep:
        raise RuntimeError(f"ran on {ran}, not {ep}: {note}")
    return outputs


def fidelity(reference: list[dict], candidate: list[dict]) -> dict:
    """Per output: worst cosine over the batches, max abs error, SQNR dB, non-finite count
    (where fp32 is finite); cosine / error / SQNR over the positions finite in both."""
    found = {}
    for name in reference[0]:
        cosines, worst_abs, signal, noise, bad, compared = [], 0.0, 0.0, 0.0, 0, 0
        for ref, got in zip(reference, candidate):
            a = np.asarray(ref[name], dtype=np.float64).ravel()
            b = np.asarray(got[name], dtype=np.float64).ravel()
            finite = np.isfinite(a)
            bad += int(np.sum(finite & ~np.isfinite(b)))
            both = finite & np.isfinite(b)
            a, b = a[both], b[both]
            compared += a.size
            norm = float(np.linalg.norm(a) * np.linalg.norm(b))
            if a.size:
                cosines.append(float(a @ b) / norm if norm > 0 else
                               float(not a.any() and not b.any()))
                worst_abs = max(worst_abs, float(np.max(np.abs(a - b))))
            signal += float(a @ a)
            noise += float((a - b) @ (a - b))
        sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0
                                            else -math.inf)
        if not compared:  # nothing finite on both sides: no number to give
            cosines, worst_abs, sqnr = [math.nan], math.nan, math.nan
        found[name] = {"cosine_min": min(cosines), "max_abs": worst_abs, "sqnr_db": sqnr,
                       "nonfinite": bad, "compared": compared}
    return found


def worst(fid: dict) -> dict:
    """The worst output (NaN, where an output had nothing to compare, counts as worst)."""
    def low(key):
        values = [o[key] for o in fid.values()]
        return math.nan if any(math.isnan(v) for v in values) else min(values)

    return {"cosine_min": low("cosine_min"), "sqnr_db": low("sqnr_db"),
            "max_abs": max((o["max_abs"] for o in fid.values()),
                           key=lambda v: math.inf if math.isnan(v) else v),
            "nonfinite": sum(o["nonfinite"] for o in fid.values())}




def top1(case: Case, outputs: list[dict]) -> dict | None:
    if case.labels is None:
        return None
    predicted = np.concatenate([np.argmax(next(iter(o.values())), axis=1) for o in outputs])
    return {"top1": float(np.mean(predicted == case.labels[:len(predicted)])),
            "n": len(predicted)}


def task_metric(case: Case, file: Path, reference: Path | None) -> dict | None:
    """real_models' task metric of a model file (fp32 or emulated; ORT CPU), det: map IoU."""
    if case.metric is None or real_models is None:
        return None
    found = real_models.metrics(case.metric, file)
    if case.metric == "ppocr_det" and reference is not None:
        found.update(real_models.agreement(case.metric, reference, file))
    return found


# ---------------------------------------------------------------- latency


def at_batch(feeds: dict, model: ir.Model, batch: int) -> dict | None:
    """The first batch tiled along axis 0 to `batch`; None when an input fixes that dim."""
    out = {}
    for spec in inputs.input_specs(model):
        array = feeds[spec.name]
        first = spec.dims[0] if spec.dims else None
        if isinstance(first, int) or not spec.dims:
            if spec.dims and first != batch:
                return None
            out[spec.name] = array
            continue
        repeats = -(-batch // array.shape[0])
        out[spec.name] = np.concatenate([array] * repeats, axis=0)[:batch]
    return out


def session_kwargs(ep: str) -> dict:
    # TF32: ORT's default for timing, the same for every variant (recorded in the JSON)
    if "tf32" in inspect.signature(runtime.make_session).parameters:
        return {"tf32": None}
    return {}


def time_model(case: Case, files: dict[str, str], batches: list[int], ep: str,
               seconds: float, cuda_options: list[str] = ()) -> dict:
    model = ir.load(case.path)
    sessions, found = {}, {}
    for key, file in files.items():
        try:
            sessions[key] = runtime.make_session(file, ep=ep, optimize=True,
                                                 **session_kwargs(ep))
            if runtime.ran_on(sessions[key], ep)[0] != ep:
                raise RuntimeError(runtime.ran_on(sessions[key], ep)[1])
        except Exception as error:  # noqa: BLE001 (one variant's failure is its row)
            found.setdefault("errors", {})[key] = one_line(error)
            sessions.pop(key, None)
    for option in cuda_options:  # fp32 and the half model under the same CUDA setting
        for key in ("fp32", ANY_SPEED):
            if key in files:
                try:
                    sessions[f"{key} {option}"] = cuda_session(files[key], option)
                except Exception as error:  # noqa: BLE001
                    found.setdefault("errors", {})[f"{key} {option}"] = one_line(error)
    for batch in batches:
        feeds = at_batch(case.feeds[0], model, batch)
        if feeds is None:
            found[str(batch)] = {"skipped": "fixed batch"}
            continue
        say(f"{case.name}: timing batch {batch} ({', '.join(sessions)})")
        found[str(batch)] = time_batch(sessions, feeds, ep, batch, seconds)
    return found


# --cuda-options: provider settings tried on fp32 and the half model side by side. NHWC: ORT's
# CUDA provider runs Conv in channels-last (its float16 NhwcConv; cuDNN's half tensor-core
# kernels want that layout), with one transpose at each end. A CUDA graph replays the whole
# run as one launch. Both are ways around what may make small fp16 conv nets slower: ORT's
# Conv+activation fusion (FusedConv) is float-only on CUDA, so their Relu/Add run apart.
CUDA_OPTIONS = {"nhwc": {"prefer_nhwc": "1"}, "graph": {"enable_cuda_graph": "1"}}
ANY_SPEED = "onnxopt-fp16 (any speed)"


def cuda_session(file: str, option: str):
    """A CUDA session of `file` with one of CUDA_OPTIONS (TF32 left at ORT's default, as in the
    other timed sessions)."""
    ort = runtime.onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [("CUDAExecutionProvider", CUDA_OPTIONS[option]), "CPUExecutionProvider"]
    session = ort.InferenceSession(file, options, providers=providers)
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"CUDA did not register with {CUDA_OPTIONS[option]}")
    session.onnxopt_ep, session.onnxopt_note = "cuda", ""  # for runtime.runner: bind on device
    return session


def time_batch(sessions: dict, feeds: dict, ep: str, batch: int, seconds: float) -> dict:
    runners, errors = {}, {}
    for key, session in sessions.items():
        try:
            runners[key] = runtime.runner(session, feeds, ep)
            if key == "fp32":
                runners["fp32 (A/A)"] = runtime.runner(session, feeds, ep)
        except Exception as error:  # noqa: BLE001
            errors[key] = one_line(error)
    if "fp32" not in runners:
        return {"error": errors.get("fp32", "fp32 did not run"), "errors": errors}
    keys = list(runners)
    measured = dict(zip(keys, bench.measure_runners([runners[k] for k in keys], ep=ep,
                                                    batch=batch, seconds=seconds)))
    base = measured["fp32"].times_ms
    row = {"shapes": input_shapes(feeds)}
    for key, latency in measured.items():
        entry = {"p50_ms": latency.p50_ms, "p90_ms": latency.p90_ms, "runs": latency.runs}
        if key != "fp32":
            entry["ratio"], entry["low"], entry["high"] = bench.ratio_ci(base, latency.times_ms)
        row[key] = entry
    for key, latency in measured.items():
        if key.startswith("onnxopt") and "anchor-fp16" in measured:
            row[key]["vs_anchor"] = bench.ratio_ci(measured["anchor-fp16"].times_ms,
                                                   latency.times_ms)
    if errors:
        row["errors"] = errors
    return row


# ---------------------------------------------------------------- one model


def run_model(name, path, npz, args, work: Path) -> dict:
    row: dict = {"name": name}
    args.result["models"].append(row)  # written as it fills in
    try:
        case = load_case(name, path, npz, args.seed)
    except Exception as error:  # noqa: BLE001
        row["error"] = one_line(error)
        return row
    row.update(path=rel(case.path), inputs=case.inputs, batches=len(case.feeds),
               shapes=input_shapes(case.feeds[0]), variants={})
    model = ir.load(case.path)
    say(f"{name}: fp32 reference on CPU ({case.inputs})")
    reference = outputs_of(model, case.feeds, "cpu", optimize=False)
    fp32 = {"file": rel(case.path)}
    if args.metrics:  # real_models' metrics run on ORT CPU and need rapidocr: CPU runs only
        fp32["metric"] = guarded(lambda: top1(case, reference) or (
            task_metric(case, case.path, None) if args.ep == "cpu" else None))
    row["fp32"] = fp32
    if args.ep == "cuda":
        row["variants"]["fp32-tf32"] = guarded(lambda: {"fidelity": fidelity(reference, outputs_of(
            model, case.feeds, "cuda", optimize=True)), "judged": "cuda (ORT default TF32)"})
    dtypes = ["float16"] + (["bfloat16"] if args.bf16 else [])
    files = {"fp32": str(case.path)}
    makers = [(VARIANT[d], lambda d=d: onnxopt_half(case, d, work / f"{name}.onnxopt.{d}.onnx"))
              for d in dtypes]
    deployed = at_batch(case.feeds[0], model, args.deploy_batch) if args.deploy_batch else None
    if deployed is not None:  # what a user who declares the batch they run gets
        makers.append((f"onnxopt-fp16@b{args.deploy_batch}", lambda: onnxopt_half(
            case, "float16", work / f"{name}.onnxopt.b{args.deploy_batch}.onnx", [deployed])))
    if args.cuda_options:  # the half model itself, to time under other CUDA settings
        makers.append((ANY_SPEED, lambda: onnxopt_half(
            case, "float16", work / f"{name}.onnxopt.any-speed.onnx", check_speed=False)))
    makers.append(("anchor-fp16", lambda: anchor_half(case, work / f"{name}.anchor.onnx")))
    for key, make in makers:
        say(f"{name}: {key}")
        variant = guarded(lambda make=make: judge(case, *make(), reference, args))
        row["variants"][key] = variant
        if "error" not in variant:
            files[key] = variant["file"]
        write_json(args.result, args.json)
    if args.batches:
        row["latency"] = guarded(lambda: time_model(case, files, args.batches, args.ep,
                                                    args.seconds, args.cuda_options))
    row["verdict"] = verdict(row, args)
    return row


def judge(case: Case, variant: dict, half: ir.Model, reference: list, args) -> dict:
    """Fidelity (and metrics) of one half model: emulated here, real kernels on CUDA."""
    if args.ep == "cuda":
        got = outputs_of(ir.load(variant["file"]), case.feeds, "cuda", optimize=True)
        variant["judged"] = "cuda"
    else:
        emulation = emulable(half)
        got = outputs_of(emulation, case.feeds, "cpu", optimize=False)
        variant["judged"] = "emulation"
        if args.metrics and case.metric is not None:
            file = Path(variant["file"]).with_suffix(".emulated.onnx")
            ir.save(emulation, file)
            variant["metric"] = guarded(lambda: task_metric(case, file, case.path))
    variant["fidelity"] = fidelity(reference, got)
    variant["worst"] = worst(variant["fidelity"])
    if args.metrics and case.labels is not None:
        variant["metric"] = top1(case, got)
    return variant


def guarded(work):
    try:
        return work()
    except Exception as error:  # noqa: BLE001 (a failure is recorded, the run goes on)
        if os.environ.get("HALF_DEBUG"):
            traceback.print_exc()
        return {"error": one_line(error)}


def shipped(key: str) -> bool:
    """A latency entry of what `optimize` writes (not the half model kept at any speed, or
    timed under other CUDA settings: explorations, outside the verdicts)."""
    return key.startswith("onnxopt") and not key.startswith(ANY_SPEED)


def verdict(row: dict, args) -> dict:
    ours = {k: v for k, v in row["variants"].items() if k.startswith("onnxopt") and "worst" in v}
    found: dict = {}
    if not ours:
        return {"error": "no onnxopt variant was judged"}
    found["no_nan"] = all(v["worst"]["nonfinite"] == 0 for v in ours.values())
    found["cosine"] = all(v["worst"]["cosine_min"] >= MIN_COSINE or not v.get("converted")
                          for v in ours.values())
    latency = row.get("latency") or {}
    timed = {b: e for b, e in latency.items() if b.isdigit() and "fp32" in e}
    if args.ep != "cuda" or not timed:
        found["speed"] = "not judged: " + ("CPU run (targets are CUDA's)" if args.ep != "cuda"
                                           else "not timed")
        return found
    found["never_slower"] = all(e[k]["low"] <= 1.0 for e in timed.values() for k in e
                                if shipped(k))
    big = timed.get(str(BIG_BATCH))
    if big is None:
        found["batch64"] = "not timed (" + latency.get(str(BIG_BATCH), {}).get("skipped",
                                                                              "not asked") + ")"
        return found
    found["b64_not_slower_than_anchor"] = all(
        big[k].get("vs_anchor", (0, 0, 0))[1] <= 1.0 for k in big if shipped(k))
    ours_big = [big[k]["ratio"] for k in big if shipped(k)]
    if row["name"] in SPEEDUP_MODELS and ours_big:  # the best onnxopt variant at batch 64
        found["b64_speedup"] = round(1 / min(ours_big), 3)
        found["b64_speedup_ok"] = found["b64_speedup"] >= MIN_SPEEDUP
    return found


# ---------------------------------------------------------------- output


def rel(path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path).split("site-packages/")[-1]


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_state() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30, check=False).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or "unknown (no git here)",
            "changed": [c for c in changed if not c.startswith("benchmarks/")]}


def machine(ep: str) -> dict:
    found = {"platform": platform.platform(), "processor": platform.processor(),
             "cpus": os.cpu_count()}
    if ep == "cuda" and shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found["gpu"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                check=False).stdout.strip()
    return found


def header(args) -> dict:
    ort = runtime.onnxruntime()
    tf32 = "tf32" in inspect.signature(runtime.make_session).parameters
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "onnxruntime": ort.__version__,
                     **{p: version(p) for p in ("onnxopt", "onnx", "onnx-ir", "numpy",
                                                "onnxconverter-common", "rapidocr-onnxruntime")}},
        "onnxopt": {**git_state(), "module": rel(Path(api.__file__).parent)},
        "machine": machine(args.ep), "ep": args.ep,
        "providers": ort.get_available_providers(),
        "settings": {"batches": args.batches, "seconds": args.seconds, "seed": args.seed,
                     "max_fidelity_batches": MAX_BATCHES, "bf16": args.bf16,
                     "judged": "emulation" if args.ep == "cpu" else "cuda",
                     "timing_fp32_math": (runtime.fp32_math(args.ep, None) if tf32
                                          else "ORT default (make_session has no tf32)"),
                     "fidelity_sessions": ("cuda: ORT optimizations on, tf32=False" if
                                           args.ep == "cuda" else "cpu: optimizations off")},
        "models": [],
    }


def write_json(result: dict, path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(clean(result), indent=1))
    os.replace(tmp, target)


def clean(data):
    """JSON without NaN/Infinity (written as strings) and with numpy scalars as numbers."""
    if isinstance(data, dict):
        return {str(k): clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [clean(v) for v in data]
    if isinstance(data, (np.floating, np.integer)):
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    return data


def cells(row: dict, key: str, variant: dict, batches: list[int]) -> list[str]:
    if "error" in variant:
        return [key, "error: " + variant["error"][:90]] + [""] * (5 + len(batches))
    w = variant.get("worst", {})
    if variant.get("judged") == "timed only":  # --cuda-options: a session setting, timed
        form = "timed only"
    elif "converted" in variant and not variant["converted"]:
        why = variant.get("undone") or variant.get("budget", "")
        form = "kept fp32: " + re.sub(r"^ONNX Runtime cannot load the model: ", "ORT: ",
                                      str(why))[:60]
    elif key.startswith("onnxopt"):
        form = (f"{variant.get('nodes_half', '?')} half, {variant.get('kept_float32_count')} "
                f"fp32, {variant.get('casts')} Cast")
    elif key.startswith("anchor"):
        form = f"{variant.get('casts')} Cast"
    else:
        form = variant.get("judged", "")
    out = [key, form, fmt(w.get("cosine_min"), ".5f"), fmt(w.get("max_abs"), ".3g"),
           fmt(w.get("sqnr_db"), ".1f"), str(w.get("nonfinite", "")),
           metric_text(variant.get("metric"))]
    latency = row.get("latency") or {}
    for b in batches:
        entry = latency.get(str(b), {})
        if "skipped" in entry:
            out.append(entry["skipped"])
        elif key in entry:
            e = entry[key]
            out.append(f"{e['ratio']:.3f} [{e['low']:.3f}-{e['high']:.3f}]")
        else:
            out.append("")
    return out


def fmt(value, spec: str) -> str:
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) \
        else str(value)


def metric_text(metric) -> str:
    if not metric:
        return ""
    if "error" in metric:
        return "error"
    metric = {**metric, **next((v for v in metric.values() if isinstance(v, dict)), {})}
    shown = [f"{k} {v:.4f}" for k, v in metric.items()
             if k in ("top1", "line_accuracy", "accuracy", "recall@1", "map_iou")
             and isinstance(v, float)]
    return ", ".join(shown) or ", ".join(f"{k} {v}" for k, v in metric.items()
                                         if k in ("text_pixels_at_0.3",))


def render(result: dict) -> None:
    batches = result["settings"]["batches"] or []
    columns = ["model", "variant", "form", "cos min", "max abs", "SQNR dB", "NaN/Inf", "metric",
               *(f"b{b} vs fp32" for b in batches)]
    rows = []
    for model in result["models"]:
        if "error" in model:
            rows.append([model["name"], "error: " + model["error"]] + [""] * (len(columns) - 2))
            continue
        fp32 = model.get("fp32", {})
        rows.append([model["name"], "fp32", f"{model['batches']} batches", "", "", "", "",
                     metric_text(fp32.get("metric"))] + [
            fp32_cell(model, b) for b in batches])
        for key, variant in model["variants"].items():
            rows.append([""] + cells(model, key, variant, batches))
        timed = [entry for entry in (model.get("latency") or {}).values()
                 if isinstance(entry, dict)]
        for key in sorted({k for entry in timed for k in entry if " " in k and k not in
                           model["variants"] and k != "fp32 (A/A)"}):  # --cuda-options
            rows.append([""] + cells(model, key, {"judged": "timed only"}, batches))
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"half precision ({result['ep']}; judged: "
                            f"{result['settings']['judged']})")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        Console(width=200).print(table)
    except ImportError:
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(row))
    for model in result["models"]:
        if "verdict" in model:
            print(f"{model['name']}: " + ", ".join(f"{k}={v}" for k, v in
                                                   model["verdict"].items()))
    print(summary(result))


def summary(result: dict) -> str:
    """One line per issue-17 target: met, or the models that miss it."""
    targets = {"no_nan": "no NaN/Inf", "cosine": f"cosine >= {MIN_COSINE} or float32",
               "never_slower": "never slower than fp32",
               "b64_not_slower_than_anchor": f"batch {BIG_BATCH} not slower than the anchor",
               "b64_speedup_ok": f">= {MIN_SPEEDUP}x fp32 at batch {BIG_BATCH}"}
    unjudged = [m["name"] for m in result["models"] if "error" in m.get("verdict", {"error": 1})]
    lines = [f"  not judged (no onnxopt variant ran): {', '.join(unjudged)}"] if unjudged else []
    for key, text in targets.items():
        judged = {m["name"]: m["verdict"][key] for m in result["models"]
                  if key in m.get("verdict", {})}
        if judged:
            missed = [name for name, ok in judged.items() if ok is not True]
            lines.append(f"  {text}: " + (f"MISSED by {', '.join(missed)}" if missed else
                                          f"met ({len(judged)} models)"))
    return "issue 17 targets (onnxopt):\n" + "\n".join(lines)


def fp32_cell(model: dict, batch: int) -> str:
    entry = (model.get("latency") or {}).get(str(batch), {})
    if "fp32" in entry:
        aa = entry.get("fp32 (A/A)", {})
        return f"{entry['fp32']['p50_ms']:.3f} ms (A/A {aa.get('ratio', float('nan')):.3f})"
    return entry.get("skipped", entry.get("error", ""))


# ---------------------------------------------------------------- export for the device


def export(directory: Path, names: list[str]) -> None:
    """Each real model and its first input batch, for a machine without rapidocr (the device
    carries at most 64 MiB: MiniLM, 90 MB, is left out)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.startswith("minilm"):
            say(f"{name}: left out (90 MB, over what a device call carries)")
            continue
        path = real_models.ensure(name, say)
        shutil.copyfile(path, directory / f"{name}.onnx")
        feeds = real_models.load_feeds(real_models.inputs_path(name))
        per_batch = sum(a.nbytes for a in feeds[0].values())
        feeds = feeds[:max(1, EXPORT_BYTES // per_batch)]
        np.savez(directory / f"{name}.npz", **{k: np.stack([f[k] for f in feeds])
                                               for k in feeds[0]})
        say(f"{name}: {directory / name}.onnx + .npz ({len(feeds)} batches)")


# ---------------------------------------------------------------- command line


def parse_args(argv=None):
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[],
                        help="NAME, NAME=PATH or NAME=PATH:NPZ (default: digits_resnet and the "
                             "real models present)")
    parser.add_argument("--light", action="store_true", help="add onnx's light models")
    parser.add_argument("--bf16", action="store_true", help="also onnxopt --bf16")
    parser.add_argument("--ep", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=None, help="latency batches (default: cuda 1,16,64; cpu none)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timing per model and batch (default 4; --quick 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of generated inputs")
    parser.add_argument("--deploy-batch", type=int, default=None,
                        help="also onnxopt --fp16 judged and timed at this batch (the shapes "
                             "a user declares), as variant onnxopt-fp16@bN")
    parser.add_argument("--cuda-options", type=lambda s: [x for x in s.split(",") if x],
                        default=[], help="with --ep cuda: also time fp32 and the half model "
                        "(kept at any speed) with these CUDA settings: " + ", ".join(CUDA_OPTIONS))
    parser.add_argument("--no-metrics", dest="metrics", action="store_false")
    parser.add_argument("--quick", action="store_true", help="digits_resnet, batch 1, 1 s")
    parser.add_argument("--keep", help="keep the converted models in this folder")
    parser.add_argument("--export", help="write the real models + 1 input batch here, and stop")
    parser.add_argument("--json", default=None)
    parser.add_argument("--render", metavar="FILE.json", help="reprint a saved run's tables")
    args = parser.parse_args(argv)
    unknown = [o for o in args.cuda_options if o not in CUDA_OPTIONS]
    if unknown or (args.cuda_options and args.ep != "cuda"):
        parser.error(f"--cuda-options: {', '.join(CUDA_OPTIONS)}, with --ep cuda only")
    if args.batches is None:
        args.batches = [1] if args.quick else ([1, 16, 64] if args.ep == "cuda" else [])
    args.seconds = args.seconds or (1.0 if args.quick else 4.0)
    args.json = args.json or (str(ROOT / "benchmarks/work/half-quick.json") if args.quick else
                              str(ROOT / f"benchmarks/results/half-{today}.json"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        render(json.loads(Path(args.render).read_text()))
        return 0
    if args.export:
        if real_models is None:
            print("--export needs benchmarks/real_models.py and rapidocr", file=sys.stderr)
            return 2
        export(Path(args.export), [p[0] for p in default_specs(args)[1:]] or list(REAL[:3]))
        return 0
    start = time.perf_counter()
    args.result = header(args)
    with tempfile.TemporaryDirectory(prefix="onnxopt-half-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, path, npz in default_specs(args):
            say(f"== {name}")
            try:
                row = run_model(name, path, npz, args, work)
            except Exception as error:  # noqa: BLE001 (the fp32 reference itself failed)
                row = args.result["models"][-1]
                row["error"] = one_line(error)
            for variant in row.get("variants", {}).values():  # the temporary files are gone after
                if not args.keep:
                    variant.pop("file", None)
            args.result["seconds"] = round(time.perf_counter() - start, 1)
            write_json(args.result, args.json)
    render(args.result)
    print(f"{args.result['seconds']:.0f} s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
