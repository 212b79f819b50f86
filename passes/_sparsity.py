"""Prunable layers and their weights seen as rows × K, shared by the weight-sparsity code.

A prunable layer is a Conv, ConvTranspose, Gemm or MatMul of the main graph whose weight is a
float constant read by that node alone. Its weight W is viewed per group g as a matrix
rows × K, where K runs over the reduction (the inputs one output sums over):
    Conv          W[C_out, C_in/g, *k]  ->  [g][C_out/g,       (*k, C_in/g)]
    ConvTranspose W[C_in, C_out/g, *k]  ->  [g][C_out/g · |k|,  C_in/g]
    Gemm transB=1 W[N, K]               ->  [1][N, K]       (transB=0: W[K, N] -> Wᵀ)
    MatMul        W[K, N] (B constant)  ->  [1][N, K]
Within K the input channel varies fastest, so N:M sparsity (at most N nonzeros in every M
consecutive weights of a row) groups M consecutive input channels at one kernel position: the
layout sparse tensor cores (NVIDIA 2:4) take. A layer whose input channels per group do not
divide by M cannot take N:M and is reported, never padded.

Magnitude pruning picks exactly round(s · size) zeros per layer (np.argpartition: ties cannot
change the count). Global scope ranks |w| / rms(W) across layers, so one layer with large
weights cannot keep everything, and caps each layer at MAX_LAYER_SPARSITY.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
from onnxopt.passes._graph import constant, describe, is_dequantized

from onnxopt.errors import BadInputError

__all__ = ["Layer", "MAX_LAYER_SPARSITY", "PRUNABLE_OPS", "first_and_last", "from_rows",
           "global_sparsities", "magnitude_mask", "n_m_mask", "parse_pattern", "prunable_layers",
           "to_rows", "write_weight"]

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MAX_LAYER_SPARSITY = 0.95  # global scope: a layer keeps at least 5% of its weights


@dataclasses.dataclass
class Layer:
    node: ir.Node
    weight: ir.Value  # the constant weight input
    group: int  # Conv / ConvTranspose `group`; 1 for Gemm / MatMul
    is_transposed: bool  # Gemm transB=0 and MatMul: W is [K, N], its rows view is Wᵀ

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or "?"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.const_value.shape)

    @property
    def input_channels(self) -> int:
        """Input channels per group: the length of each N:M run's home axis."""
        shape = self.shape
        if self.node.op_type == "Conv":
            return shape[1]
        if self.node.op_type == "ConvTranspose":
            return shape[0] // self.group
        return shape[0] if self.is_transposed else shape[1]


