"""Static int8 benchmark: onnxopt `--int8` against ONNX Runtime's `quantize_static`, side by side.

    python benchmarks/int8.py [--models NAME ...] [--methods minmax[,entropy]] [--seconds S]
                              [--calib-samples N] [--memory-samples 32,512]
                              [--json benchmarks/results/int8-<date>.json]

Models: the embedded default (`digits_resnet`), PP-OCR cls, rec, det and MiniLM (TorchScript
export) from benchmarks/real_models.py, and `silu_detector` (models/silu_detector_ts.onnx, a
YOLO-style SiLU network with random weights, at 320x320: fidelity only, issue 18) and
`silu_detector_w4` (the same with 4x the channels, exported into benchmarks/work/ on first use). Per model, both tools get the SAME calibration data, a set
disjoint from the evaluation set, and the same method:
  * digits_resnet: the first 64 bundled samples (`digits_samples.npz` 'image'); evaluation: the
    other 192, top-1 against 'label';
  * ppocr_*: `real_models.eval_set(name, SEED_CALIB)` (64 crops / 64 lines / 8 pages); evaluation:
    `eval_set(name, SEED_EVAL)` (200 / 1000 / 8);
  * minilm_ts: 64 stdlib first sentences that are in no evaluation pair, seq 64; evaluation: the
    375 next-sentence pairs (embeddings of both sides).
Calibration data is written once per model as stacked batch-1 samples: an .npz, or, when the
sample shapes differ (rec lines have their own widths), a folder of one .npz per sample.

Tools, each in a fresh subprocess (wall time and VmHWM peak RSS of the subprocess):
  1. onnxopt: `onnxopt optimize IN -o OUT --int8 --calib CALIB --calib-method M --bench none
     --report r.json [--inputs <model's realistic inputs>]` through benchmarks/_run_tool.py;
     the report says whether it quantized or kept the float model (budget missed) and which
     kernels ORT runs;
  2. ort: `quant_pre_process(skip_symbolic_shape=True)`, the opset upgraded to 13 when older
     (`onnx.version_converter`), then `quantize_static` (QDQ, per-channel, QUInt8 activations,
     QInt8 weights, a CalibrationDataReader over the same samples, MinMax or Entropy); a step
     that fails is recorded (pre-processing failing falls back to the original file);
     `ort-rr`: the same with reduce_range=True (7-bit weights), what ORT advises on x86 CPUs
     without VNNI, where full 8-bit u8 x s8 products saturate int16 (onnxopt decides this itself);
     `ort-s8s8` (not run by default): int8 activations, the activation type TensorRT and some
     CPU guides use, to measure why onnxopt's ort-cpu target keeps uint8 activations;
  `onnxopt-op13` (models older than opset 13 only): onnxopt on the model upgraded to opset 13
     beforehand with onnx.version_converter (a workaround row: see the int8 findings);
  3. fp32: the original.
Per model and tool: fidelity vs fp32 on the evaluation set (per-sample cosine of the output,
mean/min; top-1 agreement / same string / map IoU), the task metric (digits top-1, cls accuracy,
rec line accuracy + CER with greedy CTC, det box F1 at IoU 0.5 after rapidocr's DBPostProcess
vs the ground truth and vs fp32, MiniLM next-sentence recall@1), latency p50 ratio vs fp32
(batch 1, 1 intra-op thread, spinning off, all variants plus an fp32 A/A control interleaved in
one process, shuffled order each round, bootstrap 95% CI), file size, calibration time and peak
memory, and the kernels ORT's CPU provider really runs (QLinear*/QGemm and float Conv/MatMul left).
Then calibration peak memory at 32 and 512 samples on digits_resnet (the 256 bundled images tiled
with small seeded noise), both tools: onnxopt streams statistics, so its peak should stay flat.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from rich.console import Console
from rich.table import Table

from onnxopt.measure import bench, runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lossless
import real_models

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "onnxopt" / "data" / "digits_resnet.onnx"
DIGITS_SAMPLES = ROOT / "onnxopt" / "data" / "digits_samples.npz"
SILU = ROOT / "models" / "silu_detector_ts.onnx"  # issue 18: a YOLO-style SiLU detector
SILU_SIZE = 320  # its input images, 1x3x320x320 (the export takes any multiple of 8)
MODELS = ["digits_resnet", "ppocr_cls", "ppocr_rec", "ppocr_det", "minilm_ts", "silu_detector",
          "silu_detector_w4"]
CALIB_COUNT = {"digits_resnet": 64, "ppocr_cls": 64, "ppocr_rec": 64, "ppocr_det": 8,
               "minilm_ts": 64, "silu_detector": 32, "silu_detector_w4": 32}
TOOLS = ("onnxopt", "onnxopt-op13", "ort", "ort-rr")
# onnxopt with other settings, to measure what each refinement brings (--tools onnxopt,onnxopt-noeq)
VARIANTS = {"onnxopt-nobc": ("--no-bias-correction",), "onnxopt-noeq": ("--no-equalize",),
            "onnxopt-clip": ("--clip-weights", "mse"), "onnxopt-nobudget": ("--max-error", "none"),
            "onnxopt-nosmooth": ("--no-smooth",), "onnxopt-nosplit": ("--no-split-outliers",)}
# onnxopt-op13: onnxopt on the model upgraded to opset 13 first (only for opset < 13 models);
# ort-rr: ORT's tool with reduce_range=True (7-bit weights)
stderr = Console(stderr=True)


# ---------------------------------------------------------------- the ORT child process


class _Reader:
    """CalibrationDataReader over the calibration file(s): one batch-1 sample at a time."""

    def __init__(self, calib: str) -> None:
        self.feeds = _read_calib(Path(calib))
        self.index = 0

    def get_next(self):
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


def _read_calib(path: Path) -> list[dict[str, np.ndarray]]:
    """A stacked .npz (leading axis: samples), or a folder of .npz files, one sample each."""
    if not path.is_dir():
        return real_models.load_feeds(path)
    feeds = []
    for file in sorted(path.glob("*.npz")):
        with np.load(file) as data:
            feeds.append({k: data[k] for k in data.files})
    return feeds


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def ort_child(result_path: str, src: str, dst: str, calib: str, method: str,
              variant: str = "ort") -> None:
    """quant_pre_process -> opset 13 -> quantize_static; per-step seconds and errors, VmHWM.
    `variant`: ort (uint8 activations), ort-rr (7-bit weights), ort-s8s8 (int8 activations)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    result: dict = {"error": "", "steps": {}, "notes": []}
    start = time.perf_counter()
    work = Path(dst).parent
    try:
        mark = time.perf_counter()
        pre = work / "ort-pre.onnx"
        try:
            quant_pre_process(src, str(pre), skip_symbolic_shape=True)
            current = str(pre)
        except Exception as error:  # noqa: BLE001 - recorded, then quantize the original
            result["notes"].append(f"quant_pre_process failed: {_line(error)}")
            current = src
        result["steps"]["pre_process_s"] = time.perf_counter() - mark
        model = onnx.load(current)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if opset < 13:
            from onnx import version_converter

            model = version_converter.convert_version(model, 13)
            current = str(work / "ort-pre13.onnx")
            onnx.save(model, current)
            result["notes"].append(f"opset {opset} -> 13 (version_converter)")
        del model
        reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib)
        mark = time.perf_counter()
        quantize_static(current, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=(QuantType.QInt8 if variant == "ort-s8s8"
                                         else QuantType.QUInt8),
                        weight_type=QuantType.QInt8, reduce_range=variant == "ort-rr",
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "entropy": CalibrationMethod.Entropy}[method])
        result["steps"]["quantize_static_s"] = time.perf_counter() - mark
        result["samples"] = len(reader.feeds)
    except BaseException as error:  # noqa: BLE001 - every failure is a result
        result["error"] = _line(error)
        import traceback

        traceback.print_exc()
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = _peak_rss_mb()
    result["exit_code"] = 1 if result["error"] else 0
    Path(result_path).write_text(json.dumps(result))


