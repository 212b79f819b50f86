"""PassReport: onnx-ir's PassResult plus what the user must see (a log line per change)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx_ir as ir

__all__ = ["PassReport"]


@dataclasses.dataclass
class PassReport(ir.passes.PassResult):
    # One line per change or refusal, naming the node: "folded BatchNormalization 'bn3' into ...".
    log: list[str] = dataclasses.field(default_factory=list)
    # Totals by kind of change: {"folded": 12, "refused": 1}.
    counts: Counter = dataclasses.field(default_factory=Counter)

    def change(self, kind: str, line: str, count: int = 1) -> None:
        """Record a change (`count` of a kind, one log line) and mark the model modified."""
        self.counts[kind] += count
        self.log.append(line)
        self.modified = True

    def refuse(self, line: str) -> None:
        """Record a site the pass could not rewrite, and why; the graph is unchanged there."""
        self.counts["refused"] += 1
        self.log.append(line)
