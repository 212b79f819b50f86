"""Fold a per-channel affine x' = s x + t into the Conv, Gemm or MatMul that consumes x'.

    Conv:   W'[m, c, k] = W[m, c, k] s[c]      b'[m] = b[m] + sum_{c,k} W[m, c, k] t[c]
            (c runs over the input channels of m's group; a shift t is exact only without
            padding, because the padded border holds zeros of x', which are x = -t/s, not zeros
            of x; a pure scale keeps zeros zeros, so it folds whatever the padding)
    Gemm / MatMul on [..., K] input:   W' = diag(s) W      bias' = bias + alpha t W
All in float64, cast once to the weight's dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxopt.passes._graph import NameSource, constant, describe, new_initializer, rank_of

__all__ = ["fold_before", "input_channels"]


def input_channels(consumer: ir.Node) -> tuple[int, str] | None:
    """(number of input channels, 'first' or 'last': where they sit in the data input) of a
    Conv / Gemm / MatMul with a constant float weight, else None."""
    if consumer.domain not in ("", "ai.onnx") or consumer.op_type not in ("Conv", "Gemm",
                                                                          "MatMul"):
        return None
    weight = constant(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
    if weight is None or not np.issubdtype(weight.dtype, np.floating) or weight.ndim < 2:
        return None
    if consumer.op_type == "Conv":
        return weight.shape[1] * consumer.attributes.get_int("group", 1), "first"
    if consumer.op_type == "Gemm":
        if consumer.attributes.get_int("transA", 0):
            return None
        return weight.shape[1 if consumer.attributes.get_int("transB", 0) else 0], "last"
    return (weight.shape[0], "last") if weight.ndim == 2 else None


def fold_before(
    graph: ir.Graph, names: NameSource, x: ir.Value, y: ir.Value, scale: np.ndarray,
    shift: np.ndarray, *, channels_last: bool = False
) -> tuple[ir.Node, list[ir.Node], ir.Value] | str:
    """Fold y = s x + t into y's only consumer: (consumer, new nodes, new output), or the reason
    it cannot take the fold. `channels_last`: s and t run along y's last axis (else axis 1)."""
    if len(y.uses()) != 1 or y.is_graph_output():
        return "its output has several consumers"
    consumer, slot = y.uses()[0]
    if slot != 0 or consumer.domain not in ("", "ai.onnx") or consumer.op_type not in (
        "Conv", "Gemm", "MatMul"
    ):
        return f"it feeds {describe(consumer)}, not the data input of a Conv/Gemm/MatMul"
    weight = constant(consumer.inputs[1])
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return f"the weight of {describe(consumer)} is not a floating-point constant"
    bias_value = consumer.inputs[2] if len(consumer.inputs) > 2 else None
    bias = constant(bias_value) if bias_value is not None else None
    if bias_value is not None and bias is None:
        return f"the bias of {describe(consumer)} is not a constant"
    if consumer.op_type == "Conv":
        folded = _into_conv(consumer, weight.astype(np.float64), bias, scale, shift)
    else:
        folded = _into_matrix(consumer, weight.astype(np.float64), bias, scale, shift,
                              channels_last)
    if isinstance(folded, str):
        return folded
    new_weight, new_bias, attributes = folded
    base = consumer.name or consumer.outputs[0].name or consumer.op_type
    w = new_initializer(graph, names, f"{base}.weight_folded", new_weight.astype(weight.dtype))
    b = new_initializer(graph, names, f"{base}.bias_folded", new_bias.astype(weight.dtype))
    if consumer.op_type != "MatMul":
        new = ir.node(consumer.op_type, [x, w, b], attributes=attributes,
                      domain=consumer.domain, name=consumer.name)
        return consumer, [new], new.outputs[0]
    matmul = ir.node("MatMul", [x, w], name=consumer.name)
    add = ir.node("Add", [matmul.outputs[0], b], name=f"{base}_bias")
    return consumer, [matmul, add], add.outputs[0]


def _into_conv(conv: ir.Node, w: np.ndarray, bias, scale, shift):
    pads = conv.attributes.get_ints("pads", None) or ()
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if (any(pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER")) and np.any(shift):
        return (f"{describe(conv)} pads its input, and the padded border would see the "
                "shifted zeros (x = -t/s), which a folded Conv cannot reproduce")
    group = conv.attributes.get_int("group", 1)
    out_channels, channels_per_group = w.shape[:2]
    if channels_per_group * group != scale.size:
        return f"{describe(conv)} takes {channels_per_group * group} channels, BN has {scale.size}"
    # Row m of the weight sees the input channels of its own group.
    group_of = np.arange(out_channels) // (out_channels // group)
    kernel = (slice(None), slice(None)) + (None,) * (w.ndim - 2)
    s = scale.reshape(group, channels_per_group)[group_of][kernel]
    t = shift.reshape(group, channels_per_group)[group_of][kernel]
    b = np.zeros(out_channels) if bias is None else bias.astype(np.float64)
    new_bias = b + np.sum(w * t, axis=tuple(range(1, w.ndim)))
    return w * s, new_bias, dict(conv.attributes)


def _into_matrix(node: ir.Node, w: np.ndarray, bias, scale, shift, channels_last: bool):
    attributes = dict(node.attributes)
    x = node.inputs[0]
    if node.op_type == "MatMul" and (w.ndim != 2 or not (channels_last or rank_of(x) == 2)):
        return f"{describe(node)} is not a 2-D input times a 2-D constant"
    if node.attributes.get_int("transA", 0):
        return f"{describe(node)} has transA=1: BN's channels would be its output rows"
    is_transposed = bool(node.attributes.get_int("transB", 0))
    w_kn = w.T if is_transposed else w  # [K, N]: K meets BN's channels
    if w_kn.shape[0] != scale.size:
        return f"{describe(node)} takes {w_kn.shape[0]} features, BN has {scale.size}"
    alpha = node.attributes.get_float("alpha", 1.0)
    beta = node.attributes.get_float("beta", 1.0)
    b = 0.0 if bias is None else bias.astype(np.float64) * beta
    new_bias = b + alpha * (shift @ w_kn)
    new_w_kn = scale[:, None] * w_kn
    if node.op_type == "Gemm":
        attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # beta is folded into the new C
    return (new_w_kn.T if is_transposed else new_w_kn), new_bias, attributes
