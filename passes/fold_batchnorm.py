"""fold-batchnorm: BatchNormalization into the neighbouring linear op, exactly.

Inference BatchNormalization is the per-channel affine map (channel axis 1)
    y = s x + t,   s = scale / sqrt(var + epsilon),   t = B - mean s
computed in float64 and cast once to the weight's dtype. Sites, tried in order per BN:
  1. after Conv / ConvTranspose (any group, 1-3 D) / Gemm (transB, alpha, beta) / MatMul with a
     2-D constant weight and rank-2 output (+ its bias Add): W' = s W, b' = s b + t;
  2. before a Conv whose padding is all zero: W'[m, c] = W[m, c] s[c], b'[m] = b[m] + sum W[m, c] t[c]
     (with padding the border sees BN's zeros, i.e. x = -t/s, which a Conv cannot reproduce);
     before a Gemm (transA = 0) or a MatMul on rank-2 input: W' = diag(s) W, bias' += t W;
  3. otherwise BN becomes Mul + Add on constants, kept only if step 4 absorbs some of it (or
     with keep_unfolded_mul_add); else it goes back to one BN, which ORT runs faster.
  4. Mul / Add / Sub / Div by a per-channel constant after a linear unit fold into it the same way;
     otherwise into the Conv / Gemm / MatMul that alone reads its output, as in step 2 (a scale
     folds into a padded Conv too: zeros stay zeros). A scale then shift before a padded Conv,
     a h + t, becomes (h + t/a) a, so that the scale folds (PP-LCNetV3's learnable affine
     after each activation: PP-OCRv4 det loses 20 Mul and 10 Add).
Refused (logged, graph unchanged there): training-mode BN or one whose statistics outputs are
used; `spatial=0` (opset < 9); non-constant parameters; a linear op whose output has another
consumer (folding would change what that consumer sees).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxopt.passes._affine import Unit, find_unit, fold_after, replace
from onnxopt.passes._fold_affine_ops import fold_affine_ops
from onnxopt.passes._fold_before import fold_before
from onnxopt.passes._weights import fold_weights
from onnxopt.passes._graph import (
    NameSource,
    annotate_ranks,
    constant,
    describe,
    new_initializer,
    opset_version,
    rank_of,
)
from onnxopt.passes._report import PassReport

__all__ = ["FoldBatchNormPass", "FoldBatchNormOptions"]

logger = logging.getLogger(__name__)
_ROLES = ("scale", "B", "input_mean", "input_var")


@dataclasses.dataclass(frozen=True)
class FoldBatchNormOptions:
    fold_before_conv: bool = True  # exact when the Conv has no padding; ORT cannot do it itself
    to_mul_add: bool = True  # leftover BN as Mul+Add, so that step 4 may still absorb it
    # Mul+Add that step 4 could not absorb goes back to one BatchNormalization (ORT runs it
    # faster than two elementwise passes: 0.93x measured); True keeps it, for runtimes
    # without BatchNormalization.
    keep_unfolded_mul_add: bool = False
    fold_mul_add: bool = True  # step 4; also cleans up after exporters that emit x * s + t


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold BatchNormalization (and per-channel Mul/Add) into Conv/ConvTranspose/Gemm/MatMul."""

    name = "fold-batchnorm"
    lossy = False

    def __init__(self, options: FoldBatchNormOptions | None = None):
        super().__init__()
        self.options = options or FoldBatchNormOptions()

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        annotate_ranks(model)
        for graph in list(model.graphs()):  # functions have no initializers to fold into
            _fold_computed_weights(graph, report)
            names = NameSource(graph)
            rewritten = []
            for bn in [n for n in graph if _is_onnx(n, "BatchNormalization")]:
                rewritten += self._fold_batchnorm(graph, names, bn, report)
            if self.options.fold_mul_add:
                fold_affine_ops(graph, names, report)
            if not self.options.keep_unfolded_mul_add:
                for record in rewritten:
                    _restore_if_unfolded(graph, record, report)
        if report.modified:
            common.RemoveUnusedNodesPass()(model)  # the weights the folds replaced
        return report

    def _fold_batchnorm(self, graph, names: NameSource, bn: ir.Node, report: PassReport) -> list:
        """Fold one BN; returns [_MulAdd] when it became Mul+Add (step 4 may still take it)."""
        affine = _batchnorm_affine(bn, opset_version(graph))
        if isinstance(affine, str):
            report.refuse(f"kept {describe(bn)}: {affine}")
            return []
        scale, shift = affine
        unit = find_unit(bn.inputs[0])
        if isinstance(unit, Unit) and unit.channel_axis != 1:
            unit = f"the output of {describe(unit.node)} is not rank 2, so its channels are not axis 1"
        if isinstance(unit, Unit) and unit.channels != scale.size:
            unit = f"{describe(unit.node)} has {unit.channels} channels, BN has {scale.size}"
        if isinstance(unit, Unit):
            new_nodes, output = fold_after(graph, names, unit, scale, shift)
            replace(graph, [unit.node, unit.bias_add, bn], new_nodes, bn.outputs[0], output)
            report.change("folded", f"folded {describe(bn)} into {describe(unit.node)}")
            return []
        why_not_after = unit
        if self.options.fold_before_conv:
            folded = fold_before(graph, names, bn.inputs[0], bn.outputs[0], scale, shift)
            if isinstance(folded, tuple):
                consumer, new_nodes, output = folded
                replace(graph, [bn, consumer], new_nodes, consumer.outputs[0], output)
                report.change("folded", f"folded {describe(bn)} into the next {describe(consumer)}")
                return []
            why_not_after += f"; not into the next op: {folded}"
        if not self.options.to_mul_add:
            report.refuse(f"kept {describe(bn)}: {why_not_after}")
            return []
        mul_add = _as_mul_add(graph, names, bn, scale, shift)
        if isinstance(mul_add, str):
            report.refuse(f"kept {describe(bn)}: {why_not_after}; {mul_add}")
            return []
        record = _MulAdd(*mul_add, bn.op_type, list(bn.inputs), dict(bn.attributes), bn.name,
                         describe(bn), why_not_after, len(report.log))
        replace(graph, [bn], mul_add, bn.outputs[0], mul_add[-1].outputs[0])
        report.change("as Mul+Add", f"rewrote {describe(bn)} as Mul+Add: {why_not_after}")
        return [record]