def bench_each(names, work_root: Path, data: dict, out: Path, run) -> None:
    """`run(name, folder)` for each model into data["models"], the JSON rewritten after each;
    a model that fails is named in data["failed"] and the others still run."""
    for name in names:
        folder = work_root / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            data["models"].append(run(name, folder))
        except Exception as error:  # noqa: BLE001 - one model failing keeps the others
            stderr.print(f"[red]{name}: {_line(error)}[/red]")
            data.setdefault("failed", {})[name] = _line(error)
        lossless.write_json(data, out)


def _line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:400]


# ---------------------------------------------------------------- data per model


def model_path(name: str) -> Path:
    if name == "silu_detector":
        return SILU
    if name == "silu_detector_w4":  # 4x the channels (32-128, YOLOv8n's order): exported here
        path = ROOT / "benchmarks" / "work" / "silu_detector_w4_ts.onnx"
        if not path.exists():
            import subprocess

            subprocess.run([sys.executable, str(ROOT / "models" / "export_silu.py"), "--width",
                            "4", "--out", str(path.parent), "--exporters", "ts"], check=True)
        return path
    return DIGITS if name == "digits_resnet" else real_models.ensure(name)


def silu_images(seed: int, count: int) -> np.ndarray:
    """Smooth random images for the SiLU detector (random weights: no task to score): blocks
    of uniform noise upsampled x8, announced as random, fixed seed (2: calibration, 1: eval)."""
    rng = np.random.default_rng(seed)
    side = SILU_SIZE // 8
    noise = rng.random((count, 1, 3, side, side)).astype(np.float32)
    return np.repeat(np.repeat(noise, 8, axis=3), 8, axis=4)


