"""The output is always a valid model: what the input satisfied, the output satisfies too.

Three levels, each asked of the output only where the input met it (a model that already fails
the checker cannot be held to it):
    full    onnx.checker with full_check: strict shape and type inference over the whole graph
    check   onnx.checker's plain check
    loads   ONNX Runtime's CPU provider creates a session for it
A verification that ran the candidate already proved the last one, so the callers say so and
no second session is made. Every stage (passes, transfer, int8, sparsity) is held to this
whether or not its outputs could be compared with the original's.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxopt.errors import BadInputError, root_cause
from onnxopt.measure import runtime

__all__ = ["Validity", "required_of", "checker_problem", "load_problem"]


@dataclasses.dataclass(frozen=True)
class Validity:
    """What the input met, so what every output must meet."""

    full: bool = False
    check: bool = False
    loads: bool = False

    def problem(self, model: ir.Model, *, loaded: bool = False) -> str:
        """Why `model` falls short of what the input met, in one line; "" when it does not.
        `loaded`: ONNX Runtime already ran it (a verification did), so it loads."""
        if self.full or self.check:
            complaint = checker_problem(model, full=self.full)
            if complaint:
                return f"ONNX checker: {complaint}"
        if self.loads and not loaded:
            complaint = load_problem(model)
            if complaint:
                return complaint
        return ""

    def describe(self) -> str:
        met = [name for name, ok in (("onnx.checker full check", self.full),
                                     ("onnx.checker", self.check and not self.full),
                                     ("loads in ONNX Runtime", self.loads)) if ok]
        return ", ".join(met) or "nothing (the input fails the checker and ONNX Runtime)"


def required_of(model: ir.Model, *, load: bool = True) -> Validity:
    """The levels `model` (the input) meets. `load=False` leaves ONNX Runtime out: a session
    holds all the weights in memory, which a big model run with --no-verify must not pay."""
    full = not checker_problem(model, full=True)
    check = full or not checker_problem(model, full=False)
    return Validity(full=full, check=check, loads=load and not load_problem(model))


def checker_problem(model: ir.Model, *, full: bool = False) -> str:
    """The ONNX checker's complaint about `model`, or "". A model with external data is checked
    from a saved copy, by path, so relative data locations resolve beside it (not beside the
    working directory) and models over 2 GB work."""
    import onnx

    try:
        with runtime.model_file(model) as source:
            if isinstance(source, bytes):
                source = onnx.ModelProto.FromString(source)
            onnx.checker.check_model(source, full_check=full)
    except Exception as error:  # onnx's ValidationError/InferenceError, or serialization
        return root_cause(error)
    return ""


def load_problem(model: ir.Model) -> str:
    """Why ONNX Runtime's CPU provider cannot create a session for `model`, or ""."""
    try:
        with runtime.model_session(model, optimize=False, prepack=False):
            pass
    except (runtime.RuntimeFailure, BadInputError) as error:  # BadInputError: no ORT at all
        return str(error)
    return ""
