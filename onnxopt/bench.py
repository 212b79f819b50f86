"""Latency of several models on one provider, measured side by side.

The models run interleaved (A B A B ...) in one process so machine drift hits all of them alike,
with intra-op spinning off. Warm-up runs until the median of the last few runs stops moving.
The speed ratio B/A is the ratio of medians, with a bootstrap 95% confidence interval from
resampling both sets of timings (fixed seed).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from onnxopt import runtime
from onnxopt.inputs import Feeds

__all__ = ["Latency", "measure", "ratio_ci"]

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
    times_ms: list[float] = dataclasses.field(default_factory=list, repr=False)


def measure(
    sessions: Sequence[object],
    feeds: Feeds,
    *,
    ep: str = "cpu",
    seconds: float = 2.0,
    min_runs: int = 10,
    max_runs: int = 2000,
) -> list[Latency]:
    """Time every session on the same feeds, interleaved, for about `seconds` in total."""
    for session in sessions:
        _warm_up(session, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    deadline = time.perf_counter() + seconds
    while len(times[0]) < max_runs and (
        len(times[0]) < min_runs or time.perf_counter() < deadline
    ):
        for session, bucket in zip(sessions, times):
            bucket.append(_time_once(session, feeds))
    return [_summary(ep, t) for t in times]


def _time_once(session, feeds: Feeds) -> float:
    start = time.perf_counter()
    runtime.run(session, feeds)
    return (time.perf_counter() - start) * 1000.0


def _warm_up(session, feeds: Feeds) -> None:
    recent: list[float] = []
    for i in range(_WARMUP_MAX):
        recent.append(_time_once(session, feeds))
        if i + 1 >= max(_WARMUP_MIN, 2 * _WARMUP_WINDOW):
            before = np.median(recent[-2 * _WARMUP_WINDOW:-_WARMUP_WINDOW])
            now = np.median(recent[-_WARMUP_WINDOW:])
            if abs(now - before) <= _STEADY * before:
                return


def _summary(ep: str, times: list[float]) -> Latency:
    array = np.asarray(times)
    return Latency(ep, len(times), float(np.percentile(array, 50)),
                   float(np.percentile(array, 90)), float(array.mean()), float(array.std()),
                   times)


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
