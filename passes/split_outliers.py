"""split-outliers: compute a MatMul's few outlier input channels in float, the rest in int8.

ORT's int8 MatMul kernels on CPU quantize their input X [..., K] with one scale per tensor
(DynamicQuantizeMatMul: per call, from X's own min/max). Transformers carry a few channels
that are far larger than all others (MiniLM: one channel of the FFN input at 16-22x the median
channel's range), and that one channel sets the scale for all K. With O the outlier channels
and m the 0/1 mask that is 0 on O,
    Y = X W = (X * m) W' + X[..., O] W[O, :]           (W' = W with the rows O zeroed)
is exact: the first product has the outliers removed from its input (its range shrinks to the
largest ordinary channel) and goes int8; the second has |O| <= 8 inner channels and stays float
(LLM.int8's decomposition, Dettmers et al. 2022, with the outlier channels fixed from
calibration instead of found per call). Zeroing W's rows O also drops them from the per-column
weight scales.

Graph, per activation X with outliers (shared by every candidate MatMul/Gemm that reads it):
    X -> Mul(X, m)         -> each reader, with W' as its weight
    X -> Gather(X, O, axis=-1) -> MatMul(., alpha * W[O, :]) per reader -> Add to its output
The Add goes after the reader's bias Add when it has one (so int8 passes still fold the bias);
X's other readers (a residual Add) keep X.

Outliers of X: the channels whose max |x| (`absmax`, from calibration data) exceeds `ratio`
times the median channel's, at most `max_channels` of them (the largest), and only when the
others' range is at most half of X's: a split that barely shrinks the range costs ops and buys
nothing. Candidates: MatMul with a constant 2-D float32 weight, Gemm with transA = 0 and a
constant float32 B; main graph only (calibration sees no subgraph values). Float64 arithmetic,
cast once. `outlier_products` lists the new float MatMuls: int8 passes must leave them float.
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

__all__ = ["SplitOutliersOptions", "SplitOutliersPass"]


@dataclasses.dataclass(frozen=True)
class SplitOutliersOptions:
    absmax: Mapping[str, np.ndarray]  # value name -> max |x| per channel of its last axis
    ratio: float = 6.0  # an outlier's range is above ratio x the median channel's
    max_channels: int = 8  # a few: the float product must stay small
    nodes: frozenset[str] | None = None  # node names to split; None: every candidate


class SplitOutliersPass(ir.passes.InPlacePass):
    """Outlier input channels of MatMul/Gemm computed apart in float (exact rewrite)."""

    name = "split-outliers"
    lossy = False

    def __init__(self, options: SplitOutliersOptions):
        super().__init__()
        self.options = options
        self.outlier_products: list[str] = []  # node names of the float MatMuls it added

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        graph, names = model.graph, NameSource(model.graph)
        for value, nodes in _matmul_inputs.readers(graph, self.options.absmax,
                                                   self.options.nodes).items():
            absmax = np.asarray(self.options.absmax[value.name], dtype=np.float64)
            channels = outlier_channels(absmax, self.options.ratio, self.options.max_channels)
            if channels is None:
                continue
            picked = _split_input(graph, names, value, nodes, channels)
            for node in nodes:
                self.outlier_products.append(_split_node(graph, names, node, picked, channels))
            rest = float(np.delete(absmax, channels).max())
            report.change("split", f"split {value.name!r} for "
                          f"{', '.join(describe(n) for n in nodes)}: channel"
                          f"{'s' * (len(channels) > 1)} {channels.tolist()} (max |x| up to "
                          f"{absmax.max():.3g}) in float, the others (up to {rest:.3g}) int8")
        if report.modified:
            common.RemoveUnusedNodesPass()(model)  # the weights the zeroed ones replaced
        return report


def outlier_channels(absmax: np.ndarray, ratio: float, max_channels: int) -> np.ndarray | None:
    """Sorted indices of the outlier channels, or None when splitting would not pay."""
    if absmax.size < 2 * max_channels or not np.all(np.isfinite(absmax)):
        return None
    median = float(np.median(absmax))
    largest = np.argsort(-absmax, kind="stable")[:max_channels]
    picked = largest[absmax[largest] > ratio * median]
    if not picked.size or median <= 0:
        return None
    rest = np.delete(absmax, picked).max()
    if rest > 0.5 * absmax.max():  # more outliers than max_channels: the range barely shrinks
        return None
    return np.sort(picked)


def _sum_after(node: ir.Node) -> ir.Value:
    """The value the outlier product is added to: the node's bias Add output when its only
    reader is an Add of a constant, else its own output."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        add = uses[0].node
        if add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.inputs) == 2 \
                and any(constant(v) is not None for v in add.inputs):
            return add.outputs[0]
    return out


