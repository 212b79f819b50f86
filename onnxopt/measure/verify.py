"""Run two models on the same inputs in ONNX Runtime CPU and compare every output.

Metrics per output, worst over all batches:
    max_abs = max |a - b|            max_rel = max |a - b| / (|a| + atol)
    cosine  = <a, b> / (|a| |b|)      sqnr    = 10 log10( sum a^2 / sum (a - b)^2 )  [dB]
where a is the reference. An output is close when |a - b| <= atol + rtol |a| everywhere (NaN equal
to NaN), the rule of numpy.isclose, and its cosine reaches the tolerance's `min_cosine`.
Integer and bool outputs must be equal; their `cosine` is the share of equal elements (what a
lossy budget bounds: an argmax output that changes in 1 place of 1000 scores 0.999).
Score-like outputs (float, rank >= 2) also get top-1 and top-5 agreement of the argmax over
their last axis.

Both models run with ORT's graph optimizations off, so ORT's own fusions cannot hide (or cause)
a difference: we compare the graphs as written. The float32 noise floor of a model is what ORT's
own optimizations change in its outputs on the same inputs; an output's atol is raised to
FLOOR_FACTOR times that floor, so rounding in a deep network is not taken for a broken rewrite.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.errors import BadInputError
from onnxopt.inputs import Feeds
from onnxopt.measure import runtime

__all__ = ["NoiseFloor", "OutputError", "Verification", "Tolerance", "reference_outputs",
           "provider_outputs", "verify", "compare"]

Outputs = dict[str, object]
# An exact rewrite may round like ORT's own fusions do, a few times over: deep networks ending in
# a softmax show 2e-5 between ORT's optimized and raw graphs, past a 1e-5 atol.
FLOOR_FACTOR = 8.0


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-4  # exact rewrites still reorder float sums; 1e-4 leaves room for that only
    atol: float = 1e-5
    min_cosine: float = 0.0  # lossy comparisons (fp16, int8) bound the direction instead
    elementwise: bool = True  # False: only the cosine bound applies (int8 is never elementwise close)


@dataclasses.dataclass
class OutputError:
    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    is_close: bool = True
    reason: str = ""  # why not close, when it is a shape or dtype difference
    # Class scores: share of rows whose argmax (last axis) matches, and whose reference argmax
    # is among the candidate's top 5. None for outputs that are not score-like.
    top1: float | None = None
    top5: float | None = None
    exact_only: bool = False  # integer/bool output: cosine is the share of equal elements
    nonfinite: int = 0  # NaN/Inf elements where the reference is finite


@dataclasses.dataclass
class Verification:
    status: str  # "passed", "failed" or "skipped"
    reason: str = ""
    outputs: list[OutputError] = dataclasses.field(default_factory=list)
    batches: int = 0
    floor: dict[str, float] = dataclasses.field(default_factory=dict)  # see noise_floor
    invalid: bool = False  # failed for the model itself (checker, ORT load), not its numbers
    ran_on: str = ""  # the provider that produced the outputs ("" when none ran)
    note: str = ""  # why that is not the provider asked for (see runtime.ran_on), else ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def worst(self) -> str:
        """One line: the output furthest from the reference."""
        if not self.outputs:
            return self.reason
        bad = max(self.outputs, key=lambda o: (not o.is_close, o.max_abs))
        return f"{bad.name}: max abs {bad.max_abs:.3g}, cosine {bad.cosine:.6f}" + (
            f" ({bad.reason})" if bad.reason else ""
        )


def reference_outputs(
    model: ir.Model, feeds: Sequence[Feeds], *, optimize: bool = False, ep: str = "cpu"
) -> list[Outputs]:
    """Outputs of `model` for every batch; raises RuntimeFailure when ORT cannot run it."""
    return provider_outputs(model, feeds, optimize=optimize, ep=ep)[0]


def provider_outputs(
    model: ir.Model, feeds: Sequence[Feeds], *, optimize: bool = False, ep: str = "cpu"
) -> tuple[list[Outputs], str, str]:
    """(outputs for every batch, the provider that ran them, a note when that is not `ep`).

    These numbers are compared, so CUDA runs fp32 exactly (tf32=False: ORT's default TF32 puts
    correct models 33-80 dB from CPU). A few batches do not repay the weights' prepacking (see
    runtime.make_session)."""
    with runtime.model_session(model, optimize=optimize, ep=ep, prepack=False,
                               tf32=False) as session:
        outputs = [runtime.run(session, batch) for batch in feeds]
        ran, note = runtime.ran_on(session, ep)
    return outputs, ran, note


def noise_floor(model: ir.Model, reference: Sequence[Outputs], feeds: Sequence[Feeds]) -> dict:
    """Per output, the max abs difference ORT's own graph optimizations make on this model and
    these inputs: the float32 rounding an exact rewrite may also cause (0 where ORT fails)."""
    try:
        optimized = reference_outputs(model, feeds, optimize=True)
    except runtime.RuntimeFailure:
        return {}
    return {e.name: e.max_abs for e in compare(reference, optimized) if math.isfinite(e.max_abs)}


class NoiseFloor:
    """noise_floor, measured the first time a comparison needs it. The floor only raises atol,
    so outputs within the plain tolerance are close whatever it is: a run whose rewrites all
    hold never pays the session of the original it costs (a second on a 2.4 GB model)."""

    def __init__(self, model: ir.Model, reference: Sequence[Outputs], feeds: Sequence[Feeds]):
        self._source: tuple | None = (model, reference, feeds)
        self._floor: dict[str, float] = {}

    def __call__(self) -> dict[str, float]:
        if self._source is not None:
            self._floor, self._source = noise_floor(*self._source), None
        return self._floor


def verify(
    model: ir.Model,
    reference: Sequence[Outputs],
    feeds: Sequence[Feeds],
    tolerance: Tolerance = Tolerance(),
    floor: Mapping[str, float] | NoiseFloor | None = None,
    *,
    ep: str = "cpu",
    optimize: bool = False,
) -> Verification:
    """Run `model` on `ep` and compare with `reference`. A model the provider cannot load or
    run fails; a provider that is not installed is "skipped" (nothing was compared). A lazy
    NoiseFloor is measured only when an output misses the plain tolerance."""
    try:
        outputs, ran, note = provider_outputs(model, feeds, optimize=optimize, ep=ep)
    except runtime.RuntimeFailure as error:
        return Verification("failed", reason=str(error), batches=len(feeds))
    except BadInputError as error:
        return Verification("skipped", reason=str(error), batches=len(feeds))
    if isinstance(floor, NoiseFloor):
        errors = compare(reference, outputs, tolerance)
        floor = floor() if not all(e.is_close for e in errors) else {}
        if floor:
            errors = compare(reference, outputs, tolerance, floor)
    else:
        errors = compare(reference, outputs, tolerance, floor)
    status = "passed" if all(e.is_close for e in errors) else "failed"
    return Verification(status, outputs=errors, batches=len(feeds), floor=dict(floor or {}),
                        ran_on=ran, note=note)


def compare(
    reference: Sequence[Outputs],
    outputs: Sequence[Outputs],
    tolerance: Tolerance = Tolerance(),
    floor: Mapping[str, float] | None = None,
) -> list[OutputError]:
    """Per-output metrics, worst over batches, matched by output position then name.

    `floor` (see noise_floor) raises an output's atol to FLOOR_FACTOR times its noise floor."""
    errors: dict[str, OutputError] = {}
    for ref_batch, got_batch in zip(reference, outputs):
        for (name, ref), got in zip(ref_batch.items(), got_batch.values()):
            ref, got = _flat(ref), _flat(got)
            tol = for_dtype(tolerance, ref)
            atol = max(tol.atol, FLOOR_FACTOR * (floor or {}).get(name, 0.0))
            error = _compare_one(name, ref, got, dataclasses.replace(tol, atol=atol))
            errors[name] = _worse(errors.get(name), error)
    for position, error in enumerate(errors.values()):
        refs = [list(batch.values())[position] for batch in reference]
        gots = [list(batch.values())[position] for batch in outputs]
        error.top1, error.top5 = _top_k(refs, gots)
    return list(errors.values())


