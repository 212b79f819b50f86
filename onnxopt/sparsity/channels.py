"""`--sparsity-pattern channels`: remove whole channels, re-fit what reads them, hold the budget.

1. Importance: weight norms (the prune-channels pass: l2, l1), or with `--importance
   activation` what each channel carries into the layers that read it, from calibration data:
       S_c = sum over reading layers  E[x_c²] · ‖W[:, c]‖²
   (the squared output a reader loses without channel c, were channels uncorrelated).
2. prune-channels removes the least important channels until the MAC target is met.
3. Re-fit (with --calib): every layer whose inputs lost channels is solved by least squares so
   that its output matches the dense model's on the same calibration batches:
       [W' b'] = argmin ‖[X' 1] [W' b']ᵀ − [X 1] [W b]ᵀ‖² = ((H + λI)⁻¹ C [W b]ᵀ)ᵀ
   with H = [X' 1]ᵀ[X' 1] from the pruned model and C = [X' 1]ᵀ[X 1] across the two models
   (Conv: unfolded patches), restricted to the output channels the layer keeps. Layers are
   solved in waves, so each one sees the already re-fitted layers before it.
4. Budget: when the pruned model misses `--max-error`, the MAC target is bisected down (each
   try prunes and re-fits again) and the largest that holds is kept; the report says how far
   the target was met.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.calib import activations
from onnxopt.errors import BadInputError
from onnxopt.inputs import Feeds
from onnxopt.measure import budget, verify
from onnxopt.passes._graph import NameSource, constant, describe, new_initializer
from onnxopt.passes._sparsity import Layer
from onnxopt.passes.prune_channels import (
    PruneChannelsOptions,
    PruneChannelsPass,
    channel_groups,
)
from onnxopt.sparsity import hessian, reconstruct, refit, summary
from onnxopt.sparsity.options import Candidate, SparsityOptions, SparsityResult

__all__ = ["activation_scores", "prune_channels"]

_BISECTIONS = 3  # target, then 3 halvings of the interval: within 1/8 of the asked target


def prune_channels(model: ir.Model, options: SparsityOptions, notes: list[str],
                   calib_batches: Sequence[Feeds] | None, held: list[Feeds],
                   progress: Callable[[str], None]) -> SparsityResult:
    """The channel-pruned model that holds the budget (or the dense one, with the reason)."""
    groups = channel_groups(model, options.shapes)
    if not any(g.refused is None for g in groups):
        why = next((g.refused for g in groups if g.refused), "no Conv/Gemm/MatMul channels")
        raise BadInputError(f"--sparsity-pattern channels: no channel group can be pruned "
                            f"(e.g. {why})")
    scores = {}
    if options.importance == "activation":
        progress("measuring channel activations")
        scores = activation_scores(model, groups, calib_batches)
    progress("running the dense model on the held-out batches")
    reference = verify.reference_outputs(model, held)
    refits = calib_batches is not None and options.reconstruct is not False
    if calib_batches is None:
        notes.append("channels: no re-fit; --calib DATA would re-fit the layers that read the "
                     "removed channels (least squares) and judge the budget on real data")

    def attempt(target: float) -> tuple[Candidate, budget.Outcome]:
        candidate = _pruned(model, options, target, scores)
        if refits:
            progress(f"re-fitting the layers that read removed channels ({target:.0%} MACs)")
            candidate = _refitted(model, candidate, groups, calib_batches)
        checked, holds, why = options.budget.judge(candidate.model, reference, held)
        return candidate, budget.Outcome(candidate.model, None, checked, holds, why)

    candidate, outcome = attempt(options.target)
    if not outcome.holds:
        candidate, outcome = _bisect(attempt, options.target, candidate, outcome, notes)
    if not outcome.holds:
        checked = dataclasses.replace(outcome.verification, status="skipped",
                                      reason=f"dense model kept: {outcome.why}")
        return SparsityResult(model, False, checked, candidate.log, {}, [], "",
                              {"budget": outcome.why, "pattern": options.pattern,
                               "target": options.target})
    layers = summary.layer_rows(model, candidate.model, options.shapes, candidate.reconstructed)
    info = summary.summarize(model, candidate.model, layers, options, candidate.method,
                             "held" if candidate.macs_removed >= options.target - 0.01 else
                             f"held at {candidate.macs_removed:.0%} of MACs removed, not "
                             f"{options.target:.0%}")
    counts = {"channels removed": sum(map(len, candidate.removed.values())),
              "groups pruned": len(candidate.removed), "layers re-fitted": len(candidate.reconstructed)}
    return SparsityResult(candidate.model, True, outcome.verification, candidate.log, counts,
                          layers, candidate.method, info)


def _bisect(attempt, target: float, candidate: Candidate, outcome: budget.Outcome, notes):
    """The largest MAC target (within 1/2^_BISECTIONS of `target`) whose model holds."""
    low, high, best = 0.0, target, None
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        tried, result = attempt(middle)
        if result.holds:
            low, best = middle, (tried, result)
        else:
            high = middle
    if best is None:
        notes.append(f"channels: no MAC target down to {high:.0%} held the accuracy budget "
                     f"({outcome.why} at {target:.0%})")
        return candidate, outcome
    notes.append(f"channels: {target:.0%} of MACs missed the accuracy budget ({outcome.why}); "
                 f"kept {low:.0%}, the largest tried that holds")
    return best


def _pruned(model: ir.Model, options: SparsityOptions, target: float, scores) -> Candidate:
    copy = model.clone()
    importance = options.importance if options.importance in ("l1", "l2") else "l2"
    report = PruneChannelsPass(PruneChannelsOptions(
        sparsity=target, importance=importance, scores=scores, skip=options.skip,
        shapes=dict(options.shapes)))(copy)
    removed_macs = 1 - report.macs_after / report.macs_before if report.macs_before else 0.0
    changed = [n.name for n in copy.graph if n.name in set(report.consumers)]
    return Candidate(copy, "magnitude", changed, list(report.log), removed=dict(report.removed),
                     macs_removed=removed_macs)


def activation_scores(model: ir.Model, groups, batches: Sequence[Feeds]) -> dict[str, np.ndarray]:
    """Group key -> per channel, the squared output its readers would lose (module docstring)."""
    sites = [(g, site) for g in groups if g.refused is None for site in g.consumers
             if site.node.op_type in ("Conv", "Gemm", "MatMul")]
    names = sorted({site.node.inputs[0].name for _, site in sites})
    power: dict[str, np.ndarray] = {}  # mean x² per channel position of each layer input
    count = 0
    for found in activations.iter_activations(model, batches, names):
        for _, site in sites:
            name = site.node.inputs[0].name
            x = np.asarray(found[name], dtype=np.float64)
            axis = 1 if site.node.op_type == "Conv" else x.ndim - 1
            energy = np.square(x).mean(axis=tuple(a for a in range(x.ndim) if a != axis))
            power[name] = power[name] + energy if name in power else energy
        count += 1
    scores: dict[str, np.ndarray] = {}
    for group, site in sites:
        weight = constant(site.node.inputs[1])
        columns = None if weight is None else _column_energy(site.node, weight)
        energy = power.get(site.node.inputs[0].name)
        if columns is None or energy is None or len(columns) != len(site.index):
            continue
        contribution = energy / count * columns
        total = scores.setdefault(group.key, np.zeros(group.channels))
        mine = site.index >= 0
        np.add.at(total, site.index[mine], contribution[mine])
    return scores


def _column_energy(node: ir.Node, weight: np.ndarray) -> np.ndarray | None:
    """‖W[:, p]‖² per input position p of a reading layer (None: grouped Conv)."""
    w = weight.astype(np.float64)
    if node.op_type == "Conv":
        if node.attributes.get_int("group", 1) != 1:
            return None
        return np.square(w).sum(axis=tuple(a for a in range(w.ndim) if a != 1))
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return np.square(w).sum(axis=0)
    return np.square(w).sum(axis=1)


# ------------------------------------------------------------------ least-squares re-fit
def _refitted(dense: ir.Model, candidate: Candidate, groups, batches) -> Candidate:
    """`candidate` with every reading layer re-fitted to the dense model's outputs."""
    pruned = candidate.model
    dense_nodes = {n.name: n for n in dense.graph}
    readers = [n for n in pruned.graph if n.name in set(candidate.pruned) and _solvable(n)]
    layers = [_Reader(n, dense_nodes[n.name]) for n in readers if n.name in dense_nodes]
    log, done = list(candidate.log), set()
    names = NameSource(pruned.graph)
    for wave in refit.waves(pruned, [reader.as_layer() for reader in layers]):
        wave_readers = [r for r in layers if r.node in {layer.node for layer in wave}]
        _accumulate(dense, pruned, wave_readers, batches)
        for reader in wave_readers:
            kept = _kept_outputs(reader.dense, groups, candidate.removed)
            line = reader.solve(kept, names)
            log.append(line)
            done.add(reader.node.name)
    return dataclasses.replace(candidate, method="reconstructed", log=log,
                               reconstructed=frozenset(done))


