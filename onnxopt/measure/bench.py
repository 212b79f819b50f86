"""Latency statistics for models measured side by side.

Models run interleaved in one process, rotating who goes first each round (A B, B A, ...), so
machine drift and cache effects hit all of them alike, with intra-op spinning off (see
runtime.make_session). Warm-up is either a fixed count or "auto": runs
until the median of the last 5 runs moves less than 5% from the 5 before (at most 50 runs).
The speed ratio B/A is median(B) / median(A) with a bootstrap 95% confidence interval, both
timing sets resampled with replacement (fixed seed, 1000 resamples).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

from onnxopt.inputs import Feeds
from onnxopt.measure import runtime

__all__ = ["Latency", "measure", "measure_runners", "ratio_ci", "summarize", "Warmup"]

Runner = Callable[[], object]
Warmup = int | str  # a run count, or "auto"

_WARMUP_MIN, _WARMUP_MAX, _WARMUP_WINDOW = 3, 50, 5
_STEADY = 0.05  # warm-up ends when the rolling median moves less than 5%


@dataclasses.dataclass
class Latency:
    ep: str
    runs: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    p99_ms: float = 0.0
    batch: int = 1
    warmup_runs: int = 0

    times_ms: list[float] = dataclasses.field(default_factory=list, repr=False)

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch * 1000.0 / self.p50_ms if self.p50_ms > 0 else 0.0


def measure(
    sessions: Sequence[object],
    feeds: Feeds,
    *,
    ep: str = "cpu",
    seconds: float = 2.0,
    min_runs: int = 10,
    max_runs: int = 2000,
) -> list[Latency]:
    """Time ORT sessions on the same feeds, interleaved, for about `seconds` in total."""
    runners = [lambda s=s: runtime.run(s, feeds) for s in sessions]
    return measure_runners(runners, ep=ep, seconds=seconds, min_runs=min_runs, max_runs=max_runs)


def measure_runners(
    runners: Sequence[Runner],
    *,
    ep: str = "cpu",
    batch: int = 1,
    warmup: Warmup = "auto",
    runs: int | None = None,
    seconds: float = 2.0,
    min_runs: int = 10,
    max_runs: int = 2000,
    settled: Callable[[list[list[float]]], bool] | None = None,
) -> list[Latency]:
    """Time callables interleaved: exactly `runs` rounds, or rounds for about `seconds`, or
    fewer once `settled(times so far)` says the answer is known (checked from `min_runs` on)."""
    warmups = [_warm_up(runner, warmup) for runner in runners]
    times: list[list[float]] = [[] for _ in runners]
    deadline = time.perf_counter() + seconds
    while True:
        done = len(times[0])
        if runs is not None and done >= runs:
            break
        if runs is None and done >= min_runs and (done >= max_runs or time.perf_counter() > deadline
                                                  or (settled is not None and settled(times))):
            break
        # Rotate who goes first each round (AB, BA, ...): a fixed order would hand one model
        # the caches the other just warmed, a bias that shows with thousands of runs.
        first = done % len(runners)
        for index in [*range(first, len(runners)), *range(first)]:
            times[index].append(_time_once(runners[index]))
    return [summarize(ep, t, batch=batch, warmup_runs=w) for t, w in zip(times, warmups)]


def _time_once(runner: Runner) -> float:
    start = time.perf_counter()
    runner()
    return (time.perf_counter() - start) * 1000.0


def _warm_up(runner: Runner, warmup: Warmup) -> int:
    """Returns how many warm-up runs it took."""
    if warmup != "auto":
        for _ in range(int(warmup)):
            runner()
        return int(warmup)
    recent: list[float] = []
    for i in range(_WARMUP_MAX):
        recent.append(_time_once(runner))
        if i + 1 >= max(_WARMUP_MIN, 2 * _WARMUP_WINDOW):
            before = np.median(recent[-2 * _WARMUP_WINDOW:-_WARMUP_WINDOW])
            now = np.median(recent[-_WARMUP_WINDOW:])
            if abs(now - before) <= _STEADY * before:
                return i + 1
    return _WARMUP_MAX


def summarize(ep: str, times: Sequence[float], *, batch: int = 1, warmup_runs: int = 0) -> Latency:
    array = np.asarray(times, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return Latency(ep, len(array), float(p50), float(p90), float(array.mean()),
                   float(array.std()), float(p99), batch, warmup_runs, list(map(float, array)))


def ratio_ci(
    base: Sequence[float], other: Sequence[float], *, samples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """median(other) / median(base) with a bootstrap 95% interval: (ratio, low, high)."""
    a, b = np.asarray(base), np.asarray(other)
    rng = np.random.default_rng(seed)
    ratios = np.median(rng.choice(b, (samples, b.size)), axis=1) / np.median(
        rng.choice(a, (samples, a.size)), axis=1
    )
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(np.median(b) / np.median(a)), float(low), float(high)