def calib_samples(name: str, count: int | None = None) -> list[dict[str, np.ndarray]]:
    """Batch-1 calibration feeds, disjoint from the evaluation set."""
    count = count or CALIB_COUNT[name]
    if name.startswith("silu_detector"):
        return [{"input": x} for x in silu_images(real_models.SEED_CALIB, count)]
    if name == "digits_resnet":
        with np.load(DIGITS_SAMPLES) as data:
            images = data["image"][:64]
        return [{"image": images[i:i + 1]} for i in range(min(count, 64))]
    if name.startswith("minilm"):
        used = {s for pair in real_models.sentence_pairs() for s in pair}
        pool = [s for s in real_models.sentences() if s not in used]
        rng = np.random.default_rng(real_models.SEED_CALIB)
        picks = rng.choice(len(pool), size=count, replace=False)
        return [dict(zip(real_models.MINILM_INPUTS, real_models._minilm_arrays(
            [pool[i]], seq=real_models.MINILM_SEQ))) for i in picks]
    data, _ = real_models.eval_set(name, real_models.SEED_CALIB)
    if name == "ppocr_rec":
        return [{"x": x} for x in data[:count]]
    return [{"x": data[i:i + 1]} for i in range(min(count, len(data)))]


def write_calib(feeds: list[dict[str, np.ndarray]], path: Path) -> Path:
    """One stacked .npz when every sample has the same shapes, else a folder of .npz files."""
    shapes = {tuple((k, v.shape) for k, v in f.items()) for f in feeds}
    if len(shapes) == 1:
        target = path.with_suffix(".npz")
        np.savez(target, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
        return target
    path.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(path / f"{i:05d}.npz", **feed)
    return path


def memory_samples(count: int) -> list[dict[str, np.ndarray]]:
    """`count` digits images: the 256 bundled ones, tiled, plus small seeded noise."""
    with np.load(DIGITS_SAMPLES) as data:
        images = data["image"]
    rng = np.random.default_rng(real_models.SEED_CALIB)
    tiled = np.concatenate([images] * -(-count // len(images)))[:count]
    tiled = tiled + rng.normal(0, 0.02, tiled.shape).astype(np.float32)
    return [{"image": tiled[i:i + 1]} for i in range(count)]


def timing_feeds(name: str) -> dict[str, np.ndarray]:
    if name.startswith("silu_detector"):
        return {"input": silu_images(3, 1)[0]}
    if name == "digits_resnet":
        with np.load(DIGITS_SAMPLES) as data:
            return {"image": data["image"][64:65]}
    return real_models.load_feeds(real_models.inputs_path(name))[0]


# ---------------------------------------------------------------- evaluation


def evaluate(name: str, path: str, reference: dict | None) -> dict:
    """Raw outputs on the evaluation set, the task metric, fidelity vs `reference` (fp32)."""
    sess = real_models.session(path, threads=2)
    found: dict = {}
    if name == "digits_resnet":
        with np.load(DIGITS_SAMPLES) as data:
            x, labels = data["image"][64:], data["label"][64:]
        raw = np.concatenate([sess.run(None, {"image": x[i:i + 32]})[0]
                              for i in range(0, len(x), 32)])
        found["metric"] = {"top1": float(np.mean(raw.argmax(-1) == labels)), "n": len(labels)}
        found["_correct"] = raw.argmax(-1) == labels
        per_sample = list(raw)
    elif name == "ppocr_cls":
        x, labels = real_models.eval_set(name)
        raw = np.concatenate([sess.run(None, {"x": x[i:i + 16]})[0] for i in range(0, len(x), 16)])
        found["metric"] = real_models.cls_accuracy(raw, np.array(labels))
        found["_correct"] = raw.argmax(-1) == np.array(labels)
        per_sample = list(raw)
    elif name == "ppocr_rec":
        tensors, texts = real_models.eval_set(name)
        per_sample = [sess.run(None, {"x": t})[0][0] for t in tensors]
        predicted = [real_models.ctc_greedy(p[None], _charset())[0] for p in per_sample]
        found["metric"] = real_models.line_accuracy(predicted, texts)
        found["_correct"] = np.array([p.replace(" ", "") == t.replace(" ", "")
                                      for p, t in zip(predicted, texts)])
        found["_texts"] = predicted
    elif name.startswith("silu_detector"):  # random weights: fidelity to fp32 is the measure
        per_sample = [sess.run(None, {"input": x})[0] for x in silu_images(real_models.SEED_EVAL,
                                                                               16)]
        found["metric"] = {"note": "random weights: no task metric, fidelity only"}
    elif name == "ppocr_det":
        pages, boxes = real_models.eval_set(name)
        per_sample = [sess.run(None, {"x": pages[i:i + 1]})[0] for i in range(len(pages))]
        found["_boxes"] = [det_boxes(m) for m in per_sample]
        found["metric"] = box_f1(found["_boxes"], boxes)
    else:
        pairs = real_models.eval_set(name)
        first = real_models.embed(sess, [p[0] for p in pairs])
        second = real_models.embed(sess, [p[1] for p in pairs])
        found["metric"] = real_models.retrieval(first, second)
        found["_correct"] = (first @ second.T).argmax(1) == np.arange(len(first))
        per_sample = list(first) + list(second)
    found["_raw"] = per_sample
    if reference is not None:
        found["fidelity"] = fidelity(name, reference, found)
    return found


_CHARSET: list[str] = []


def _charset() -> list[str]:
    if not _CHARSET:
        _CHARSET.extend(real_models.rec_charset())
    return _CHARSET


def fidelity(name: str, reference: dict, found: dict) -> dict:
    cos = []
    for a, b in zip(reference["_raw"], found["_raw"]):
        a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
        cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    result = {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos))}
    if "_correct" in reference and "_correct" in found:
        # The task metric's change as samples it lost and gained against fp32: a few flips
        # either way are the evaluation set's noise, a one-sided count is not.
        was, now = np.asarray(reference["_correct"]), np.asarray(found["_correct"])
        result["lost"], result["gained"] = int(np.sum(was & ~now)), int(np.sum(~was & now))
    if name in ("digits_resnet", "ppocr_cls"):
        result["top1_agreement"] = float(np.mean([np.argmax(a) == np.argmax(b) for a, b in
                                                  zip(reference["_raw"], found["_raw"])]))
    elif name == "ppocr_rec":
        result["same_string"] = float(np.mean([a == b for a, b in zip(reference["_texts"],
                                                                       found["_texts"])]))
    elif name.startswith("silu_detector"):
        pass  # per-sample cosine only: the head's raw box and class channels
    elif name == "ppocr_det":
        x = np.concatenate(reference["_raw"]) > 0.3
        y = np.concatenate(found["_raw"]) > 0.3
        result["map_iou"] = float((x & y).sum() / max(1, (x | y).sum()))
        result["box_f1_vs_fp32"] = box_f1(found["_boxes"], reference["_boxes"])["f1"]
    else:
        n = len(cos) // 2  # first half: sentence-1 embeddings (unit norm)
        a, b = np.stack(reference["_raw"][:n]), np.stack(found["_raw"][:n])
        top_a = (a @ a.T - 2 * np.eye(n)).argmax(1)
        top_b = (b @ b.T - 2 * np.eye(n)).argmax(1)
        result["top1_neighbour_agreement"] = float(np.mean(top_a == top_b))
        # Recall@1 moves by whole queries; the margin (the right candidate's score minus the
        # best wrong one's) moves continuously, so its mean change shows a systematic loss
        # that a few flips cannot.
        shift = _margins(found["_raw"], n) - _margins(reference["_raw"], n)
        result["margin_shift_mean"] = float(shift.mean())
        result["margin_shift_se"] = float(shift.std() / np.sqrt(len(shift)))
    return result


def _margins(raw: list, n: int) -> np.ndarray:
    """Per query (first n rows of `raw`): its pair's score minus the best other candidate's."""
    scores = np.stack(raw[:n]).astype(np.float64) @ np.stack(raw[n:]).astype(np.float64).T
    right = np.diag(scores).copy()
    np.fill_diagonal(scores, -np.inf)
    return right - scores.max(axis=1)


def det_boxes(prob_map: np.ndarray) -> list[list[float]]:
    """rapidocr's DB post-processing (REAL_MODELS.md settings), axis-aligned hull per quad."""
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

    post = DBPostProcess(thresh=0.3, box_thresh=0.5, max_candidates=1000, unclip_ratio=1.6,
                         use_dilation=True, score_mode="fast")
    quads, _ = post(prob_map, prob_map.shape[2:])
    return [[float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()),
             float(q[:, 1].max())] for q in np.asarray(quads).reshape(-1, 4, 2)]


