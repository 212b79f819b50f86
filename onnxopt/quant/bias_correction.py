"""Bias correction: the float model is the teacher for the int8 one's per-channel mean.

Rounding weights to int8 shifts each layer's output by ΔW · E[x] on average, per output
channel, and the shift accumulates through the network (Nagel et al. 2019). On calibration
batches we measure E[x], the per-channel mean of every quantized Conv/Gemm/MatMul's input in
the float model, and subtract the shift from the float model's bias before quantizing:
    b'_c = b_c - (ΔW · E[x])_c
Conv and Gemm get a bias if they had none; a MatMul's bias is the constant of the Add that is
its only consumer (MatMul + Add is how exporters write Linear). Means are summed in float64,
one batch of activations in memory at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.calib import activations
from onnxopt.inputs import Feeds
from onnxopt.passes import _qdq
from onnxopt.passes._graph import NameSource, constant, new_initializer
from onnxopt.passes._qdq import WeightOptions

__all__ = ["corrected", "output_shifts"]


def output_shifts(model: ir.Model, layers: Sequence[str], data: Sequence[Feeds],
                  weights: WeightOptions) -> dict[str, np.ndarray]:
    """Node name -> per-output-channel mean shift ΔW · E[x] that rounding the weight of each of
    `layers` (node names) to int8 causes, E[x] being the layer input's per-channel mean over
    `data` in the float model. Only the layer's own rounding counts: the shift its inputs
    inherit from upstream layers is corrected there (measuring whole-network shifts instead
    corrects the same error several times)."""
    nodes = {n.name: n for n in model.graph if n.name in set(layers) and _bias_site(n)}
    if not nodes:
        return {}
    inputs = {node.inputs[0].name: _input_axis(node) for node in nodes.values()}
    sums = {name: 0.0 for name in inputs}
    counts = dict.fromkeys(inputs, 0)
    for batch in activations.iter_activations(model, data, list(inputs)):
        for name, axis in inputs.items():
            array = batch[name]
            sums[name] = sums[name] + _per_channel_sum(array, axis)
            counts[name] += array.size // max(1, array.shape[axis])
    shifts = {}
    for layer, node in nodes.items():
        name = node.inputs[0].name
        shifts[layer] = _shift(node, _qdq.weight_rounding_error(node, weights),
                               sums[name] / max(1, counts[name]))
    return shifts


def _shift(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """ΔW applied to the mean input, per output channel."""
    if node.op_type == "Conv":  # ΔW [O, I/g, k...], input channels of group g: g*I/g + i
        groups = node.attributes.get_int("group", 1)
        out, per_group = error.shape[0], error.shape[1]
        summed = error.reshape(out, per_group, -1).sum(axis=2)  # padding edges: approximate
        group_of = np.arange(out) // (out // groups)
        return np.einsum("oi,oi->o", summed,
                         mean.reshape(groups, per_group)[group_of])
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return error @ mean  # [N, K] · [K]
    return mean @ error  # MatMul / Gemm: [K] · [K, N]


def corrected(model: ir.Model, shifts: dict[str, np.ndarray]) -> tuple[ir.Model, int]:
    """A clone of `model` whose biases absorb `shifts` (b - shift); the number of layers."""
    clone = model.clone()
    names, done = NameSource(clone.graph), 0
    for node in clone.graph:
        shift = shifts.get(node.name)
        site = _bias_site(node) if shift is not None else None
        if site is None:
            continue
        consumer, index = site
        old = constant(consumer.inputs[index]) if index < len(consumer.inputs) and \
            consumer.inputs[index] is not None else None
        channels = shift.shape[0]
        base = np.zeros(channels) if old is None else old.astype(np.float64).reshape(channels)
        bias = new_initializer(clone.graph, names, f"{node.name or 'layer'}_bias_corrected",
                               (base - shift).astype(np.float32))
        if index >= len(consumer.inputs):  # Conv / Gemm without a bias: add one
            consumer.resize_inputs(index + 1)
        consumer.replace_input_with(index, bias)
        done += 1
    return clone, done


def _bias_site(node: ir.Node) -> tuple[ir.Node, int] | None:
    """(node holding the bias, input index) for a Conv/Gemm/MatMul whose bias can be set."""
    w = constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if w is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv":
        return _own_bias(node, 2, w.shape[0])
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        return _own_bias(node, 2, w.shape[0 if node.attributes.get_int("transB", 0) else 1])
    if node.op_type == "MatMul" and w.ndim == 2:
        out = node.outputs[0]
        consumers = out.consumers()
        if len(out.uses()) != 1 or out.is_graph_output() or consumers[0].op_type != "Add":
            return None
        add = consumers[0]
        index = 1 if add.inputs[0] is out else 0
        c = constant(add.inputs[index])
        if c is None or c.dtype != np.float32 or c.size != w.shape[1] or \
                c.shape[-1] != w.shape[1] or len(add.inputs[index].uses()) != 1:
            return None
        return add, index
    return None


def _own_bias(node: ir.Node, index: int, channels: int) -> tuple[ir.Node, int] | None:
    if index < len(node.inputs) and node.inputs[index] is not None:
        c = constant(node.inputs[index])
        if c is None or c.dtype != np.float32 or c.shape != (channels,):
            return None  # a broadcast Gemm C or a computed bias: not one value per channel
    return node, index


def _input_axis(node: ir.Node) -> int:
    return 1 if node.op_type == "Conv" else -1


def _per_channel_sum(array: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(array.astype(np.float64), axis, 0)
    return moved.reshape(moved.shape[0], -1).sum(axis=1)
