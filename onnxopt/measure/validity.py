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

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from onnxopt import io
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
    working directory) and models over 2 GB work (see _checkable); so is a big one, whose
    weights the checker would otherwise get serialized (and a lazy weight computed)."""
    import onnx

    try:
        if io.external_files(model) or io.weight_bytes(model) > _CHECK_INLINE_BYTES:
            with _checkable(model) as path:
                onnx.checker.check_model(path, full_check=full)
        else:
            onnx.checker.check_model(ir.to_proto(model), full_check=full)
    except Exception as error:  # onnx's ValidationError/InferenceError, or serialization
        return root_cause(error)
    return ""


# In-memory weights past this are not serialized for the checker (see _checkable).
_CHECK_INLINE_BYTES = 1 << 26


@contextlib.contextmanager
def _checkable(model: ir.Model) -> Iterator[str]:
    """`model` saved for the checker with every weight external, in stand-in files of the
    size its data needs (sparse: no disk, no time). The checker reads where data lives, never
    the data, and since onnx 1.17 refuses data files with more than one hard link (the links
    runtime.model_file makes so that sessions copy nothing); stand-ins are single files. A
    location that is absolute or leaves the model's folder stays as written, for the checker
    to refuse."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as tmp:
        folder = Path(tmp)
        stub = model.clone()  # shares tensors; its values take the stand-ins below
        ends: dict[str, int] = {}
        for graph in stub.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    location, offset = tensor.location, tensor.offset or 0
                    if Path(location).is_absolute() or ".." in Path(location).parts:
                        continue
                elif (tensor is not None and tensor.dtype != ir.DataType.STRING  # never external
                      and tensor.nbytes >= io.EXTERNAL_TENSOR_MIN_BYTES):
                    location, offset = "weights.bin", ends.get("weights.bin", 0)
                else:
                    continue
                length = tensor.nbytes
                value.const_value = ir.ExternalTensor(
                    location, offset, length, tensor.dtype, shape=tensor.shape,
                    name=tensor.name or value.name, base_dir=tmp)
                ends[location] = max(ends.get(location, 0), offset + length)
        for location, end in ends.items():
            (folder / location).parent.mkdir(parents=True, exist_ok=True)
            with open(folder / location, "ab") as standin:
                standin.truncate(max(end, standin.tell()))
        path = folder / "model.onnx"
        onnx.save(ir.to_proto(stub), str(path))
        yield str(path)


def load_problem(model: ir.Model) -> str:
    """Why ONNX Runtime's CPU provider cannot create a session for `model`, or ""."""
    try:
        with runtime.model_session(model, optimize=False, prepack=False):
            pass
    except (runtime.RuntimeFailure, BadInputError) as error:  # BadInputError: no ORT at all
        return str(error)
    return ""