def box_f1(predicted: list[list], truth: list[list]) -> dict:
    """Greedy one-to-one matching at IoU >= 0.5, summed over pages."""
    hits = n_pred = n_true = 0
    for pred, true in zip(predicted, truth):
        n_pred, n_true = n_pred + len(pred), n_true + len(true)
        free = list(true)
        for box in pred:
            ious = [_iou(box, t) for t in free]
            if ious and max(ious) >= 0.5:
                free.pop(int(np.argmax(ious)))
                hits += 1
    precision, recall = hits / max(1, n_pred), hits / max(1, n_true)
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    return {"f1": f1, "precision": precision, "recall": recall, "boxes": n_true}


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


# ---------------------------------------------------------------- running the tools


def run_onnxopt(name: str, src: Path, calib: Path, method: str, work: Path, timeout: float,
                flags: tuple[str, ...] = ()) -> dict:
    out, report = work / "onnxopt.onnx", work / "onnxopt-report.json"
    cmd = ["onnxopt", "optimize", str(src), "-o", str(out), "--int8", "--calib", str(calib),
           "--calib-method", method, "--bench", "none", "--quiet", "--report", str(report),
           *flags]
    if name.startswith("silu_detector"):
        cmd += ["--shape", f"input:1,3,{SILU_SIZE},{SILU_SIZE}"]
    elif name != "digits_resnet":  # verification of the exact passes on realistic inputs
        cmd += ["--inputs", str(real_models.inputs_path(name))]
    row = lossless.run_child(cmd, work, "onnxopt", timeout)
    row["command"] = " ".join(["onnxopt", *cmd[1:]])
    if row["exit_code"] and not row["error"]:
        row["error"] = row["log_tail"] or f"exit {row['exit_code']}"
    if report.is_file():
        data = json.loads(report.read_text())
        int8 = data.get("int8") or {}
        row["quantized"] = int8.get("quantized")
        row["budget"] = int8.get("budget")
        row["calibration"] = int8.get("calibration")
        row["kernels"] = int8.get("kernels")
        row["kernel_summary"] = int8.get("ort_cpu_kernels")
        row["int8_s"] = (data.get("seconds") or {}).get("int8")
        row["notes"] = data.get("notes", [])
        row["held_out"] = {o.get("name"): {k: o.get(k) for k in ("cosine", "sqnr_db")}
                           for o in (data.get("verification") or {}).get("outputs", [])}
    if row.get("quantized") is False and out.is_file() and row["exit_code"] == 1:
        # the budget was missed: the CLI exits 1 (verification failed) but wrote the float model
        row["error"], row["exit_code_note"] = "", "exit 1: int8 budget missed, float model written"
    row["output"] = str(out) if out.is_file() and not row["error"] else None
    return row