def _top_k(refs: list, gots: list) -> tuple[float | None, float | None]:
    """Argmax agreement over the last axis, for float outputs of rank >= 2 with >= 2 classes."""
    try:
        ref = np.concatenate([np.asarray(r).reshape(-1, np.shape(r)[-1]) for r in refs])
        got = np.concatenate([np.asarray(g).reshape(-1, np.shape(g)[-1]) for g in gots])
    except (ValueError, IndexError, TypeError):
        return None, None
    if (ref.shape != got.shape or np.ndim(refs[0]) < 2 or ref.shape[1] < 2
            or not np.issubdtype(ref.dtype, np.floating)):
        return None, None
    ref_top1 = np.argmax(ref, axis=1)
    top1 = float(np.mean(np.argmax(got, axis=1) == ref_top1))
    if ref.shape[1] < 5:
        return top1, None
    top5 = np.argpartition(-got, 4, axis=1)[:, :5]
    return top1, float(np.mean(np.any(top5 == ref_top1[:, None], axis=1)))


def for_dtype(tolerance: Tolerance, reference: np.ndarray) -> Tolerance:
    """An fp16 output cannot be closer than its own rounding: 2 ulps relative (2e-3), and an
    absolute 4 ulps of the output's largest value (2^-8 max|a|, at least 1e-3), because an fp16
    intermediate rounded before a subtraction (BN's mean) leaves an error of the intermediate's
    scale in a small result. fp32 tolerances stay as given."""
    if reference.dtype != np.float16 or reference.size == 0:
        return tolerance
    finite = np.abs(reference[np.isfinite(reference)].astype(np.float64))
    scale = float(finite.max()) if finite.size else 0.0
    return dataclasses.replace(tolerance, rtol=max(tolerance.rtol, 2e-3),
                               atol=max(tolerance.atol, 1e-3, scale * 2**-8))


