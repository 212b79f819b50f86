"""equalize-cross-layer: rescale the channels between two Convs so both weights share ranges.

For Conv1 → [Relu | LeakyRelu | nothing] → Conv2, where Conv1's output feeds only that chain,
output channel i of Conv1 and input channel i of Conv2 trade a factor s_i > 0:
    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i         (s_i = sqrt(r1_i / r2_i))
with r1_i = max|W1[i]| and r2_i = max|W2 entries reading channel i|. Relu and LeakyRelu are
positively homogeneous (f(x / s) = f(x) / s), so the network computes the same function, and
both ranges become sqrt(r1_i · r2_i): per-tensor activation ranges and per-channel weight
ranges then waste fewer int8 levels on a few wide channels (depthwise networks suffer most;
Nagel et al. 2019, "Data-Free Quantization"). Chains are swept a few times (a middle Conv
belongs to two pairs) in float64; every weight is cast to float32 once, at the end.

Refused (the pair is left alone): a weight or bias that is not a float32 constant or is shared
with another node, a Conv1 output read by anything else, grouped Conv2 whose channel groups do
not line up, an activation other than Relu/LeakyRelu between them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes._graph import NameSource, constant, describe, new_initializer
from onnxopt.passes._report import PassReport

__all__ = ["EqualizeCrossLayerPass"]

_SWEEPS = 4  # a chain of n Convs converges in a few sweeps; more changes nothing measurable
_POSITIVE_HOMOGENEOUS = ("Relu", "LeakyRelu")


@dataclasses.dataclass
class _Pair:
    first: ir.Node
    second: ir.Node


class EqualizeCrossLayerPass(ir.passes.InPlacePass):
    """Cross-layer equalization of Conv → Relu → Conv chains (exact up to float rounding)."""

    name = "equalize-cross-layer"
    lossy = False

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        pairs = [pair for node in model.graph if (pair := _pair(node, report)) is not None]
        if not pairs:
            return report
        weights: dict[ir.Value, np.ndarray] = {}  # float64 working copies, cast once at the end
        for pair in pairs:
            for node in (pair.first, pair.second):
                weights.setdefault(node.inputs[1], constant(node.inputs[1]).astype(np.float64))
            bias = _bias(pair.first)
            if bias is not None:
                weights.setdefault(bias, constant(bias).astype(np.float64))
        spread = {id(p): 0.0 for p in pairs}
        for _ in range(_SWEEPS):
            for pair in pairs:
                spread[id(pair)] = max(spread[id(pair)], _equalize(pair, weights))
        names = NameSource(model.graph)
        for value, array in weights.items():
            new = new_initializer(model.graph, names, f"{value.name or 'weight'}_equalized",
                                  array.astype(np.float32))
            for use in list(value.uses()):
                use.node.replace_input_with(use.idx, new)
        common.RemoveUnusedNodesPass()(model)  # the float32 weights the equalized ones replaced
        for pair in pairs:
            report.change("equalized", f"equalized {describe(pair.first)} -> "
                          f"{describe(pair.second)}: channel range ratio up to "
                          f"{spread[id(pair)]:.1f}x before")
        return report


def _pair(node: ir.Node, report: PassReport) -> _Pair | None:
    """The Conv2 that `node` (a Conv) feeds through at most one Relu/LeakyRelu, if equalizable."""
    if not _is_conv(node) or _weight(node) is None:
        return None
    value = node.outputs[0]
    consumers = value.consumers()
    if len(value.uses()) != 1 or value.is_graph_output():
        return None
    middle = consumers[0]
    if middle.op_type in _POSITIVE_HOMOGENEOUS and middle.domain in ("", "ai.onnx"):
        value = middle.outputs[0]
        if len(value.uses()) != 1 or value.is_graph_output():
            return None
        middle = value.consumers()[0]
    second = middle
    if not _is_conv(second) or second.inputs[0] is not value or _weight(second) is None:
        return None
    why = _refusal(node, second)
    if why:
        report.refuse(f"kept {describe(node)} -> {describe(second)}: {why}")
        return None
    return _Pair(node, second)


def _refusal(first: ir.Node, second: ir.Node) -> str | None:
    for node in (first, second):
        if len(node.inputs[1].uses()) != 1:
            return f"weight {node.inputs[1].name!r} is shared with another node"
    bias = _bias(first)
    if bias is not None and (constant(bias) is None or len(bias.uses()) != 1
                             or constant(bias).dtype != np.float32):
        return f"bias {bias.name!r} is not a float32 constant of its own"
    w2 = constant(second.inputs[1])
    channels = constant(first.inputs[1]).shape[0]
    groups = second.attributes.get_int("group", 1)
    if w2.shape[1] * groups != channels:
        return f"{channels} output channels do not match the next Conv's input channels"
    return None


def _is_conv(node: ir.Node) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx") and len(node.inputs) >= 2


def _weight(node: ir.Node) -> np.ndarray | None:
    w = constant(node.inputs[1])
    return w if w is not None and w.dtype == np.float32 and w.ndim >= 3 else None


def _bias(node: ir.Node) -> ir.Value | None:
    return node.inputs[2] if len(node.inputs) > 2 else None


def _equalize(pair: _Pair, weights: dict[ir.Value, np.ndarray]) -> float:
    """One equalization step on the float64 copies; returns the largest r1/r2 spread it met."""
    w1, w2 = weights[pair.first.inputs[1]], weights[pair.second.inputs[1]]
    channels = w1.shape[0]
    groups = pair.second.attributes.get_int("group", 1)
    per_group_in, per_group_out = w2.shape[1], w2.shape[0] // groups
    # W2 viewed as [groups, out per group, in per group, ...]: channel i = (i // in, i % in).
    view = w2.reshape(groups, per_group_out, per_group_in, -1)
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    r2 = np.abs(view).max(axis=(1, 3)).reshape(channels)
    valid = (r1 > 0) & (r2 > 0)
    scale = np.where(valid, np.sqrt(np.where(valid, r1 / np.where(r2 > 0, r2, 1.0), 1.0)), 1.0)
    spread = float(np.max(np.where(valid, np.maximum(r1 / r2, r2 / r1), 1.0), initial=1.0))
    weights[pair.first.inputs[1]] = w1 / scale.reshape(-1, *([1] * (w1.ndim - 1)))
    bias = _bias(pair.first)
    if bias is not None:
        weights[bias] = weights[bias] / scale
    factors = scale.reshape(groups, 1, per_group_in, 1)
    weights[pair.second.inputs[1]] = (view * factors).reshape(w2.shape)
    return spread
