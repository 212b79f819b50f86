"""The dense model as the teacher: a pruned layer is re-fitted to the dense layer's output.

For a layer of the pruned model (input X', weight W' [rows, K'], bias b') and its twin in the
dense model (input X, W, b), both models run on the same calibration batches and each layer
keeps, with a column of ones appended to its unfolded input,
    H = [X' 1]ᵀ[X' 1]        C = [X' 1]ᵀ[X 1]                      (onnxopt.sparsity.hessian)
so that ‖[X' 1][W' b']ᵀ − [X 1][W b]ᵀ‖², the layer's distance to the teacher, is a quadratic in
[W' b'] with no activations kept. The errors of the layers before it are in X' and get
corrected here, not only this layer's own pruning. Layers are taken in waves (refit.waves), so
each one sees the already re-fitted layers before it.

A layer is viewed as rows [outputs, K] in its unfolded input's order (`rows_and_bias`: Conv
W.reshape(C_out, -1), Gemm transB=1 W, Gemm transB=0 and MatMul Wᵀ) plus its bias: Conv's B,
Gemm's C, or the [N] constant of an Add that alone reads a MatMul; a layer without one gets a
new bias input where ONNX has one (Conv, Gemm), so a mean shift can be corrected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.calib import activations
from onnxopt.inputs import Feeds
from onnxopt.passes._graph import NameSource, constant, new_initializer
from onnxopt.sparsity import hessian

__all__ = ["Reader", "accumulate", "bias_input", "is_nk", "rows_and_bias", "write_bias",
           "write_rows"]


class Reader:
    """A pruned layer, its dense twin and the two moments of their inputs."""

    def __init__(self, node: ir.Node, dense: ir.Node):
        self.node, self.dense = node, dense
        self.hessian = hessian.InputHessian(hessian.layer_input(node), with_bias=True)
        self.cross = hessian.CrossMoment(hessian.layer_input(node), hessian.layer_input(dense),
                                         with_bias=True)

    @property
    def rows(self) -> int:
        """Unfolded input rows seen (samples x output positions)."""
        return self.hessian.count


ROWS_PER_INPUT = 32  # rows of X per column of XᵀX that make it well determined (SparseGPT
#                      used ~20: 128 x 2048 tokens for up to 12288 inputs)
# ... but never from fewer samples: rows of one image are far from independent (PP-OCR cls
# re-fitted on 8 images reached cosine 0.55 at 30% sparsity, on 32 0.96).
MIN_BATCHES = 32


def accumulate(dense: ir.Model, pruned: ir.Model, readers: Sequence[Reader],
               batches: Sequence[Feeds]) -> None:
    """Both models on the same batches, one batch of activations in memory at a time, until
    every reader has ROWS_PER_INPUT rows per input (a Conv on large maps after a few images;
    a Gemm on pooled features reads every batch)."""
    if not readers:
        return
    pruned_names = [r.node.inputs[0].name for r in readers]
    dense_names = [r.dense.inputs[0].name for r in readers]
    seen = 0
    for new, old in zip(activations.iter_activations(pruned, batches, pruned_names),
                        activations.iter_activations(dense, batches, dense_names)):
        for reader in readers:
            x_new, x_old = new[reader.node.inputs[0].name], old[reader.dense.inputs[0].name]
            reader.hessian.add(x_new)
            reader.cross.add(x_new, x_old)
        seen += 1
        if seen >= MIN_BATCHES and all(r.rows >= ROWS_PER_INPUT * r.hessian.size
                                       for r in readers):
            break


def is_nk(node: ir.Node) -> bool:
    """Gemm with transB=1: its weight is already [N, K]."""
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def rows_and_bias(node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """The layer as [outputs, K] rows (float64) in its unfolded input's order, and its bias
    (zeros when it has none)."""
    weight = constant(node.inputs[1]).astype(np.float64)
    rows = weight.reshape(weight.shape[0], -1) if node.op_type == "Conv" or is_nk(node) \
        else weight.T
    value = bias_input(node)
    bias = constant(value) if value is not None else None
    bias = np.zeros(rows.shape[0]) if bias is None else np.broadcast_to(
        bias.astype(np.float64).ravel(), (rows.shape[0],)).copy()
    return rows, bias


def bias_input(node: ir.Node) -> ir.Value | None:
    """The constant bias the layer adds: Conv's B, Gemm's C of shape [N] (or [1, N]), or the
    [N] constant of an Add that alone reads a MatMul."""
    if node.op_type in ("Conv", "Gemm"):
        value = node.inputs[2] if len(node.inputs) > 2 else None
        array = constant(value)
        return value if array is not None and array.size == max(array.shape, default=1) else None
    output = node.outputs[0]
    if len(output.uses()) != 1 or output.is_graph_output():
        return None
    add = output.consumers()[0]
    if add.op_type != "Add":
        return None
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    array = constant(other)
    return other if array is not None and array.ndim == 1 else None


def write_rows(node: ir.Node, rows: np.ndarray) -> None:
    """Write [outputs, K] rows back as the layer's weight (its shape and dtype)."""
    value = node.inputs[1]
    current = value.const_value
    shape = tuple(current.shape)
    array = rows.reshape(shape) if node.op_type == "Conv" or is_nk(node) else rows.T
    value.const_value = ir.tensor(array.astype(current.dtype.numpy()), name=value.name)


def write_bias(node: ir.Node, bias: np.ndarray, names: NameSource) -> bool:
    """Write the layer's new bias: in place when only this layer reads it, else (a shared or
    missing bias of a Conv/Gemm) as a new initializer. False: nowhere to put it (a MatMul
    with no Add after it)."""
    value = bias_input(node)
    dtype = constant(node.inputs[1]).dtype
    if value is not None and len(value.uses()) == 1 and constant(value).size == bias.size:
        value.const_value = ir.tensor(bias.reshape(constant(value).shape).astype(dtype),
                                      name=value.name)
        return True
    if node.op_type == "MatMul":
        if value is None:
            return False
        add = node.outputs[0].consumers()[0]
        created = new_initializer(add.graph, names, f"{node.name or 'layer'}.bias",
                                  bias.astype(dtype))
        add.replace_input_with(1 if add.inputs[0] is node.outputs[0] else 0, created)
        return True
    created = new_initializer(node.graph, names, f"{node.name or 'layer'}.bias",
                              bias.astype(dtype))
    node.resize_inputs(3)
    node.replace_input_with(2, created)
    return True
