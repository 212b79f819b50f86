"""What `--int8` needs before it calibrates: a model it can touch (`check_quantizable`), named
nodes (the fallback and `--keep-float` pick layers by name), an opset with per-channel
DequantizeLinear (`at_int8_opset`), and the calibration data split into a streamed calibration
part and a held-out part that judges the budget (`split_data`).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from onnxopt import pipeline
from onnxopt.calib import sources
from onnxopt.errors import BadInputError
from onnxopt.passes import FuseActivationsPass
from onnxopt.passes._gather import MIN_TABLE_ELEMENTS
from onnxopt.passes._graph import is_dequantized
from onnxopt.passes._weights import computed_from_constants
from onnxopt.passes.quantize_int8 import CONV_TRANSPOSE_FLOAT
from onnxopt.quant.options import Int8Options

__all__ = ["at_int8_opset", "calibration_data", "check_quantizable", "named", "split_data"]


def check_quantizable(model: ir.Model, source: str) -> None:
    """A one-line error when `--int8` has nothing to work on: no Conv, Gemm or MatMul with a
    constant float weight and no embedding table large enough for int8, in any graph. (A model
    with such layers that all end up float says why in its report instead.)"""
    for graph in model.graphs():
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            sizes = [_float_constant_size(v) for v in node.inputs[:2]]
            computed = [v for v in node.inputs[:2] if computed_from_constants(v)
                        and (v.dtype is None or v.dtype.is_floating_point())]
            if node.op_type in ("Conv", "Gemm", "MatMul") and (
                    any(size is not None for size in sizes) or computed):
                return  # a computed weight is folded by the fold-weights pass first
            if node.op_type == "Gather" and (sizes[0] or 0) >= MIN_TABLE_ELEMENTS:
                return
    transposed = sum(1 for g in model.graphs() for n in g if n.op_type == "ConvTranspose")
    extra = (f"; its {transposed} ConvTranspose stay float ({CONV_TRANSPOSE_FLOAT})"
             if transposed else "")
    already = sum(1 for g in model.graphs() for n in g if n.op_type in ("Conv", "Gemm", "MatMul")
                  and len(n.inputs) > 1 and is_dequantized(n.inputs[1]))
    if already:
        extra += (f"; its {already} Conv/Gemm/MatMul layers with a weight are already int8 "
                  "(weights read through DequantizeLinear)")
    raise BadInputError(f"{source}: nothing to quantize with --int8: no Conv, Gemm or MatMul "
                        f"with a constant float weight, no large embedding table{extra}")


def _float_constant_size(value: ir.Value | None) -> int | None:
    """The element count of a float constant, from its metadata: a multi-GB model's weights
    are not read just to see that they exist."""
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node
        return None
    if tensor is None or not tensor.dtype.is_floating_point():
        return None
    return tensor.size


def named(model: ir.Model) -> ir.Model:
    """The model, or a copy whose unnamed nodes have names: the budget's fallback, SmoothQuant
    and `--keep-float` pick layers by node name (copies share the weights)."""
    if all(node.name for graph in model.graphs() for node in graph):
        return model
    named = model.clone()
    common.NameFixPass()(named)
    return named


def calibration_data(model: ir.Model, options: Int8Options) -> sources.CalibrationData:
    """`--calib` as `options` describe it (preprocessing, sample cap, declared shapes)."""
    return sources.calibration_data(options.calib, model, preprocess=options.preprocess,
                                    samples=options.calib_samples, shapes=options.shapes)


def split_data(model: ir.Model, options: Int8Options, notes: list[str]):
    """(calibration batches, held-out batches): see onnxopt.calib.sources.held_out_split."""
    data = calibration_data(model, options)
    notes.extend(data.notes)
    return sources.held_out_split(data, notes)


def at_int8_opset(model: ir.Model, notes: list[str]) -> ir.Model:
    """Opset 13 at least: per-channel DequantizeLinear needs its axis attribute. Opset 14 when
    the model has x * HardSigmoid(x) (hard-swish before opset 14): one HardSwish there leaves
    three float ops between two QLinearConv instead of four (PP-OCR det: int8 0.75 -> 0.72 of
    the original's latency at 1 thread)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    target = 14 if opset < 14 and _has_split_hardswish(model.graph) else 13
    if opset >= target:
        return model
    why = ("per-channel DequantizeLinear needs its axis attribute" if target == 13 else
           "per-channel DequantizeLinear needs 13, one HardSwish per x * HardSigmoid(x) 14")
    try:
        upgraded = pipeline.upgrade_opset(model, target)
    except BadInputError:
        if target == 13:
            raise  # 13 is a must; 14 only a gain
        if opset >= 13:
            return model
        target, why = 13, "per-channel DequantizeLinear needs its axis attribute"
        upgraded = pipeline.upgrade_opset(model, target)
    notes.append(f"upgraded opset {opset} -> {target} with onnx's version converter ({why})")
    if target == 14:
        FuseActivationsPass()(upgraded)
    return upgraded


def _has_split_hardswish(graph: ir.Graph) -> bool:
    """Whether some Mul multiplies x by HardSigmoid(x)."""
    for node in graph:
        if node.op_type != "Mul" or len(node.inputs) != 2 or None in node.inputs:
            continue
        for a, b in (node.inputs, node.inputs[::-1]):
            producer = b.producer()
            if producer is not None and producer.op_type == "HardSigmoid" and \
                    producer.inputs[0] is a:
                return True
    return False
