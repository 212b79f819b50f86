"""Applying a removal to the model: cut every site, write every fix, shrink every carried value.

`removed` maps a group's root to a bool mask of its removed channels; a layout turns it into the
positions each site, fix and value keeps. Weights are cut by indexing only, in their own dtype,
so kept values are bit-exact. A constant read by several sites is cut once for all of them (a
grouped Conv's gather first); a shared per-channel parameter the checks chose to copy
(`copies`) gets a new initializer per reader instead. Shape constants (Split sizes, Slice
bounds, Reshape targets, Resize sizes) may be shared too, so fixes never edit one in place:
`set_input` gives the node its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes._channel_layout import (
    ChannelBuilder,
    Site,
    constant_source,
    kept_length,
    node_name,
)
from onnxopt.passes._graph import NameSource, constant

__all__ = ["apply_removal", "set_input"]


def apply_removal(b: ChannelBuilder, removed: Mapping[int, np.ndarray]) -> list[ir.Node]:
    """Remove the channels (root -> bool mask) from every site, fix and value; returns the
    consumer nodes whose input channels shrank."""
    names = NameSource(b.graph)
    uses: dict[tuple, list[Site]] = defaultdict(list)
    for site in b.sites:
        uses[(site.node, site.input)].append(site)
    done: set[ir.Value] = set()
    for (node, index), specs in uses.items():
        source = constant_source(node.inputs[index])
        if source in done or not any(_touched(s.layout, removed) for s in specs):
            continue
        array = constant(source)
        for spec in sorted(specs, key=lambda s: -s.blocks):  # a grouped gather first
            array = _slice(array, spec, _kept(spec.layout, removed))
        if source in b.copies:
            set_input(node, index, array, names, source.name)
        else:
            done.add(source)
            _write_constant(source, array)
    for fix in b.fixes:
        if any(_touched(layout, removed) for layout in fix.layouts):
            fix.write([kept_length(layout, removed) for layout in fix.layouts], names)
    for value, carried in b.carried.items():
        if value.shape is not None and _touched(carried.layout, removed):
            dims = list(value.shape)
            dims[carried.axis] = kept_length(carried.layout, removed)
            value.shape = ir.Shape(dims)
    common.RemoveUnusedNodesPass()(b.model)
    return list(dict.fromkeys(s.node for s in b.sites
                              if s.role == "consumer" and _touched(s.layout, removed)))


def _keep_mask(layout: tuple, removed: Mapping[int, np.ndarray]) -> np.ndarray:
    parts = [np.repeat(~removed[s.group][s.start:s.stop], s.inner) if s.group in removed
             else np.ones(s.size, dtype=bool) for s in layout]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _kept(layout: tuple, removed: Mapping[int, np.ndarray]) -> np.ndarray:
    return np.flatnonzero(_keep_mask(layout, removed))


def _touched(layout: tuple, removed: Mapping[int, np.ndarray]) -> bool:
    return any(s.group in removed and removed[s.group][s.start:s.stop].any() for s in layout)


def _slice(array: np.ndarray, site: Site, keep: np.ndarray) -> np.ndarray:
    """Keep positions `keep` on the site's axis. Pure indexing, so it is exact in any dtype."""
    if site.blocks == 1:
        return np.take(array, keep, axis=site.axis)
    g, a = site.blocks, array.shape[1]  # grouped Conv: output block i reads positions i·a + j
    rows = array.reshape(g, -1, *array.shape[1:])
    return np.concatenate([rows[i][:, keep[(keep >= i * a) & (keep < (i + 1) * a)] - i * a]
                           for i in range(g)])


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


def set_input(node: ir.Node, index: int, array: np.ndarray, names: NameSource,
              base: str | None = None) -> None:
    """A new initializer as `node.inputs[index]` (shape constants may be shared: never edited)."""
    graph = node.graph
    name = names(base or f"{node_name(node)}_input{index}")
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
