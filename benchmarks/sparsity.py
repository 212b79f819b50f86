"""Sparsity benchmark (issue 15): what `onnxopt optimize --sparsity` costs in accuracy and buys.

    python benchmarks/sparsity.py [--models NAME ...] [--variants KEY,...] [--seconds S]
                                  [--calib-samples N] [--jobs 2] [--quick] [--keep DIR]
                                  [--json benchmarks/results/sparsity-<date>.json]
    python benchmarks/sparsity.py --render FILE.json     # reprint the tables of a saved run

Models: the embedded default (`digits_resnet`) and the real models `ppocr_det`, `ppocr_rec`,
`ppocr_cls`, `minilm_ts` (benchmarks/real_models.py; `--prepare` once). Calibration and
evaluation data are int8.py's (`calib_samples`, `write_calib`, `evaluate`, `fidelity`): disjoint
sets, the same task metrics; rec calibrates on 24 lines and det on 6 pages instead of int8's 64
and 8 (their re-fits are the slow ones; see CALIB_COUNT).

Every variant is one `onnxopt optimize IN -o OUT --calib CALIB --bench none --quiet --report
r.json [--inputs <realistic .npz>] <flags>` in a fresh subprocess (benchmarks/_run_tool.py, the
CLI's own entry point), timed as a whole (`opt s`: interpreter start included). Each run gets
`--shape` with the timing input's dims (batch 1; rec: 48 x 768, the widest line of
ppocr_rec.npz) so that MACs are counted on real sizes (PP-OCR and MiniLM have dynamic dims):

    key          flags                                                      budget
    u50          --sparsity 0.5                        (re-fitted: SparseGPT)   none
    u50-mag      --sparsity 0.5 --no-reconstruct       (magnitude)              none
    2:4          --sparsity-pattern 2:4                (re-fitted: SparseGPT)   none
    2:4-mag      --sparsity-pattern 2:4 --no-reconstruct                        none
    ch10/20/30   --sparsity-pattern channels --sparsity 0.1/0.2/0.3 (least squares) none
    ch30-mag     channels 0.3 --no-reconstruct                                  none
    ch30-l2      channels 0.3 --importance l2 (re-fitted; the default with --calib is activation) none
    u50-budget   --sparsity 0.5                        default --max-error (cosine>=0.99)
    ch30-budget  channels 0.3                          default --max-error

`--max-error none` measures the raw pruning; the two `-budget` rows show what the tool keeps when
it judges its own accuracy budget. One more run, `dense`, is the same pipeline with no pruning:
the latency baseline, so that the ratios show what pruning adds to onnxopt's exact rewrites
(the original file is timed too, as a row of its own).

Per variant: fidelity vs the original on the evaluation set (cosine mean/min of the outputs, the
model's agreement metric, samples the task metric lost/gained: int8.fidelity), the task metric;
from the report's `sparsity` section: method, verdict, achieved sparsity (share of prunable
weights zero), MACs removed (share), layers pruned, weights raw and zip bytes before/after; the
optimize wall time. Latency: p50 ratio vs `dense` (int8.time_variants: batch 1, 1 intra-op
thread, every timed file and an A/A copy of the baseline interleaved and shuffled each round in
one process, bootstrap 95% CI) for the channel variants, which remove real MACs, and `u50` as the
control: zeros change no shape, so it should stay at ~1.0.

The onnxopt runs go `--jobs` (default 2) at a time, one per core; then, alone, the evaluations
(2 threads) and the timing.

Output: one rich table per model on stdout and the JSON (written after every model) under
benchmarks/results/; `--quick` (digits_resnet; u50, u50-mag, ch30, ch30-budget; 2 s of timing)
writes to benchmarks/work/ instead.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import int8
import lossless
import real_models

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["digits_resnet", "ppocr_cls", "ppocr_rec", "ppocr_det", "minilm_ts"]
# int8.py's counts except rec and det, whose re-fits are the slow ones (one core, per variant:
# rec u50 370 s with 64 lines, 120 s with 8; det u50 145 s with 4 pages, 80 s with 2); fewer
# samples keep the default run near 25 minutes. --calib-samples N overrides them all.
CALIB_COUNT = {**int8.CALIB_COUNT, "ppocr_rec": 24, "ppocr_det": 6}
stderr = Console(stderr=True)


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str
    flags: tuple[str, ...]
    budget: str = "none"  # --max-error: "none" measures the raw pruning
    is_timed: bool = False  # latency vs dense: channels remove MACs; u50 is the ~1.0 control


_CH = ("--sparsity-pattern", "channels", "--sparsity")
VARIANTS = [
    Variant("u50", ("--sparsity", "0.5"), is_timed=True),
    Variant("u50-mag", ("--sparsity", "0.5", "--no-reconstruct")),
    Variant("2:4", ("--sparsity-pattern", "2:4")),
    Variant("2:4-mag", ("--sparsity-pattern", "2:4", "--no-reconstruct")),
    Variant("ch10", (*_CH, "0.1"), is_timed=True),
    Variant("ch20", (*_CH, "0.2"), is_timed=True),
    Variant("ch30", (*_CH, "0.3"), is_timed=True),
    Variant("ch30-mag", (*_CH, "0.3", "--no-reconstruct"), is_timed=True),
    Variant("ch30-l2", (*_CH, "0.3", "--importance", "l2"), is_timed=True),
    Variant("u50-budget", ("--sparsity", "0.5"), budget="cosine>=0.99"),
    Variant("ch30-budget", (*_CH, "0.3"), budget="cosine>=0.99", is_timed=True),
]
QUICK = ["u50", "u50-mag", "ch30", "ch30-budget"]


# ---------------------------------------------------------------- one onnxopt run


def run_variant(name: str, src: Path, calib: Path, variant: Variant | None, work: Path,
                timeout: float) -> dict:
    """`onnxopt optimize` in a fresh process (variant None: the dense pipeline, no pruning)."""
    work.mkdir(parents=True, exist_ok=True)
    out, report = work / "out.onnx", work / "report.json"
    cmd = ["onnxopt", "optimize", str(src), "-o", str(out), "--bench", "none", "--quiet",
           "--report", str(report)]
    for key, value in int8.timing_feeds(name).items():
        # the dims the MAC counts use: without them a dynamic H/W counts each Conv as 1 MAC and
        # channel pruning removes nothing (ppocr_cls: 0% at every target)
        cmd += ["--shape", f"{key}:{','.join(str(d) for d in value.shape)}"]
    if variant is not None:
        cmd += ["--calib", str(calib), *variant.flags, "--max-error", variant.budget]
    if name != "digits_resnet":  # verification of the exact passes on realistic inputs
        cmd += ["--inputs", str(real_models.inputs_path(name))]
    row = lossless.run_child(cmd, work, "onnxopt", timeout)
    row["command"] = " ".join(["onnxopt", *cmd[1:]])
    data = json.loads(report.read_text()) if report.is_file() else {}
    row["seconds"] = data.get("seconds")
    row["notes"] = data.get("notes", [])
    if variant is not None:
        row["sparsity"] = _sparsity_section(data.get("sparsity"))
    if row["exit_code"] == 1 and out.is_file() and data and not row["error"]:
        # as with --int8: a missed budget exits 1 and writes the model it kept
        row["exit_code_note"] = "exit 1: budget missed, the kept model was written"
    elif row["exit_code"] and not row["error"]:
        row["error"] = row["log_tail"] or f"exit {row['exit_code']}"
    row["output"] = str(out) if out.is_file() and not row["error"] else None
    if row["output"]:
        row["file_mb"] = out.stat().st_size / 2**20
    return row


def _sparsity_section(section: dict | None) -> dict | None:
    """The report's `sparsity` section, its per-layer list summarized (the JSON stays small)."""
    if not section:
        return None
    found = {k: v for k, v in section.items() if k != "layers"}
    layers = section.get("layers") or []
    shares = [row.get("sparsity") for row in layers if isinstance(row, dict)]
    shares = [s for s in shares if isinstance(s, (int, float))]
    found["layers_summary"] = {
        "layers": len(layers),
        "pruned": sum(1 for s in shares if s > 0),
        "reconstructed": sum(1 for row in layers if isinstance(row, dict)
                             and row.get("reconstructed")),
        "sparsity_min_median_max": ([float(np.min(shares)), float(np.median(shares)),
                                     float(np.max(shares))] if shares else None)}
    return found


