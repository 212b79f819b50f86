"""What int8 may cost: onnxopt.measure.budget's accuracy budget and fallback search, applied to
the layers a quantize pass's log says it quantized (back to float when the budget needs it)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from onnxopt.measure import budget
from onnxopt.measure.budget import (
    ONE_SESSION_BYTES,
    Budget,
    Outcome,
    Trial,
    latency_ratio,
    longest_prefix,
    parse_budget,
    slower,
    switched_scores,
)

__all__ = ["ONE_SESSION_BYTES", "Budget", "Outcome", "fall_back", "latency_ratio", "longest_prefix", "parse_budget",
           "quantized_layers", "slower", "switched_scores"]

_QUANTIZED = re.compile(r"^quantized '(.+?)' \(")


def quantized_layers(log: Iterable[str]) -> list[str]:
    """Node names a quantize pass's log says it quantized, in graph order."""
    return [m[1] for line in log if (m := _QUANTIZED.match(line))]


def fall_back(trial: Trial, full: Outcome, notes: list[str], *,
              most: int | None = None) -> Outcome:
    """The quantized layers of `full` back to float, the fewest that hold the budget
    (onnxopt.measure.budget.fall_back)."""
    return budget.fall_back(trial, full, quantized_layers(full.report.log), notes, most=most)
