"""Channel dependency graph for structured pruning: which tensor dimensions shrink together.

A *group* is one channel space of n channels: the output channels of its producers (Conv,
ConvTranspose, Gemm, MatMul with a constant weight), merged by every op that ties two spaces
channel for channel (Add / Sub / Mul of two activations). Every value that carries channels has
a channel axis and a *layout*, its positions along that axis as segments
    (group, channels [start, stop), inner):  channel c at offset + (c - start)·inner + [0, inner)
so Concat appends segments, Split and Slice cut them, Flatten / Reshape [N, C, H, W] -> [N, C·H·W]
multiplies inner by H·W (channel c = rows [c·HW, (c+1)·HW) of the next Gemm's K), and a
depthwise Conv with multiplier m multiplies it by m. Removing channel c removes, from every
*site* (a constant's axis: producer rows, consumer input columns, BN and other per-channel
constants) and every *fix* (Split sizes, Slice bounds, Reshape targets, Resize sizes, a depthwise
Conv's `group`), the positions the layout gives c. A grouped Conv (1 < group < C_in) ties
channels to blocks: a group it touches loses as many channels in each block (`blocks`).

A group is refused (kept whole; the reason names the node) when: 1. it reaches a graph output;
2. an elementwise op or Concat ties it to channels no group owns (a graph input, an unknown op);
3. an op that cannot follow channels reads it (Transpose, Softmax, LayerNormalization, attention
MatMul, custom domains, nodes with subgraphs, a reader inside a subgraph, a Shape whose channel
count is used; a Shape read for the batch only, as in x.view(x.size(0), -1), is fine); 4. one
of its weights, biases or per-channel constants is not a constant, or is read by a node outside
its sites, or is a weight its sites slice two ways (a shared bias or BN parameter gets a copy
per reader instead: deduplication shares equal ones); 5. its layout cannot be followed:
segments that do not line up in an Add, a cut inside a channel's block, a Reshape other than
[N, C, rest] -> [N, C·rest] or [N, C, *rest'], a Pad or Resize that changes the channel axis,
computed Slice bounds or Split sizes, a grouped Conv reading several groups; 6. `blocks` does
not leave two or more channels per block; a grouped ConvTranspose. Functions and subgraphs are
never changed.

MACs: Conv N·C_out·|out spatial|·(C_in/group)·|kernel|, ConvTranspose N·C_in·|in spatial|·
(C_out/group)·|kernel|, Gemm / MatMul M·K·N, from ONNX shape inference, a symbolic batch as 1.
A node whose input and output positions shrink by r_in and r_out keeps base·(1 - r_in)(1 - r_out).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes._graph import NameSource, constant, describe, opset_version

__all__ = ["ActivationSite", "ChannelGraph", "ChannelGroup", "ChannelSite", "channel_groups"]

_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_UNARY = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
    "Selu", "Celu", "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Identity",
    "Dropout", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Cast", "Floor", "Ceil",
    "Round", "Sign", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool"})  # same channels in, same channels out (pooling: spatial axes only)
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow",
                          "PRelu"})  # a constant operand with C channels shrinks with them
_COPIED = ("scale", "param")  # roles whose shared constants are copied, not refused
_FREE_FIRST_INPUT = frozenset({*_LINEAR, *_ELEMENTWISE, "Concat"})  # channels on any input
_REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd",
                     "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"})
# Ops known not to follow channels, and why (the rest get "which cannot follow its channels").
_REFUSED_OPS = {
    "Transpose": "which moves the channel axis",
    "Softmax": "which normalizes across the channels",
    "LogSoftmax": "which normalizes across the channels",
    "LayerNormalization": "which normalizes across the channels",
    "GroupNormalization": "which normalizes groups of channels",
    "Gather": "which picks positions along an axis",
}


@dataclasses.dataclass(frozen=True)
class _Segment:
    group: int | None  # None: channels no group owns (a graph input's): never removed
    start: int
    stop: int
    inner: int = 1  # consecutive positions per channel: H·W after Flatten, m after depthwise

    @property
    def size(self) -> int:
        return (self.stop - self.start) * self.inner


@dataclasses.dataclass(frozen=True)
class _Carried:
    """What a value carries: its channel axis, its rank and the layout along that axis."""

    axis: int
    rank: int
    layout: tuple  # of _Segment


@dataclasses.dataclass
class _Site:
    node: ir.Node
    input: int
    axis: int
    layout: tuple
    # "producer", "consumer", "weight" (depthwise): weights, counted for importance;
    # "scale" (BN): counted; "param" (bias, BN statistics, per-channel constants): not counted.
    role: str
    blocks: int = 1  # grouped Conv consumer: the weight's axis 1 holds C_in/blocks per block


@dataclasses.dataclass
class _Fix:
    layouts: list  # kept lengths of these layouts are what `write` puts in the graph
    write: Callable[[list[int], NameSource], None]


@dataclasses.dataclass
class _MacNode:
    node: ir.Node
    base: float
    sides: list  # layouts whose kept share multiplies base (input side, output side)


@dataclasses.dataclass
class ChannelSite:
    """A constant that shrinks with the group: `node.inputs[input]` loses positions on `axis`.
    `index[p]` is the group channel at position p (-1: another group's). For a consumer, p runs
    over the activation's channels; a grouped Conv's weight holds C_in/group of them per block."""

    node: ir.Node
    input: int
    axis: int
    index: np.ndarray


@dataclasses.dataclass
class ActivationSite:
    """A value carrying the group's channels on `axis` (`index` as in ChannelSite)."""

    value: ir.Value
    axis: int
    index: np.ndarray


@dataclasses.dataclass
class ChannelGroup:
    key: str  # the first producer's node name (unique): what `remove=` and `scores=` name
    channels: int
    producers: list[ir.Node]
    consumers: list[ChannelSite]
    # Producer-side constants holding one slice per channel: producer weights and biases, BN
    # parameters, depthwise weights, per-channel constants of Add / Mul.
    parameters: list[ChannelSite]
    activations: list[ActivationSite]
    macs_per_channel: float  # MACs one average channel costs in the dense model
    refused: str | None
    blocks: int = 1  # removals must be equal in each of `blocks` runs of channels (grouped Conv)
    chain: str = ""  # "Conv 'a' -> Relu -> Conv 'b'", for log lines
    root: int = dataclasses.field(default=-1, repr=False)


def channel_groups(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None
                   ) -> list[ChannelGroup]:
    """Every channel group of the main graph, refused ones included (with their reason)."""
    return ChannelGraph(model, shapes).groups


class ChannelGraph:
    """The groups of one model, with what pruning needs: sites, fixes, MAC model."""

    def __init__(self, model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None):
        self.model, self.graph = model, model.graph
        self.opset = opset_version(model.graph)
        self._dims = _infer_dims(model, None)  # structure: symbolic dims keep their names
        self._sized = _infer_dims(model, dict(shapes or {}))  # MACs: batch 1, user's shapes
        batch = {v.shape[0].value for v in model.graph.inputs if v.shape is not None
                 and v.shape.rank() and not isinstance(v.shape[0], int)}
        for name, dims in self._dims.items():  # a batch inference could not follow counts 1
            if not _known(*self._sized.get(name, (None,))):
                self._sized[name] = tuple(1 if d in batch else d for d in dims)
        self._parent: list[int] = []
        self._channels: list[int] = []
        self._blocks: list[int] = []
        self._producers: list[list[ir.Node]] = []
        self._chain: dict[int, list[str]] = {}
        self._reasons: dict[int, str] = {}
        self.carried: dict[ir.Value, _Carried] = {}
        self.sites: list[_Site] = []
        self.fixes: list[_Fix] = []
        self.mac_nodes: dict[ir.Node, _MacNode] = {}
        self.notes: list[str] = []
        self.copies: set[ir.Value] = set()  # shared per-channel parameters, copied per reader
        self._unsized: list[str] = []
        for node in self.graph:
            self._visit(node)
            if node.op_type in _LINEAR and node.domain in ("", "ai.onnx") and \
                    node not in self.mac_nodes:
                self.mac(node, [])
        if self._unsized:
            self.notes.append(f"MACs: {len(self._unsized)} node(s) have sizes shape inference "
                              f"could not resolve, counted as 1 ({', '.join(self._unsized[:3])}"
                              f"{', ...' if len(self._unsized) > 3 else ''}); pass shapes=")
        self._check_boundaries()
        self._check_constants()
        self.groups = self._finalize()

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
        return (_Segment(gid, 0, channels),)

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

    def whole(self, segment: _Segment) -> bool:
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
        dims = self.dims(value)
        return None if dims is None else len(dims)

    def carry(self, value: ir.Value | None, node: ir.Node, axis: int, rank: int,
              layout: tuple) -> None:
        if value is None:
            return
        self.carried[value] = _Carried(axis, rank, layout)
        if node.op_type not in _LINEAR:
            for segment in layout:
                if segment.group is not None:
                    self._chain[self.find(segment.group)].append(node.op_type)

    def site(self, node: ir.Node, index: int, axis: int, layout: tuple, role: str,
             blocks: int = 1) -> bool:
        """Register `node.inputs[index]` (a constant) as shrinking with `layout` on `axis`."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            return True  # an optional input left out (a Conv without bias)
        array = constant(_source(value))
        if array is None:
            self.refuse(layout, f"input {index} {value.name!r} of {describe(node)} is not a "
                        "constant")
            return False
        expected = _length(layout) // blocks
        if array.ndim <= axis or array.shape[axis] != expected:
            self.refuse(layout, f"{value.name!r} of {describe(node)} has shape "
                        f"{list(array.shape)}, not {expected} on axis {axis}")
            return False
        self.sites.append(_Site(node, index, axis, layout, role, blocks))
        return True

    def mac(self, node: ir.Node, sides: list) -> None:
        """Record a Conv / ConvTranspose / Gemm / MatMul: its dense MACs and the layouts that
        shrink it (input side, output side)."""
        factors = _mac_factors(node, self._sized)
        if not _known(*factors):
            self._unsized.append(describe(node))
        self.mac_nodes[node] = _MacNode(node, math.prod(f for f in factors if _known(f)), sides)

    # ------------------------------------------------------------------ traversal
    def _visit(self, node: ir.Node) -> None:
        ins = [None if v is None else self.carried.get(v) for v in node.inputs]
        rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):
            rule = None
        if rule is None:
            self.refuse_inputs(node, ins, _REFUSED_OPS.get(node.op_type,
                                                           "which cannot follow its channels"))
        elif node.op_type not in _FREE_FIRST_INPUT and ins[0] is None and any(ins):
            self.refuse_inputs(node, ins, "which takes channels as a parameter")
        elif node.op_type in _LINEAR or any(c is not None for c in ins):
            rule(self, node, ins)

    def _check_boundaries(self) -> None:
        visited = set(self.graph)
        for value, carried in self.carried.items():
            if value.is_graph_output():
                self.refuse(carried.layout, f"feeds graph output {value.name!r}")
            for node in value.consumers():
                if node not in visited:
                    self.refuse(carried.layout, f"read inside a subgraph by {describe(node)}")

    def _check_constants(self) -> None:
        """Refuse a constant read by a node outside the sites, or a weight sliced two ways;
        a shared bias or BN parameter sliced two ways gets a copy per reader instead."""
        by_source: dict[ir.Value, dict] = defaultdict(lambda: defaultdict(list))
        sites_of: dict[ir.Value, list[_Site]] = defaultdict(list)
        for site in self.sites:
            source = _source(site.node.inputs[site.input])
            sites_of[source].append(site)
            spec = (site.axis, self.resolve(site.layout), site.blocks)
            by_source[source][(site.node, site.input)].append(spec)
        for source, uses in by_source.items():
            reason = None
            if source.is_graph_output():
                reason = f"constant {source.name!r} is a graph output"
            for node, index in _terminal_uses(source):
                if (node, index) not in uses:
                    reason = f"constant {source.name!r} is also read by {describe(node)}"
            if len({tuple(specs) for specs in uses.values()}) > 1:
                if all(s.role in _COPIED for s in sites_of[source]) and reason is None:
                    self.copies.add(source)  # equal biases deduplicated: one copy per reader
                else:
                    reason = f"constant {source.name!r} is shared by " + " and ".join(
                        describe(node) for node, _ in uses)
            if reason:
                for (node, index), specs in uses.items():
                    for _, layout, _ in specs:
                        self.refuse(layout, reason)

    def resolve(self, layout: tuple) -> tuple:
        return tuple(s if s.group is None else dataclasses.replace(s, group=self.find(s.group))
                     for s in layout)

    def _finalize(self) -> list[ChannelGroup]:
        for site in self.sites:
            site.layout = self.resolve(site.layout)
        for fix in self.fixes:
            fix.layouts = [self.resolve(layout) for layout in fix.layouts]
        for mac in self.mac_nodes.values():
            mac.sides = [self.resolve(layout) for layout in mac.sides]
        self.carried = {v: dataclasses.replace(c, layout=self.resolve(c.layout))
                        for v, c in self.carried.items()}
        groups, keys = [], set()
        for root in sorted({self.find(g) for g in range(len(self._parent))}):
            channels, blocks = self._channels[root], self._blocks[root]
            if channels % blocks or channels == blocks:
                self._reasons.setdefault(root, f"its {channels} channels do not split into "
                                         f"{blocks} grouped-Conv blocks of two or more")
            key = _unique(_name(self._producers[root][0]), keys)
            groups.append(ChannelGroup(
                key, channels, self._producers[root], self._consumers(root),
                [ChannelSite(s.node, s.input, s.axis, _index(s.layout, root))
                 for s in self.sites if s.role != "consumer" and _has(s.layout, root)],
                [ActivationSite(v, c.axis, _index(c.layout, root))
                 for v, c in self.carried.items() if _has(c.layout, root)],
                self._macs_per_channel(root), self._reasons.get(root), blocks,
                self._describe_chain(root), root))
        return groups

    def _consumers(self, root: int) -> list[ChannelSite]:
        return [ChannelSite(s.node, s.input, s.axis,
                            _index(self.carried[s.node.inputs[0]].layout, root))
                for s in self.sites if s.role == "consumer" and _has(s.layout, root)]

    def _macs_per_channel(self, root: int) -> float:
        total = 0.0
        for mac in self.mac_nodes.values():
            for layout in mac.sides:
                total += mac.base * (_index(layout, root) >= 0).sum() / _length(layout)
        return total / self._channels[root]

    def _describe_chain(self, root: int) -> str:
        producers = ", ".join(f"{n.op_type} {_name(n)!r}" for n in self._producers[root])
        consumers = ", ".join(f"{s.node.op_type} {_name(s.node)!r}" for s in self.sites
                              if s.role == "consumer" and _has(s.layout, root))
        middle = list(dict.fromkeys(self._chain[root]))
        parts = [producers, *middle[:4], *(["..."] if len(middle) > 4 else [])]
        return " -> ".join(parts + ([consumers] if consumers else []))

    # ------------------------------------------------------------------ MACs and slices
    def macs(self, removed: Mapping[int, np.ndarray] | None = None) -> float:
        """Model MACs with `removed` (root -> bool mask of removed channels)."""
        return sum(self.node_macs(mac, removed or {}) for mac in self.mac_nodes.values())

    @staticmethod
    def node_macs(mac: _MacNode, removed: Mapping[int, np.ndarray]) -> float:
        value = mac.base
        for layout in mac.sides:
            value *= _kept_length(layout, removed) / _length(layout)
        return value

    def coupled_slices(self, group: ChannelGroup) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
        """(array, axis, index) of the group's weights counted for importance: producer rows,
        consumer columns, depthwise weights, BN scale; index maps positions on axis to channels."""
        for site in self.sites:
            if site.role == "param" or not _has(site.layout, group.root):
                continue
            array = constant(_source(site.node.inputs[site.input]))
            if site.blocks > 1:  # W[G·b, a, k] -> [b, G·a, k]: axis 1 = activation positions
                g, a = site.blocks, array.shape[1]
                array = array.reshape(g, -1, a, *array.shape[2:]).swapaxes(0, 1)
                array = array.reshape(array.shape[0], g * a, *array.shape[3:])
            yield array, site.axis, _index(site.layout, group.root)

    def apply(self, removed: Mapping[int, np.ndarray]) -> list[ir.Node]:
        """Remove the channels (root -> bool mask) from every site, fix and value; returns the
        consumer nodes whose input channels shrank."""
        names = NameSource(self.graph)
        uses: dict[tuple, list[_Site]] = defaultdict(list)
        for site in self.sites:
            uses[(site.node, site.input)].append(site)
        done: set[ir.Value] = set()
        for (node, index), specs in uses.items():
            source = _source(node.inputs[index])
            if source in done or not any(_touched(s.layout, removed) for s in specs):
                continue
            array = constant(source)
            for spec in sorted(specs, key=lambda s: -s.blocks):  # a grouped gather first
                array = _slice(array, spec, _kept(spec.layout, removed))
            if source in self.copies:
                _set_input(node, index, array, names, source.name)
            else:
                done.add(source)
                _write_constant(source, array)
        for fix in self.fixes:
            if any(_touched(layout, removed) for layout in fix.layouts):
                fix.write([_kept_length(layout, removed) for layout in fix.layouts], names)
        for value, carried in self.carried.items():
            if value.shape is not None and _touched(carried.layout, removed):
                dims = list(value.shape)
                dims[carried.axis] = _kept_length(carried.layout, removed)
                value.shape = ir.Shape(dims)
        common.RemoveUnusedNodesPass()(self.model)
        return list(dict.fromkeys(s.node for s in self.sites
                                  if s.role == "consumer" and _touched(s.layout, removed)))


# ---------------------------------------------------------------------- layouts
def _length(layout: tuple) -> int:
    return sum(s.size for s in layout)


def _has(layout: tuple, root: int) -> bool:
    return any(s.group == root for s in layout)


def _index(layout: tuple, root: int) -> np.ndarray:
    """Per position: the channel of group `root` there, or -1."""
    parts = [np.repeat(np.arange(s.start, s.stop), s.inner) if s.group == root
             else np.full(s.size, -1) for s in layout]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _keep_mask(layout: tuple, removed: Mapping[int, np.ndarray]) -> np.ndarray:
    parts = [np.repeat(~removed[s.group][s.start:s.stop], s.inner) if s.group in removed
             else np.ones(s.size, dtype=bool) for s in layout]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _kept(layout: tuple, removed: Mapping[int, np.ndarray]) -> np.ndarray:
    return np.flatnonzero(_keep_mask(layout, removed))


def _kept_length(layout: tuple, removed: Mapping[int, np.ndarray]) -> int:
    return sum(s.size - int(removed[s.group][s.start:s.stop].sum()) * s.inner
               if s.group in removed else s.size for s in layout)


def _touched(layout: tuple, removed: Mapping[int, np.ndarray]) -> bool:
    return any(s.group in removed and removed[s.group][s.start:s.stop].any() for s in layout)


def _sublayout(layout: tuple, low: int, high: int) -> tuple | None:
    """Positions [low, high) as segments; None when a bound cuts inside a channel's block."""
    out, offset = [], 0
    for s in layout:
        a, b = max(low, offset), min(high, offset + s.size)
        if a < b:
            if (a - offset) % s.inner or (b - offset) % s.inner:
                return None
            out.append(_Segment(s.group, s.start + (a - offset) // s.inner,
                                s.start + (b - offset) // s.inner, s.inner))
        offset += s.size
    return tuple(out)


def _slice(array: np.ndarray, site: _Site, keep: np.ndarray) -> np.ndarray:
    """Keep positions `keep` on the site's axis. Pure indexing, so it is exact in any dtype."""
    if site.blocks == 1:
        return np.take(array, keep, axis=site.axis)
    g, a = site.blocks, array.shape[1]  # grouped Conv: output block i reads positions i·a + j
    rows = array.reshape(g, -1, *array.shape[1:])
    return np.concatenate([rows[i][:, keep[(keep >= i * a) & (keep < (i + 1) * a)] - i * a]
                           for i in range(g)])


# ---------------------------------------------------------------------- constants
def _source(value: ir.Value) -> ir.Value:
    """The constant behind a chain of Identity nodes (exporters share biases that way)."""
    while (producer := value.producer()) is not None and producer.op_type == "Identity" \
            and producer.domain in ("", "ai.onnx") and constant(producer.inputs[0]) is not None:
        value = producer.inputs[0]
    return value


def _terminal_uses(value: ir.Value) -> Iterator[tuple[ir.Node, int]]:
    for node, index in value.uses():
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
            if node.outputs[0].is_graph_output():
                yield node, index
            yield from _terminal_uses(node.outputs[0])
        else:
            yield node, index


def _write_constant(source: ir.Value, array: np.ndarray) -> None:
    tensor = ir.tensor(array, name=source.name)
    if source.is_initializer():
        source.const_value = tensor
    else:  # a Constant node's output
        node = source.producer()
        node.attributes.clear()
        node.attributes["value"] = ir.AttrTensor("value", tensor)
    source.shape = ir.Shape(array.shape)
    stack = [n.outputs[0] for n in source.consumers() if n.op_type == "Identity"]
    while stack:  # the Identity chain's outputs: a stale shape would fail the checker
        value = stack.pop()
        if value.shape is not None:
            value.shape = ir.Shape(array.shape)
        stack += [n.outputs[0] for n in value.consumers() if n.op_type == "Identity"]


def _ints(node: ir.Node, index: int, attribute: str, opset_moved: int, opset: int
          ) -> list[int] | None:
    """An int list given as input `index` (opset >= opset_moved) or as an attribute."""
    if opset >= opset_moved:
        value = node.inputs[index] if index < len(node.inputs) else None
        array = None if value is None else constant(value)
        return None if array is None else [int(x) for x in array.ravel()]
    attr = node.attributes.get(attribute)
    return None if attr is None else [int(x) for x in attr.value]


def _set_input(node: ir.Node, index: int, array: np.ndarray, names: NameSource,
               base: str | None = None) -> None:
    """A new initializer as `node.inputs[index]` (shape constants may be shared: never edited)."""
    graph = node.graph
    name = names(base or f"{_name(node)}_input{index}")
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


# ---------------------------------------------------------------------- shapes and MACs
def _infer_dims(model: ir.Model, shapes: dict | None) -> dict[str, tuple]:
    """Value name -> dims (int, symbolic name or None) from ONNX shape inference on a clone.
    With `shapes`,
    graph inputs take those shapes and a symbolic batch becomes 1 (for counting MACs)."""
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


def _known(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


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


def _unique(name: str, taken: set[str]) -> str:
    key, index = name, 2
    while key in taken:
        key, index = f"{name}#{index}", index + 1
    taken.add(key)
    return key


def _name(node: ir.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else "") or node.op_type


# ---------------------------------------------------------------------- rules per op
def _normalize(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _unary(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c = ins[0]
    if c is None or any(x is not None for x in ins[1:]):
        return b.refuse_inputs(node, ins, "whose parameters are activations")
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1] is not None \
            and node.outputs[1].uses():
        return b.refuse(c.layout, f"read by {describe(node)}, whose indices output is used")
    for value in node.outputs:
        b.carry(value, node, c.axis, c.rank, c.layout)


def _unify(b: ChannelGraph, node: ir.Node, layouts: list[tuple]) -> tuple:
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


def _elementwise(b: ChannelGraph, node: ir.Node, ins: list) -> None:
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
        if at is None or dims[at] != _length(layout) or constant(_source(value)) is None:
            b.refuse(layout, f"{describe(node)} combines it with {value.name!r}, whose "
                     "channels no group owns")
        else:
            b.site(node, index, at, layout, "param")
    b.carry(node.outputs[0], node, axis, rank, layout)


def _batchnorm(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c = ins[0]
    if any(x is not None for x in ins[1:]) or any(v is not None and v.uses()
                                                  for v in node.outputs[1:]):
        return b.refuse_inputs(node, ins, "in training mode")
    for index in range(1, len(node.inputs)):  # scale (and B, mean, var): per channel
        role = "scale" if index == 1 else "param"
        b.site(node, index, 0, c.layout, role)
    b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)


def _concat(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    first = next(c for c in ins if c is not None)
    axis = _normalize(node.attributes.get_int("axis", 0), first.rank)
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
        if c is None and (dims is None or not _known(dims[axis])):
            return b.refuse_inputs(node, ins, f"with {value.name!r} of unknown channels")
        segments += c.layout if c is not None else [_Segment(None, 0, dims[axis])]
    b.carry(node.outputs[0], node, axis, first.rank, tuple(segments))


def _split(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c = ins[0]
    axis = _normalize(node.attributes.get_int("axis", 0), c.rank)
    if axis != c.axis:
        for value in node.outputs:
            b.carry(value, node, c.axis, c.rank, c.layout)
        return
    length, count = _length(c.layout), len(node.outputs)
    sizes = _ints(node, 1, "split", 13, b.opset)
    if sizes is None and (len(node.inputs) < 2 or node.inputs[1] is None):
        step = -(-length // count)  # opset 18 num_outputs: equal chunks, the last smaller
        sizes = [min(step, length - i * step) for i in range(count)]
    parts, offset = [], 0
    for size in sizes or []:
        parts.append(_sublayout(c.layout, offset, offset + size))
        offset += size
    if sizes is None or any(p is None for p in parts) or offset != length:
        return b.refuse(c.layout, f"{describe(node)} cuts its channels where they cannot "
                        "follow (computed sizes or inside a channel's block)")
    for value, part in zip(node.outputs, parts):
        b.carry(value, node, axis, c.rank, part)

    def write(kept: list[int], names: NameSource) -> None:
        if b.opset >= 13:
            _set_input(node, 1, np.array(kept, dtype=np.int64), names)
            node.attributes.pop("num_outputs", None)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", kept)
    b.fixes.append(_Fix(parts, write))


def _slice_op(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c, length = ins[0], _length(ins[0].layout)
    moved = b.opset >= 10  # starts / ends / axes / steps became inputs
    bounds = [_ints(node, i, key, 10, b.opset) for i, key in enumerate(_SLICE_KEYS, start=1)]
    given = [(_input(node, i) is not None) if moved else key in node.attributes
             for i, key in enumerate(_SLICE_KEYS, start=1)]
    if any(x is not None for x in ins[1:]) or any(g and v is None for g, v in zip(given, bounds)):
        return b.refuse(c.layout, f"read by {describe(node)}, whose bounds are computed")
    starts, ends, axes, steps = bounds
    axes = [_normalize(a, c.rank) for a in (axes or range(len(starts)))]
    if c.axis not in axes:
        return b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)
    i = axes.index(c.axis)
    low, high = (min(max(x + length if x < 0 else x, 0), length) for x in (starts[i], ends[i]))
    part = _sublayout(c.layout, low, high) if (steps or [1] * len(axes))[i] == 1 else None
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
                _set_input(node, index, np.array(values, dtype=np.int64), names)
            else:
                node.attributes[key] = ir.AttrInt64s(key, values)
    b.fixes.append(_Fix([_sublayout(c.layout, 0, low), _sublayout(c.layout, 0, high)], write))


_SLICE_KEYS = ("starts", "ends", "axes", "steps")


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    return node.inputs[index] if index is not None and index < len(node.inputs) else None


def _pad(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c = ins[0]
    pads = _ints(node, 1, "pads", 11, b.opset)
    axes = _ints(node, 3, "axes", 18, b.opset) if b.opset >= 18 else None
    axes = [_normalize(a, c.rank) for a in (axes or range(c.rank))]
    if pads is None or any(x is not None for x in ins[1:]) or (
            c.axis in axes and (pads[axes.index(c.axis)] or pads[axes.index(c.axis) + len(axes)])):
        return b.refuse(c.layout, f"read by {describe(node)}, which pads the channel axis")
    b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)


def _resize(b: ChannelGraph, node: ir.Node, ins: list) -> None:
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
    axes = [_normalize(a, c.rank) for a in (axes.value if axes else range(c.rank))]
    at = axes.index(c.axis) if c.axis in axes else None
    if at is not None and scales is not None and scales[at] != 1.0:
        return b.refuse(c.layout, f"read by {describe(node)}, which resizes the channel axis")
    b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)
    if at is not None and sizes is not None:
        def write(kept: list[int], names: NameSource) -> None:
            new = np.array(sizes, dtype=np.int64)
            new[at] = kept[0]
            _set_input(node, 3, new, names)
        b.fixes.append(_Fix([c.layout], write))


def _reduce(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c = ins[0]
    moved = 13 if node.op_type == "ReduceSum" else 18
    axes = _ints(node, 1, "axes", moved, b.opset)
    empty = not axes and node.attributes.get_int("noop_with_empty_axes", 0)
    if empty:
        return b.carry(node.outputs[0], node, c.axis, c.rank, c.layout)
    axes = [_normalize(a, c.rank) for a in axes or []]
    if not axes or c.axis in axes or any(x is not None for x in ins[1:]):
        return b.refuse(c.layout, f"read by {describe(node)}, which reduces over the channels")
    keep = node.attributes.get_int("keepdims", 1)
    axis = c.axis if keep else c.axis - sum(a < c.axis for a in axes)
    b.carry(node.outputs[0], node, axis, c.rank if keep else c.rank - len(axes), c.layout)


def _flatten(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c = ins[0]
    axis = _normalize(node.attributes.get_int("axis", 1), c.rank)
    dims = b.dims(node.inputs[0])
    merged = dims[axis:c.axis] if dims else [None]
    rest = dims[c.axis + 1:] if dims else [None]
    if axis > c.axis or any(d != 1 for d in merged) or not _known(*rest):
        return b.refuse(c.layout, f"read by {describe(node)}, which merges the channel axis "
                        "with unknown or leading dims")
    inner = math.prod(rest)
    layout = tuple(dataclasses.replace(s, inner=s.inner * inner) for s in c.layout)
    b.carry(node.outputs[0], node, 1, 2, layout)


def _reshape(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    """[N, C, rest] -> [N, C·rest] (channel c = a rest-sized block) or -> [N, C, rest']."""
    c, dims, out = ins[0], b.dims(node.inputs[0]), b.dims(node.outputs[0])
    target = None if any(ins[1:]) or dims is None else _target(node, b)
    if target is None:
        return b.refuse(c.layout, f"read by {describe(node)}, whose target shape is computed")
    shape = [entry for entry, _ in target]
    copies = 0 if node.attributes.get_int("allowzero", 0) else None  # 0 copies the input dim
    lead = all(s in (dims[i], copies) or (s is None and out is not None and out[i] == dims[i])
               or (s == -1 and shape.count(-1) == 1) for i, s in enumerate(shape[:c.axis]))
    rest, length = dims[c.axis + 1:], _length(c.layout)
    if lead and len(shape) == c.axis + 1 and _known(*rest) and \
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
            _set_input(holder, index, array, names)
        b.fixes.append(_Fix([layout], write))


def _target(node: ir.Node, b: ChannelGraph) -> list | None:
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
        if array is None and (dims is None or len(dims) != 1 or not _known(*dims)):
            return None
        values = [None] * dims[0] if array is None else [int(x) for x in array.ravel()]
        entries += [(x, (concat, index, i)) for i, x in enumerate(values)]
    return entries


def _shape(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    """Harmless when only dims before the channel axis are read: x.view(x.size(0), -1)."""
    c = ins[0]
    start = _normalize(node.attributes.get_int("start", 0), c.rank)
    end = min(_normalize(node.attributes.get_int("end", c.rank), c.rank), c.rank)
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


def _squeeze(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c = ins[0]
    axes = _ints(node, 1, "axes", 13, b.opset)
    if node.op_type == "Unsqueeze":
        rank = c.rank + len(axes or [])
        axes = sorted(_normalize(a, rank) for a in axes or [])
        kept_axes = [a for a in range(rank) if a not in axes]
        return b.carry(node.outputs[0], node, kept_axes[c.axis], rank, c.layout)
    if axes is None:
        dims = b.dims(node.inputs[0])
        axes = None if dims is None or not _known(*dims) else [i for i, d in enumerate(dims)
                                                               if d == 1]
    axes = None if axes is None else [_normalize(a, c.rank) for a in axes]
    if axes is None or c.axis in axes:
        return b.refuse(c.layout, f"read by {describe(node)}, which may squeeze the channels")
    b.carry(node.outputs[0], node, c.axis - sum(a < c.axis for a in axes), c.rank - len(axes),
            c.layout)


def _conv(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c, weight = ins[0], constant(_source(node.inputs[1]))
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
        b.fixes.append(_Fix([c.layout], write))
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


def _conv_transpose(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c, weight = ins[0], constant(_source(node.inputs[1]))
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


def _gemm(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c, weight = ins[0], constant(_source(node.inputs[1]))
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
    bias = constant(_source(node.inputs[2])) if len(node.inputs) > 2 and node.inputs[2] else None
    if bias is not None and bias.ndim and bias.shape[-1] != 1:
        b.site(node, 2, bias.ndim - 1, layout, "param")
    elif bias is None and len(node.inputs) > 2 and node.inputs[2] is not None:
        b.refuse(layout, f"bias of {describe(node)} is not a constant")
    b.mac(node, [c.layout, layout] if c is not None else [layout])
    b.carry(node.outputs[0], node, 1, 2, layout)


def _matmul(b: ChannelGraph, node: ir.Node, ins: list) -> None:
    c, weight = ins[0], constant(_source(node.inputs[1]))
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
    **dict.fromkeys(_REDUCE, _reduce), "BatchNormalization": _batchnorm,
    "InstanceNormalization": _batchnorm, "Concat": _concat, "Split": _split,
    "Slice": _slice_op, "Pad": _pad, "Resize": _resize, "Upsample": _resize,
    "Flatten": _flatten, "Reshape": _reshape, "Squeeze": _squeeze, "Unsqueeze": _squeeze,
    "Shape": _shape,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _matmul,
}
