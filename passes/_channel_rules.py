"""Per-op rules of the channel graph: how each op carries, ties or refuses its inputs' channels.

`visit` hands a node to its rule when one of its inputs carries channels (or it is a linear
op, which makes a group of its own). A rule tells the builder (_channel_layout) the layout of
each output (`carry`), the constants that shrink with it (`site`), the attributes or shape
inputs to rewrite (`fixes`), and refuses what it cannot follow, naming the node. An op without a
rule, from a custom domain or with a subgraph refuses every group it reads (refusal 3 in
_channel_groups); so does an op reading channels only as a parameter (a BatchNormalization
scale, a Pad's pads).

Here: ops that keep the channels (unary ops, pooling), ops that tie them channel for channel
(elementwise ops, where a constant operand with C channels becomes a site; Concat across the
channels), BatchNormalization (its four parameters are sites), and the linear ops that consume a
group on their weight's input axis and produce a new one (Conv, depthwise Conv, ConvTranspose,
Gemm, MatMul). The ops that cut, move or reshape the channel axis are in _channel_shape_rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir
from onnxopt.passes._channel_layout import (
    LINEAR,
    ChannelBuilder,
    Fix,
    Segment,
    constant_source,
    is_known,
    layout_length,
    normalize_axis,
)
from onnxopt.passes._channel_shape_rules import SHAPE_RULES
from onnxopt.passes._graph import NameSource, constant, describe

__all__ = ["visit"]

_UNARY = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Selu", "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Identity",
    "Dropout", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Cast", "Floor", "Ceil",
    "Round", "Sign", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool"})  # same channels in, same channels out (pooling: spatial axes only)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow",
                          "PRelu"})  # a constant operand with C channels shrinks with them
_FREE_FIRST_INPUT = frozenset({*LINEAR, *_ELEMENTWISE, "Concat"})  # channels on any input
# Ops known not to follow channels, and why (the rest get "which cannot follow its channels").
_REFUSED_OPS = {
    "Transpose": "which moves the channel axis",
    "Softmax": "which normalizes across the channels",
    "LogSoftmax": "which normalizes across the channels",
    "LayerNormalization": "which normalizes across the channels",
    "GroupNormalization": "which normalizes groups of channels",
    "Gather": "which picks positions along an axis",
}


def visit(b: ChannelBuilder, node: ir.Node) -> None:
    """Apply the node's rule, or refuse every group it reads."""
    ins = [None if v is None else b.carried.get(v) for v in node.inputs]
    rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for a in node.attributes.values()):
        rule = None
    if rule is None:
        b.refuse_inputs(node, ins, _REFUSED_OPS.get(node.op_type,
                                                    "which cannot follow its channels"))
    elif node.op_type not in _FREE_FIRST_INPUT and ins[0] is None and any(ins):
        b.refuse_inputs(node, ins, "which takes channels as a parameter")
    elif node.op_type in LINEAR or any(c is not None for c in ins):
        rule(b, node, ins)


def _unary(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c = ins[0]
    if c is None or any(x is not None for x in ins[1:]):
        return b.refuse_inputs(node, ins, "whose parameters are activations")
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1] is not None \
            and node.outputs[1].uses():
        return b.refuse(c.layout, f"read by {describe(node)}, whose indices output is used")
    for value in node.outputs:
        b.carry(value, node, c.axis, c.rank, c.layout)


def _unify(b: ChannelBuilder, node: ir.Node, layouts: list[tuple]) -> tuple:
    """Tie the layouts channel for channel (merging groups); refuse what does not line up."""
    first = layouts[0]
    for other in layouts[1:]:
        if len(other) != len(first) or any(x.size != y.size or x.inner != y.inner
                                           for x, y in zip(first, other)):
            b.refuse(first + other, f"{describe(node)} combines channel ranges that do not "
                     "line up")
            continue
        for x, y in zip(first, other):
            if x.group is None and y.group is None:
                continue
            same = x.group is not None and y.group is not None and (
                b.find(x.group), x.start, x.stop) == (b.find(y.group), y.start, y.stop)
            if b.whole(x) and b.whole(y):
                b.union(x.group, y.group)
            elif not same:
                b.refuse((x, y), f"{describe(node)} ties part of it to other channels")
    return first