# ---------------------------------------------------------------- one model


def bench_model(name: str, variants: list[Variant], args, work: Path) -> dict:
    def say(text: str) -> None:
        stderr.print(f"[dim]{name}:[/dim] {text}", highlight=False)

    src = int8.model_path(name)
    count = args.calib_samples or CALIB_COUNT[name]
    feeds = int8.calib_samples(name, count)
    calib = int8.write_calib(feeds, work / "calib")
    result = {"model": name, "path": lossless._rel(src),
              "calibration": {"samples": len(feeds), "file": calib.name,
                              "note": _calib_note(name, len(feeds))},
              "original": {"file_mb": src.stat().st_size / 2**20}, "variants": {}}
    say("evaluating the original")
    reference = int8.evaluate(name, str(src), None)
    result["original"]["metric"] = reference["metric"]
    clock = {"start": time.perf_counter()}
    rows = _run_all(name, src, calib, variants, args, work, say)
    clock["runs"] = time.perf_counter()
    dense = result["dense"] = rows.pop("dense")
    timed = {"original": str(src)}
    say("evaluating the dense pipeline and every variant")
    _evaluate_row(name, dense, reference)
    for variant in variants:
        row = result["variants"][variant.key] = rows[variant.key]
        row["flags"], row["budget"] = " ".join(variant.flags), variant.budget
        _evaluate_row(name, row, reference)
        if variant.is_timed and row.get("output") and not row.get("run_error"):
            timed[variant.key] = row["output"]
    clock["evaluation"] = time.perf_counter()
    result["latency"] = _latency(name, dense, timed, args.seconds, say)
    clock["timing"] = time.perf_counter()
    # wall time of each phase (the original's evaluation, before them, is in none)
    result["seconds"] = {phase: clock[phase] - clock[before] for before, phase in
                         (("start", "runs"), ("runs", "evaluation"), ("evaluation", "timing"))}
    for row in [dense, *result["variants"].values()]:
        row.pop("output", None)
        if not row.get("error"):
            row.pop("log_tail", None)
    return result