def run_ort(src: Path, calib: Path, method: str, work: Path, timeout: float,
            variant: str = "ort") -> dict:
    out, result = work / "ort.onnx", work / "ort.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ort-child", str(result), str(src),
           str(out), str(calib), method, variant]
    proc, wall = lossless.timed_process(cmd, work / "ort.log", timeout)
    data = json.loads(result.read_text()) if result.is_file() else {}
    tail = " | ".join((work / "ort.log").read_text(errors="replace").strip().splitlines()[-3:])
    row = {"wall_s": wall, "tool_s": data.get("seconds"), "peak_mb": data.get("peak_rss_mb"),
           "exit_code": data.get("exit_code", proc.returncode), "steps": data.get("steps", {}),
           "notes": data.get("notes", []),
           "error": data.get("error") or ("" if data else (f"timed out after {timeout:.0f} s"
                                                           if wall >= timeout else tail[-500:]))}
    row["int8_s"] = row["steps"].get("quantize_static_s")
    row["output"] = str(out) if out.is_file() and not row["error"] else None
    if row["output"]:
        row["kernels"] = kernel_counts(row["output"])
        row["kernel_summary"] = _kernel_summary(row["kernels"])
    return row


def kernel_counts(path: str) -> dict | None:
    try:
        from onnxopt.passes import _qdq

        return _qdq.ort_kernel_counts(path)
    except Exception as error:  # noqa: BLE001 - only a column of the table
        return {"error": _line(error)}


def _kernel_summary(kernels: dict | None) -> str:
    if not kernels or "error" in kernels:
        return (kernels or {}).get("error", "-")
    try:
        from onnxopt.quant import int8

        return int8.integer_kernel_summary(kernels)
    except ImportError:
        return ", ".join(f"{k} {v}" for k, v in sorted(kernels.items()))


def time_variants(paths: dict[str, str], feeds: dict, seconds: float) -> dict:
    """fp32, fp32 again (A/A control) and the int8 files, interleaved, 1 thread, batch 1."""
    labels = ["fp32", "fp32 (A/A)", *[k for k in paths if k != "fp32"]]
    sources = {"fp32 (A/A)": paths["fp32"], **paths}
    sessions, results = [], {}
    for label in labels:
        try:
            sessions.append((label, runtime.make_session(sources[label], threads=1)))
        except runtime.RuntimeFailure as error:
            results[label] = {"error": str(error)}
    try:
        bench.measure([s for _, s in sessions], feeds, seconds=0.0, min_runs=3)  # warm-up
        times = lossless._shuffled_rounds([s for _, s in sessions], feeds, seconds)
    except runtime.RuntimeFailure as error:
        return {label: {"error": str(error)} for label in labels}
    for (label, _), samples in zip(sessions, times):
        ratio, low, high = bench.ratio_ci(times[0], samples)
        results[label] = {"runs": len(samples), "p50_ms": float(np.median(samples)),
                          "ratio": ratio, "low": low, "high": high}
    return results


