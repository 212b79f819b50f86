"""Layouts, sites and fixes of channel groups, and the builder the op rules record them in.

Every value that carries channels has a channel axis and a *layout*, its positions along that
axis as segments
    (group, channels [start, stop), inner):  channel c at offset + (c - start)·inner + [0, inner)
so Concat appends segments, Split and Slice cut them, Flatten / Reshape [N, C, H, W] -> [N, C·H·W]
multiplies inner by H·W (channel c = rows [c·HW, (c+1)·HW) of the next Gemm's K), and a
depthwise Conv with multiplier m multiplies it by m. Removing channel c removes, from every
*site* (a constant's axis: producer rows, consumer input columns, BN and other per-channel
constants) and every *fix* (Split sizes, Slice bounds, Reshape targets, Resize sizes, a depthwise
Conv's `group`), the positions the layout gives c. A grouped Conv (1 < group < C_in) ties
channels to blocks: a group it touches loses as many channels in each block (`blocks`).

ChannelBuilder is what the op rules (_channel_rules) write to while the graph is walked: groups
in a union-find (the earlier producer stays the root, so group keys are stable), refusals, carried
values, sites, fixes, and each linear node's dense MACs: Conv N·C_out·|out spatial|·(C_in/group)·
|kernel|, ConvTranspose N·C_in·|in spatial|·(C_out/group)·|kernel|, Gemm / MatMul M·K·N, from
ONNX shape inference, a symbolic batch as 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes._graph import NameSource, constant, describe, opset_version

__all__ = [
    "LINEAR", "Carried", "ChannelBuilder", "Fix", "MacNode", "Segment", "Site", "channel_index",
    "constant_source", "has_group", "is_known", "kept_length", "layout_length", "node_name",
    "normalize_axis", "sublayout",
]

LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the ops that produce groups


@dataclasses.dataclass(frozen=True)
class Segment:
    group: int | None  # None: channels no group owns (a graph input's): never removed
    start: int
    stop: int
    inner: int = 1  # consecutive positions per channel: H·W after Flatten, m after depthwise

    @property
    def size(self) -> int:
        return (self.stop - self.start) * self.inner


@dataclasses.dataclass(frozen=True)
class Carried:
    """What a value carries: its channel axis, its rank and the layout along that axis."""

    axis: int
    rank: int
    layout: tuple  # of Segment


@dataclasses.dataclass
class Site:
    node: ir.Node
    input: int
    axis: int
    layout: tuple
    # "producer", "consumer", "weight" (depthwise): weights, counted for importance;
    # "scale" (BN): counted; "param" (bias, BN statistics, per-channel constants): not counted.
    role: str
    blocks: int = 1  # grouped Conv consumer: the weight's axis 1 holds C_in/blocks per block


@dataclasses.dataclass
class Fix:
    layouts: list  # kept lengths of these layouts are what `write` puts in the graph
    write: Callable[[list[int], NameSource], None]


@dataclasses.dataclass
class MacNode:
    node: ir.Node
    base: float
    sides: list  # layouts whose kept share multiplies base (input side, output side)


class ChannelBuilder:
    """The groups being built and what the op rules recorded: carried values, sites, fixes,
    MAC nodes. ChannelGraph (_channel_groups) walks the graph with it and finalizes."""

    def __init__(self, model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None):
        self.model, self.graph = model, model.graph
        self.opset = opset_version(model.graph)
        self._dims = _infer_dims(model, None)  # structure: symbolic dims keep their names
        self._sized = _infer_dims(model, dict(shapes or {}))  # MACs: batch 1, user's shapes
        batch = {v.shape[0].value for v in model.graph.inputs if v.shape is not None
                 and v.shape.rank() and not isinstance(v.shape[0], int)}
        # Sizes observed at run time (any value name) settle what inference could not follow
        # (BERT's computed Reshapes); what is still unknown, a batch dim, counts 1.
        inputs = {v.name for v in model.graph.inputs}
        self._sized.update({k: tuple(v) for k, v in (shapes or {}).items() if k not in inputs})
        for name, dims in self._dims.items():
            if not is_known(*self._sized.get(name, (None,))):
                self._sized[name] = tuple(1 if d in batch else d for d in dims)
        self._parent: list[int] = []
        self._channels: list[int] = []
        self._blocks: list[int] = []
        self._producers: list[list[ir.Node]] = []
        self._chain: dict[int, list[str]] = {}
        self._reasons: dict[int, str] = {}
        self.carried: dict[ir.Value, Carried] = {}
        self.sites: list[Site] = []
        self.fixes: list[Fix] = []
        self.mac_nodes: dict[ir.Node, MacNode] = {}
        self.notes: list[str] = []
        self.copies: set[ir.Value] = set()  # shared per-channel parameters, copied per reader
        self._unsized: list[str] = []

    # ------------------------------------------------------------------ groups (union-find)
    def find(self, gid: int) -> int:
        while self._parent[gid] != gid:
            self._parent[gid] = self._parent[self._parent[gid]]
            gid = self._parent[gid]
        return gid

    def new_group(self, node: ir.Node, channels: int, blocks: int = 1) -> tuple:
        gid = len(self._parent)
        self._parent.append(gid)
        self._channels.append(channels)
        self._blocks.append(blocks)
        self._producers.append([node])
        self._chain[gid] = []
        return (Segment(gid, 0, channels),)

    def union(self, a: int, b: int) -> None:
        a, b = sorted((self.find(a), self.find(b)))  # the earlier producer stays the root
        if a == b:
            return
        self._parent[b] = a
        self._blocks[a] = math.lcm(self._blocks[a], self._blocks[b])
        self._producers[a] += self._producers[b]
        self._chain[a] += self._chain.pop(b)
        if b in self._reasons:
            self._reasons.setdefault(a, self._reasons.pop(b))

    def refuse(self, layout: tuple, reason: str) -> None:
        for segment in layout:
            if segment.group is not None:
                self._reasons.setdefault(self.find(segment.group), reason)

    def refuse_inputs(self, node: ir.Node, ins: list, why: str) -> None:
        for carried in ins:
            if carried is not None:
                self.refuse(carried.layout, f"read by {describe(node)}, {why}")

    def require_blocks(self, gid: int, blocks: int) -> None:
        root = self.find(gid)
        self._blocks[root] = math.lcm(self._blocks[root], blocks)

    def whole(self, segment: Segment) -> bool:
        return (segment.group is not None and segment.start == 0
                and segment.stop == self._channels[self.find(segment.group)])

    # ------------------------------------------------------------------ building blocks
    def dims(self, value: ir.Value | None) -> tuple | None:
        """Static dims (None where unknown) from shape inference or the value's own shape."""
        if value is None:
            return None
        if value.name in self._dims:
            return self._dims[value.name]
        array = constant(value)
        if array is not None:
            return array.shape
        return None if value.shape is None else tuple(_dim(d) for d in value.shape)

    def rank(self, value: ir.Value | None) -> int | None:
        """From shape inference, else from the sizes observed at run time (`shapes`): ONNX
        inference leaves some outputs without a shape (Swin at opset 13: its MatMuls after a
        decomposed LayerNormalization)."""
        dims = self.dims(value)
        if dims is None and value is not None and value.name in self._sized:
            return len(self._sized[value.name])
        return None if dims is None else len(dims)

    def carry(self, value: ir.Value | None, node: ir.Node, axis: int, rank: int,
              layout: tuple) -> None:
        if value is None:
            return
        self.carried[value] = Carried(axis, rank, layout)
        if node.op_type not in LINEAR:
            for segment in layout:
                if segment.group is not None:
                    self._chain[self.find(segment.group)].append(node.op_type)

    def site(self, node: ir.Node, index: int, axis: int, layout: tuple, role: str,
             blocks: int = 1) -> bool:
        """Register `node.inputs[index]` (a constant) as shrinking with `layout` on `axis`."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            return True  # an optional input left out (a Conv without bias)
        array = constant(constant_source(value))
        if array is None:
            self.refuse(layout, f"input {index} {value.name!r} of {describe(node)} is not a "
                        "constant")
            return False
        expected = layout_length(layout) // blocks
        if array.ndim <= axis or array.shape[axis] != expected:
            self.refuse(layout, f"{value.name!r} of {describe(node)} has shape "
                        f"{list(array.shape)}, not {expected} on axis {axis}")
            return False
        self.sites.append(Site(node, index, axis, layout, role, blocks))
        return True

    def mac(self, node: ir.Node, sides: list) -> None:
        """Record a Conv / ConvTranspose / Gemm / MatMul: its dense MACs and the layouts that
        shrink it (input side, output side)."""
        factors = _mac_factors(node, self._sized)
        if not is_known(*factors):
            self._unsized.append(describe(node))
        self.mac_nodes[node] = MacNode(node, math.prod(f for f in factors if is_known(f)), sides)


# ---------------------------------------------------------------------- layouts
def layout_length(layout: tuple) -> int:
    return sum(s.size for s in layout)


def has_group(layout: tuple, root: int) -> bool:
    return any(s.group == root for s in layout)


def channel_index(layout: tuple, root: int) -> np.ndarray:
    """Per position: the channel of group `root` there, or -1."""
    parts = [np.repeat(np.arange(s.start, s.stop), s.inner) if s.group == root
             else np.full(s.size, -1) for s in layout]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def kept_length(layout: tuple, removed: Mapping[int, np.ndarray]) -> int:
    return sum(s.size - int(removed[s.group][s.start:s.stop].sum()) * s.inner
               if s.group in removed else s.size for s in layout)


def sublayout(layout: tuple, low: int, high: int) -> tuple | None:
    """Positions [low, high) as segments; None when a bound cuts inside a channel's block."""
    out, offset = [], 0
    for s in layout:
        a, b = max(low, offset), min(high, offset + s.size)
        if a < b:
            if (a - offset) % s.inner or (b - offset) % s.inner:
                return None
            out.append(Segment(s.group, s.start + (a - offset) // s.inner,
                               s.start + (b - offset) // s.inner, s.inner))
        offset += s.size
    return tuple(out)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def constant_source(value: ir.Value) -> ir.Value:
    """The constant behind a chain of Identity nodes (exporters share biases that way)."""
    while (producer := value.producer()) is not None and producer.op_type == "Identity" \
            and producer.domain in ("", "ai.onnx") and constant(producer.inputs[0]) is not None:
        value = producer.inputs[0]
    return value


def node_name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "") or node.op_type


# ---------------------------------------------------------------------- shapes and MACs
def is_known(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def _infer_dims(model: ir.Model, shapes: dict | None) -> dict[str, tuple]:
    """Value name -> dims (int, symbolic name or None) from ONNX shape inference on a clone.
    With `shapes`, graph inputs take those shapes and a symbolic batch becomes 1 (for counting
    MACs)."""
    copy = model.clone()
    if shapes is not None:
        for value in copy.graph.inputs:
            if value.name in shapes:
                value.shape = ir.Shape(shapes[value.name])
            elif value.shape is not None and value.shape.rank() and \
                    not isinstance(value.shape[0], int):
                value.shape = ir.Shape([1, *value.shape[1:]])
    common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(copy)
    return {name: tuple(_dim(d) for d in value.shape)
            for name, value in ir.convenience.create_value_mapping(copy.graph).items()
            if value.shape is not None}


def _dim(dim) -> int | str | None:
    """An int, a symbolic name (equal names are equal sizes), or None (unknown)."""
    return dim if isinstance(dim, int) else getattr(dim, "value", None)


def _mac_factors(node: ir.Node, sized: dict[str, tuple]) -> list:
    """The sizes whose product is a linear node's dense MACs (None or a name: unknown)."""
    def dims(value):
        array = None if value is None else constant(value)
        return array.shape if array is not None else sized.get(value.name) if value else None
    x, w, y = dims(node.inputs[0]), dims(node.inputs[1]), dims(node.outputs[0])
    if node.op_type in ("Conv", "ConvTranspose"):  # N·|spatial| of output (input) · |W|
        data = y if node.op_type == "Conv" else x
        return [*(data[:1] + data[2:] if data else [None]), *(w or [None])]
    k = None if x is None else x[0 if node.attributes.get_int("transA", 0) else -1]
    return [*(y or [None]), k]  # Gemm / MatMul: |Y| · K
