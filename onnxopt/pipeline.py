"""Run passes in order, verify, and revert what breaks.

With `verify_each`, every pass that changed the model is checked against the original's outputs
right away, and an exact pass that breaks the tolerance (or the ONNX checker, or crashes) is
undone: the model from before it is kept and the pipeline goes on. Without it, the whole pipeline
is checked once at the end; if that fails, it is replayed from the start with per-pass checks so
the culprit is found and reverted. When the original's outputs cannot be had (it does not run on
the inputs, or --no-verify), the same loop still holds every pass to the input's validity (the
checker, ONNX Runtime loading it): an invalid model is never the result. Snapshots are `Model.clone()`s, which share tensors, so they
cost graph bookkeeping, not weight memory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnxopt import io
from onnxopt.errors import BadInputError, OnnxoptError, root_cause
from onnxopt.inputs import Feeds
from onnxopt.measure import verify as verify_mod
from onnxopt.measure.validity import Validity
from onnxopt.passes import PassReport

__all__ = ["PassRun", "Checker", "ValidityOnly", "run_pipeline", "upgrade_opset"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassRun:
    name: str
    modified: bool = False
    reverted: bool = False
    reason: str = ""  # why it was reverted
    log: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


@dataclasses.dataclass
class Checker:
    """What "still correct" means for this run: the original's outputs on fixed inputs, and
    the validity levels the original met (see measure.validity)."""

    feeds: Sequence[Feeds]
    reference: Sequence[dict]
    tolerance: verify_mod.Tolerance = verify_mod.Tolerance()
    floor: verify_mod.NoiseFloor | dict[str, float] = dataclasses.field(default_factory=dict)
    validity: Validity = Validity(check=True)

    def __call__(self, model: ir.Model) -> verify_mod.Verification:
        problem = self.validity.problem(model, loaded=True)  # verify loads it below
        if problem:
            return verify_mod.Verification("failed", reason=problem, invalid=True)
        return verify_mod.verify(model, self.reference, self.feeds, self.tolerance, self.floor)

    def unchanged(self) -> verify_mod.Verification:
        """The verification of the model as given: its outputs are the reference itself (no
        session; on a 2.4 GB model that is a second of ORT and its memory saved)."""
        outputs = verify_mod.compare(self.reference, self.reference, self.tolerance)
        return verify_mod.Verification("passed", outputs=outputs, batches=len(self.feeds))


@dataclasses.dataclass
class ValidityOnly:
    """The judge when the original's outputs cannot be had (or --no-verify): the output must
    still be as valid a model as the input was. It verifies nothing, so run_pipeline reports no
    verification for it."""

    validity: Validity

    def __call__(self, model: ir.Model) -> verify_mod.Verification:
        problem = self.validity.problem(model)
        if problem:
            return verify_mod.Verification("failed", reason=problem, invalid=True)
        return verify_mod.Verification("passed")

    def unchanged(self) -> verify_mod.Verification:
        return verify_mod.Verification("passed")  # the input is as valid as itself


def run_pipeline(
    model: ir.Model,
    passes: Sequence[ir.passes.PassBase],
    *,
    checker: Checker | ValidityOnly | None,
    verify_each: bool = False,
    on_pass: Callable[[str], None] | None = None,
) -> tuple[ir.Model, list[PassRun], verify_mod.Verification | None]:
    """Apply `passes` to `model` (in place where possible).

    Returns the model to keep, what each pass did, and the kept model's verification (None
    when `checker` only holds it to the input's validity, or is None: no check at all)."""
    checker = checker if checker is not None else ValidityOnly(Validity())
    original = None if verify_each else model.clone()  # clones share the weights' data
    try:
        model, runs = _run(model, passes, checker if verify_each else None, on_pass,
                           careful=verify_each)
    except _Crashed:  # an in-place pass died half-way: start again, a snapshot per pass
        logger.info("a pass crashed; replaying with a snapshot before every pass")
        model, runs = _run(original, passes, checker, on_pass, careful=True)
        return model, runs, _reported(checker, checker(model))
    if not any(run.modified for run in runs):  # every pass said "no change": the input itself
        return model, runs, _reported(checker, checker.unchanged())
    verification = checker(model)
    if original is not None and not verification.passed:
        logger.info("final check failed (%s); replaying pass by pass", verification.reason)
        model, runs = _run(original, passes, checker, on_pass, careful=True)
        verification = checker(model)
    return model, runs, _reported(checker, verification)


def _reported(checker, verification: verify_mod.Verification):
    return None if isinstance(checker, ValidityOnly) else verification


class _Crashed(Exception):
    """A pass raised with no snapshot to go back to (the fast path takes none)."""


def _run(model, passes, checker, on_pass, *, careful: bool) -> tuple[ir.Model, list[PassRun]]:
    """Apply the passes in order. `careful`: snapshot before each pass, so a crash (or, with a
    checker, a failed check of an exact pass) reverts that pass alone."""
    runs = []
    for pass_ in passes:
        name = getattr(pass_, "name", type(pass_).__name__)
        if on_pass:
            on_pass(name)
        snapshot = model.clone() if careful else None
        run = PassRun(name)
        start = time.perf_counter()
        try:
            result = pass_(model)
        except OnnxoptError:
            raise  # the user's input is at fault (a one-line error), not the pass
        except Exception as error:  # a pass bug must not cost the user their model
            root = root_cause(error)
            logger.debug("pass %s crashed", name, exc_info=True)
            run.seconds = time.perf_counter() - start
            if snapshot is None:
                raise _Crashed(name) from error
            run.reverted, run.reason = True, f"crashed: {root}"
            runs.append(run)
            model = snapshot
            continue
        run.seconds = time.perf_counter() - start
        model = result.model
        io.release_external(model)  # what the pass read of big weights leaves the memory
        run.modified = result.modified
        if isinstance(result, PassReport):
            run.log, run.counts = list(result.log), dict(result.counts)
        if checker is not None and run.modified:
            verification = checker(model)
            # A lossy pass may miss the tolerance (its own budget judges it), never validity.
            if verification.invalid or (not verification.passed
                                        and not getattr(pass_, "lossy", False)):
                run.reverted, run.reason = True, verification.worst()
                model = snapshot
        runs.append(run)
    return model, runs


def upgrade_opset(model: ir.Model, target: int) -> ir.Model:
    """onnx's version converter, for a pass that needs a newer opset than the model has."""
    from onnx import version_converter

    base_dirs = {t.base_dir for t in io.iter_tensors(model) if isinstance(t, ir.ExternalTensor)}
    try:
        proto = version_converter.convert_version(ir.to_proto(model), target)
    except Exception as error:  # the converter raises plain RuntimeError/ValueError
        raise BadInputError(f"onnx's version converter cannot take this model to opset {target}: "
                            f"{root_cause(error)}") from None
    upgraded = ir.serde.deserialize_model(proto)
    for base_dir in base_dirs:  # external weights stay where they are; point at them again
        ir.external_data.set_base_dir(upgraded.graph, base_dir)
    return upgraded