def bench_model(name: str, methods: list[str], args, work: Path) -> dict:
    def say(text: str) -> None:
        stderr.print(f"[dim]{name}:[/dim] {text}", highlight=False)

    src = model_path(name)
    feeds = calib_samples(name, args.calib_samples)
    calib = write_calib(feeds, work / "calib")
    result = {"model": name, "path": lossless._rel(src), "calibration": {
        "samples": len(feeds), "file": calib.name, "note": _calib_note(name, len(feeds))},
        "fp32": {"file_mb": src.stat().st_size / 2**20}, "runs": {}}
    say("evaluating fp32")
    reference = evaluate(name, str(src), None)
    result["fp32"]["metric"] = reference["metric"]
    paths = {"fp32": str(src)}
    for method in methods:
        for tool in args.tools:
            key = f"{tool}/{method}"
            folder = work / key.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            if tool == "onnxopt-op13":
                upgraded = upgrade_to_13(src, work)
                if upgraded is None:
                    continue
                say(f"{key}: quantizing (input upgraded to opset 13 with onnx's converter)")
                row = run_onnxopt(name, upgraded, calib, method, folder, args.timeout)
            else:
                say(f"{key}: quantizing")
                row = (run_onnxopt(name, src, calib, method, folder, args.timeout,
                                   VARIANTS.get(tool, ()))
                       if tool == "onnxopt" or tool in VARIANTS
                       else run_ort(src, calib, method, folder, args.timeout, tool))
            if row.get("output"):
                row["file_mb"] = os.path.getsize(row["output"]) / 2**20
                say(f"{key}: evaluating")
                try:
                    found = evaluate(name, row["output"], reference)
                    row["metric"], row["fidelity"] = found["metric"], found["fidelity"]
                    if tool == "onnxopt" and row.get("quantized") is False:
                        row["note_float"] = "kept float: identical to fp32 up to exact rewrites"
                    paths[key] = row["output"]
                except Exception as error:  # noqa: BLE001 - a model ORT cannot run is a result
                    row["run_error"] = _line(error)
            result["runs"][key] = row
    say(f"timing {len(paths) + 1} variants interleaved, 1 thread, batch 1, {args.seconds:.0f} s")
    result["latency"] = time_variants(paths, timing_feeds(name), args.seconds)
    for row in result["runs"].values():
        row.pop("output", None)
        if not row.get("error"):
            row.pop("log_tail", None)
    return result


def upgrade_to_13(src: Path, work: Path) -> Path | None:
    """The model at opset 13 (onnx.version_converter), or None when it already is >= 13."""
    model = onnx.load(str(src))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 13:
        return None
    target = work / f"{src.stem}_opset13.onnx"
    onnx.save(onnx.version_converter.convert_version(model, 13), str(target))
    return target


def _calib_note(name: str, count: int) -> str:
    return {"digits_resnet": f"first {count} bundled samples; eval: the other 192",
            "minilm_ts": f"{count} stdlib first sentences in no eval pair (seed 2), seq 64",
            "silu_detector": f"{count} smooth random {SILU_SIZE}x{SILU_SIZE} images (seed 2, "
                             "random data); eval: 16 more (seed 1)",
            "silu_detector_w4": f"{count} smooth random {SILU_SIZE}x{SILU_SIZE} images (seed 2, "
                                "random data); eval: 16 more (seed 1)",
            }.get(name, f"eval_set({name}, seed 2): {count} samples; eval: seed 1")


def memory_scaling(counts: list[int], args, work: Path) -> list[dict]:
    """Peak RSS of each tool's calibration subprocess at each sample count (digits_resnet)."""
    rows = []
    work.mkdir(parents=True, exist_ok=True)
    for count in counts:
        calib = write_calib(memory_samples(count), work / f"mem{count}")
        for tool in ("onnxopt", "ort"):
            folder = work / f"mem{count}-{tool}"
            folder.mkdir(parents=True, exist_ok=True)
            stderr.print(f"[dim]memory:[/dim] {tool}, {count} samples", highlight=False)
            row = (run_onnxopt("digits_resnet", DIGITS, calib, "minmax", folder, args.timeout)
                   if tool == "onnxopt" else run_ort(DIGITS, calib, "minmax", folder, args.timeout))
            rows.append({"tool": tool, "samples": count, "peak_mb": row.get("peak_mb"),
                         "wall_s": row.get("wall_s"), "int8_s": row.get("int8_s"),
                         "error": row.get("error", ""), "quantized": row.get("quantized")})
    return rows


