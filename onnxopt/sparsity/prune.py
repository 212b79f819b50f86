"""`--sparsity`: prune the weights, re-fit them from calibration data, hold the accuracy budget.

    result = sparsify(model, SparsityOptions(0.5, calib="calib.npz"), notes, feeds=..., ...)

Unstructured and N:M: the prune-weights pass zeroes the smallest weights (magnitude); with
calibration data each pruned layer is also re-fitted (SparseGPT: OBS row updates from the
layer's input Hessian XᵀX, layers in order so each sees the already-pruned model's inputs;
`refit`), and of the two the one closer to the dense model on the held-out batches is kept.
Channels: the prune-channels pass removes whole channels, then the layers that read them are
re-fitted by least squares (`channels`).
Then the budget (`--max-error`, cosine >= 0.99 by default, as int8): when the pruned model
misses it, the layers whose pruning costs the most (each measured alone) go back to dense, the
fewest that hold it (onnxopt.measure.budget.fall_back); the report says how far the target was
met. When nothing holds, the dense model stays and the report says why.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import io
from onnxopt.calib import sources
from onnxopt.errors import BadInputError
from onnxopt.inputs import Feeds
from onnxopt.measure import budget, verify
from onnxopt.passes import PruneWeightsOptions, PruneWeightsPass, _sparsity
from onnxopt.passes._graph import NameSource, new_switch, select
from onnxopt.sparsity import channels, refit, summary
from onnxopt.sparsity.options import CHANNELS, Candidate, SparsityOptions, SparsityResult

__all__ = ["calibration_split", "sparsify"]

Progress = Callable[[str], None]


def sparsify(model: ir.Model, options: SparsityOptions, notes: list[str], *,
             feeds: Sequence[Feeds] | None, progress: Progress) -> SparsityResult:
    """The pruned model that holds the budget (or the dense one, with the reason)."""
    options.check()
    calib_batches, held = calibration_split(model, options, notes, feeds)
    # MACs (the channel target, the report) need concrete sizes: those of the real inputs.
    seen = {name: tuple(np.shape(array)) for name, array in held[0].items()}
    options = dataclasses.replace(options, shapes={**seen, **options.shapes})
    if options.pattern == CHANNELS:
        return channels.prune_channels(model, options, notes, calib_batches, held, progress)
    layers, refused = _sparsity.prunable_layers(model, options.skip,
                                                keep_first_last=options.keep_first_last)
    if not layers:
        why = refused[0] if refused else "no Conv, ConvTranspose, Gemm or MatMul with a " \
                                         "constant float weight"
        raise BadInputError(f"--sparsity: nothing to prune ({why})")
    progress("running the dense model on the held-out batches")
    reference = verify.reference_outputs(model, held)
    if calib_batches is None:
        notes.append("sparsity: magnitude only; --calib DATA would re-fit the pruned layers "
                     "from their inputs (SparseGPT) and judge the budget on real data")
    judge = _Judge(model, reference, held, options.budget, calib_batches, progress)
    trial, outcome = judge.best(options, notes)
    if not outcome.holds:
        progress("holding the accuracy budget")
        outcome = budget.fall_back(trial, outcome, trial.candidate.pruned, notes, exact="dense",
                                   lossy="pruned", verb="pruned")
    if not outcome.holds and options.n_m is None:
        trial, outcome = _lower_target(judge, options, trial, outcome, notes)
    return _result(model, trial.candidate, outcome, options, refused, held[0])


@dataclasses.dataclass
class _Judge:
    """Makes the candidates for a target (magnitude, and re-fitted with calibration data) and
    judges them on the held-out batches."""

    dense: ir.Model
    reference: list
    held: list
    budget: budget.Budget
    calib_batches: Sequence[Feeds] | None
    progress: Progress

    def best(self, options: SparsityOptions, notes: list[str] | None = None):
        """(trial, outcome) of the candidate closest to dense at `options.target`."""
        candidates = [_magnitude(self.dense, options)]
        if options.reconstruct is not False and self.calib_batches is not None:
            self.progress(f"re-fitting the pruned layers (SparseGPT, {options.target:.0%})")
            candidates.append(refit.reconstructed(self.dense, options, self.calib_batches,
                                                  self.progress))
        trials = [_Trial(c, self.dense, self.reference, self.held, self.budget)
                  for c in candidates]
        outcomes = [t.run(()) for t in trials]
        for trial, outcome in zip(trials, outcomes):
            trial.candidate.score = outcome.score
        best = max(range(len(trials)), key=lambda i: (outcomes[i].holds, outcomes[i].score))
        if notes is not None and len(trials) > 1:
            notes.append("sparsity: worst-output SQNR vs dense " + ", ".join(
                f"{t.candidate.method} {o.score:.1f} dB" for t, o in zip(trials, outcomes))
                + f"; kept {trials[best].candidate.method}")
        return trials[best], outcomes[best]


def _lower_target(judge: _Judge, options: SparsityOptions, trial, outcome, notes):
    """When no set of dense layers holds the budget at the target: the largest lower target
    (bisected) whose pruned model holds it, or the original (trial, outcome)."""
    def attempt(target: float):
        judge.progress(f"holding the accuracy budget at {target:.0%} sparsity")
        return judge.best(dataclasses.replace(options, sparsity=target))

    found = budget.bisect_down(attempt, options.target)
    if found is None:
        notes.append(f"sparsity: no target down to {options.target / 8:.0%} held the accuracy "
                     f"budget ({outcome.why} at {options.target:.0%})")
        return trial, outcome
    notes.append(f"sparsity: {options.target:.0%} missed the accuracy budget ({outcome.why}) "
                 f"even with layers back to dense; kept a target of {found[0]:.1%}, the "
                 "largest tried that holds")
    return found[1]


def calibration_split(model: ir.Model, options: SparsityOptions, notes: list[str],
                      feeds: Sequence[Feeds] | None):
    """(calibration batches or None, held-out batches that judge the budget)."""
    if not options.calib:
        if not feeds:
            raise BadInputError("--sparsity: no inputs to judge the accuracy on; give --calib "
                                "DATA or --inputs")
        return None, list(feeds)
    data = sources.calibration_data(options.calib, model, preprocess=options.preprocess,
                                    samples=options.calib_samples, shapes=options.shapes)
    notes.extend(data.notes)
    if data.is_random:
        notes.append("sparsity: --calib random re-fits the layers to noise; give real data")
    # A pruned model can be right on average and wrong on a few inputs: judge it on a few.
    return sources.held_out_split(data, notes, min_held=sources.FEW_HELD_OUT)


def _magnitude(model: ir.Model, options: SparsityOptions) -> Candidate:
    copy = model.clone()
    report = PruneWeightsPass(PruneWeightsOptions(
        options.target, options.pattern, options.scope, options.skip,
        options.keep_first_last))(copy)
    pruned = [s.node for s in report.layers if s.zeros]
    return Candidate(copy, "magnitude", pruned, list(report.log), target=options.target)


@dataclasses.dataclass
class _Trial:
    """The candidate with some pruned layers given their dense weights back, judged."""

    candidate: Candidate
    dense: ir.Model
    reference: list
    feeds: list
    budget: budget.Budget

    def run(self, exclude: tuple[str, ...], *, batches: int | None = None) -> budget.Outcome:
        model = _with_dense_layers(self.candidate.model, self.dense, exclude)
        checked, holds, why = self.budget.judge(model, self.reference[:batches],
                                                self.feeds[:batches])
        return budget.Outcome(model, None, checked, holds, why, exclude)

    def scores_alone(self, layers: list[str]) -> dict[str, float]:
        """run((layer,), batches=1).score for each layer, bit for bit, from one model in which
        each layer's pruned weight sits behind a switch (_with_switches), in one session."""
        if 2 * io.weight_bytes(self.candidate.model) > budget.ONE_SESSION_BYTES:
            return {}  # the switched model holds the dense weights too
        model, switches = _with_switches(self.candidate.model, self.dense, layers)
        return budget.switched_scores(model, switches, self.feeds[0], self.reference[0])


