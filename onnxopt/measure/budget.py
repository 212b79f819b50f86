"""What a lossy rewrite may cost, and the search that keeps it within: the accuracy budget per
output (`--max-error`), the sensitivity fallback that sends the worst layers back to exact, and
the speed check. int8 (layers back to float) and sparsity (layers back to dense) both use it.

A trial rewrites a copy of the model with some layers left exact and judges it against the
reference outputs on held-out batches; `fall_back` searches the layers to leave exact with as
few trials as it can (each is a full rewrite + run).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnxopt import io
from onnxopt.errors import BadInputError
from onnxopt.measure import bench, runtime, verify

__all__ = ["Budget", "Outcome", "Trial", "bisect_down", "fall_back", "latency_ratio",
           "longest_prefix", "parse_budget", "slower", "switched_scores", "timed_pair"]

_TIMING_SECONDS = 1.5  # rewrite vs original, interleaved: enough to see 5% on 2 cores
_MAX_FALLBACK = 0.5  # past half the layers left exact, the rewrite has nothing left to offer


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a lossy rewrite may cost, per output vs the reference: cosine >= x and/or
    SQNR >= y dB (None: no bound)."""

    min_cosine: float | None = 0.99  # conservative: `--int8` or `--sparsity` must never wreck a model
    min_sqnr_db: float | None = None

    def judge(self, model: ir.Model, reference, feeds) -> tuple[verify.Verification, bool, str]:
        """Run `model` on `feeds` against the `reference` outputs: (verification, holds, why).
        A lossy rewrite is never elementwise close; only this budget decides."""
        checked = verify.verify(model, reference, feeds, verify.Tolerance(elementwise=False))
        holds, why = self.holds(checked.outputs) if checked.outputs else (False, checked.reason)
        checked.status, checked.reason = ("passed" if holds else "failed"), why
        return checked, holds, why

    def holds(self, errors: list[verify.OutputError]) -> tuple[bool, str]:
        for out in errors:
            if out.nonfinite:
                return False, f"{out.name}: {out.nonfinite} NaN/Inf where the original is finite"
            if out.exact_only:  # integer output (argmax, counts): the share of equal elements
                if not out.cosine >= (self.min_cosine or 0.0):
                    return False, (f"{out.name}: {out.cosine:.4f} of its elements equal "
                                   f"< {self.min_cosine}")
                continue
            if self.min_cosine is not None and not out.cosine >= self.min_cosine:
                return False, f"{out.name}: cosine {out.cosine:.4f} < {self.min_cosine}"
            if self.min_sqnr_db is not None and not out.sqnr_db >= self.min_sqnr_db:
                return False, f"{out.name}: SQNR {out.sqnr_db:.1f} dB < {self.min_sqnr_db}"
        return True, ""


def parse_budget(text: str) -> Budget:
    """`cosine>=0.99`, `sqnr>=30`, both joined by `,`, or `none`."""
    if text.strip().lower() == "none":
        return Budget(None, None)
    fields: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(cosine|sqnr)\s*>=\s*([0-9.eE+-]+)", part.lower())
        if not match:
            raise BadInputError(f"--max-error {text!r}: expected cosine>=0.99, sqnr>=30, "
                                "both (comma-separated) or none")
        fields["min_cosine" if match[1] == "cosine" else "min_sqnr_db"] = float(match[2])
    return Budget(fields.get("min_cosine"), fields.get("min_sqnr_db"))


@dataclasses.dataclass
class Outcome:
    model: ir.Model
    report: object  # PassReport
    verification: verify.Verification
    holds: bool
    why: str
    excluded: tuple[str, ...] = ()  # the layers this trial left exact (float, dense)

    @property
    def score(self) -> float:
        """The worst output's SQNR (dB): what sensitivity ranks by."""
        return min((o.sqnr_db for o in self.verification.outputs), default=-math.inf)


class Trial(Protocol):
    def run(self, exclude: tuple[str, ...], *, batches: int | None = None) -> Outcome: ...