# ---------------------------------------------------------------- rendering


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _metric_cell(name: str, metric: dict | None) -> str:
    if not metric:
        return "-"
    if name == "digits_resnet":
        return f"top-1 {metric['top1']:.4f}"
    if name == "ppocr_cls":
        return f"acc {metric['accuracy']:.3f}"
    if name == "ppocr_rec":
        return f"line {metric['line_accuracy']:.3f} CER {metric['cer']:.3f}"
    if name == "ppocr_det":
        return f"box F1 {metric['f1']:.3f}"
    if "recall@1" not in metric:
        return "-"
    return f"R@1 {metric['recall@1']:.3f}"


def _agree_cell(fid: dict | None) -> str:
    if not fid:
        return "-"
    flips = f" -{fid['lost']}/+{fid['gained']}" if "lost" in fid else ""
    for key, label in (("top1_agreement", "top-1"), ("same_string", "same str"),
                       ("top1_neighbour_agreement", "NN top-1")):
        if key in fid:
            return f"{label} {fid[key]:.3f}{flips}"
    if "map_iou" not in fid:  # silu_detector: cosine only
        return "-"
    return f"IoU {fid['map_iou']:.3f} F1 {fid['box_f1_vs_fp32']:.3f}"


def _ratio_cell(entry: dict | None, control: dict | None) -> str:
    if not entry:
        return "-"
    if "error" in entry:
        return "[red]ORT fails[/red]"
    text = f"{entry['ratio']:.3f} [{entry['low']:.3f}-{entry['high']:.3f}]"
    if control and "error" not in control:
        if entry["high"] < min(1.0, control["low"]):
            return f"[green]{text}[/green]"
        if entry["low"] > max(1.0, control["high"]):
            return f"[red]{text}[/red]"
    return text


def _status(tool: str, row: dict) -> str:
    if row.get("error") or row.get("run_error"):
        return "[red]failed[/red]"
    kernels = row.get("kernels") or {}
    if tool.startswith("onnxopt") and not row.get("quantized"):
        return "[yellow]kept fp32[/yellow]"
    if not any(k.startswith(_INTEGER) for k in kernels):
        return "[red]no int8[/red]"
    return "int8 (dynamic)" if "DynamicQuantizeMatMul" in kernels else "int8"


# integer kernels in ORT's optimized graph (static QDQ fusions and dynamic int8 MatMuls)
_INTEGER = ("QLinear", "QGemm", "MatMulInteger", "DynamicQuantizeMatMul")


def _kernel_cell(row: dict) -> str:
    kernels = row.get("kernels") or {}
    if not kernels or "error" in kernels:
        return "-"
    integer = sum(v for k, v in kernels.items() if k.startswith(_INTEGER))
    left = sum(kernels.get(k, 0) for k in ("Conv", "FusedConv", "Gemm", "MatMul",
                                           "FusedMatMul"))
    return f"{integer} int / {left} fp"


