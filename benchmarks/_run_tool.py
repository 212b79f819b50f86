"""Run one optimizer on one model in its own process, so its time and peak memory are its own.

    python benchmarks/_run_tool.py RESULT.json onnxsim|onnxslim|onnxoptimizer IN.onnx OUT.onnx
    python benchmarks/_run_tool.py RESULT.json onnxconverter-fp16 IN.onnx OUT.onnx
    python benchmarks/_run_tool.py RESULT.json ort-quantize-dynamic IN.onnx OUT.onnx
    python benchmarks/_run_tool.py RESULT.json ort-quantize-static IN.onnx OUT.onnx CALIB.npz
    python benchmarks/_run_tool.py RESULT.json onnxopt optimize IN.onnx -o OUT.onnx ...

`onnxopt` runs the real CLI entry point (`onnxopt.cli.main`, what the console script calls) with
those arguments. RESULT.json gets {"seconds": load + optimize + save, "error": one line or "",
"exit_code", "peak_rss_mb", "detail"}. Peak RSS is VmHWM from /proc/self/status, read at the end:
the high-water mark of this program's own address space. (The rusage `ru_maxrss` of a child is
no good here: Linux carries the parent's RSS across fork/vfork + exec into it.)
"""

from __future__ import annotations

import json
import os
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


def _onnxconverter_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    from onnxconverter_common import float16

    # keep_io_types: float32 inputs and outputs, as onnxopt --fp16 keeps them by default
    return float16.convert_float_to_float16(model, keep_io_types=True), {}


TOOLS = {"onnxsim": _onnxsim, "onnxslim": _onnxslim, "onnxoptimizer": _onnxoptimizer,
         "onnxconverter-fp16": _onnxconverter_fp16}


def _ort_quantize_static(src: str, dst: str, calib: str) -> None:
    """ONNX Runtime's quantize_static as its docs show it, QDQ with per-channel weights (as
    onnxopt's), fed the samples of CALIB.npz (one array per input, samples on the first axis)
    one at a time; by path, reading and writing external data itself."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            with np.load(calib) as data:
                arrays = {name: data[name] for name in data.files}
            count = len(next(iter(arrays.values())))
            self.samples = iter([{n: a[i] for n, a in arrays.items()} for i in range(count)])

        def get_next(self):
            return next(self.samples, None)

    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    use_external_data_format=True)


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _save(model: onnx.ModelProto, dst: str) -> None:
    """Past protobuf's 2 GiB a model must keep its weights in an external file."""
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights < (1 << 31) - (1 << 27):
        onnx.save(model, dst)
    else:
        onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(dst) + ".data")


def _run_onnxopt_cli(args: list[str]) -> int:
    from onnxopt import cli

    sys.argv = ["onnxopt", *args]
    try:
        cli.main()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    return 0


def main(result_path: str, tool: str, *args: str) -> None:
    start = time.perf_counter()
    result: dict = {"error": "", "detail": {}, "exit_code": 0}
    try:
        if tool == "onnxopt":
            result["exit_code"] = _run_onnxopt_cli(list(args))
        elif tool == "ort-quantize-dynamic":  # by path: it reads and writes external data itself
            from onnxruntime.quantization import quantize_dynamic

            src, dst = args
            quantize_dynamic(src, dst, use_external_data_format=True)
        elif tool == "ort-quantize-static":
            _ort_quantize_static(*args)
        else:
            src, dst = args
            model, detail = TOOLS[tool](onnx.load(src))
            _save(model, dst)
            result["detail"] = detail
    except BaseException as error:  # report every failure, including SystemExit from a library
        lines = str(error).strip().splitlines()
        result["error"] = f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]
        result["exit_code"] = 1
        traceback.print_exc()
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = _peak_rss_mb()
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
