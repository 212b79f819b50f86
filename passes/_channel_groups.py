"""Channel dependency graph for structured pruning: which tensor dimensions shrink together.

A *group* is one channel space of n channels: the output channels of its producers (Conv,
ConvTranspose, Gemm, MatMul with a constant weight), merged by every op that ties two spaces
channel for channel (Add / Sub / Mul of two activations). ChannelGraph walks the main graph once,
in order: the op rules (_channel_rules, _channel_shape_rules) give every value that carries
channels its layout and record the sites and fixes that shrink with it (_channel_layout says
what layouts, sites and fixes are). The checks here then refuse groups that reach a graph output
or a subgraph, or whose constants are read elsewhere (1, 3 and 4 below); the groups are listed
with their sites, activations and MACs; `apply` (_channel_rewrite) removes channels.

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

MACs: each Conv / ConvTranspose / Gemm / MatMul counts its dense MACs (formula in
_channel_layout); a node whose input and output positions shrink by r_in and r_out keeps
base·(1 - r_in)(1 - r_out).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnxopt.passes._channel_layout import (
    LINEAR,
    ChannelBuilder,
    MacNode,
    Site,
    channel_index,
    constant_source,
    has_group,
    kept_length,
    layout_length,
    node_name,
)
from onnxopt.passes._channel_rewrite import apply_removal
from onnxopt.passes._channel_rules import visit
from onnxopt.passes._graph import constant, describe

__all__ = ["ActivationSite", "ChannelGraph", "ChannelGroup", "ChannelSite", "channel_groups"]

_COPIED = ("scale", "param")  # roles whose shared constants are copied, not refused


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


class ChannelGraph(ChannelBuilder):
    """The groups of one model, with what pruning needs: sites, fixes, MAC model."""

    def __init__(self, model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None):
        super().__init__(model, shapes)
        for node in self.graph:
            visit(self, node)
            if node.op_type in LINEAR and node.domain in ("", "ai.onnx") and \
                    node not in self.mac_nodes:
                self.mac(node, [])
        if self._unsized:
            self.notes.append(f"MACs: {len(self._unsized)} node(s) have sizes shape inference "
                              f"could not resolve, counted as 1 ({', '.join(self._unsized[:3])}"
                              f"{', ...' if len(self._unsized) > 3 else ''}); pass shapes=")
        self._check_boundaries()
        self._check_constants()
        self.groups = self._finalize()

    # ------------------------------------------------------------------ checks and groups
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
        sites_of: dict[ir.Value, list[Site]] = defaultdict(list)
        for site in self.sites:
            source = constant_source(site.node.inputs[site.input])
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
            key = _unique(node_name(self._producers[root][0]), keys)
            groups.append(ChannelGroup(
                key, channels, self._producers[root], self._consumers(root),
                [ChannelSite(s.node, s.input, s.axis, channel_index(s.layout, root))
                 for s in self.sites if s.role != "consumer" and has_group(s.layout, root)],
                [ActivationSite(v, c.axis, channel_index(c.layout, root))
                 for v, c in self.carried.items() if has_group(c.layout, root)],
                self._macs_per_channel(root), self._reasons.get(root), blocks,
                self._describe_chain(root), root))
        return groups

    def _consumers(self, root: int) -> list[ChannelSite]:
        return [ChannelSite(s.node, s.input, s.axis,
                            channel_index(self.carried[s.node.inputs[0]].layout, root))
                for s in self.sites if s.role == "consumer" and has_group(s.layout, root)]

    def _macs_per_channel(self, root: int) -> float:
        total = 0.0
        for mac in self.mac_nodes.values():
            for layout in mac.sides:
                positions = (channel_index(layout, root) >= 0).sum()
                total += mac.base * positions / layout_length(layout)
        return total / self._channels[root]

    def _describe_chain(self, root: int) -> str:
        producers = ", ".join(f"{n.op_type} {node_name(n)!r}" for n in self._producers[root])
        consumers = ", ".join(f"{s.node.op_type} {node_name(s.node)!r}" for s in self.sites
                              if s.role == "consumer" and has_group(s.layout, root))
        middle = list(dict.fromkeys(self._chain[root]))
        parts = [producers, *middle[:4], *(["..."] if len(middle) > 4 else [])]
        return " -> ".join(parts + ([consumers] if consumers else []))

    # ------------------------------------------------------------------ MACs and slices
    def macs(self, removed: Mapping[int, np.ndarray] | None = None) -> float:
        """Model MACs with `removed` (root -> bool mask of removed channels)."""
        return sum(self.node_macs(mac, removed or {}) for mac in self.mac_nodes.values())

    @staticmethod
    def node_macs(mac: MacNode, removed: Mapping[int, np.ndarray]) -> float:
        value = mac.base
        for layout in mac.sides:
            value *= kept_length(layout, removed) / layout_length(layout)
        return value

    def coupled_slices(self, group: ChannelGroup) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
        """(array, axis, index) of the group's weights counted for importance: producer rows,
        consumer columns, depthwise weights, BN scale; index maps positions on axis to channels."""
        for site in self.sites:
            if site.role == "param" or not has_group(site.layout, group.root):
                continue
            array = constant(constant_source(site.node.inputs[site.input]))
            if site.blocks > 1:  # W[G·b, a, k] -> [b, G·a, k]: axis 1 = activation positions
                g, a = site.blocks, array.shape[1]
                array = array.reshape(g, -1, a, *array.shape[2:]).swapaxes(0, 1)
                array = array.reshape(array.shape[0], g * a, *array.shape[3:])
            yield array, site.axis, channel_index(site.layout, group.root)

    def apply(self, removed: Mapping[int, np.ndarray]) -> list[ir.Node]:
        """Remove the channels (root -> bool mask): see _channel_rewrite.apply_removal."""
        return apply_removal(self, removed)


def _terminal_uses(value: ir.Value) -> Iterator[tuple[ir.Node, int]]:
    for node, index in value.uses():
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
            if node.outputs[0].is_graph_output():
                yield node, index
            yield from _terminal_uses(node.outputs[0])
        else:
            yield node, index


def _unique(name: str, taken: set[str]) -> str:
    key, index = name, 2
    while key in taken:
        key, index = f"{name}#{index}", index + 1
    taken.add(key)
    return key
