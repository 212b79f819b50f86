"""The MatMul/Gemm inputs that per-channel activation ranges act on (shared by
smooth-activations and split-outliers): candidates, their weights as [K, N], their readers."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnxopt.passes._graph import constant

__all__ = ["candidate_inputs", "readers", "weight_rows"]


def candidate_inputs(graph: ir.Graph, nodes: frozenset[str] | None = None) -> list[str]:
    """Names of the activations a per-channel rewrite could act on (the values whose
    per-channel max |x| it needs), for MatMul/Gemm nodes named in `nodes` (None: all)."""
    found = {}
    for node in graph:
        if (nodes is None or node.name in nodes) and weight_rows(node) is not None \
                and not node.inputs[0].is_initializer():  # a weight a caller may override
            found[node.inputs[0].name] = True
    return [name for name in found if name]


def readers(graph: ir.Graph, absmax: Mapping[str, np.ndarray],
            nodes: frozenset[str] | None = None) -> dict[ir.Value, list[ir.Node]]:
    """Activation with a per-channel range in `absmax` -> the candidate MatMul/Gemm nodes that
    read it (graph order)."""
    found: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if nodes is not None and node.name not in nodes:
            continue
        rows = weight_rows(node)
        value = node.inputs[0]
        stats = absmax.get(value.name) if value is not None else None
        if rows is None or stats is None or np.shape(stats) != (rows.shape[0],) \
                or value.is_initializer():
            continue
        if value.dtype not in (None, ir.DataType.FLOAT):
            continue
        found.setdefault(value, []).append(node)
    return found


def weight_rows(node: ir.Node) -> np.ndarray | None:
    """The weight as [K, N] (rows = input channels) of a candidate MatMul/Gemm, else None:
    MatMul with a constant 2-D float32 weight, Gemm with transA = 0 and a constant float32 B."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[0] is None:
        return None
    if node.op_type == "MatMul":
        w = constant(node.inputs[1])
        return w if w is not None and w.dtype == np.float32 and w.ndim == 2 else None
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
        w = constant(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return None
        return w.T if node.attributes.get_int("transB", 0) else w
    return None