def _elementwise(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    carried = [c for c in ins if c is not None]
    rank = b.rank(node.outputs[0]) or max(c.rank for c in carried)
    axes = {c.axis + rank - c.rank for c in carried}
    if len(axes) != 1:
        return b.refuse_inputs(node, ins, "whose inputs put the channels on different axes")
    axis = axes.pop()
    layout = _unify(b, node, [c.layout for c in carried])
    for index, (value, c) in enumerate(zip(node.inputs, ins)):
        if c is not None or value is None:
            continue
        dims = b.dims(value)
        at = None if dims is None else axis - (rank - len(dims))
        if at is not None and (at < 0 or dims[at] == 1):
            continue  # broadcast over the channels: a scalar or a per-position constant
        if at is None or dims[at] != layout_length(layout) or \
                constant(constant_source(value)) is None:
            b.refuse(layout, f"{describe(node)} combines it with {value.name!r}, whose "
                     "channels no group owns")
        else:
            b.site(node, index, at, layout, "param")
    b.carry(node.outputs[0], node, axis, rank, layout)


def _batchnorm(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c = ins[0]
    if any(x is not None for x in ins[1:]) or any(v is not None and v.uses()
                                                  for v in node.outputs[1:]):
        return b.refuse_inputs(node, ins, "in training mode")
    for index in range(1, len(node.inputs)):  # scale (and B, mean, var): per channel
        role = "scale" if index == 1 else "param"
        b.site(node, index, 0, c.layout, role)
    b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)


def _concat(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    first = next(c for c in ins if c is not None)
    axis = normalize_axis(node.attributes.get_int("axis", 0), first.rank)
    if any(c is not None and c.axis != first.axis for c in ins):
        return b.refuse_inputs(node, ins, "which puts the channels on different axes")
    if axis != first.axis:
        if any(c is None for c in ins):
            return b.refuse_inputs(node, ins, "which joins it with channels no group owns")
        layout = _unify(b, node, [c.layout for c in ins])
        return b.carry(node.outputs[0], node, first.axis, first.rank, layout)
    segments = []
    for value, c in zip(node.inputs, ins):
        dims = b.dims(value)
        if c is None and (dims is None or not is_known(dims[axis])):
            return b.refuse_inputs(node, ins, f"with {value.name!r} of unknown channels")
        segments += c.layout if c is not None else [Segment(None, 0, dims[axis])]
    b.carry(node.outputs[0], node, axis, first.rank, tuple(segments))


def _conv(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c, weight = ins[0], constant(constant_source(node.inputs[1]))
    groups = node.attributes.get_int("group", 1)
    if weight is None or any(x is not None for x in ins[1:]):
        return b.refuse_inputs(node, ins, "whose weight is not a constant")
    rank = weight.ndim
    if c is not None and groups > 1 and weight.shape[1] == 1:  # depthwise: channel c -> c·m..
        multiplier = weight.shape[0] // groups
        layout = tuple(dataclasses.replace(s, inner=s.inner * multiplier) for s in c.layout)
        b.site(node, 1, 0, layout, "weight")
        b.site(node, 2, 0, layout, "param")

        def write(kept: list[int], names: NameSource) -> None:
            node.attributes["group"] = ir.AttrInt64("group", kept[0])
        b.fixes.append(Fix([c.layout], write))
        b.mac(node, [layout])
        return b.carry(node.outputs[0], node, 1, rank, layout)
    if c is not None:
        if groups > 1 and (len(c.layout) != 1 or not b.whole(c.layout[0])
                           or c.layout[0].inner != 1):
            b.refuse(c.layout, f"grouped {describe(node)} reads channels of several groups")
        elif groups > 1:
            b.require_blocks(c.layout[0].group, groups)
        b.site(node, 1, 1, c.layout, "consumer", blocks=groups)
    layout = b.new_group(node, weight.shape[0], groups)
    b.site(node, 1, 0, layout, "producer")
    b.site(node, 2, 0, layout, "param")
    b.mac(node, [c.layout, layout] if c is not None else [layout])
    b.carry(node.outputs[0], node, 1, rank, layout)


def _conv_transpose(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c, weight = ins[0], constant(constant_source(node.inputs[1]))
    if weight is None or any(x is not None for x in ins[1:]):
        return b.refuse_inputs(node, ins, "whose weight is not a constant")
    if node.attributes.get_int("group", 1) != 1:
        return b.refuse_inputs(node, ins, "a grouped ConvTranspose (not handled)")
    if c is not None:
        b.site(node, 1, 0, c.layout, "consumer")
    layout = b.new_group(node, weight.shape[1])
    b.site(node, 1, 1, layout, "producer")
    b.site(node, 2, 0, layout, "param")
    b.mac(node, [c.layout, layout] if c is not None else [layout])
    b.carry(node.outputs[0], node, 1, weight.ndim, layout)


def _gemm(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c, weight = ins[0], constant(constant_source(node.inputs[1]))
    trans_b = node.attributes.get_int("transB", 0)
    if weight is None or any(x is not None for x in ins[1:]):
        return b.refuse_inputs(node, ins, "whose weight is not a constant")
    if c is not None:
        if node.attributes.get_int("transA", 0) or c.axis != 1:
            b.refuse(c.layout, f"read by {describe(node)} with transA=1")
        else:
            b.site(node, 1, 1 if trans_b else 0, c.layout, "consumer")
    layout = b.new_group(node, weight.shape[0 if trans_b else 1])
    b.site(node, 1, 0 if trans_b else 1, layout, "producer")
    bias = (constant(constant_source(node.inputs[2]))
            if len(node.inputs) > 2 and node.inputs[2] else None)
    if bias is not None and bias.ndim and bias.shape[-1] != 1:
        b.site(node, 2, bias.ndim - 1, layout, "param")
    elif bias is None and len(node.inputs) > 2 and node.inputs[2] is not None:
        b.refuse(layout, f"bias of {describe(node)} is not a constant")
    b.mac(node, [c.layout, layout] if c is not None else [layout])
    b.carry(node.outputs[0], node, 1, 2, layout)


def _matmul(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c, weight = ins[0], constant(constant_source(node.inputs[1]))
    if ins[1] is not None or weight is None or weight.ndim != 2:
        return b.refuse_inputs(node, ins, "whose right operand is not a 2-D constant")
    rank = b.rank(node.outputs[0]) or (c.rank if c is not None else b.rank(node.inputs[0]))
    if c is not None:
        if c.axis != c.rank - 1:
            b.refuse(c.layout, f"read by {describe(node)} on an axis other than the last")
        else:
            b.site(node, 1, 0, c.layout, "consumer")
    layout = b.new_group(node, weight.shape[1])
    b.site(node, 1, 1, layout, "producer")
    b.mac(node, [c.layout, layout] if c is not None else [layout])
    if rank is None:
        return b.refuse(layout, f"the output rank of {describe(node)} is unknown")
    b.carry(node.outputs[0], node, rank - 1, rank, layout)


_RULES: dict[str, Callable] = {
    **dict.fromkeys(_UNARY, _unary), **dict.fromkeys(_ELEMENTWISE, _elementwise),
    "BatchNormalization": _batchnorm, "InstanceNormalization": _batchnorm, "Concat": _concat,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
    **SHAPE_RULES,
}
