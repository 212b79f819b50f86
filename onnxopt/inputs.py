"""Model inputs for verification and timing: read from an .npz, or generated from declared shapes.

Batching rule (used everywhere inputs are read): an array shaped exactly like the input is one
batch; one extra leading axis stacks several batches; otherwise, for a model with a fixed batch
size, axis 0 is split into batches of that size.

Generated inputs use a fixed seed. Dynamic dims come from `--shape name:1,3,224,224`; a dim left
unspecified is guessed (batch 1, others 32) and each guess is reported, because a guessed shape
proves less than a declared one. Integer inputs that index a Gather (token ids, position ids)
stay below the size of the gathered axis; `*mask*` inputs are all ones. Every tensor type is
generated: strings are words of a fixed vocabulary in mixed case, bfloat16/float8/int4 come from
ml_dtypes (runtime.run hands them to ORT as OrtValues), and a declared 0 dim gives an empty
tensor. Sequences, maps and optionals cannot be generated (CannotGenerateError).
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt.errors import BadInputError, CannotGenerateError

__all__ = ["InputSpec", "input_specs", "generate", "load_npz", "parse_shape", "show_dims", "Feeds",
           "BatchLayout", "batch_layout", "take_batch"]

Feeds = dict[str, np.ndarray]
_GUESSED_BATCH = 1
_GUESSED_DIM = 32
# Largest generated input: 256 Mi elements (1 GiB of float32); a declared dim of 2**40 is a lie.
MAX_GENERATED_ELEMENTS = 1 << 28
# Ops that pass integer ids through unchanged on their way to a Gather.
_ID_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}
# Generated strings: words in several cases, with stop words and an empty string, so string ops
# (StringNormalizer, Tokenizer, CategoryMapper) see the cases they exist for.
_WORDS = ("monday", "Tuesday", "WEDNESDAY", "the", "a", "onnx", "Runtime", "", "x1", "héllo")
# ml_dtypes' small types that numpy does not call integer
_SMALL_INTEGERS = {"int2", "uint2", "int4", "uint4"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]  # int = fixed, str = symbolic name, None = unknown


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs by IR < 4 are optional)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        if not isinstance(value.type, ir.TensorType):
            raise CannotGenerateError(
                f"input {value.name!r} is a {value.type}, not a tensor; "
                "onnxopt cannot generate it, and .npz files cannot hold it"
            )
        dims: tuple[int | str | None, ...] = ()
        if value.shape is not None:
            dims = tuple(_dim(d) for d in value.shape)
        try:
            dtype = value.dtype.numpy()
        except (TypeError, AttributeError):  # UNDEFINED or no element type at all
            raise CannotGenerateError(f"input {value.name!r} declares no element type") from None
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def _dim(dim) -> int | str | None:
    if isinstance(dim, int):
        return dim if dim >= 0 else None  # some exporters write -1 for "dynamic"
    return dim.value


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`name:1,3,224,224` -> ("name", (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 0:
        raise BadInputError(f"--shape {text!r}: expected NAME:D1,D2,... with non-negative sizes")
    return name, shape


def generate(
    model: ir.Model,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batches: int = 1,
    seed: int = 0,
    warnings: list[str] | None = None,
) -> list[Feeds]:
    """`batches` feeds from the declared shapes, with a fixed seed; guesses go to `warnings`."""
    shapes = dict(shapes or {})
    specs = input_specs(model)
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise BadInputError(
            f"--shape names {sorted(unknown)} are not model inputs; inputs: {[s.name for s in specs]}"
        )
    resolved = {s.name: _resolve_shape(s, shapes.get(s.name), warnings) for s in specs}
    for spec in specs:
        elements = int(np.prod(resolved[spec.name], dtype=np.float64))
        if elements > MAX_GENERATED_ELEMENTS:
            raise CannotGenerateError(
                f"input {spec.name!r} of shape {show_dims(resolved[spec.name])} has {elements:.3g} "
                f"elements, over the {MAX_GENERATED_ELEMENTS:.3g} onnxopt generates; pass --inputs")
    rng = np.random.default_rng(seed)
    return [
        {s.name: _random_tensor(model, s, resolved[s.name], rng) for s in specs}
        for _ in range(batches)
    ]


def _resolve_shape(spec: InputSpec, given, warnings: list[str] | None) -> tuple[int, ...]:
    if given is not None:
        if len(given) != len(spec.dims) or any(
            isinstance(d, int) and d != g for d, g in zip(spec.dims, given)
        ):
            raise BadInputError(
                f"--shape {spec.name}:{','.join(map(str, given))} does not fit the declared "
                f"shape {show_dims(spec.dims)}"
            )
        return tuple(given)
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        guess = _GUESSED_BATCH if axis == 0 else _GUESSED_DIM
        shape.append(guess)
        if warnings is not None:
            warnings.append(
                f"input {spec.name!r} dim {axis} ({dim or 'unnamed'}) guessed as {guess}; "
                f"declare it with --shape {spec.name}:..."
            )
    return tuple(shape)


def show_dims(dims) -> str:
    """`[N,3,224,224]`, `?` for an unknown dim."""
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _random_tensor(model: ir.Model, spec: InputSpec, shape, rng: np.random.Generator):
    dtype = spec.dtype
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison is a numpy scalar
    if dtype == np.object_:  # ONNX strings
        return np.asarray(rng.choice(np.array(_WORDS, dtype=object), size=shape), dtype=object)
    if np.issubdtype(dtype, np.integer) or dtype.name in _SMALL_INTEGERS:
        if "mask" in spec.name.lower():
            return np.ones(shape, dtype=dtype)
        high = _gather_size(model, spec.name) or 2
        return rng.integers(0, high, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if np.issubdtype(dtype, np.floating) or "float" in dtype.name:  # ml_dtypes' too
        return np.asarray(rng.standard_normal(shape)).astype(dtype)
    raise CannotGenerateError(f"input {spec.name!r}: cannot generate {dtype}; pass --inputs")


def _gather_size(model: ir.Model, name: str) -> int | None:
    """Size of the axis a Gather indexes with this input, following id-preserving ops."""
    value = next(v for v in model.graph.inputs if v.name == name)
    frontier, seen, sizes = [value], set(), []
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        for node, slot in current.uses():
            if node.op_type == "Gather" and slot == 1:
                data = node.inputs[0]
                axis = node.attributes.get_int("axis", 0)
                if data is not None and data.shape is not None and data.shape.rank() > 0:
                    size = data.shape[axis]
                    if isinstance(size, int):
                        sizes.append(size)
            elif node.op_type in _ID_PASSTHROUGH and slot == 0:
                frontier.extend(node.outputs)
    return min(sizes) if sizes else None


def load_npz(path: str | os.PathLike, model: ir.Model, *, ignore: Sequence[str] = ()) -> list[Feeds]:
    """Batches from an .npz with one array per input name (see the batching rule above)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such inputs file")
    if not zipfile.is_zipfile(path):  # np.load would talk about pickles instead
        raise BadInputError(f"{path}: not an .npz file (np.savez writes one array per input name)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k not in ignore}
    except Exception as error:
        raise BadInputError(f"{path}: not a readable .npz file ({error})") from None
    specs = {s.name: s for s in input_specs(model)}
    missing = sorted(set(specs) - set(arrays))
    extra = sorted(set(arrays) - set(specs))
    if missing or extra:
        raise BadInputError(
            f"{path}: names do not match the model's inputs: missing {missing}, "
            f"unknown {extra}; the model takes {sorted(specs)}"
        )
    stacks = {}
    for name, array in arrays.items():
        stacks[name] = _as_batches(path, specs[name], array)
    counts = {len(v) for v in stacks.values()}
    if len(counts) != 1:
        raise BadInputError(f"{path}: inputs hold different numbers of batches: {sorted(counts)}")
    return [{name: stacks[name][i] for name in stacks} for i in range(counts.pop())]


def _as_batches(path: Path, spec: InputSpec, array: np.ndarray) -> list[np.ndarray]:
    layout = batch_layout(f"{path}: input {spec.name!r}", spec, array)
    return [take_batch(array, layout, b) for b in range(layout.batches)]


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Where batch b sits in an array: the whole array, array[b], or rows b·size … (b+1)·size."""

    mode: str  # "one" | "stack" | "split"
    batches: int
    rows: int  # rows along the batch axis per batch


def batch_layout(where: str, spec: InputSpec, array: np.ndarray) -> BatchLayout:
    """The batching rule: exact shape = one batch; one more leading axis = a stack; axis 0 a
    multiple of the model's fixed batch size = split into batches of that size."""
    if array.dtype != spec.dtype:
        raise BadInputError(f"{where} is {array.dtype}, the model wants {spec.dtype}")
    rank, shape = len(spec.dims), array.shape
    batch = spec.dims[0] if rank else None
    if array.ndim == rank + 1 and _fits(shape[1:], spec.dims):
        return BatchLayout("stack", shape[0], shape[1] if rank else 1)
    if array.ndim == rank and _fits(shape, spec.dims):
        return BatchLayout("one", 1, shape[0] if rank else 1)
    if (
        array.ndim == rank
        and isinstance(batch, int)
        and batch > 0
        and shape[0] % batch == 0
        and _fits(shape[1:], spec.dims[1:])
    ):
        return BatchLayout("split", shape[0] // batch, batch)
    split = f", or N×{batch} rows to split" if isinstance(batch, int) else ""
    raise BadInputError(
        f"{where} has shape {list(shape)}, the model wants {show_dims(spec.dims)} "
        f"(or a stack of such batches{split})"
    )


def _fits(shape: Sequence[int], dims: Sequence[int | str | None]) -> bool:
    return len(shape) == len(dims) and all(
        not isinstance(d, int) or d == s for s, d in zip(shape, dims)
    )


def take_batch(array: np.ndarray, layout: BatchLayout, b: int) -> np.ndarray:
    if layout.mode == "stack":
        return array[b]
    if layout.mode == "split":
        return array[b * layout.rows : (b + 1) * layout.rows]
    return array
