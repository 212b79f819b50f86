"""What `--int8` takes (Int8Options) and gives (Int8Result), shared by the static and the
dynamic path."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxopt.errors import BadInputError
from onnxopt.measure import verify
from onnxopt.passes._graph import matching_node_names
from onnxopt.quant.budget import Budget, Outcome

__all__ = ["CLIP_WEIGHTS", "METHODS", "MODES", "TARGETS", "Int8Options", "Int8Result",
           "check_choices", "keep_float_names", "kept_float"]

METHODS = ("minmax", "percentile", "entropy", "mse")
MODES = ("auto", "static", "dynamic")
TARGETS = ("ort-cpu", "ort-cuda", "tensorrt")
CLIP_WEIGHTS = ("max", "mse", "percentile")


@dataclasses.dataclass(frozen=True)
class Int8Options:
    calib: str | None = None  # .npz, folder of .npy/.npz/images, or "random"
    calib_method: str = "minmax"
    calib_samples: int | None = None
    preprocess: str | None = None  # for image folders
    budget: Budget = dataclasses.field(default_factory=Budget)
    shapes: dict = dataclasses.field(default_factory=dict)
    # 7-bit weights: None = decide by the CPU (x86 without VNNI saturates VPMADDUBSW's int16
    # pair sums with full 8-bit weights; measured on the default model: top-1 98.4% -> 93.8%).
    reduce_range: bool | None = None
    # int8 that runs slower than float on ORT CPU is not kept (tiny layers pay more for Q/DQ
    # than they gain); False keeps it anyway (--allow-slower).
    check_speed: bool = True
    # auto: static with --calib, else dynamic (MatMul/Gemm weights int8, activations quantized at
    # run time: what pays on CPU without calibration data); static or dynamic force one.
    mode: str = "auto"
    target: str = "ort-cpu"  # see TARGETS and quantize-int8's placements
    clip_weights: str = "max"  # per-channel weight ranges: max, mse or percentile
    # None: tried, kept only where it brings the held-out error down; True/False force it.
    bias_correction: bool | None = None
    # Node names to keep float whatever the budget says: comma-separated regular expressions,
    # each matched against whole node names (`--keep-float '/bert/.*/output/dense/MatMul'`).
    keep_float: str | None = None
    # Cross-layer equalization of Conv -> Relu -> Conv before calibrating: exact, and measured
    # to help (PP-OCR rec held-out cosine 0.90 -> 0.94, the default model 0.99991 -> 0.99992).
    equalize: bool = True
    # SmoothQuant before dynamic int8 (needs --calib for per-channel activation ranges):
    # None: measured both ways, kept where the worst output is closer to fp32; True/False force.
    smooth: bool | None = None
    # The few outlier input channels of a MatMul computed apart in float (split-outliers), the
    # rest int8; needs --calib. None: measured like smoothing; True/False force it.
    split_outliers: bool | None = None


@dataclasses.dataclass
class Int8Result:
    model: ir.Model  # the quantized model, or the float one when the budget was missed
    is_quantized: bool
    verification: verify.Verification  # held-out batches, budget as the tolerance
    kernels: dict[str, int]  # ORT's optimized graph: op type -> count
    calibration_batches: int
    log: list[str]
    counts: dict[str, int]
    layer_sqnr: dict[str, float] = dataclasses.field(default_factory=dict)  # see layer_sqnr
    kept_float: int = 0  # quantized layers the budget sent back to float
    # "dynamic": activations quantized at run time; calibration_batches then counts the batches
    # SmoothQuant could measure per-channel ranges on (0 without --calib)
    mode: str = "static"


def keep_float_names(model: ir.Model, options: Int8Options) -> tuple[str, ...]:
    """The node names `--keep-float` selects (every graph); a pattern naming none is an error."""
    if not options.keep_float:
        return ()
    names = [n.name for g in model.graphs() for n in g if n.name]
    kept: list[str] = []
    for pattern, matched in matching_node_names(model, options.keep_float).items():
        if not matched:
            raise BadInputError(f"--keep-float {pattern!r} matches no node name (e.g. "
                                f"{', '.join(repr(n) for n in names[:3])})")
        kept.extend(matched)
    return tuple(dict.fromkeys(kept))


def check_choices(options: Int8Options) -> None:
    for flag, value, choices in (("--quant-mode", options.mode, MODES),
                                 ("--target", options.target, TARGETS),
                                 ("--clip-weights", options.clip_weights, CLIP_WEIGHTS)):
        if value not in choices:
            raise BadInputError(f"{flag} {value!r}: choose from {', '.join(choices)}")


def kept_float(model, result: Outcome, batches: int, kernels, why: str = "") -> Int8Result:
    """The float model, with what was tried: verification of the float model is exact."""
    checked = dataclasses.replace(result.verification, status="skipped",
                                  reason=why or result.why or "nothing to quantize")
    return Int8Result(model, False, checked, kernels, batches, list(result.report.log),
                      dict(result.report.counts))
