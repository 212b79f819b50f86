"""Step 4 of fold-batchnorm: Mul / Add / Sub / Div by a constant fold into a linear op.

    after a Conv / ConvTranspose / Gemm / MatMul unit:  W'[c] = s[c] W[c],  b'[c] = s[c] b[c] + t[c]
    before the Conv / Gemm / MatMul that alone reads it: W'[.., c] = W[.., c] s[c],  b' = b + W t
A scale folds into a padded Conv too (zeros stay zeros); a shift only into an unpadded one, so a
scale then shift before a padded Conv, a h + t, becomes (h + t/a) a and the scale folds
(PP-LCNetV3's learnable affine after each activation: PP-OCRv4 det loses 20 Mul and 10 Add).
The trailing Mul/Add of a GELU or LayerNorm written out op by op stays: ORT fuses those patterns
only whole. Float64, cast once to the weight's dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxopt.passes._affine import (
    Unit,
    channel_vector,
    find_unit,
    fold_after,
    per_channel,
    replace,
)
from onnxopt.passes._fold_before import fold_before, input_channels
from onnxopt.passes._graph import NameSource, constant, describe, new_initializer, rank_of
from onnxopt.passes._report import PassReport

__all__ = ["fold_affine_ops"]

_AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def fold_affine_ops(graph: ir.Graph, names: NameSource, report: PassReport) -> None:
    """Step 4, repeated until nothing changes: each fold removes one node, so it ends."""
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.graph is graph:  # a fold may have removed it already
                changed |= _fold_affine_op(graph, names, node, report)


def _constant_operand(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(x, c) of an affine op `x op c` with a floating-point constant c, else None."""
    if node.op_type not in _AFFINE_OPS or node.domain not in ("", "ai.onnx") or len(
            node.inputs) != 2 or None in node.inputs:
        return None
    x, c = node.inputs
    if constant(c) is None and node.op_type in ("Mul", "Add"):
        x, c = c, x  # commutative: the constant may come first
    array = constant(c)
    if array is None or constant(x) is not None or not np.issubdtype(array.dtype, np.floating):
        return None
    if node.op_type in ("Sub", "Div") and node.inputs[0] is not x:
        return None  # c - x and c / x are not affine in x
    return x, array


def _fold_affine_op(graph, names, node: ir.Node, report: PassReport) -> bool:
    operand = _constant_operand(node)
    if operand is None:
        return False
    x, array = operand
    unit = find_unit(x)
    if not isinstance(unit, Unit) or array.dtype != unit.weight.dtype:
        return _fold_affine_op_before(graph, names, node, x, array, report)
    if unit.node.op_type == "MatMul" and unit.bias_add is None and node.op_type in ("Add", "Sub"):
        return False  # that Add is the MatMul's bias: already as folded as it gets
    vector = per_channel(array, unit)
    if vector is None or (node.op_type == "Div" and np.any(vector == 0)):
        return _fold_affine_op_before(graph, names, node, x, array, report)
    new_nodes, output = fold_after(graph, names, unit, *_affine(node.op_type, vector))
    replace(graph, [unit.node, unit.bias_add, node], new_nodes, node.outputs[0], output)
    report.change(f"{node.op_type} folded", f"folded {describe(node)} into {describe(unit.node)}")
    return True


