"""Small graph helpers the passes share: constants, node names, fresh value names."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

__all__ = ["constant", "describe", "all_graphs", "NameSource", "opset_version"]


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is a true constant: an initializer that is not also a graph
    input (a caller could override that), or a Constant node's output. Else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def describe(node: ir.Node) -> str:
    """`'bn3' (BatchNormalization)`, or `<unnamed BatchNormalization>`."""
    return f"{node.name!r} ({node.op_type})" if node.name else f"<unnamed {node.op_type}>"


def all_graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, every subgraph (If/Loop/Scan bodies), and every function body."""
    yield from model.graphs()
    yield from model.functions.values()


def opset_version(graph: ir.Graph | ir.Function, domain: str = "") -> int:
    return graph.opset_imports.get(domain, graph.opset_imports.get("ai.onnx", 1))


class NameSource:
    """Unique names for new values in one graph (initializer names must be unique on creation)."""

    def __init__(self, graph: ir.Graph):
        self._taken = {v.name for v in graph.initializers.values()}
        self._taken.update(v.name for v in graph.inputs)
        for node in graph:
            self._taken.update(v.name for v in node.outputs if v.name)

    def __call__(self, base: str) -> str:
        name, index = base, 1
        while name in self._taken:
            name, index = f"{base}_{index}", index + 1
        self._taken.add(name)
        return name
