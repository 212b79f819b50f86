"""Channel-graph rules for the ops that cut, move or reshape the channel axis.

Split and Slice cut a layout into sublayouts (refused when a bound falls inside a channel's
block, is computed at run time, or a Slice steps); their sizes and bounds become fixes. Pad and
Resize carry the channels while they leave the channel axis alone (a Resize given `sizes` gets a
fix). Reduce* over other axes, Squeeze and Unsqueeze move the channel axis. Flatten and Reshape
[N, C, rest] -> [N, C·rest] multiply each segment's `inner` by |rest|; Reshape to
[N, C, *rest'] keeps the layout. A Reshape target (a constant, or a Concat of constant and
computed parts) that spells the channel count gets a fix. Shape is harmless while only dims
before the channel axis are read, as in x.view(x.size(0), -1). Refusal 5 in _channel_groups
lists what cannot be followed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnxopt.passes._channel_layout import (
    ChannelBuilder,
    Fix,
    is_known,
    layout_length,
    normalize_axis,
    sublayout,
)
from onnxopt.passes._channel_rewrite import set_input
from onnxopt.passes._graph import NameSource, constant, describe

__all__ = ["SHAPE_RULES"]

_REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd",
                     "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"})
_SLICE_KEYS = ("starts", "ends", "axes", "steps")  # attributes before opset 10, then inputs 1-4


def _split(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c = ins[0]
    axis = normalize_axis(node.attributes.get_int("axis", 0), c.rank)
    if axis != c.axis:
        for value in node.outputs:
            b.carry(value, node, c.axis, c.rank, c.layout)
        return
    length, count = layout_length(c.layout), len(node.outputs)
    sizes = _ints(node, 1, "split", 13, b.opset)
    if sizes is None and (len(node.inputs) < 2 or node.inputs[1] is None):
        step = -(-length // count)  # opset 18 num_outputs: equal chunks, the last smaller
        sizes = [min(step, length - i * step) for i in range(count)]
    parts, offset = [], 0
    for size in sizes or []:
        parts.append(sublayout(c.layout, offset, offset + size))
        offset += size
    if sizes is None or any(p is None for p in parts) or offset != length:
        return b.refuse(c.layout, f"{describe(node)} cuts its channels where they cannot "
                        "follow (computed sizes or inside a channel's block)")
    for value, part in zip(node.outputs, parts):
        b.carry(value, node, axis, c.rank, part)

    def write(kept: list[int], names: NameSource) -> None:
        if b.opset >= 13:
            set_input(node, 1, np.array(kept, dtype=np.int64), names)
            node.attributes.pop("num_outputs", None)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", kept)
    b.fixes.append(Fix(parts, write))


def _slice_op(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c, length = ins[0], layout_length(ins[0].layout)
    moved = b.opset >= 10  # starts / ends / axes / steps became inputs
    bounds = [_ints(node, i, key, 10, b.opset) for i, key in enumerate(_SLICE_KEYS, start=1)]
    given = [(_input(node, i) is not None) if moved else key in node.attributes
             for i, key in enumerate(_SLICE_KEYS, start=1)]
    if any(x is not None for x in ins[1:]) or any(g and v is None for g, v in zip(given, bounds)):
        return b.refuse(c.layout, f"read by {describe(node)}, whose bounds are computed")
    starts, ends, axes, steps = bounds
    axes = [normalize_axis(a, c.rank) for a in (axes or range(len(starts)))]
    if c.axis not in axes:
        return b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)
    i = axes.index(c.axis)
    low, high = (min(max(x + length if x < 0 else x, 0), length) for x in (starts[i], ends[i]))
    part = sublayout(c.layout, low, high) if (steps or [1] * len(axes))[i] == 1 else None
    if part is None:
        return b.refuse(c.layout, f"{describe(node)} cuts its channels with a step or inside "
                        "a channel's block")
    b.carry(node.outputs[0], node, c.axis, c.rank, part)
    if (low, high) == (0, length):
        return

    def write(kept: list[int], names: NameSource) -> None:  # bounds count kept positions
        for index, (key, bound) in enumerate(zip(_SLICE_KEYS, (starts, ends)), start=1):
            values = list(bound)
            values[i] = kept[index - 1]
            if moved:
                set_input(node, index, np.array(values, dtype=np.int64), names)
            else:
                node.attributes[key] = ir.AttrInt64s(key, values)
    b.fixes.append(Fix([sublayout(c.layout, 0, low), sublayout(c.layout, 0, high)], write))


def _pad(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c = ins[0]
    pads = _ints(node, 1, "pads", 11, b.opset)
    axes = _ints(node, 3, "axes", 18, b.opset) if b.opset >= 18 else None
    axes = [normalize_axis(a, c.rank) for a in (axes or range(c.rank))]
    if pads is None or any(x is not None for x in ins[1:]) or (
            c.axis in axes and (pads[axes.index(c.axis)] or pads[axes.index(c.axis) + len(axes)])):
        return b.refuse(c.layout, f"read by {describe(node)}, which pads the channel axis")
    b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)


def _resize(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c = ins[0]
    old = node.op_type == "Upsample" or b.opset < 11  # inputs X, scales; later X, roi, ...
    operands = []
    for index in (1, None) if old else (2, 3):
        value = _input(node, index)
        array = None if value is None else constant(value)
        if value is not None and array is None or any(x is not None for x in ins[1:]):
            return b.refuse(c.layout, f"read by {describe(node)}, whose scales are computed")
        operands.append(None if array is None or not array.size else array.ravel())
    scales, sizes = operands
    if scales is None and "scales" in node.attributes:  # Upsample-7
        scales = np.array(node.attributes["scales"].value)
    axes = node.attributes.get("axes")
    axes = [normalize_axis(a, c.rank) for a in (axes.value if axes else range(c.rank))]
    at = axes.index(c.axis) if c.axis in axes else None
    if at is not None and scales is not None and scales[at] != 1.0:
        return b.refuse(c.layout, f"read by {describe(node)}, which resizes the channel axis")
    b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)
    if at is not None and sizes is not None:
        def write(kept: list[int], names: NameSource) -> None:
            new = np.array(sizes, dtype=np.int64)
            new[at] = kept[0]
            set_input(node, 3, new, names)
        b.fixes.append(Fix([c.layout], write))


def _reduce(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c = ins[0]
    moved = 13 if node.op_type == "ReduceSum" else 18
    axes = _ints(node, 1, "axes", moved, b.opset)
    empty = not axes and node.attributes.get_int("noop_with_empty_axes", 0)
    if empty:
        return b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)
    axes = [normalize_axis(a, c.rank) for a in axes or []]
    if not axes or c.axis in axes or any(x is not None for x in ins[1:]):
        return b.refuse(c.layout, f"read by {describe(node)}, which reduces over the channels")
    keep = node.attributes.get_int("keepdims", 1)
    axis = c.axis if keep else c.axis - sum(a < c.axis for a in axes)
    b.carry(node.outputs[0], node, axis, c.rank if keep else c.rank - len(axes), c.layout)


def _flatten(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c = ins[0]
    axis = normalize_axis(node.attributes.get_int("axis", 1), c.rank)
    dims = b.dims(node.inputs[0])
    merged = dims[axis:c.axis] if dims else [None]
    rest = dims[c.axis + 1:] if dims else [None]
    if axis > c.axis or any(d != 1 for d in merged) or not is_known(*rest):
        return b.refuse(c.layout, f"read by {describe(node)}, which merges the channel axis "
                        "with unknown or leading dims")
    inner = math.prod(rest)
    layout = tuple(dataclasses.replace(s, inner=s.inner * inner) for s in c.layout)
    b.carry(node.outputs[0], node, 1, 2, layout)


def _reshape(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    """[N, C, rest] -> [N, C·rest] (channel c = a rest-sized block) or -> [N, C, rest']."""
    c, dims, out = ins[0], b.dims(node.inputs[0]), b.dims(node.outputs[0])
    target = None if any(ins[1:]) or dims is None else _target(node, b)
    if target is None:
        return b.refuse(c.layout, f"read by {describe(node)}, whose target shape is computed")
    shape = [entry for entry, _ in target]
    copies = 0 if node.attributes.get_int("allowzero", 0) else None  # 0 copies the input dim
    lead = all(s in (dims[i], copies) or (s is None and out is not None and out[i] == dims[i])
               or (s == -1 and shape.count(-1) == 1) for i, s in enumerate(shape[:c.axis]))
    rest, length = dims[c.axis + 1:], layout_length(c.layout)
    if lead and len(shape) == c.axis + 1 and is_known(*rest) and \
            shape[c.axis] in (-1, length * math.prod(rest)):
        layout = tuple(dataclasses.replace(s, inner=s.inner * math.prod(rest)) for s in c.layout)
    elif lead and len(shape) > c.axis and shape[c.axis] in (copies, length) and \
            -1 not in shape[:c.axis]:
        layout = c.layout
    else:
        return b.refuse(c.layout, f"read by {describe(node)}, which regroups the channel axis")
    b.carry(node.outputs[0], node, c.axis, len(shape), layout)
    holder, index, at = target[c.axis][1]
    if shape[c.axis] not in (-1, copies):
        def write(kept: list[int], names: NameSource) -> None:
            array = constant(holder.inputs[index]).astype(np.int64).ravel().copy()
            array[at] = kept[0]
            set_input(holder, index, array, names)
        b.fixes.append(Fix([layout], write))


def _target(node: ir.Node, b: ChannelBuilder) -> list | None:
    """A Reshape's target as (entry, (holder node, input, index)); entry None: computed at run
    time. A constant, or a Concat (read by this Reshape alone) of constant and computed parts."""
    value = node.inputs[1]
    if constant(value) is not None:
        return [(int(x), (node, 1, i)) for i, x in enumerate(constant(value).ravel())]
    concat = value.producer()
    if concat is None or concat.op_type != "Concat" or len(value.uses()) != 1:
        return None
    entries = []
    for index, part in enumerate(concat.inputs):
        array, dims = constant(part), b.dims(part)
        if array is None and (dims is None or len(dims) != 1 or not is_known(*dims)):
            return None
        values = [None] * dims[0] if array is None else [int(x) for x in array.ravel()]
        entries += [(x, (concat, index, i)) for i, x in enumerate(values)]
    return entries


def _shape(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    """Harmless when only dims before the channel axis are read: x.view(x.size(0), -1)."""
    c = ins[0]
    start = normalize_axis(node.attributes.get_int("start", 0), c.rank)
    end = min(normalize_axis(node.attributes.get_int("end", c.rank), c.rank), c.rank)
    if end <= c.axis:
        return
    for user in node.outputs[0].consumers():
        index = constant(user.inputs[1]) if user.op_type == "Gather" else None
        if index is None or user.inputs[0] is not node.outputs[0] or \
                np.any(start + np.where(index < 0, index + end - start, index) >= c.axis):
            return b.refuse(c.layout, f"read by {describe(node)}, whose channel count "
                            f"{describe(user)} uses")
    if node.outputs[0].is_graph_output():
        b.refuse(c.layout, f"read by {describe(node)}, a graph output")


def _squeeze(b: ChannelBuilder, node: ir.Node, ins: list) -> None:
    c = ins[0]
    axes = _ints(node, 1, "axes", 13, b.opset)
    if node.op_type == "Unsqueeze":
        rank = c.rank + len(axes or [])
        axes = sorted(normalize_axis(a, rank) for a in axes or [])
        kept_axes = [a for a in range(rank) if a not in axes]
        return b.carry(node.outputs[0], node, kept_axes[c.axis], rank, c.layout)
    if axes is None:
        dims = b.dims(node.inputs[0])
        axes = None if dims is None or not is_known(*dims) else [
            i for i, d in enumerate(dims) if d == 1]
    axes = None if axes is None else [normalize_axis(a, c.rank) for a in axes]
    if axes is None or c.axis in axes:
        return b.refuse(c.layout, f"read by {describe(node)}, which may squeeze the channels")
    b.carry(node.outputs[0], node, c.axis - sum(a < c.axis for a in axes), c.rank - len(axes),
            c.layout)


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    return node.inputs[index] if index is not None and index < len(node.inputs) else None


def _ints(node: ir.Node, index: int, attribute: str, opset_moved: int, opset: int
          ) -> list[int] | None:
    """An int list given as input `index` (opset >= opset_moved) or as an attribute."""
    if opset >= opset_moved:
        value = node.inputs[index] if index < len(node.inputs) else None
        array = None if value is None else constant(value)
        return None if array is None else [int(x) for x in array.ravel()]
    attr = node.attributes.get(attribute)
    return None if attr is None else [int(x) for x in attr.value]


SHAPE_RULES: dict[str, Callable] = {
    **dict.fromkeys(_REDUCE, _reduce), "Split": _split, "Slice": _slice_op, "Pad": _pad,
    "Resize": _resize, "Upsample": _resize, "Flatten": _flatten, "Reshape": _reshape,
    "Squeeze": _squeeze, "Unsqueeze": _squeeze, "Shape": _shape,
}