def render(data: dict, console: Console) -> None:
    table = Table(title=f"int8 (static, batch 1, 1 thread; ratios vs fp32 with 95% CI) - "
                        f"{data['date']}", title_justify="left")
    for column in ("model", "tool", "status", "cos mean", "cos min", "agreement", "task metric",
                   "p50 ratio [95% CI]", "MB", "calib s", "peak MB", "ORT kernels"):
        table.add_column(column, justify="left" if column in ("model", "tool", "status",
                                                              "agreement", "task metric",
                                                              "ORT kernels") else "right")
    for result in data["models"]:
        name, latency = result["model"], result.get("latency", {})
        control = latency.get("fp32 (A/A)")
        table.add_row(name, "fp32", "", "1", "1", "", _metric_cell(name, result["fp32"].get(
            "metric")), f"A/A {_ratio_cell(control, None)}", f"{result['fp32']['file_mb']:.2f}",
            "", "", "")
        for key, row in result["runs"].items():
            fid = row.get("fidelity") or {}
            table.add_row("", key, _status(key.split("/")[0], row),
                          _fmt(fid.get("cosine_mean"), ".4f"), _fmt(fid.get("cosine_min"), ".4f"),
                          _agree_cell(fid), _metric_cell(name, row.get("metric")),
                          _ratio_cell(latency.get(key), control), _fmt(row.get("file_mb"), ".2f"),
                          _fmt(row.get("wall_s"), ".1f"), _fmt(row.get("peak_mb"), ".0f"),
                          _kernel_cell(row))
        table.add_section()
    console.print(table)
    for result in data["models"]:
        console.print(f"  {result['model']}: calibration {result['calibration']['note']} "
                      f"({result['calibration']['file']})", highlight=False, soft_wrap=True)
        for key, row in result["runs"].items():
            for field in ("error", "run_error"):
                if row.get(field):
                    console.print(f"    [red]{key} {field}:[/red] {row[field]}", highlight=False,
                                  soft_wrap=True)
            if key.startswith("onnxopt") and row.get("quantized") is False:
                console.print(f"    {key}: kept the float model; budget: {row.get('budget')}",
                              highlight=False, soft_wrap=True)
            for note in row.get("notes", []):
                if "guessed" not in note:
                    console.print(f"    {key}: {note}", highlight=False, soft_wrap=True)
            if row.get("kernel_summary"):
                console.print(f"    {key} ORT CPU kernels: {row['kernel_summary']}",
                              highlight=False, soft_wrap=True)
    if data.get("memory"):
        table = Table(title="calibration peak memory vs samples (digits_resnet, minmax; "
                            "VmHWM of the subprocess)", title_justify="left")
        for column in ("tool", *[f"{n} samples: peak MB" for n in data["settings"]["memory"]],
                       *[f"{n} samples: s" for n in data["settings"]["memory"]]):
            table.add_column(column, justify="left" if column == "tool" else "right")
        for tool in ("onnxopt", "ort"):
            rows = {r["samples"]: r for r in data["memory"] if r["tool"] == tool}
            table.add_row(tool, *[("[red]failed[/red]" if rows.get(n, {}).get("error") else
                                   _fmt(rows.get(n, {}).get("peak_mb"), ".0f"))
                                  for n in data["settings"]["memory"]],
                          *[_fmt(rows.get(n, {}).get("wall_s"), ".1f")
                            for n in data["settings"]["memory"]])
        console.print(table)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=MODELS, help=f"default: {MODELS}")
    parser.add_argument("--methods", default="minmax", help="minmax and/or entropy, e.g. "
                        "minmax,entropy (both tools run each)")
    parser.add_argument("--tools", type=lambda s: s.split(","), default=list(TOOLS),
                        help="onnxopt, ort (quantize_static as specified), ort-rr (the same "
                        "with reduce_range=True, what ORT advises on CPUs without VNNI), "
                        "ort-s8s8 (int8 activations), onnxopt variants: "
                        + ", ".join(VARIANTS))
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per model")
    parser.add_argument("--calib-samples", type=int, help="override the per-model sample count")
    parser.add_argument("--memory-samples", default="32,512",
                        help="sample counts of the memory test on digits_resnet ('none': skip)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per tool run, seconds")
    parser.add_argument("--json", default=f"benchmarks/results/int8-{today}.json")
    parser.add_argument("--keep", help="keep the quantized models and logs in this folder")
    parser.add_argument("--render", metavar="JSON", help="print the tables of a saved run")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tools if t not in (*TOOLS, "ort-s8s8", *VARIANTS)]
    if unknown:
        parser.error(f"--tools: unknown {', '.join(unknown)}")
    return args


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--ort-child":
        ort_child(*sys.argv[2:])
        return 0
    args = parse_args(argv)
    console = Console(width=max(shutil.get_terminal_size((220, 40)).columns, 220))
    if args.render:
        render(json.loads(Path(args.render).read_text()), console)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    memory = [] if args.memory_samples == "none" else [int(n) for n in
                                                        args.memory_samples.split(",")]
    data = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/int8.py", *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "vnni": _has_vnni()},
            "versions": lossless.versions(), "git": lossless.git_state(),
            "settings": {"methods": methods, "seconds": args.seconds, "memory": memory,
                         "ort": "quant_pre_process(skip_symbolic_shape=True), opset->13, "
                                "quantize_static(QDQ, per_channel, QUInt8 act, QInt8 weights, "
                                "reduce_range=False; ort-rr: True; ort-s8s8: QInt8 act)",
                         "timing": "CPU, ORT_ENABLE_ALL, 1 intra-op thread, spinning off, "
                                   "batch 1, interleaved shuffled rounds"},
            "models": [], "memory": []}
    work_root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="int8-bench-"))
    out = Path(args.json)
    try:
        bench_each(args.models, work_root, data, out,
                   lambda name, folder: bench_model(name, methods, args, folder))
        if memory:
            data["memory"] = memory_scaling(memory, args, work_root / "memory")
            lossless.write_json(data, out)
    finally:
        if not args.keep:
            shutil.rmtree(work_root, ignore_errors=True)
    render(data, console)
    console.print(f"results: {out}", highlight=False)
    return 0


def _has_vnni() -> bool | None:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return bool(flags & {"avx512_vnni", "avx_vnni", "avx512vnni"})


if __name__ == "__main__":
    sys.exit(main())
