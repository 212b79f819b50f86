"""Run one peer optimizer on one model, in its own process (so its wall time and peak RSS are its own).

    python benchmarks/_run_tool.py TOOL IN.onnx OUT.onnx RESULT.json

TOOL is onnxsim, onnxslim or onnxoptimizer (onnxopt runs through its own CLI). RESULT.json gets
{"seconds": time of load + optimize + save, "error": one line or "", "detail": {...}}; the
process exits 0 even when the tool fails, so the caller reads the outcome from RESULT.json.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import onnx


def _onnxsim(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    import onnxsim

    simplified, check_ok = onnxsim.simplify(model)  # defaults, as `onnxsim IN OUT` runs it
    return simplified, {"onnxsim_check_ok": bool(check_ok)}


def _onnxslim(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    import onnxslim

    return onnxslim.slim(model), {}


def _onnxoptimizer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    import onnxoptimizer

    # Its default list (fuse and elimination passes) already holds fuse_bn_into_conv in 0.4;
    # add it explicitly so older releases fold batch norms too.
    passes = list(onnxoptimizer.get_fuse_and_elimination_passes())
    if "fuse_bn_into_conv" not in passes:
        passes.append("fuse_bn_into_conv")
    return onnxoptimizer.optimize(model, passes), {"passes": len(passes)}


TOOLS = {"onnxsim": _onnxsim, "onnxslim": _onnxslim, "onnxoptimizer": _onnxoptimizer}


def main(tool: str, src: str, dst: str, result_path: str) -> None:
    start = time.perf_counter()
    result: dict = {"error": "", "detail": {}}
    try:
        model, detail = TOOLS[tool](onnx.load(src))
        onnx.save(model, dst)
        result["detail"] = detail
    except BaseException as error:  # report every failure, including SystemExit from a library
        lines = str(error).strip().splitlines()
        result["error"] = f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]
        traceback.print_exc()
    result["seconds"] = time.perf_counter() - start
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(*sys.argv[1:5])