def _run_all(name: str, src: Path, calib: Path, variants: list[Variant], args, work: Path,
             say) -> dict[str, dict]:
    """The dense run and every variant, `args.jobs` subprocesses at a time (each runs on about
    one core; nothing else runs meanwhile: evaluation and timing come after)."""
    jobs = [("dense", None), *[(v.key, v) for v in variants]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {}
        for key, variant in jobs:
            folder = work / key.replace(":", "-")
            futures[key] = pool.submit(run_variant, name, src, calib, variant, folder,
                                       args.timeout)
        rows = {}
        for key, variant in jobs:
            rows[key] = futures[key].result()
            flags = "no pruning" if variant is None else (f"{' '.join(variant.flags)} "
                                                          f"--max-error {variant.budget}")
            say(f"{key} ({flags}): {rows[key]['wall_s']:.0f} s"
                + (f", [red]{rows[key]['error']}[/red]" if rows[key].get("error") else ""))
    return rows


def _evaluate_row(name: str, row: dict, reference: dict) -> None:
    if not row.get("output"):
        return
    try:
        found = int8.evaluate(name, row["output"], reference)
        row["metric"], row["fidelity"] = found["metric"], found["fidelity"]
    except Exception as error:  # noqa: BLE001 - a model ORT cannot run is a result
        row["run_error"] = int8._line(error)


def _latency(name: str, dense: dict, timed: dict[str, str], seconds: float, say) -> dict:
    """Ratios vs `dense` (onnxopt without pruning; the original when that run failed)."""
    baseline = dense.get("output") or timed["original"]
    paths = {"fp32": baseline, **(timed if dense.get("output") else
                                  {k: v for k, v in timed.items() if k != "original"})}
    say(f"timing {len(paths) + 1} files interleaved, 1 thread, batch 1, {seconds:.0f} s")
    found = int8.time_variants(paths, int8.timing_feeds(name), seconds)
    rename = {"fp32": "dense", "fp32 (A/A)": "dense (A/A)"}
    latency = {rename.get(k, k): v for k, v in found.items()}
    latency["baseline"] = "dense" if dense.get("output") else "original (dense run failed)"
    return latency


def _calib_note(name: str, count: int) -> str:
    note = int8._calib_note(name, count)
    if count < int8.CALIB_COUNT[name]:
        note += f" (int8.py uses {int8.CALIB_COUNT[name]}; fewer here for the re-fits' time)"
    return note


# ---------------------------------------------------------------- rendering


def _pct(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"


def _mb_pair(pair) -> str:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return "-"
    return f"{pair[0] / 2**20:.2f} -> {pair[1] / 2**20:.2f}"


def _status(row: dict) -> str:
    if row.get("error") or row.get("run_error"):
        return "[red]failed[/red]"
    section = row.get("sparsity") or {}
    if section and not section.get("method"):
        return "[yellow]kept dense[/yellow]"  # the budget was missed at every level tried
    return f"{section.get('method') or '-'} / {section.get('verdict') or '-'}"


def render(data: dict, console: Console) -> None:
    for result in data["models"]:
        render_model(result, data["date"], console)


def render_model(result: dict, date: str, console: Console) -> None:
    name, latency = result["model"], result.get("latency", {})
    control = latency.get("dense (A/A)")
    table = Table(title=f"{name}: sparsity (fidelity vs the original; latency = p50 ratio vs "
                        f"{latency.get('baseline', 'dense')}, batch 1, 1 thread, 95% CI) - "
                        f"{date}", title_justify="left")
    for column in ("variant", "method / verdict", "sparsity", "MACs rm", "cos mean", "cos min",
                   "agreement", "task metric", "p50 ratio [95% CI]", "weights MB",
                   "zip MB", "opt s"):
        table.add_column(column, justify="left" if column in (
            "variant", "method / verdict", "agreement", "task metric") else "right")
    original = result["original"]
    table.add_row("original", "", "", "", "1", "1", "", int8._metric_cell(
        name, original.get("metric")), int8._ratio_cell(latency.get("original"), control),
        f"{original['file_mb']:.2f} (file)", "", "")
    dense = result.get("dense") or {}
    fid = dense.get("fidelity") or {}
    table.add_row("dense", "[red]failed[/red]" if dense.get("error") else "exact rewrites",
                  "", "", int8._fmt(fid.get("cosine_mean"), ".4f"),
                  int8._fmt(fid.get("cosine_min"), ".4f"), int8._agree_cell(fid),
                  int8._metric_cell(name, dense.get("metric")),
                  f"A/A {int8._ratio_cell(control, None)}",
                  int8._fmt(dense.get("file_mb"), ".2f") + " (file)", "",
                  int8._fmt(dense.get("wall_s"), ".1f"))
    table.add_section()
    for key, row in result["variants"].items():
        section, fid = row.get("sparsity") or {}, row.get("fidelity") or {}
        table.add_row(key, _status(row), _pct(section.get("sparsity")),
                      _pct(section.get("macs_removed")), int8._fmt(fid.get("cosine_mean"), ".4f"),
                      int8._fmt(fid.get("cosine_min"), ".4f"), int8._agree_cell(fid),
                      int8._metric_cell(name, row.get("metric")),
                      int8._ratio_cell(latency.get(key), control),
                      _mb_pair(section.get("weights_raw_bytes")),
                      _mb_pair(section.get("weights_zip_bytes")),
                      int8._fmt(row.get("wall_s"), ".1f"))
    console.print(table)
    _render_notes(result, console)


# notes every run carries with these settings: we pass --bench none and time the files ourselves
_QUIET_NOTES = ("verification and timing inputs", "latency was not measured")


def _render_notes(result: dict, console: Console) -> None:
    def say(text: str) -> None:
        console.print(f"  {text}", highlight=False, soft_wrap=True)

    say(f"calibration: {result['calibration']['note']} ({result['calibration']['file']})")
    shared: dict[str, list[str]] = {}  # a note several variants share, printed once
    for key, row in [("dense", result.get("dense") or {}), *result["variants"].items()]:
        for field in ("error", "run_error"):
            if row.get(field):
                say(f"[red]{key} {field}:[/red] {row[field]}")
                say(f"  command: {row.get('command')}")
        if row.get("exit_code_note"):
            say(f"{key}: {row['exit_code_note']}")
        section = row.get("sparsity") or {}
        if row.get("budget") not in (None, "none"):
            say(f"{key}: --max-error {row['budget']}: {section.get('budget')}")
        for note in [section.get("note"), *row.get("notes", [])]:
            if note and not note.startswith(_QUIET_NOTES) and "guessed as" not in note:
                shared.setdefault(note, []).append(key)
    for note, keys in shared.items():
        say(f"{', '.join(keys)}: {note}")


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help=f"default: {MODELS}")
    parser.add_argument("--variants", type=lambda s: s.split(","),
                        help="comma-separated keys, default all: "
                             + ",".join(v.key for v in VARIANTS))
    parser.add_argument("--seconds", type=float, help="timing budget per model (default 10; "
                        "--quick 2)")
    parser.add_argument("--calib-samples", type=int, help="override the per-model sample count")
    parser.add_argument("--timeout", type=float, default=900.0, help="per onnxopt run, seconds")
    parser.add_argument("--jobs", type=int, default=2, help="onnxopt runs at a time (default 2, "
                        "one per core: `opt s` is then measured beside another run; 1 for "
                        "clean times)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits_resnet, " + ", ".join(QUICK) + "; 2 s timing")
    parser.add_argument("--json", help=f"default: benchmarks/results/sparsity-{today}.json "
                        f"(--quick: benchmarks/work/sparsity-quick-{today}.json)")
    parser.add_argument("--keep", help="keep the pruned models and logs in this folder")
    parser.add_argument("--render", metavar="JSON", help="print the tables of a saved run")
    args = parser.parse_args(argv)
    args.models = args.models or (["digits_resnet"] if args.quick else MODELS)
    args.variants = args.variants or (QUICK if args.quick else [v.key for v in VARIANTS])
    unknown = [k for k in args.variants if k not in {v.key for v in VARIANTS}]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}")
    args.seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 10.0)
    args.json = args.json or (f"benchmarks/work/sparsity-quick-{today}.json" if args.quick
                              else f"benchmarks/results/sparsity-{today}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(width=max(shutil.get_terminal_size((200, 40)).columns, 200))
    if args.render:
        render(json.loads(Path(args.render).read_text()), console)
        return 0
    variants = [v for v in VARIANTS if v.key in args.variants]
    data = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/sparsity.py", *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count()},
            "versions": lossless.versions(), "git": lossless.git_state(),
            "settings": {"seconds": args.seconds, "jobs": args.jobs, "calib_samples": {
                name: args.calib_samples or CALIB_COUNT[name] for name in args.models},
                "variants": {v.key: {"flags": " ".join(v.flags), "max_error": v.budget,
                                     "timed": v.is_timed} for v in variants},
                "common_flags": "--calib CALIB --bench none --quiet --report r.json "
                                "[--inputs <model's realistic .npz>]",
                "timing": "CPU, ORT_ENABLE_ALL, 1 intra-op thread, spinning off, batch 1, "
                          "interleaved shuffled rounds; ratios vs onnxopt's dense pipeline"},
            "models": []}
    started = time.perf_counter()
    work_root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sparsity-"))
    out = Path(args.json)
    def run(name: str, folder: Path) -> dict:
        result = bench_model(name, variants, args, folder)
        render_model(result, data["date"], console)
        return result

    try:
        int8.bench_each(args.models, work_root, data, out, run)
    finally:
        if not args.keep:
            shutil.rmtree(work_root, ignore_errors=True)
    data["seconds_total"] = time.perf_counter() - started
    lossless.write_json(data, out)
    console.print(f"results: {out} ({data['seconds_total'] / 60:.1f} min)", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