def _fold_affine_op_before(graph, names, node: ir.Node, x: ir.Value, array: np.ndarray,
                           report: PassReport) -> bool:
    """The same op into the Conv/Gemm/MatMul that reads its output (a learnable affine after
    an activation, as in PP-LCNetV3; a scale after a normalization), when it is the only
    reader: a scale folds whatever the Conv's padding, a shift only without padding."""
    y = node.outputs[0]
    if len(y.uses()) != 1 or y.is_graph_output() or _in_a_fused_pattern(x):
        return False
    consumer = y.uses()[0][0]
    found = input_channels(consumer)
    weight = constant(consumer.inputs[1]) if found else None
    if found is None or weight is None or weight.dtype != array.dtype:
        return False
    channels, where = found
    vector = channel_vector(array, rank_of(x), channels, last=where == "last")  # c must not grow x
    if vector is None or (node.op_type == "Div" and np.any(vector == 0)):
        return False
    scale, shift = _affine(node.op_type, vector)
    folded = fold_before(graph, names, x, y, scale, shift, channels_last=where == "last")
    if isinstance(folded, str):
        return np.any(shift) and _move_scale_past_shift(graph, names, node, x, shift, report)
    consumer, new_nodes, output = folded
    replace(graph, [node, consumer], new_nodes, consumer.outputs[0], output)
    report.change(f"{node.op_type} folded",
                  f"folded {describe(node)} into the next {describe(consumer)}")
    return True


def _move_scale_past_shift(graph, names, node: ir.Node, x: ir.Value, shift: np.ndarray,
                           report: PassReport) -> bool:
    """h a + t = (h + t / a) a: when a shift cannot fold into the padded Conv after it, the
    scale before it moves past it and folds there (one elementwise op fewer; the rounding of
    h + t/a is relative to the result, as that of h a + t)."""
    scaler = x.producer()
    operand = _constant_operand(scaler) if scaler is not None else None
    if operand is None or scaler.op_type not in ("Mul", "Div") or len(x.uses()) != 1 \
            or x.is_graph_output():
        return False
    h, array = operand
    if _in_a_fused_pattern(h):
        return False
    rank = rank_of(h)
    vector = channel_vector(array, rank, shift.size, last=False)
    if vector is None or rank is None or rank < 2 or np.any(vector == 0):
        return False
    scale = vector if scaler.op_type == "Mul" else 1.0 / vector
    moved = new_initializer(graph, names, f"{node.name or 'shift'}_moved",
                            (shift / scale).reshape((-1,) + (1,) * (rank - 2))
                            .astype(array.dtype))
    add = ir.node("Add", [h, moved], name=node.name)
    folded = fold_before(graph, names, add.outputs[0], node.outputs[0], scale,
                         np.zeros_like(scale))
    if isinstance(folded, str):
        return False
    consumer, new_nodes, output = folded
    replace(graph, [scaler, node, consumer], [add, *new_nodes], consumer.outputs[0], output)
    report.change(f"{scaler.op_type} folded", f"moved {describe(scaler)} past "
                  f"{describe(node)} into the next {describe(consumer)} (padded)")
    return True


# Ops that mark the decomposed GELU (Erf; Tanh for the approximation) and LayerNorm (Sqrt, Pow,
# ReduceMean) patterns ORT fuses at load time: their trailing Mul(0.5) / Mul(gamma) / Add(beta)
# must stay, or ORT runs four to nine elementwise kernels instead of one (MiniLM: BiasGelu
# 0.67 ms -> Add/Erf/Div/Mul 1.1 ms per run when GELU's 0.5 went into the next MatMul).
_FUSED_PATTERN_MARKERS = frozenset({"Erf", "Tanh", "Sqrt", "Pow", "ReduceMean"})


def _in_a_fused_pattern(value: ir.Value, depth: int = 4) -> bool:
    """Whether `value` ends a GELU or LayerNorm written out op by op: a marker op within
    `depth` elementwise steps back."""
    frontier = [value]
    for _ in range(depth):
        producers = [v.producer() for v in frontier if v is not None and v.producer()]
        if any(p.op_type in _FUSED_PATTERN_MARKERS for p in producers):
            return True
        frontier = [v for p in producers if p.op_type in _AFFINE_OPS for v in p.inputs]
        if not frontier:
            return False
    return False


def _affine(op_type: str, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of x op c, per channel."""
    ones, zeros = np.ones_like(vector), np.zeros_like(vector)
    return {"Mul": (vector, zeros), "Add": (ones, vector),
            "Sub": (ones, -vector), "Div": (1.0 / vector, zeros)}[op_type]