@dataclasses.dataclass
class _MulAdd:
    """A BN rewritten as Mul+Add, with what it takes to put it back."""

    mul: ir.Node
    add: ir.Node
    op_type: str
    inputs: list
    attributes: dict
    name: str | None
    described: str
    why: str
    log_index: int


def _restore_if_unfolded(graph, record: _MulAdd, report: PassReport) -> None:
    if record.mul.graph is not graph or record.add.graph is not graph:
        return  # step 4 absorbed at least one of them: the rewrite paid off
    bn = ir.node(record.op_type, record.inputs, attributes=record.attributes, name=record.name)
    constants = [record.mul.inputs[1], record.add.inputs[1]]
    replace(graph, [record.mul, record.add], [bn], record.add.outputs[0], bn.outputs[0])
    for value in constants:  # the scale and shift this rewrite made; nothing else reads them
        if not value.uses():
            graph.initializers.pop(value.name, None)
    report.counts["as Mul+Add"] -= 1
    if not report.counts["as Mul+Add"]:
        del report.counts["as Mul+Add"]
    report.log[record.log_index] = (f"kept {record.described}: {record.why}; as Mul+Add it "
                                    "would not fold either, and ORT runs one BatchNormalization "
                                    "faster than Mul+Add")
    report.counts["refused"] += 1
    report.modified = any(n for kind, n in report.counts.items() if kind != "refused")


_LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_AFFINE = {"BatchNormalization", "Mul", "Add", "Sub", "Div"}


def _fold_computed_weights(graph: ir.Graph, report: PassReport) -> None:
    """The weights this pass folds into (a linear op next to a BN or a per-channel affine op,
    and BN's own parameters) need their values: one computed from constants (the model zoo's
    ConstantOfShape) becomes an initializer first (passes/_weights.py)."""
    def next_to_affine(node: ir.Node) -> bool:
        after = any(use.op_type in _AFFINE for out in node.outputs for use, _ in out.uses())
        before = any(v is not None and v.producer() is not None
                     and v.producer().op_type in _AFFINE for v in node.inputs[:1])
        return after or before

    wanted = [n for n in graph if n.domain in ("", "ai.onnx") and (
        n.op_type == "BatchNormalization" or (n.op_type in _LINEAR and next_to_affine(n)))]
    folded = fold_weights(graph, wanted)
    if folded:
        report.change("weight computed from constants", f"{len(folded)} weights computed from "
                      f"constants became initializers (first: {folded[0]!r})", len(folded))


def _is_onnx(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def _batchnorm_affine(bn: ir.Node, opset: int) -> tuple[np.ndarray, np.ndarray] | str:
    if bn.attributes.get_int("training_mode", 0):
        return "training_mode=1"
    if any(v is not None and (v.uses() or v.is_graph_output()) for v in bn.outputs[1:]):
        return "its running statistics outputs are used (a training graph)"
    if opset < 9 and bn.attributes.get_int("spatial", 1) == 0:
        return "spatial=0 keeps statistics per element, not per channel"
    params = []
    for role, value in zip(_ROLES, bn.inputs[1:5]):
        array = constant(value)
        if array is None:
            name = value.name if value is not None else "<missing>"
            return f"{role} {name!r} is not a constant (a graph input or computed)"
        if not np.issubdtype(array.dtype, np.floating):
            return f"{role} {value.name!r} is {array.dtype}"
        params.append(array.astype(np.float64).ravel())
    gamma, beta, mean, var = params
    # epsilon is stored as float32; ORT adds that float32 value, so use it exactly.
    epsilon = float(np.float32(bn.attributes.get_float("epsilon", 1e-5)))
    if not all(np.isfinite(p).all() for p in params):
        return "a parameter holds NaN or Inf"
    if not (var + epsilon > 0).all():  # a damaged or hand-made model: sqrt would give NaN
        return "variance + epsilon is not positive everywhere"
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale


def _as_mul_add(graph, names, bn: ir.Node, scale, shift) -> list[ir.Node] | str:
    x = bn.inputs[0]
    rank = _rank(x) or _rank(bn.outputs[0])
    # Opset 15+ lets BN's parameters differ in type from X (fp16 X, fp32 scale): follow X.
    dtype = x.dtype.numpy() if x.dtype is not None else constant(bn.inputs[1]).dtype
    if rank is None or rank < 2:
        return "its input rank is unknown, so Mul+Add shapes cannot be built"
    shape = (scale.size,) + (1,) * (rank - 2)
    base = bn.name or bn.outputs[0].name or "batchnorm"
    s = new_initializer(graph, names, f"{base}.scale", scale.reshape(shape).astype(dtype))
    t = new_initializer(graph, names, f"{base}.shift", shift.reshape(shape).astype(dtype))
    mul = ir.node("Mul", [x, s], name=f"{base}_mul")
    add = ir.node("Add", [mul.outputs[0], t], name=f"{base}_add")
    return [mul, add]


def _rank(value: ir.Value) -> int | None:
    """From shapes (see annotate_ranks), or from the Conv that produced it (= weight rank)."""
    if rank_of(value) is not None:
        return rank_of(value)
    producer = value.producer()
    if producer is not None and producer.op_type in ("Conv", "ConvTranspose"):
        weight = constant(producer.inputs[1])
        return None if weight is None else weight.ndim
    return None