def parse_pattern(text: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (n, m) with 0 < n < m."""
    if text == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise BadInputError(f"--sparsity-pattern {text!r}: expected unstructured, channels "
                            "or N:M with 0 < N < M, e.g. 2:4")
    return int(match[1]), int(match[2])


def prunable_layers(model: ir.Model, skip: Sequence[str] = (), *, keep_first_last: bool = True
                    ) -> tuple[list[Layer], list[str]]:
    """The layers a sparsity pass may prune, in graph order, and one line per layer it may not
    (naming the node and the reason)."""
    layers, refused = [], []
    patterns = [re.compile(p) for p in skip]
    for node in model.graph:
        if node.op_type not in PRUNABLE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        found = _layer(node)
        if isinstance(found, str):
            refused.append(f"kept {describe(node)} dense: {found}")
        elif found is not None:
            layers.append(found)
    edges = first_and_last(model, layers) if keep_first_last else set()
    kept = []
    for layer in layers:
        if any(p.search(layer.node.name or "") for p in patterns):
            refused.append(f"kept {describe(layer.node)} dense: matches --sparsity-skip")
        elif layer.node in edges:
            refused.append(f"kept {describe(layer.node)} dense: first or last layer "
                           "(--no-sparsity-keep-ends prunes it)")
        else:
            kept.append(layer)
    return kept, refused


def _layer(node: ir.Node) -> Layer | str | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    array = constant(weight)
    if array is None and is_dequantized(weight):
        return (f"weight {weight.name!r} is already int8 (read through DequantizeLinear): "
                "prune the float model, then quantize")
    if array is None:
        return None if node.op_type == "MatMul" else "its weight is not a constant"
    if not np.issubdtype(array.dtype, np.floating):
        return f"weight {weight.name!r} is {array.dtype}, not float"
    if weight.const_value is None:
        return f"weight {weight.name!r} is a Constant node (run cleanup first)"
    if len(weight.uses()) != 1:
        return f"weight {weight.name!r} is shared with another node"
    attrs = node.attributes
    if node.op_type in ("Conv", "ConvTranspose"):
        return Layer(node, weight, attrs.get_int("group", 1), False)
    if array.ndim != 2:
        return f"weight {weight.name!r} is {array.ndim}-D, not 2-D"
    if node.op_type == "Gemm":
        return Layer(node, weight, 1, not attrs.get_int("transB", 0))
    return Layer(node, weight, 1, True)


def first_and_last(model: ir.Model, layers: Sequence[Layer]) -> set[ir.Node]:
    """Layers with no other prunable layer upstream (first) or downstream (last): they see the
    raw input or make the output, where pruning costs the most accuracy."""
    nodes = {layer.node for layer in layers}
    has_upstream, has_downstream = set(), set()
    for layer in layers:
        seen, stack = set(), [layer.node]
        while stack:  # walk downstream; every prunable node reached has `layer` upstream
            for output in stack.pop().outputs:
                for consumer in output.consumers():
                    if consumer not in seen:
                        seen.add(consumer)
                        stack.append(consumer)
        reached = seen & nodes - {layer.node}
        has_upstream |= reached
        if reached:
            has_downstream.add(layer.node)
    return {n for n in nodes if n not in has_upstream or n not in has_downstream}


def to_rows(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """W as [groups, rows, K] (module docstring); `from_rows` inverts it."""
    g, op = layer.group, layer.node.op_type
    if op == "Conv":  # [C_out, C_in/g, *k] -> [g, C_out/g, *k, C_in/g]
        w = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:])
        w = np.moveaxis(w, 2, -1)
        return w.reshape(g, w.shape[1], -1)
    if op == "ConvTranspose":  # [C_in, C_out/g, *k] -> [g, C_out/g, *k, C_in/g]
        w = weight.reshape(g, weight.shape[0] // g, *weight.shape[1:])
        w = np.moveaxis(w, 1, -1)
        return w.reshape(g, -1, w.shape[-1])
    return (weight.T if layer.is_transposed else weight)[None]


def from_rows(layer: Layer, rows: np.ndarray) -> np.ndarray:
    shape, g, op = layer.shape, layer.group, layer.node.op_type
    if op == "Conv":
        w = rows.reshape(g, shape[0] // g, *shape[2:], shape[1])
        return np.moveaxis(w, -1, 2).reshape(shape)
    if op == "ConvTranspose":
        w = rows.reshape(g, shape[1], *shape[2:], shape[0] // g)
        return np.moveaxis(w, -1, 1).reshape(shape)
    return rows[0].T if layer.is_transposed else rows[0]


def magnitude_mask(scores: np.ndarray, zeros: int) -> np.ndarray:
    """Keep-mask (True = kept) with exactly `zeros` of the smallest scores dropped."""
    keep = np.ones(scores.size, dtype=bool)
    if zeros > 0:
        keep[np.argpartition(scores.ravel(), zeros - 1)[:zeros]] = False
    return keep.reshape(scores.shape)


def n_m_mask(rows: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask over [groups, rows, K]: the n largest |w| of every m consecutive along K."""
    runs = np.abs(rows).reshape(*rows.shape[:-1], -1, m)
    order = np.argsort(-runs, axis=-1, kind="stable")
    keep = np.zeros(runs.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(rows.shape)


def global_sparsities(arrays: Iterable[tuple[str, np.ndarray]], sparsity: float
                      ) -> dict[str, float]:
    """One threshold on |w| / rms(W) across all layers; each layer's share below it (capped at
    MAX_LAYER_SPARSITY), so the total is `sparsity` of all weights unless a cap binds."""
    scores = {name: (np.abs(a) / max(float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))),
                                      1e-30)).astype(np.float32).ravel()
              for name, a in arrays}
    if not scores:
        return {}
    everything = np.concatenate(list(scores.values()))
    zeros = int(round(sparsity * everything.size))
    if zeros == 0:
        return dict.fromkeys(scores, 0.0)
    threshold = np.partition(everything, zeros - 1)[zeros - 1]
    return {name: min(float(np.count_nonzero(s <= threshold)) / s.size, MAX_LAYER_SPARSITY)
            for name, s in scores.items()}


def write_weight(layer: Layer, array: np.ndarray) -> None:
    """Replace the layer's weight values (same name, dtype and shape)."""
    value = layer.weight
    dtype = value.const_value.dtype
    value.const_value = ir.tensor(array.astype(dtype.numpy()), name=value.name)
