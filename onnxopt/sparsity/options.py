"""What `--sparsity` takes (SparsityOptions) and gives (SparsityResult)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from onnxopt.errors import BadInputError
from onnxopt.measure import verify
from onnxopt.measure.budget import Budget
from onnxopt.passes import _sparsity

__all__ = ["CHANNELS", "IMPORTANCE", "SCOPES", "Candidate", "LayerRow", "SparsityOptions",
           "SparsityResult"]

CHANNELS = "channels"
SCOPES = ("layer", "global")
IMPORTANCE = ("auto", "l2", "l1", "activation")


@dataclasses.dataclass(frozen=True)
class SparsityOptions:
    # Unstructured: the share of each layer's weights set to zero; channels: the share of the
    # model's MACs removed; N:M: fixed at 1 - N/M (None takes it from the pattern).
    sparsity: float | None = 0.5
    pattern: str = "unstructured"  # unstructured, N:M (e.g. 2:4) or channels
    scope: str = "layer"  # "global": one normalized magnitude threshold across layers
    skip: tuple[str, ...] = ()  # node-name regexes kept dense (--sparsity-skip)
    keep_first_last: bool = True  # the layers reading the input / making the output stay dense
    calib: str | None = None  # calibration data: re-fits the pruned layers, judges the budget
    calib_samples: int | None = None
    preprocess: str | None = None
    shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    budget: Budget = dataclasses.field(default_factory=Budget)  # --max-error, as int8's
    reconstruct: bool | None = None  # None: re-fit whenever calibration data is given
    # Channels: weight norm (l2, l1) or calibrated activation size (activation). auto:
    # activation with --calib, else l2. Measured at 30% of the MACs, re-fitted: PP-OCR det box
    # F1 0.714 -> 0.951, rec line accuracy 0.238 -> 0.738, cls 0.860 -> 0.940 with activation;
    # the digits default 0.979 -> 0.964 (benchmarks/results/sparsity-2026-12-04.json).
    importance: str = "auto"
    # Channels: time the pruned model against the dense one for the verdict (`faster` only
    # when measured so); off with `--bench none`.
    timed: bool = True

    @property
    def n_m(self) -> tuple[int, int] | None:
        return None if self.pattern == CHANNELS else _sparsity.parse_pattern(self.pattern)

    @property
    def channel_importance(self) -> str:
        """The importance channels are ranked by: `auto` resolved."""
        if self.importance == "auto":
            return "activation" if self.calib else "l2"
        return self.importance

    @property
    def target(self) -> float:
        """The share of zeros (or of MACs removed, for channels) asked for."""
        n_m = self.n_m
        return 1 - n_m[0] / n_m[1] if n_m is not None else float(self.sparsity or 0.0)

    def check(self) -> None:
        """One-line errors for options that cannot work together."""
        n_m = self.n_m  # raises on a malformed pattern
        if n_m is not None and self.sparsity is not None and \
                abs(self.sparsity - (1 - n_m[0] / n_m[1])) > 1e-9:
            raise BadInputError(f"--sparsity {self.sparsity} with --sparsity-pattern "
                                f"{self.pattern}: that pattern is {1 - n_m[0] / n_m[1]:.0%} "
                                "sparse by definition; leave --sparsity out")
        if n_m is None and self.sparsity is None:
            what = "of MACs to remove" if self.pattern == CHANNELS else "of weights to zero"
            raise BadInputError(f"--sparsity-pattern {self.pattern} needs --sparsity S, the "
                                f"share {what} (e.g. 0.3)")
        if n_m is None and not 0.0 < self.sparsity < 1.0:
            raise BadInputError(f"--sparsity {self.sparsity}: expected a share 0 < s < 1, "
                                "e.g. 0.5")
        if self.scope not in SCOPES:
            raise BadInputError(f"--sparsity-scope {self.scope!r}: expected layer or global")
        if self.importance not in IMPORTANCE:
            raise BadInputError(f"--importance {self.importance!r}: expected "
                                f"{', '.join(IMPORTANCE)}")
        if self.importance == "activation" and not self.calib:
            raise BadInputError("--importance activation needs --calib DATA")
        if self.reconstruct and not self.calib:
            raise BadInputError("--reconstruct needs --calib DATA (the layers' inputs)")


@dataclasses.dataclass
class LayerRow:
    """One prunable layer in the report: what it holds and computes before and after."""

    node: str
    op_type: str
    weights: int  # parameters of the weight tensor before
    nonzero: int  # nonzero weights after (channels: parameters left)
    macs: int | None  # dense multiply-accumulates (None: shapes unknown)
    effective_macs: int | None  # after: dense MACs x density (unstructured, N:M) or the real
    #                             MACs of the smaller layer (channels)
    reconstructed: bool = False  # its weights were re-fitted from calibration data

    @property
    def sparsity(self) -> float:
        return 1 - self.nonzero / self.weights if self.weights else 0.0


@dataclasses.dataclass
class Candidate:
    """A pruned copy of the model, how it was made, and the layers it pruned (graph order)."""

    model: ir.Model
    method: str  # "magnitude" or "reconstructed"
    pruned: list[str]
    log: list[str]
    reconstructed: frozenset[str] = frozenset()  # layers whose weights were re-fitted
    score: float = 0.0  # worst output SQNR vs dense on the held-out batches
    removed: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # channels: group
    #                                                               key -> channels removed
    macs_removed: float = 0.0  # channels: share of the model's MACs removed
    target: float = 0.0  # the share of zeros (channels: of MACs) it was made for


@dataclasses.dataclass
class SparsityResult:
    model: ir.Model
    is_pruned: bool
    verification: verify.Verification
    log: list[str]
    counts: dict
    layers: list[LayerRow]
    method: str  # "magnitude", "reconstructed", or "" when nothing was kept
    summary: dict = dataclasses.field(default_factory=dict)  # sizes, MACs, verdict, errors