def _solvable(node: ir.Node) -> bool:
    """Layers the least-squares re-fit covers: plain Conv (group 1), Gemm, 2-D MatMul."""
    if node.op_type == "Conv":
        return node.attributes.get_int("group", 1) == 1 and constant(node.inputs[1]) is not None
    if node.op_type == "Gemm":
        attrs = node.attributes
        return (not attrs.get_int("transA", 0) and attrs.get_float("alpha", 1.0) == 1.0
                and attrs.get_float("beta", 1.0) == 1.0 and constant(node.inputs[1]) is not None)
    weight = constant(node.inputs[1]) if node.op_type == "MatMul" else None
    return weight is not None and weight.ndim == 2


def _kept_outputs(node: ir.Node, groups, removed: dict[str, list[int]]) -> np.ndarray | None:
    """Output channel positions of a dense `node` that the pruned model keeps (None: all)."""
    output = node.outputs[0]
    gone = None
    for group in groups:
        channels = set(removed.get(group.key, ()))
        for site in group.activations:
            if site.value is output and channels:
                hit = np.isin(site.index, list(channels)) & (site.index >= 0)
                gone = hit if gone is None else gone | hit
    return None if gone is None else np.flatnonzero(~gone)


class _Reader:
    """A layer whose input channels shrank, with its dense twin and its two accumulators."""

    def __init__(self, node: ir.Node, dense: ir.Node):
        self.node, self.dense = node, dense
        self.hessian = hessian.InputHessian(hessian.layer_input(node), with_bias=True)
        self.cross = hessian.CrossMoment(hessian.layer_input(node), hessian.layer_input(dense),
                                         with_bias=True)

    def as_layer(self) -> Layer:
        """For refit.waves, which orders layers by their node."""
        return Layer(self.node, self.node.inputs[1], 1, not _is_nk(self.node))

    def solve(self, kept: np.ndarray | None, names: NameSource) -> str:
        """Least squares onto the dense layer's output (its kept channels); the log line."""
        rows, bias = _rows_and_bias(self.dense)
        if kept is not None:
            rows, bias = rows[kept], bias[kept]
        target = np.concatenate([rows, bias[:, None]], axis=1)  # [outputs, K + 1]
        current = constant(self.node.inputs[1])
        bias_input = _bias_input(self.node)
        has_bias = bias_input is not None or self.node.op_type != "MatMul"
        h, c = self.hessian.hessian[0], self.cross.moment[0]
        if not has_bias:  # a MatMul with no Add after it: fit the weights alone
            h, c = h[:-1, :-1], c[:-1]
        solved = reconstruct.refit(h, c, target)
        outputs = current.shape[0] if self.node.op_type == "Conv" or _is_nk(self.node) \
            else current.shape[1]
        if solved.shape[0] != outputs:
            return (f"kept {describe(self.node)} as pruned: {solved.shape[0]} output channels "
                    f"found for {outputs} (not re-fitted)")
        weight = solved[:, :-1] if has_bias else solved
        if has_bias:
            _write_bias(self.node, bias_input, solved[:, -1].astype(current.dtype), names)
        _write_weight(self.node, weight, current)
        return (f"re-fitted {describe(self.node)} by least squares to the dense layer's output "
                f"({self.hessian.count} rows)")