def fall_back(trial: Trial, full: Outcome, names: list[str], notes: list[str], *,
              most: int | None = None, exact: str = "float", lossy: str = "int8",
              verb: str = "quantized") -> Outcome:
    """Sensitivity: each rewritten layer of `names` alone back to exact (`exact`: "float",
    "dense"; one held-out batch), ranked by the SQNR it wins back; then the worst 1, 2, 4, ...
    go back until the budget holds, and a bisection between the last count that missed and the
    first that held finds the fewest. The ranking comes from one batch, so each layer of that
    list is then retried rewritten alone (least blamed first) and stays rewritten where the
    budget still holds. When error is spread over many layers no short list wins it back; then
    the longest prefix of the network (graph order) that holds the budget stays rewritten.
    With `most`, a search that would need more than `most` layers exact is given up (another
    variant already does better): `full` comes back, not holding."""
    if most is not None and most < 1:
        return full
    gains = _gains_alone(trial, full, names)
    order = sorted(names, key=lambda n: -gains[n])
    limit = max(1, int(len(order) * _MAX_FALLBACK))
    limit = limit if most is None else min(limit, most)
    missed, count = 0, 1  # all int8 (0 back in float) missed the budget
    while True:  # 1, 2, 4, ... of the worst back to float: log(n) checks, not n
        count = min(count, limit)
        outcome = trial.run(tuple(order[:count]))
        if outcome.holds:
            break
        if count >= limit:
            if most is not None:
                return full
            return longest_prefix(trial, full, names, notes, exact=exact, lossy=lossy, verb=verb)
        missed, count = count, count * 2
    while count - missed > 1:  # holding is close to monotone in the count: bisect
        middle = (missed + count) // 2
        candidate = trial.run(tuple(order[:middle]))
        if candidate.holds:
            count, outcome = middle, candidate
        else:
            missed = middle
    kept = list(order[:count])
    for name in reversed(order[:count]):  # the ranking is from one batch: retry each alone
        candidate = trial.run(tuple(n for n in kept if n != name))
        if candidate.holds:
            kept.remove(name)
            outcome = candidate
    shown = ", ".join(f"{n!r} (+{gains[n]:.1f} dB)" for n in kept)
    notes.append(f"kept {exact} to hold the accuracy budget ({full.why} when all were "
                 f"{lossy}): {shown}")
    return outcome


def _gains_alone(trial: Trial, full: Outcome, names: list[str]) -> dict[str, float]:
    """Per layer, the SQNR won back with it alone exact (one held-out batch): from the trial's
    one-session shortcut (`scores_alone`) where it has one, else a trial per layer."""
    alone = trial.scores_alone(names) if hasattr(trial, "scores_alone") else {}
    return {n: (alone[n] if n in alone else trial.run((n,), batches=1).score) - full.score
            for n in names}


def switched_scores(model: ir.Model, switches: dict[str, str], feeds, reference) -> dict:
    """A trial's `scores_alone` from one model in which each layer's rewrite sits behind a
    boolean input (`switches`: layer -> input name; True: rewritten): per layer, the score
    (Outcome.score) with its switch alone False, on one batch, in one session made as
    verification makes its own, so each score is the trial's bit for bit. {} when ORT cannot
    run the model: the caller then runs a trial per layer."""
    scores: dict[str, float] = {}
    tolerance = verify.Tolerance(elementwise=False)
    try:
        with runtime.model_session(model, optimize=False, prepack=False, tf32=False) as session:
            for layer in switches:
                flags = {name: np.array(other != layer) for other, name in switches.items()}
                outputs = runtime.run(session, {**feeds, **flags})
                errors = verify.compare([reference], [outputs], tolerance)
                scores[layer] = min((e.sqnr_db for e in errors), default=-math.inf)
    except runtime.RuntimeFailure:
        return {}
    return scores


def longest_prefix(trial: Trial, full: Outcome, names: list[str], notes, *,
                   exact: str = "float", lossy: str = "int8", verb: str = "quantized") -> Outcome:
    """Binary search on k: the first k rewritten layers stay rewritten, the others exact (error
    that accumulates downstream grows with depth, so holding is close to monotone in k)."""
    holding, failing, best = 0, len(names), None
    while failing - holding > 1:
        middle = (holding + failing) // 2
        outcome = trial.run(tuple(names[middle:]))
        if outcome.holds:
            holding, best = middle, outcome
        else:
            failing = middle
    if best is None:
        return full
    notes.append(f"kept {exact} to hold the accuracy budget ({full.why} when all were "
                 f"{lossy}): the last {len(names) - holding} of {len(names)} {verb} layers, from "
                 f"{names[holding]!r} on; the first {holding} stay {lossy}")
    return best