def _with_switches(pruned: ir.Model, dense: ir.Model,
                   names: Sequence[str]) -> tuple[ir.Model, dict[str, str]]:
    """A copy of `pruned` with a boolean input per layer of `names` (layer -> its name): fed
    False, the layer reads its dense weight (as `_with_dense_layers` gives it). A weight that
    several of these layers share gets no switch (giving one of them its dense weight gives
    it to all)."""
    copy = pruned.clone()
    graph, source = copy.graph, NameSource(copy.graph)
    dense_weights = {n.name: n.inputs[1].const_value for n in dense.graph if n.name in names}
    layers = [n for n in copy.graph if n.name in dense_weights]
    sharing = collections.Counter(n.inputs[1] for n in layers)
    switches = {}
    for node in layers:
        weight = node.inputs[1]
        if sharing[weight] > 1:
            continue
        switch = new_switch(graph, source, f"{node.name}_pruned_on")
        dense_value = ir.Value(name=source(f"{weight.name}_dense"),
                               const_value=dense_weights[node.name])
        graph.register_initializer(dense_value)
        select(graph, source, switch, weight, dense_value, list(weight.uses()))
        switches[node.name] = switch.name
    return copy, switches


def _with_dense_layers(pruned: ir.Model, dense: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of `pruned` (sharing its tensors) whose layers `names` read their dense weights."""
    copy = pruned.clone()
    if not names:
        return copy
    dense_weights = {n.name: n.inputs[1].const_value for n in dense.graph if n.name in names}
    for node in copy.graph:
        if node.name in dense_weights:
            node.inputs[1].const_value = dense_weights[node.name]
    return copy


def _result(dense: ir.Model, candidate: Candidate, outcome: budget.Outcome,
            options: SparsityOptions, refused: list[str], feeds: Feeds) -> SparsityResult:
    kept_dense = set(outcome.excluded)
    pruned = [n for n in candidate.pruned if n not in kept_dense]
    log = [*refused, *candidate.log,
           *(f"kept {n!r} dense: the accuracy budget" for n in outcome.excluded)]
    if not outcome.holds or not pruned:
        why = outcome.why or "no layer could be pruned within the accuracy budget"
        checked = dataclasses.replace(outcome.verification, status="skipped",
                                      reason=f"dense model kept: {why}")
        return SparsityResult(dense, False, checked, log, {}, [], "",
                              {"budget": why, "pattern": options.pattern,
                               "target": options.target})
    layers = summary.layer_rows(dense, outcome.model, options.shapes,
                                candidate.reconstructed - kept_dense, feeds)
    counts = {"pruned": len(pruned), "kept dense": len(kept_dense)}
    info = summary.summarize(dense, outcome.model, layers, options, candidate.method, "",
                             feeds)
    info["budget"] = summary.budget_text(options, info["sparsity"], "of the weights zero",
                                         len(kept_dense) if kept_dense else None)
    return SparsityResult(outcome.model, True, outcome.verification, log, counts, layers,
                          candidate.method, info)
