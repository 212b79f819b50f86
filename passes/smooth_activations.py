"""smooth-activations: move per-channel activation outliers into the MatMul weights (SmoothQuant).

Int8 MatMul kernels on CPU quantize their input X [..., K] with one scale per tensor
(DynamicQuantizeMatMul per call, QLinearMatMul from calibration). Transformers have a few
channels k of X that are 10-100x larger than the rest (MiniLM: max/median of the per-channel
ranges 16-21 after LayerNorm and GELU), and those few set the scale: the others keep only a
handful of int8 levels. With s_k > 0 per input channel,
    Y = X W = (X diag(1/s)) (diag(s) W)
is exact in real arithmetic, and
    s_k = max|X_k|^alpha / max|W_k,:|^(1 - alpha)          (Xiao et al. 2023, alpha = 0.5)
gives X/s and the rows of diag(s) W balanced ranges; the weights keep per-column int8 scales,
so they absorb the spread cheaply. max|X_k| comes from calibration data (`absmax`, per value).

Where X diag(1/s) is computed:
  - folded into X's producer when X feeds nothing but smoothed MatMuls (Shape reads only its
    shape): LayerNormalization with constant 1-D scale/bias, Add(Mul(z, g), c), the last
    step of a decomposed LayerNorm, with g and c constant along the last axis, or a Mul by a
    constant along the last axis (split-outliers' inlier mask);
  - else one Mul by the constant 1/s, shared by the smoothed MatMuls that read X; X's other
    readers (a residual Add) keep X.
Candidates: MatMul with a constant 2-D float32 weight [K, N]; Gemm with transA = 0 and a
constant float32 B. Only the main graph (calibration sees no subgraph values). Channels with a
zero range (dead, or a zero weight row) keep s = 1. Arithmetic in float64, cast once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes import _matmul_inputs
from onnxopt.passes._graph import NameSource, constant, describe, new_initializer
from onnxopt.passes._report import PassReport

__all__ = ["SmoothActivationsOptions", "SmoothActivationsPass"]


@dataclasses.dataclass(frozen=True)
class SmoothActivationsOptions:
    absmax: Mapping[str, np.ndarray]  # value name -> max |x| per channel of its last axis
    alpha: float = 0.5  # 0: weights keep their ranges; 1: activations become flat
    nodes: frozenset[str] | None = None  # node names to smooth; None: every candidate


class SmoothActivationsPass(ir.passes.InPlacePass):
    """Per-channel scales that move activation outliers into the MatMul weights (exact)."""

    name = "smooth-activations"
    lossy = False

    def __init__(self, options: SmoothActivationsOptions):
        super().__init__()
        self.options = options

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        graph, names = model.graph, NameSource(model.graph)
        for value, nodes in _matmul_inputs.readers(graph, self.options.absmax,
                                                  self.options.nodes).items():
            scale = self._scale(value, nodes)
            if scale is None:
                continue
            where = _fold_into_producer(graph, names, value, nodes, 1.0 / scale)
            if where is None:
                where = _insert_mul(graph, names, value, nodes, 1.0 / scale)
            for node in nodes:
                _scale_weight_rows(graph, names, node, scale)
            spread = float(self.options.absmax[value.name].max()
                           / max(np.median(self.options.absmax[value.name]), 1e-30))
            report.change("smoothed", f"smoothed {value.name!r} ({where}) for "
                          f"{', '.join(describe(n) for n in nodes)}: channel range "
                          f"max/median {spread:.1f}")
        if report.modified:
            common.RemoveUnusedNodesPass()(model)  # the weights the scaled ones replaced
        return report

    def _scale(self, value: ir.Value, nodes: list[ir.Node]) -> np.ndarray | None:
        """s per input channel, or None when nothing would change."""
        a = np.asarray(self.options.absmax[value.name], dtype=np.float64)
        w = np.max([np.abs(_matmul_inputs.weight_rows(n)).max(axis=1) for n in nodes], axis=0)
        alpha = self.options.alpha
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
        s = np.where(np.isfinite(s) & (s > 0) & (a > 0) & (w > 0), s, 1.0)
        return None if np.all(s == 1.0) else s


def _scale_weight_rows(graph: ir.Graph, names: NameSource, node: ir.Node,
                       scale: np.ndarray) -> None:
    w = constant(node.inputs[1]).astype(np.float64)
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    w = w * (scale[None, :] if transposed else scale[:, None])
    base = node.inputs[1].name or f"{node.name}_weight"
    node.replace_input_with(1, new_initializer(graph, names, f"{base}_smoothed",
                                               w.astype(np.float32)))


def _fold_into_producer(graph: ir.Graph, names: NameSource, value: ir.Value,
                        readers: list[ir.Node], inverse: np.ndarray) -> str | None:
    """Scale the producer's per-channel constants by 1/s; None when that is not exact."""
    if value.is_graph_output() or any(
            use.node not in readers and use.node.op_type != "Shape" for use in value.uses()):
        return None
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    if producer.op_type == "LayerNormalization" and value is producer.outputs[0]:
        slots = [i for i in (1, 2) if i < len(producer.inputs) and producer.inputs[i] is not None]
        targets = [(producer, i) for i in slots]
    elif producer.op_type == "Add":
        targets = _affine_slots(producer)
    elif producer.op_type == "Mul":  # by a constant: split-outliers' inlier mask, a scale
        slots = [i for i in (0, 1) if constant(producer.inputs[i]) is not None]
        targets = [(producer, slots[0])] if len(slots) == 1 else []
    else:
        return None
    if not targets or any(_channel_vector(constant(n.inputs[i]), inverse.size) is None
                          for n, i in targets):
        return None
    for node, index in targets:
        c = _channel_vector(constant(node.inputs[index]), inverse.size)
        base = node.inputs[index].name or f"{node.name}_constant"
        node.replace_input_with(index, new_initializer(
            graph, names, f"{base}_smoothed", (c * inverse).astype(np.float32)))
    return f"folded into {describe(producer)}"