def bisect_down(attempt: Callable[[float], tuple], target: float, steps: int = 3):
    """The largest of target/2, then halvings of the interval, whose attempt holds: `attempt(x)`
    returns (anything, Outcome); the search is within target / 2^steps of the best. Returns
    (x, attempt's result) or None when nothing tried held."""
    low, high, best = 0.0, target, None
    for _ in range(steps):
        middle = (low + high) / 2
        tried = attempt(middle)
        if tried[1].holds:
            low, best = middle, (middle, tried)
        else:
            high = middle
    return best


# Two sessions of a model over this are not held at once: each is timed alone, in turn.
ONE_SESSION_BYTES = 1 << 28
_SEQUENTIAL_SECONDS = 1.0  # per model when timed in turn (its runs take 30-100 ms: 10+ each)
_CLEARLY_FASTER = 0.9  # a second model timed in turn stops once its CI is wholly under this


def latency_ratio(first: ir.Model, second: ir.Model, feeds, *, seconds: float = _TIMING_SECONDS,
                  ep: str = "cpu", second_graph: str | None = None) -> tuple[float, float, float]:
    """p50 latency of `second` / `first` on `ep` with its 95% CI (see timed_pair)."""
    before, after, _ = timed_pair(first, second, feeds, seconds=seconds, ep=ep,
                                  second_graph=second_graph)
    return bench.ratio_ci(before.times_ms, after.times_ms)


def timed_pair(first: ir.Model, second: ir.Model, feeds, *, seconds: float = _TIMING_SECONDS,
               ep: str = "cpu", second_graph: str | None = None) -> tuple:
    """(first's Latency, second's Latency, runtime.ran_on of the first's session) on `ep`:
    interleaved, or, for a model whose weights pass ONE_SESSION_BYTES, one session at a time
    (memory stays near one model; the two samples then see the machine at different
    moments), the second timed only until it is clearly faster. `second_graph`: where the
    second's session saves the graph ORT runs (runtime.make_session's save_optimized)."""
    if io.weight_bytes(first) + io.weight_bytes(second) <= ONE_SESSION_BYTES:
        with runtime.model_session(first, ep=ep) as a, runtime.model_session(
                second, ep=ep, save_optimized=second_graph) as b:
            runners = [runtime.runner(a, feeds, ep), runtime.runner(b, feeds, ep)]
            before, after = bench.measure_runners(runners, ep=ep, seconds=seconds)
            return before, after, runtime.ran_on(a, ep)
    timed: list = []
    seconds = min(seconds, _SEQUENTIAL_SECONDS)  # each ~100 ms run of a big model says more

    def settled(times: list[list[float]]) -> bool:
        """The second model is clearly faster: its 95% CI lies under _CLEARLY_FASTER. Only
        that verdict stops early: with repeated looks a near tie would now and then cross a
        line by chance, and "slower" must rest on the full time."""
        if not timed or len(times[0]) % 5:
            return False
        return bench.ratio_ci(timed[0].times_ms, times[0], samples=200)[2] < _CLEARLY_FASTER

    ran = None
    for model, graph in ((first, None), (second, second_graph)):
        with runtime.model_session(model, ep=ep, save_optimized=graph) as session:
            # 3 warm-up runs: the weights were packed when the session was made, and "auto"
            # (10 runs at least) costs a second of a big model for nothing; 5 runs at least,
            # the second's more only while its verdict is open
            [latency] = bench.measure_runners([runtime.runner(session, feeds, ep)], ep=ep,
                                              seconds=seconds, warmup=3, min_runs=5,
                                              settled=settled)
            ran = ran or runtime.ran_on(session, ep)
            del session  # else it outlives the block and meets the next session in memory
        timed.append(latency)
    return timed[0], timed[1], ran


def slower(before: ir.Model, after: ir.Model, feeds, what: str = "float", ep: str = "cpu", *,
           after_graph: str | None = None) -> str:
    """'' when `after` is not measurably slower on `ep`, else the ratio with its 95% CI."""
    ratio, low, high = latency_ratio(before, after, feeds, ep=ep, second_graph=after_graph)
    return f"{ratio:.2f}x the {what} latency, 95% CI {low:.2f}-{high:.2f}" if low > 1.0 else ""