def _split_input(graph: ir.Graph, names: NameSource, value: ir.Value, nodes: list[ir.Node],
                 channels: np.ndarray) -> ir.Value:
    """Feeds X * m to every reader in `nodes`; returns X[..., channels]. Each computed once."""
    base = value.name or "activation"
    size = _matmul_inputs.weight_rows(nodes[0]).shape[0]
    mask = np.ones(size, dtype=np.float32)
    mask[channels] = 0.0
    mul = ir.node("Mul", [value, new_initializer(graph, names, f"{base}_inlier_mask", mask)],
                  name=names(f"{base}_inliers"))
    gather = ir.node("Gather", [value, new_initializer(graph, names, f"{base}_outlier_index",
                                                       channels.astype(np.int64))],
                     attributes={"axis": -1}, name=names(f"{base}_outliers"))
    for out, suffix, shape in ((mul.outputs[0], "inliers", value.shape),
                               (gather.outputs[0], "outliers", None)):
        out.name, out.dtype = names(f"{base}_{suffix}"), ir.DataType.FLOAT
        if shape is not None:
            out.shape = shape
    graph.insert_before(nodes[0], [mul, gather])
    for node in nodes:
        node.replace_input_with(0, mul.outputs[0])
    return gather.outputs[0]


def _split_node(graph: ir.Graph, names: NameSource, node: ir.Node, picked: ir.Value,
                channels: np.ndarray) -> str:
    """Zero the weight rows `channels` of `node` and add X[..., channels] @ W[channels, :] to
    its (biased) output; returns the new float MatMul's name."""
    target = _sum_after(node)
    rows = _matmul_inputs.weight_rows(node).astype(np.float64)  # [K, N]
    alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
    small = (alpha * rows[channels]).astype(np.float32)
    weight = constant(node.inputs[1]).copy()
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    if transposed:
        weight[:, channels] = 0.0
    else:
        weight[channels, :] = 0.0
    base = node.inputs[1].name or f"{node.name}_weight"
    node.replace_input_with(1, new_initializer(graph, names, f"{base}_inliers", weight))
    product = ir.node("MatMul", [picked, new_initializer(graph, names, f"{base}_outliers", small)],
                      name=names(f"{node.name or base}_outliers"))
    total = ir.node("Add", [target, product.outputs[0]], name=names(f"{node.name or base}_sum"))
    for out, suffix in ((product.outputs[0], "outlier_part"), (total.outputs[0], "sum")):
        out.name, out.dtype = names(f"{target.name}_{suffix}"), ir.DataType.FLOAT
    total.outputs[0].shape = target.shape
    for use in list(target.uses()):
        if use.node is not total:
            use.node.replace_input_with(use.idx, total.outputs[0])
    if target.is_graph_output():  # the output keeps its name: callers read it by name
        name = target.name
        target.name = names(f"{name}_inliers")
        total.outputs[0].name = name
        graph.outputs[graph.outputs.index(target)] = total.outputs[0]
    graph.insert_after(target.producer(), [product, total])
    return product.name