def _affine_slots(add: ir.Node) -> list[tuple[ir.Node, int]]:
    """[(Mul, g slot), (Add, c slot)] for Add(Mul(z, g), c) whose Mul output only feeds the Add."""
    for c_slot in (0, 1):
        other = add.inputs[1 - c_slot]
        if constant(add.inputs[c_slot]) is None or other is None:
            continue
        mul = other.producer()
        if (mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx")
                or len(other.uses()) != 1 or other.is_graph_output()):
            return []
        g_slots = [i for i in (0, 1) if constant(mul.inputs[i]) is not None]
        if len(g_slots) != 1:
            return []
        return [(mul, g_slots[0]), (add, c_slot)]
    return []


def _channel_vector(c: np.ndarray | None, channels: int) -> np.ndarray | None:
    """`c` as float64 [channels] when it is float32 and varies only along the last axis."""
    if c is None or c.dtype != np.float32:
        return None
    if c.size == 1:
        return np.full(channels, float(c.reshape(())), dtype=np.float64)
    if c.shape[-1] != channels or c.size != channels:
        return None
    return c.reshape(channels).astype(np.float64)


def _insert_mul(graph: ir.Graph, names: NameSource, value: ir.Value,
                readers: list[ir.Node], inverse: np.ndarray) -> str:
    base = value.name or "activation"
    factor = new_initializer(graph, names, f"{base}_smooth", inverse.astype(np.float32))
    mul = ir.node("Mul", [value, factor], name=names(f"{base}_smooth_Mul"))
    mul.outputs[0].name = names(f"{base}_smoothed")
    mul.outputs[0].dtype = ir.DataType.FLOAT
    if value.shape is not None:
        mul.outputs[0].shape = value.shape
    graph.insert_before(readers[0], mul)
    for node in readers:
        node.replace_input_with(0, mul.outputs[0])
    return "Mul by 1/s"