def _flat(value) -> np.ndarray:
    """Sequence and optional outputs come back from ORT as lists: compare their elements."""
    if value is None:
        return np.zeros((0,), dtype=np.float32)
    if isinstance(value, list):
        parts = [np.asarray(v).ravel() for v in value]
        return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.float32)
    return np.asarray(value)


def _compare_one(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance) -> OutputError:
    if ref.shape != got.shape:
        return OutputError(
            name, math.inf, math.inf, 0.0, -math.inf, False,
            f"shape {list(got.shape)} instead of {list(ref.shape)}",
        )
    if not np.issubdtype(ref.dtype, np.floating):
        is_equal = bool(np.array_equal(ref, got))
        diff = 0.0 if is_equal else float(np.max(np.abs(ref.astype(np.float64) - got)))
        agreement = float(np.mean(ref == got)) if ref.size else 1.0
        return OutputError(name, diff, diff, agreement, math.inf if is_equal else -math.inf,
                           is_equal, exact_only=True)
    whole_a = ref.astype(np.float64).ravel()
    whole_b = got.astype(np.float64).ravel()
    is_close = not tol.elementwise or bool(
        np.all(np.isclose(whole_b, whole_a, rtol=tol.rtol, atol=tol.atol, equal_nan=True)))
    finite = np.isfinite(whole_a) & np.isfinite(whole_b)
    all_finite = bool(finite.all())
    # the metrics below skip non-finite elements: one copy of the finite ones, or none
    a, b = (whole_a, whole_b) if all_finite else (whole_a[finite], whole_b[finite])
    diff = np.abs(a - b)
    max_abs = float(diff.max()) if diff.size else 0.0
    if not all_finite and np.any(np.isnan(whole_a) != np.isnan(whole_b)):
        max_abs = math.inf
    abs_a = np.abs(a)
    max_rel = float((diff / (abs_a + tol.atol)).max()) if diff.size else 0.0
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(np.dot(a, b) / norm) if norm > 0 else float(max_abs == 0)
    noise = float(np.sum(diff**2))
    signal = float(np.sum(a ** 2))
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    if diff.size and max(abs_a.max(), np.abs(b).max()) <= tol.atol:
        # Both outputs are zero to within atol (PP-OCR det's sigmoid on random 32x32 inputs
        # peaks at 3e-8): their direction is float noise, and a cosine of 0.45 would only
        # mislead. They are the same output as far as any tolerance can tell.
        cosine, sqnr = 1.0, math.inf
    reason = ""
    if cosine < tol.min_cosine:
        is_close, reason = False, f"cosine {cosine:.6f} < {tol.min_cosine}"
    # Metrics above skip non-finite elements; a NaN or Inf the reference does not have is a
    # failure whatever they say (a float16 overflow looks like this).
    nonfinite = 0 if all_finite else int(np.count_nonzero(np.isfinite(whole_a)
                                                          & ~np.isfinite(whole_b)))
    if nonfinite:
        is_close, reason = False, f"{nonfinite} NaN/Inf where the reference is finite"
    return OutputError(name, max_abs, max_rel, cosine, sqnr, is_close, reason,
                       nonfinite=nonfinite)


def _worse(old: OutputError | None, new: OutputError) -> OutputError:
    if old is None:
        return new
    return OutputError(
        new.name,
        max(old.max_abs, new.max_abs),
        max(old.max_rel, new.max_rel),
        min(old.cosine, new.cosine),
        min(old.sqnr_db, new.sqnr_db),
        old.is_close and new.is_close,
        old.reason or new.reason,
        exact_only=new.exact_only,
        nonfinite=old.nonfinite + new.nonfinite,
    )
