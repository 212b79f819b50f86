"""The whole benchmark suite in one command.

    python benchmarks/run_all.py            # full: ~9 min on 2 cores
    python benchmarks/run_all.py --quick    # smoke run: default model + ppocr_cls, ~30 s

1. benchmarks/real_models.py --prepare: exports MiniLM (TorchScript + dynamo, checked against
   torch) and writes the realistic-input .npz files, once; both are cached in benchmarks/work/.
2. benchmarks/real_models.py --metrics: the task metrics of the original real models (rec line
   accuracy / CER, cls accuracy, MiniLM next-sentence recall@1 / MRR) -> `metrics` in the JSON.
3. benchmarks/lossless.py on the embedded default model and the real models (PP-OCR det, rec,
   cls; MiniLM TorchScript and dynamo): onnxopt against onnxsim, onnxslim and onnxoptimizer.
4. repeatability of `onnxopt bench`: the embedded default against itself, 1 thread, 20 s
   (p50 ratio and its 95% CI: within 3% of 1.0 and containing it on an idle machine).
5. benchmarks/int8.py: static int8, onnxopt --int8 against ONNX Runtime's quantize_static on the
   default model and PP-OCR cls/rec/det + MiniLM (ts), calibration memory at 32/512 samples;
   its own JSON: benchmarks/results/int8-<date>.json (--quick: default + cls, in benchmarks/work/).
6. benchmarks/transfer.py (full run only): `onnxopt transfer` of MiniLM between its TorchScript
   and dynamo exports, both ways; its own JSON: benchmarks/results/transfer-<date>.json.

Full run: JSON in benchmarks/results/suite-<date>.json (lossless.py's format plus `metrics` and
`suite`), the printed tables in benchmarks/results/suite-<date>.txt. --quick writes to
benchmarks/work/ instead (a smoke run is nothing to commit). `--render FILE.json` reprints tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FULL_MODELS = ["digits_resnet", "ppocr_det", "ppocr_rec", "ppocr_cls", "minilm_ts",
               "minilm_dynamo"]
QUICK_MODELS = ["digits_resnet", "ppocr_cls"]


def run(cmd: list[str], log) -> int:
    """Run a step, echoing its output to the terminal and to the log."""
    print(f"$ {' '.join(cmd)}", flush=True)
    log.write(f"$ {' '.join(cmd)}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "COLUMNS": os.environ.get("COLUMNS", "220")}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
    log.flush()
    return proc.wait()


def main(argv=None) -> int:
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: default model + ppocr_cls, 1 s of timing per shape")
    parser.add_argument("--json", help="result file (default: benchmarks/results/suite-<date>"
                        ".json, --quick: benchmarks/work/suite-quick-<date>.json)")
    parser.add_argument("--render", metavar="JSON", help="reprint the tables of a saved run")
    args = parser.parse_args(argv)
    python = sys.executable
    if args.render:
        return subprocess.call([python, str(HERE / "lossless.py"), "--render", args.render],
                               cwd=ROOT)
    models = QUICK_MODELS if args.quick else FULL_MODELS
    default = (f"benchmarks/work/suite-quick-{today}.json" if args.quick
               else f"benchmarks/results/suite-{today}.json")
    out = Path(args.json or default)
    out = out if out.is_absolute() else ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics_file = ROOT / "benchmarks" / "work" / f"metrics-{today}.json"
    real = [m for m in models if m != "digits_resnet"]
    lossless = [python, "benchmarks/lossless.py", "--models", *models, "--json", str(out)]
    lossless += ["--seconds", "1", "--threads", "1,2"] if args.quick else []
    repeat_file = out.with_name(out.stem + "-bench-repeat.json")
    default_model = str(ROOT / "onnxopt" / "data" / "digits_resnet.onnx")
    repeat = [python, "-m", "onnxopt", "bench", default_model, default_model, "--threads", "1",
              "--time", "5" if args.quick else "20", "--no-placement", "--json", str(repeat_file)]
    int8_file = (ROOT / "benchmarks" / "work" / f"int8-quick-{today}.json" if args.quick
                 else ROOT / "benchmarks" / "results" / f"int8-{today}.json")
    int8 = [python, "benchmarks/int8.py", "--json", str(int8_file)]
    int8 += (["--models", *QUICK_MODELS, "--seconds", "2", "--memory-samples", "none"]
             if args.quick else [])
    start = time.perf_counter()
    steps = {}
    with open(out.with_suffix(".txt"), "w") as log:
        for name, cmd in (
            ("prepare", [python, "benchmarks/real_models.py", "--prepare", *real]),
            ("metrics", [python, "benchmarks/real_models.py", "--metrics", *real, "--json",
                         str(metrics_file)]),
            ("lossless", lossless),
            ("bench repeatability", repeat),
            ("int8", int8),
            *([] if args.quick else [("transfer", [python, "benchmarks/transfer.py"])]),
        ):
            mark = time.perf_counter()
            code = run(cmd, log)
            steps[name] = {"exit_code": code, "seconds": round(time.perf_counter() - mark, 1)}
            if code and name == "prepare":
                print(f"{name} failed (exit {code}); lossless.py runs the models it can",
                      flush=True)
        total = time.perf_counter() - start
        summary = f"suite: {total / 60:.1f} min; " + ", ".join(
            f"{k} {v['seconds']:.0f} s (exit {v['exit_code']})" for k, v in steps.items())
        print(summary)
        log.write(summary + "\n")
    if out.is_file():
        data = json.loads(out.read_text())
        data["suite"] = {"command": " ".join(["python", "benchmarks/run_all.py", *sys.argv[1:]]),
                         "quick": args.quick, "models": models, "steps": steps,
                         "minutes": round(total / 60, 2)}
        if metrics_file.is_file():
            data["metrics"] = json.loads(metrics_file.read_text())
        if repeat_file.is_file():
            rows = json.loads(repeat_file.read_text())["rows"]
            ratio, low, high = rows[1]["ratio"]
            data["bench_repeatability"] = {"model": "digits_resnet vs itself", "ratio": ratio,
                                           "ci95": [low, high], "runs": rows[1]["latency"]["runs"]}
            print(f"bench repeatability: p50 ratio {ratio:.3f} [{low:.3f}-{high:.3f}]")
        exports = {}
        for name in real:
            info = ROOT / "benchmarks" / "work" / f"{name}.export.json"
            if info.is_file():
                exports[name] = json.loads(info.read_text())
        if exports:
            data["minilm_exports"] = exports
        if int8_file.is_file():
            data["int8"] = {"results": str(int8_file.relative_to(ROOT))}
        out.write_text(json.dumps(data, indent=1))
        print(f"results: {out.relative_to(ROOT)} (tables: {out.with_suffix('.txt').relative_to(ROOT)})")
    return max(v["exit_code"] for v in steps.values())


if __name__ == "__main__":
    sys.exit(main())
