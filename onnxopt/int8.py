"""`--int8`: calibrate, insert QDQ, hold the accuracy budget, count the integer kernels ORT runs.

Steps, on the model the exact passes produced:
  1. calibration data (`--calib`): batches are split 80/20; the first part is reduced batch by
     batch into streamed histograms of every tensor the pass will quantize, the held-out part
     judges the result;
  2. ranges per tensor by `--calib-method` (minmax, percentile, entropy, mse);
  3. the quantize-int8 pass (per-channel int8 weights, uint8 activations, QDQ that ORT's CPU
     provider fuses), after an opset upgrade to 13 when the model is older;
  4. the budget (`--max-error`, default cosine >= 0.99 on every output) on the held-out batches:
     a quantized model that misses it is not kept; the float model is, and the report says why;
  5. ORT loads the result with all optimizations and the kernels it really runs are counted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable

import onnx_ir as ir

from onnxopt import calibrate, pipeline, verify
from onnxopt.errors import BadInputError

__all__ = ["Int8Options", "Int8Result", "Budget", "parse_budget", "quantize",
           "integer_kernel_summary"]

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
_HELD_OUT = 0.2


@dataclasses.dataclass(frozen=True)
class Budget:
    """What int8 may cost, per output vs fp32: cosine >= x and/or SQNR >= y dB (None: no bound)."""

    min_cosine: float | None = 0.99  # conservative: `--int8` alone must never wreck a model
    min_sqnr_db: float | None = None

    def holds(self, errors: list[verify.OutputError]) -> tuple[bool, str]:
        for out in errors:
            if self.min_cosine is not None and not out.cosine >= self.min_cosine:
                return False, f"{out.name}: cosine {out.cosine:.4f} < {self.min_cosine}"
            if self.min_sqnr_db is not None and not out.sqnr_db >= self.min_sqnr_db:
                return False, f"{out.name}: SQNR {out.sqnr_db:.1f} dB < {self.min_sqnr_db}"
        return True, ""


def parse_budget(text: str) -> Budget:
    """`cosine>=0.99`, `sqnr>=30`, both joined by `,`, or `none`."""
    if text.strip().lower() == "none":
        return Budget(None, None)
    fields: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(cosine|sqnr)\s*>=\s*([0-9.eE+-]+)", part.lower())
        if not match:
            raise BadInputError(f"--max-error {text!r}: expected cosine>=0.99, sqnr>=30, "
                                "both (comma-separated) or none")
        fields["min_cosine" if match[1] == "cosine" else "min_sqnr_db"] = float(match[2])
    return Budget(fields.get("min_cosine"), fields.get("min_sqnr_db"))


@dataclasses.dataclass(frozen=True)
class Int8Options:
    calib: str | None = None  # .npz, folder of .npy/.npz/images, or "random"
    calib_method: str = "minmax"
    calib_samples: int | None = None
    preprocess: str | None = None  # for image folders
    budget: Budget = Budget()
    shapes: dict = dataclasses.field(default_factory=dict)
    # 7-bit weights: None = decide by the CPU (x86 without VNNI saturates VPMADDUBSW's int16
    # pair sums with full 8-bit weights; measured on the default model: top-1 98.4% -> 93.8%).
    reduce_range: bool | None = None


@dataclasses.dataclass
class Int8Result:
    model: ir.Model  # the quantized model, or the float one when the budget was missed
    is_quantized: bool
    verification: verify.Verification  # held-out batches, budget as the tolerance
    kernels: dict[str, int]  # ORT's optimized graph: op type -> count
    calibration_batches: int
    log: list[str]
    counts: dict[str, int]


def quantize(
    model: ir.Model,
    options: Int8Options,
    notes: list[str],
    *,
    progress: Callable[[str], None] | None = None,
) -> Int8Result:
    say = progress or (lambda _: None)
    if options.calib is None:
        raise BadInputError("--int8 needs calibration data for now: --calib DATA (an .npz, a "
                            "folder of .npy/.npz or images with --preprocess), or --calib random")
    if options.calib_method not in METHODS:
        raise BadInputError(f"--calib-method {options.calib_method!r}: choose from {', '.join(METHODS)}")
    from onnxopt.passes import quantize_int8  # passes import onnxopt modules: import late
    data = calibrate.calibration_data(options.calib, model, preprocess=options.preprocess,
                                      samples=options.calib_samples, shapes=options.shapes)
    notes.extend(data.notes)
    batches = list(data)  # one batch at a time below; the list holds the feeds, not activations
    held = max(1, math.floor(len(batches) * _HELD_OUT)) if len(batches) > 1 else 0
    calib_batches, check_batches = batches[:len(batches) - held], batches[len(batches) - held:]
    if not check_batches:
        check_batches = calib_batches
        notes.append("one calibration batch: the accuracy budget is judged on the same batch")
    say(f"calibrating on {len(calib_batches)} batches")
    tensors = quantize_int8.quantizable_tensors(model)
    stats = calibrate.collect_stats(model, calib_batches, tensors)
    ranges = {name: _range(s, options.calib_method) for name, s in stats.items()}
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    quantized = model.clone()
    if opset < quantize_int8.QuantizeInt8Pass.min_opset:
        quantized = pipeline.upgrade_opset(quantized, quantize_int8.QuantizeInt8Pass.min_opset)
        notes.append(f"upgraded opset {opset} -> 13 with onnx's version converter "
                     "(per-channel DequantizeLinear needs its axis attribute)")
    say("inserting QDQ")
    reduce_range = options.reduce_range
    if reduce_range is None:
        reduce_range = quantize_int8.cpu_needs_reduce_range()
        if reduce_range:
            notes.append("this CPU has no VNNI: 7-bit weights (reduce_range) avoid int16 "
                         "saturation in ORT's uint8 x int8 kernels")
    pass_report = quantize_int8.QuantizeInt8Pass(
        quantize_int8.QuantizeInt8Options(ranges=ranges, reduce_range=reduce_range))(quantized)
    say("checking the accuracy budget")
    reference = verify.reference_outputs(model, check_batches)
    loose = verify.Tolerance(elementwise=False)
    checked = verify.verify(pass_report.model, reference, check_batches, loose)
    holds, why = options.budget.holds(checked.outputs) if checked.outputs else (False, checked.reason)
    checked.status = "passed" if holds else "failed"
    checked.reason = why
    kernels = quantize_int8.ort_kernel_counts(ir.to_proto(pass_report.model).SerializeToString())
    if not holds:
        notes.append(f"int8 missed the accuracy budget ({why}); kept the float model")
        return Int8Result(model, False, checked, kernels, len(calib_batches), pass_report.log,
                          dict(pass_report.counts))
    return Int8Result(pass_report.model, True, checked, kernels, len(calib_batches),
                      pass_report.log, dict(pass_report.counts))


def _range(stats, method: str) -> tuple[float, float]:
    if method == "minmax":
        return stats.range_minmax()
    if method == "percentile":
        return stats.range_percentile()
    if method == "entropy":
        return stats.range_entropy()
    return stats.range_mse(symmetric=False)


def integer_kernel_summary(kernels: dict[str, int]) -> str:
    """`QLinearConv 16, QGemm 1; float Conv 0, MatMul 0`."""
    integer = {k: v for k, v in kernels.items() if k.startswith(("QLinear", "QGemm", "MatMulInteger",
                                                                   "ConvInteger", "DynamicQuantize"))}
    floats = {k: kernels.get(k, 0) for k in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul")}
    left = ", ".join(f"{k} {v}" for k, v in floats.items() if v)
    return (", ".join(f"{k} {v}" for k, v in sorted(integer.items())) or "no integer kernels") + (
        f"; float left: {left}" if left else "; no float Conv/Gemm/MatMul left")

