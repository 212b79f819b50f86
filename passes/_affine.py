"""Per-channel affine maps and the linear ops they fold into (shared by fold-batchnorm).

A linear unit is an op with a constant weight whose output channel c is
    y[c] = (W x)[c] + b[c]
Conv (W: [M, C/g, k...], channel axis 1), ConvTranspose (W: [C, M/g, k...], channel axis 1),
Gemm (Y = alpha A' B' + beta C, channel = column), or MatMul with a 2-D constant W [K, N]
(channel = last axis), optionally followed by an Add of a per-channel constant (its bias).

An affine map z[c] = s[c] y[c] + t[c] after the unit folds exactly into it:
    W'[c] = s[c] W[c]            b'[c] = s[c] b[c] + t[c]
All arithmetic is float64; results are cast once to the weight's dtype.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnxopt.passes._graph import NameSource, constant, describe, new_initializer, rank_of

__all__ = ["Unit", "channel_vector", "find_unit", "fold_after", "per_channel", "replace"]

_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class Unit:
    node: ir.Node  # Conv, ConvTranspose, Gemm or MatMul
    bias_add: ir.Node | None  # the Add that gives a MatMul its bias, folded along with it
    weight: np.ndarray
    bias: np.ndarray | None  # Gemm's C keeps its own (broadcastable) shape
    channels: int
    rank: int | None  # rank of the unit's output, when known
    output: ir.Value

    @property
    def channel_axis(self) -> int | None:
        if self.node.op_type in ("Conv", "ConvTranspose"):
            return 1
        return None if self.rank is None else self.rank - 1


def _sole_use(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def find_unit(value: ir.Value) -> Unit | str:
    """The linear unit producing `value`, or the reason it cannot take a fold."""
    node = value.producer()
    if node is None:
        return f"{value.name!r} is not produced by a node"
    if not _sole_use(value):
        return f"the output of {describe(node)} has another consumer"
    bias_add = None
    if node.op_type == "Add":
        matmul = next((v.producer() for v in node.inputs if v is not None and v.producer()
                       and v.producer().op_type == "MatMul"), None)
        if matmul is None or not _sole_use(matmul.outputs[0]):
            return f"it follows {describe(node)}, not Conv/ConvTranspose/Gemm/MatMul"
        bias_add, node = node, matmul
    if node.op_type not in _LINEAR_OPS or node.domain not in ("", "ai.onnx"):
        return f"it follows {describe(node)}, not Conv/ConvTranspose/Gemm/MatMul"
    weight = constant(node.inputs[1])
    if weight is None:
        return f"the weight of {describe(node)} is not a constant"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"the weight of {describe(node)} is {weight.dtype}, not floating point"
    return _unit(node, bias_add, weight, value)


def _unit(node: ir.Node, bias_add: ir.Node | None, weight: np.ndarray, value) -> Unit | str:
    op, attrs = node.op_type, node.attributes
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant(bias_value) if bias_value is not None else None
    if bias_value is not None and bias is None:
        return f"the bias of {describe(node)} is not a constant"
    if op == "Conv":
        return Unit(node, None, weight, bias, weight.shape[0], weight.ndim, value)
    if op == "ConvTranspose":
        channels = weight.shape[1] * attrs.get_int("group", 1)
        return Unit(node, None, weight, bias, channels, weight.ndim, value)
    if op == "Gemm":
        channels = weight.shape[0] if attrs.get_int("transB", 0) else weight.shape[1]
        return Unit(node, None, weight, bias, channels, 2, value)
    if weight.ndim != 2:  # MatMul
        return f"the weight of {describe(node)} is {weight.ndim}-D, not 2-D"
    unit = Unit(node, bias_add, weight, None, weight.shape[1], rank_of(node.inputs[0]), value)
    if bias_add is not None:
        other = next(v for v in bias_add.inputs if v is not node.outputs[0])
        add_const = constant(other)
        unit.bias = None if add_const is None else per_channel(add_const, unit)
        if unit.bias is None:
            return f"{describe(bias_add)} after {describe(node)} is not a per-channel constant"
    return unit


def per_channel(c: np.ndarray, unit: Unit) -> np.ndarray | None:
    """`c` as a [channels] vector of the unit's output channels, or None (`channel_vector`)."""
    return channel_vector(c, unit.rank, unit.channels,
                          last=unit.node.op_type not in ("Conv", "ConvTranspose"))


def channel_vector(c: np.ndarray, rank: int | None, channels: int, *,
                   last: bool) -> np.ndarray | None:
    """`c` as a [channels] vector when broadcasting it against a rank-`rank` tensor only varies
    along the channel axis (the last one, or axis 1) and never grows the tensor's rank; else
    None. With the rank unknown, only a [channels] vector on the last axis is certain."""
    if c.size == 1 and c.ndim <= (rank if rank is not None else 1):
        return np.full(channels, c.item(), dtype=np.float64)
    if rank is None:
        return c.astype(np.float64) if last and c.shape == (channels,) else None
    if c.ndim > rank or (not last and rank < 2):
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    axis = rank - 1 if last else 1
    if shape[axis] != channels or any(d != 1 for i, d in enumerate(shape) if i != axis):
        return None
    return c.reshape(channels).astype(np.float64)


def fold_after(
    graph: ir.Graph, names: NameSource, unit: Unit, scale: np.ndarray, shift: np.ndarray
) -> tuple[list[ir.Node], ir.Value]:
    """New nodes computing s * unit(x) + t, and their output."""
    node, dtype = unit.node, unit.weight.dtype
    w = unit.weight.astype(np.float64)
    attributes = dict(node.attributes)
    if node.op_type == "Conv":
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif node.op_type == "ConvTranspose":
        group = node.attributes.get_int("group", 1)
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        s = scale.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        w = (grouped * s).reshape(w.shape)
    elif node.op_type == "Gemm":
        w = w * (scale[:, None] if node.attributes.get_int("transB", 0) else scale[None, :])
        attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # beta is folded into the new C
    else:  # MatMul
        w = w * scale[None, :]
    bias = 0.0 if unit.bias is None else unit.bias.astype(np.float64)
    if node.op_type == "Gemm":
        bias = bias * node.attributes.get_float("beta", 1.0)
    bias = (bias * scale + shift).astype(dtype)
    base = node.name or unit.output.name or node.op_type
    weight_value = new_initializer(graph, names, f"{base}.weight_folded", w.astype(dtype))
    bias_value = new_initializer(graph, names, f"{base}.bias_folded", bias)
    if node.op_type != "MatMul":
        new = ir.node(node.op_type, [node.inputs[0], weight_value, bias_value],
                      attributes=attributes, domain=node.domain, name=node.name)
        return [new], new.outputs[0]
    matmul = ir.node("MatMul", [node.inputs[0], weight_value], name=node.name)
    add = ir.node("Add", [matmul.outputs[0], bias_value],
                  name=unit.bias_add.name if unit.bias_add else f"{base}_bias")
    return [matmul, add], add.outputs[0]


def replace(graph, old_nodes, new_nodes, old_output: ir.Value, new_output: ir.Value) -> None:
    """Swap `old_nodes` (None entries skipped) for `new_nodes`, `old_output` for `new_output`."""
    old_nodes = [n for n in old_nodes if n is not None]
    ir.convenience.replace_nodes_and_values(
        graph, old_nodes[-1], old_nodes, new_nodes, [old_output], [new_output]
    )
