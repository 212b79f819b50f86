"""Which nodes stay float32 in a half model, and why: one line per node for the report.

By the graph (no data needed):
  - the target provider registers no half kernel for the op (ONNX Runtime's own kernel table,
    kernels.half_kernel): it would run the node on the CPU, with copies both ways;
  - sums over long axes (ReduceSum, ReduceL2, CumSum, ...): an accumulation of more than
    LONG_AXIS terms, or of an unknown count, loses the small terms in half;
  - shape arithmetic: float nodes whose results only reach shape-like inputs (Resize's scales
    and sizes, Reshape's shape, ...), where a rounding changes a size, not a value.
By the data (the float32 model's activations on the verification or calibration inputs):
  - float16 only: a tensor beyond +-65504 would become Inf; its producer and readers stay
    float32. A tensor that is nonzero but whose largest value is below float16's smallest
    normal (2^-14) would lose most of its bits or flush to zero: it stays float32 too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.calib.activations import iter_activations
from onnxopt.passes._graph import opset_version
from onnxopt.passes.to_half import FP16_MAX, FP16_MIN_NORMAL, computes_float32
from onnxopt.precision import kernels

__all__ = ["LONG_AXIS", "activation_ranges", "data_reasons", "graph_reasons"]

LONG_AXIS = 4096  # terms summed in half beyond which float32 accumulation is kept
_SUMS = {"ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
         "ReduceLogSumExp", "ReduceProd", "CumSum"}
_PROVIDER = {"ort-cuda": "cuda", "tensorrt": "cuda", "ort-cpu": "cpu"}


def graph_reasons(model: ir.Model, dtype: str, target: str,
                  half_inputs) -> dict[str, str]:
    """Node name -> why it stays float32, from the graph alone. `half_inputs(node)` gives the
    input positions a node would take in half (None: it cannot go to half at all)."""
    graph = model.graph
    opset = opset_version(graph)
    provider = _PROVIDER.get(target, "cuda")
    reasons: dict[str, str] = {}
    shape_only = _shape_arithmetic(graph, half_inputs)
    for node in graph:
        if half_inputs(node) is None or not computes_float32(node):
            continue
        has_kernel = kernels.half_kernel(provider, node.domain, node.op_type, opset, dtype)
        if has_kernel is False:
            reasons[node.name] = (f"ONNX Runtime's {provider} provider has no {dtype} "
                                  f"{node.op_type} kernel")
        elif node.op_type in _SUMS:
            terms = _summed_terms(node)
            if terms is None or terms > LONG_AXIS:
                reasons[node.name] = (f"sums {'an unknown number of' if terms is None else terms}"
                                      f" terms (> {LONG_AXIS} stay float32)")
        elif node in shape_only:
            reasons[node.name] = "shape arithmetic (its result only sets sizes or scales)"
    return reasons


def _summed_terms(node: ir.Node) -> int | None:
    """How many input elements each output element sums, from static shapes (None: unknown)."""
    source = node.inputs[0] if node.inputs else None
    if source is None or source.shape is None or not all(
            isinstance(d, int) for d in source.shape):
        return None
    dims = list(source.shape)
    if node.op_type == "CumSum":
        axis = _constant_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        return dims[axis[0]] if axis else None
    axes = None
    if "axes" in node.attributes:
        axes = list(node.attributes["axes"].value)
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = _constant_ints(node.inputs[1])
        if axes is None:
            return None
    if not axes:  # all axes (unless noop_with_empty_axes, where it sums nothing)
        noop = node.attributes.get("noop_with_empty_axes")
        return 1 if noop is not None and noop.value else math.prod(dims)
    return math.prod(dims[a] for a in axes)


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).ravel()]


def _shape_arithmetic(graph: ir.Graph, half_inputs) -> set[ir.Node]:
    """Float nodes whose every result ends, through other such nodes, in an input position a
    half node would not take in half (a size, a scale), never in data or a model output."""
    outputs = set(graph.outputs)
    memo: dict[ir.Node, bool] = {}
    # Readers come after their producers in a graph: deciding in reverse order has every
    # reader's answer ready (no recursion, which a 400-node-deep DenseNet would exhaust).
    for node in reversed(list(graph)):
        memo[node] = _reaches_only_shapes(node, outputs, half_inputs,
                                          lambda reader: memo.get(reader, False))
    return {node for node in graph if half_inputs(node) is not None and memo[node]}


def _reaches_only_shapes(node: ir.Node, outputs: set, half_inputs, only_shapes) -> bool:
    uses = [use for out in node.outputs for use in out.uses()]
    if not uses or any(out in outputs for out in node.outputs):
        return False
    for use in uses:
        reader = use.node
        if reader.op_type in ("Shape", "Size"):
            continue
        positions = half_inputs(reader)
        if positions is None:
            return False
        if reader.op_type not in ("Cast", "CastLike") and use.idx not in positions:
            continue  # a size, a scale, an axis: not data
        if not only_shapes(reader):
            return False
    return True


def activation_ranges(model: ir.Model, batches: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """Per float32 node output: (max |x|, largest share of nonzero elements in a batch) over
    all batches (Inf when a value is not finite)."""
    names = [v.name for node in model.graph for v in node.outputs
             if v.name and v.dtype == ir.DataType.FLOAT]
    peaks: dict[str, float] = {}
    nonzero: dict[str, float] = {}
    for found in iter_activations(model, batches, names, prepack=False):  # the few judged
        for name, array in found.items():
            array = np.asarray(array)
            finite = np.abs(array[np.isfinite(array)]) if array.size else array
            peak = float(finite.max()) if finite.size else 0.0
            if not np.all(np.isfinite(array)):
                peak = math.inf
            peaks[name] = max(peaks.get(name, 0.0), peak)
            nonzero[name] = max(nonzero.get(name, 0.0),
                                float(np.count_nonzero(array)) / max(1, array.size))
    return {name: (peaks[name], nonzero[name]) for name in peaks}


def data_reasons(model: ir.Model, dtype: str, ranges: dict[str, tuple[float, float]],
                 half_inputs) -> dict[str, str]:
    """Node name -> why it stays float32, from the float32 model's activation ranges."""
    if dtype != "float16":  # bfloat16 has float32's range
        return {}
    reasons: dict[str, str] = {}
    for node in model.graph:
        for out in node.outputs:
            peak, share = ranges.get(out.name, (0.0, 0.0))
            if peak > FP16_MAX:
                why = f"{out.name!r} reaches {peak:.3g}, past float16's {FP16_MAX:g}"
                readers = [use.node for use in out.uses()]
            elif 0.0 < peak < FP16_MIN_NORMAL and share > 0:
                why = f"{out.name!r} stays below {FP16_MIN_NORMAL:.2g} (float16 would flush it)"
                readers = []
            else:
                continue
            for target in [node, *readers]:
                if half_inputs(target) is not None and target.name not in reasons:
                    reasons[target.name] = why
    return reasons
