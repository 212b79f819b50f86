"""Scale: a multi-GB model through onnxopt and its peers, time and peak memory side by side.

    python benchmarks/scale.py                         # ~2.4 GB MLP, 9 runs, ~8 min on 2 cores
    python benchmarks/scale.py --blocks 12 --ffn 24576 # ~4.8 GB

Builds an MLP with external data (`--blocks` blocks of MatMul+Add+Relu+MatMul+Add, hidden
`--hidden`, feed-forward `--ffn`, float32 weights drawn with numpy's fixed seed 0, announced),
then runs each tool in its own process (benchmarks/_run_tool.py: wall time, and peak RSS as the
process's VmHWM) one after another: onnxopt's exact pipeline, --int8 (calibration-free,
dynamic: its accuracy budget and speed check) and --fp16 (judged by emulation without a GPU),
each with --no-verify and verified, and static --int8 --calib (verified); onnx-simplifier, ONNX
Runtime's quantize_dynamic and quantize_static (the same calibration file: random samples,
numpy seed 1, announced) and onnxconverter-common's float16 conversion (keep_io_types). Ratios are against the model's
weight bytes. Issue 16's targets: peak RSS <= 0.5x the model with --no-verify and <= 1.2x with
verification, >= 3x faster than onnx-simplifier. The disk is synced before each run. Results:
benchmarks/results/scale-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "onnxopt lossless --no-verify": ["onnxopt", "optimize", "{src}", "-o", "{dst}", "--bench",
                                     "none", "-q", "--no-verify"],
    "onnxopt lossless (verified)": ["onnxopt", "optimize", "{src}", "-o", "{dst}", "--bench",
                                    "none", "-q"],
    "onnxopt --int8 --no-verify": ["onnxopt", "optimize", "{src}", "-o", "{dst}", "--bench",
                                   "none", "-q", "--int8", "--no-verify"],
    "onnxopt --int8 (verified)": ["onnxopt", "optimize", "{src}", "-o", "{dst}", "--bench",
                                  "none", "-q", "--int8"],
    "onnxopt --fp16 --no-verify": ["onnxopt", "optimize", "{src}", "-o", "{dst}", "--bench",
                                   "none", "-q", "--fp16", "--no-verify"],
    "onnxopt --fp16 (verified)": ["onnxopt", "optimize", "{src}", "-o", "{dst}", "--bench",
                                  "none", "-q", "--fp16"],
    "onnxopt --int8 --calib (verified)": ["onnxopt", "optimize", "{src}", "-o", "{dst}",
                                                  "--bench", "none", "-q", "--int8",
                                                  "--calib", "{calib}"],
    "onnx-simplifier": ["onnxsim", "{src}", "{dst}"],
    "ORT quantize_static": ["ort-quantize-static", "{src}", "{dst}", "{calib}"],
    "ORT quantize_dynamic": ["ort-quantize-dynamic", "{src}", "{dst}"],
    "onnxconverter-common fp16": ["onnxconverter-fp16", "{src}", "{dst}"],
}


def build(path: Path, blocks: int, hidden: int, ffn: int) -> int:
    """The MLP, written tensor by tensor into one external-data file; returns weight bytes."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    data = path.with_name(path.name + ".data")
    nodes, inits, offset, x = [], [], 0, "x"
    with open(data, "wb") as sink:
        def weight(name, shape):
            nonlocal offset
            array = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
            sink.write(array.tobytes())
            tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)),
                               ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += array.nbytes
            inits.append(tensor)

        for b in range(blocks):
            weight(f"w1_{b}", (hidden, ffn))
            weight(f"b1_{b}", (ffn,))
            weight(f"w2_{b}", (ffn, hidden))
            weight(f"b2_{b}", (hidden,))
            nodes += [helper.make_node("MatMul", [x, f"w1_{b}"], [f"h{b}"]),
                      helper.make_node("Add", [f"h{b}", f"b1_{b}"], [f"a{b}"]),
                      helper.make_node("Relu", [f"a{b}"], [f"r{b}"]),
                      helper.make_node("MatMul", [f"r{b}", f"w2_{b}"], [f"m{b}"]),
                      helper.make_node("Add", [f"m{b}", f"b2_{b}"], [f"y{b}"])]
            x = f"y{b}"
    graph = helper.make_graph(
        nodes, "scale_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 16, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return offset


CALIBRATION_SAMPLES = 16


def write_calibration(path: Path, hidden: int) -> None:
    """Static int8's calibration samples, the same file for onnxopt and ONNX Runtime: random
    normal inputs (numpy seed 1, announced), x [CALIBRATION_SAMPLES, 1, 16, hidden]."""
    print(f"calibration: {CALIBRATION_SAMPLES} RANDOM samples (numpy seed 1)", flush=True)
    rng = np.random.default_rng(1)
    np.savez(path, x=rng.standard_normal((CALIBRATION_SAMPLES, 1, 16, hidden), dtype=np.float32))


def run(argv: list[str], src: Path, work: Path) -> dict:
    """One tool in its own process (lossless.run_child): its seconds, peak RSS, output size."""
    from lossless import run_child  # beside this script

    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    # The last tool's GBs of output are written back to disk before the next one starts, so no
    # tool is timed against another's writeback.
    os.sync()
    row = run_child([a.format(src=src, dst=out / "model.onnx", calib=work / "calib.npz")
                     for a in argv], work, "tool", timeout=3600)
    return {"seconds": row["tool_s"], "peak_rss_mb": row["peak_mb"],
            "exit_code": row["exit_code"], "error": row["error"],
            "output_mb": round(sum(p.stat().st_size for p in out.iterdir()) / 1e6, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=12288)
    parser.add_argument("--runs", help="comma-separated subset of: " + ", ".join(RUNS))
    parser.add_argument("--work", help="folder for the model and outputs (default: a temp dir)")
    parser.add_argument("--json", help="default: benchmarks/results/scale-DATE.json")
    args = parser.parse_args(argv)
    chosen = [r.strip() for r in args.runs.split(",")] if args.runs else list(RUNS)
    work = Path(args.work or tempfile.mkdtemp(prefix="onnxopt-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "mlp.onnx"
    print(f"building {src} (random weights, numpy seed 0) ...", flush=True)
    weight_bytes = build(src, args.blocks, args.hidden, args.ffn)
    model_mb = weight_bytes / 1e6
    write_calibration(work / "calib.npz", args.hidden)
    print(f"model: {model_mb:.0f} MB of weights", flush=True)
    results = {}
    for name in chosen:
        print(f"{name} ...", flush=True)
        result = run(RUNS[name], src, work)
        result["rss_vs_model"] = (round(result["peak_rss_mb"] * 1e6 / weight_bytes, 3)
                                  if result.get("peak_rss_mb") else None)
        results[name] = result
        print(f"  {result.get('seconds', 0):.1f} s, peak RSS {result.get('peak_rss_mb') or 0:.0f} MB "
              f"({result['rss_vs_model']}x the model), exit {result.get('exit_code')} "
              f"{result.get('error', '')}", flush=True)
    simplifier = results.get("onnx-simplifier", {}).get("seconds")
    for result in results.values():
        if simplifier and result.get("seconds") and result.get("exit_code") == 0:
            result["speedup_vs_onnxsim"] = round(simplifier / result["seconds"], 2)
    today = datetime.date.today().isoformat()
    target = Path(args.json or ROOT / "benchmarks" / "results" / f"scale-{today}.json")
    from lossless import git_state, versions  # beside this script

    target.write_text(json.dumps({
        "date": today, "command": " ".join(["python", *sys.argv]),
        "versions": versions(), "git": git_state(),
        "model": {"blocks": args.blocks, "hidden": args.hidden, "ffn": args.ffn,
                  "weight_mb": round(model_mb, 1)},
        "results": results}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"written: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