def _is_nk(node: ir.Node) -> bool:
    """Gemm with transB=1: its weight is already [N, K]."""
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def _rows_and_bias(node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """The dense layer as [outputs, K] rows in its input's unfolded order, and its bias."""
    weight = constant(node.inputs[1]).astype(np.float64)
    rows = weight.reshape(weight.shape[0], -1) if node.op_type == "Conv" or _is_nk(node) \
        else weight.T
    bias_value = _bias_input(node)
    bias = constant(bias_value) if bias_value is not None else None
    bias = np.zeros(rows.shape[0]) if bias is None else np.broadcast_to(
        bias.astype(np.float64).ravel(), (rows.shape[0],)).copy()
    return rows, bias


def _bias_input(node: ir.Node) -> ir.Value | None:
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
    return other if array is not None and array.ndim == 1 and len(other.uses()) == 1 else None


def _write_weight(node: ir.Node, rows: np.ndarray, current: np.ndarray) -> None:
    array = rows.reshape(current.shape) if node.op_type == "Conv" or _is_nk(node) else rows.T
    value = node.inputs[1]
    value.const_value = ir.tensor(array.astype(current.dtype), name=value.name)


def _write_bias(node: ir.Node, value: ir.Value | None, bias: np.ndarray,
                names: NameSource) -> None:
    """Write the re-fitted bias in place, or give a Conv/Gemm without one a new bias input."""
    if value is not None:
        shape = constant(value).shape
        value.const_value = ir.tensor(bias.reshape(shape), name=value.name)
        return
    if node.op_type == "MatMul":
        return
    created = new_initializer(node.graph, names, f"{node.name or 'layer'}.bias", bias)
    node.resize_inputs(3)
    node.replace_input_with(2, created)


def _accumulate(dense: ir.Model, pruned: ir.Model, readers: Sequence[_Reader],
                batches: Sequence[Feeds]) -> None:
    """Both models on the same batches: each reader's pruned input (H) and both inputs (C)."""
    if not readers:
        return
    pruned_names = [r.node.inputs[0].name for r in readers]
    dense_names = [r.dense.inputs[0].name for r in readers]
    for new, old in zip(activations.iter_activations(pruned, batches, pruned_names),
                        activations.iter_activations(dense, batches, dense_names)):
        for reader in readers:
            x_new, x_old = new[reader.node.inputs[0].name], old[reader.dense.inputs[0].name]
            reader.hessian.add(x_new)
            reader.cross.add(x_new, x_old)
