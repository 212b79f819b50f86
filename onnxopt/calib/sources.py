"""Calibration data and streamed activation statistics for int8.

Sources (`--calib DATA`), each read one batch at a time and checked against the model's inputs
before the first run (names, dtypes, shapes from file headers), so bad data fails in seconds:
- an .npz: one array per input name, under the batching rule of `inputs` (exact shape = one batch,
  one extra leading axis = a stack) plus a third case: an array of the input's rank whose axis 0
  is a multiple of the model's fixed batch size is split into batches of that size. Members that
  np.savez stored uncompressed are memory-mapped, so a batch reads only its own rows;
- a folder of .npy (single-input models) or .npz files, sorted by name, each under the same rule;
- a folder of images with a `Preprocess` (`--preprocess size=224,mean=...,std=...`):
      x = (pixel · scale - mean[c]) / std[c]     (pixel in 0…255 after resizing, per channel c)
- "random": inputs generated from declared shapes with a fixed seed; `is_random` and `notes` say
  so, and the caller must warn loudly (ranges from noise do not fit real data).
`samples` (`--calib-samples N`) caps rows along the batch axis across batches; with a fixed batch
size the cap rounds down to whole batches (at least one).

The statistics of the activations are reduced batch by batch in `onnxopt.calib.activations`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import inputs
from onnxopt.calib.images import Preprocess, image_size, load_image, parse_preprocess
from onnxopt.errors import BadInputError, first_line
from onnxopt.inputs import (
    BatchLayout,
    Feeds,
    InputSpec,
    batch_layout,
    show_dims,
    take_batch,
)

__all__ = [
    "RANDOM",
    "Batches",
    "CalibrationData",
    "Preprocess",
    "calibration_data",
    "held_out_split",
    "parse_preprocess",
]

logger = logging.getLogger(__name__)

RANDOM = "random"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_RANDOM_BATCHES = 8  # `--calib random` without --calib-samples: enough to exercise the path
_HELD_OUT = 0.2  # share of the batches that judge an accuracy budget instead of calibrating
_MAX_HELD_OUT = 32  # batches: each budget trial runs all of them, so more only costs time
FEW_HELD_OUT = 4  # below this many held-out batches, the report warns about the budget


@dataclasses.dataclass(frozen=True)
class CalibrationData:
    """Batches of feeds, read lazily; iterate again to read them again (held-out checks)."""

    source: str
    is_random: bool  # True: generated noise; the caller must warn in the output and the report
    batch_count: int
    sample_count: int  # rows along the batch axis, after the --calib-samples cap
    notes: tuple[str, ...]  # lines the user must see (random data, guessed dims, dropped rows)
    _read: Callable[[], Iterator[Feeds]] = dataclasses.field(repr=False)

    def __iter__(self) -> Iterator[Feeds]:
        return self._read()

    def __len__(self) -> int:
        return self.batch_count

    def batches(self, start: int = 0, stop: int | None = None) -> Batches:
        """Batches [start, stop) as a stream that reads them again on every pass."""
        stop = self.batch_count if stop is None else min(stop, self.batch_count)
        return Batches(self, start, max(start, stop))


@dataclasses.dataclass(frozen=True)
class Batches:
    """A range of calibration batches, read from the source on each iteration: statistics,
    SmoothQuant ranges and bias correction each stream them, so memory holds one batch at a
    time whatever `--calib-samples` is (a list of every batch would grow with it: 512 det pages
    are 2.5 GB of float input)."""

    data: CalibrationData
    start: int
    stop: int

    def __iter__(self) -> Iterator[Feeds]:
        return itertools.islice(iter(self.data), self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> list[Feeds]:
        """The batches of a slice, read now: for the few that are kept in memory."""
        start, stop, step = index.indices(len(self))
        return list(itertools.islice(iter(self), start, stop, step))


@dataclasses.dataclass(frozen=True)
class _Part:
    """One file (or group of images): opened only while its batches are read."""

    label: str
    open: Callable[[], Mapping[str, np.ndarray]]
    layouts: Mapping[str, BatchLayout]
    batches: int
    rows: int


def calibration_data(
    source: str | os.PathLike,
    model: ir.Model,
    *,
    preprocess: Preprocess | str | None = None,
    samples: int | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch_size: int = 1,
    seed: int = 0,
) -> CalibrationData:
    """Calibration batches from `source` (.npz, folder, image folder, or "random").

    `shapes` (--shape) resolves dynamic dims of generated inputs; `batch_size` groups images when
    the model's batch dim is dynamic."""
    if samples is not None and samples <= 0:
        raise BadInputError(f"--calib-samples {samples}: expected a positive number of samples")
    specs = inputs.input_specs(model)
    notes: list[str] = []
    if str(source) == RANDOM:
        return _random(model, specs, samples, shapes, seed)
    path = Path(source)
    if isinstance(preprocess, str):
        preprocess = parse_preprocess(preprocess)
    if path.is_dir():
        parts = _folder_parts(path, specs, preprocess, batch_size, notes)
    elif path.is_file():
        parts = [_npz_part(path, specs)]
    else:
        raise BadInputError(f"--calib {str(source)!r}: no such file or folder (or pass 'random')")
    plan, rows = _cap(parts, samples, specs, notes)
    if not plan:
        raise BadInputError(f"--calib {path}: holds no batches")
    batch_count = sum(len(taken) for _, taken in plan)
    return CalibrationData(
        str(path), False, batch_count, rows, tuple(notes), lambda: _read(plan, specs)
    )


def held_out_split(data: CalibrationData, notes: list[str], *, min_held: int = 1
                   ) -> tuple[Batches, list[Feeds]]:
    """(calibration batches, held-out batches): the last 20% (at least `min_held` while half
    the data is left to calibrate on, at most _MAX_HELD_OUT) judge an accuracy budget and stay
    in memory (every trial runs them); the rest is streamed. Fewer than FEW_HELD_OUT held-out
    batches are said in a note: a budget judged on a handful of samples can hold by luck."""
    count = len(data)
    held = max(math.floor(count * _HELD_OUT), min(min_held, count // 2))
    held = min(max(1, held), _MAX_HELD_OUT) if count > 1 else 0
    calib_batches = data.batches(0, count - held)
    if not held:
        notes.append("one calibration batch: the accuracy budget is judged on the same batch")
        return calib_batches, calib_batches[:]
    if held < FEW_HELD_OUT:
        notes.append(f"the accuracy budget is judged on {held} held-out calibration "
                     f"batch{'es' if held > 1 else ''} only: give more calibration data "
                     f"(--calib) for a budget that means something")
    return calib_batches, data.batches(count - held)[:]


def _random(model, specs, samples, shapes, seed) -> CalibrationData:
    guesses: list[str] = []
    [first] = inputs.generate(model, shapes=shapes, seed=seed, warnings=guesses)
    rows = _rows(specs, first)
    batches = _RANDOM_BATCHES if samples is None else max(1, math.ceil(samples / rows))
    notes = (
        (
            f"calibration data is RANDOM ({batches} generated batches, seed {seed}): what "
            "is measured on noise (int8 ranges, which weights matter) does not match real "
            "inputs; pass --calib with real samples"
        ),
        *guesses,
    )

    def read() -> Iterator[Feeds]:
        yield first
        for b in range(1, batches):
            yield inputs.generate(model, shapes=shapes, seed=seed + b)[0]

    return CalibrationData(RANDOM, True, batches, batches * rows, notes, read)


def _folder_parts(folder: Path, specs, preprocess, batch_size, notes) -> list[_Part]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    arrays = [p for p in files if p.suffix.lower() in (".npy", ".npz")]
    if preprocess is not None:
        if not images:
            raise BadInputError(f"--calib {folder}: no image files (.png, .jpg, ...) to preprocess")
        return _image_parts(folder, images, specs, preprocess, batch_size, notes)
    if not arrays:
        if images:
            raise BadInputError(
                f"--calib {folder}: holds images; declare how to feed them with --preprocess "
                "(e.g. size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225)"
            )
        raise BadInputError(f"--calib {folder}: empty folder (no .npy or .npz files)")
    skipped = len(files) - len(arrays)
    if skipped:
        logger.debug("%s: %d files that are not .npy/.npz ignored", folder, skipped)
    return [
        _npy_part(p, specs) if p.suffix.lower() == ".npy" else _npz_part(p, specs) for p in arrays
    ]


def _npz_part(path: Path, specs: Sequence[InputSpec]) -> _Part:
    headers = _open_npz(path, headers_only=True)
    _check_names(str(path), specs, headers)
    layouts = {s.name: batch_layout(f"{path}: input {s.name!r}", s, headers[s.name]) for s in specs}
    return _file_part(path, specs, layouts, lambda: _open_npz(path, headers_only=False))


def _npy_part(path: Path, specs: Sequence[InputSpec]) -> _Part:
    if len(specs) != 1:
        raise BadInputError(
            f"{path}: an .npy holds one array, the model takes {[s.name for s in specs]}; "
            "use .npz files (one array per input name)"
        )
    array = _load_npy(path)
    layouts = {specs[0].name: batch_layout(f"{path}: input {specs[0].name!r}", specs[0], array)}
    return _file_part(path, specs, layouts, lambda: {specs[0].name: _load_npy(path)})


def _file_part(path, specs, layouts, open_arrays) -> _Part:
    counts = {layout.batches for layout in layouts.values()}
    if len(counts) != 1:
        raise BadInputError(f"{path}: inputs hold different numbers of batches: {sorted(counts)}")
    rows = layouts[specs[0].name].rows if specs else 1
    return _Part(str(path), open_arrays, layouts, counts.pop(), rows)


def _load_npy(path: Path) -> np.ndarray:
    """A read-only memory map, so a batch reads only its own rows."""
    try:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # empty arrays cannot be mapped
            return np.load(path, allow_pickle=False)
    except Exception as error:
        raise BadInputError(f"{path}: not a readable .npy file ({error})") from None


def _open_npz(path: Path, *, headers_only: bool) -> dict[str, np.ndarray]:
    """Members of an .npz: memory maps when stored uncompressed (np.savez), else read whole
    (np.savez_compressed); with `headers_only`, compressed members are zero-byte stand-ins of
    the right shape and dtype."""
    if not zipfile.is_zipfile(path):  # np.load would talk about pickles instead
        raise BadInputError(f"{path}: not an .npz file (np.savez writes one array per input name)")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                arrays[name] = _npz_member(path, archive, raw, info, headers_only)
    except BadInputError:
        raise
    except Exception as error:
        raise BadInputError(f"{path}: not a readable .npz file ({error})") from None
    return arrays


def _npz_member(path, archive, raw, info, headers_only) -> np.ndarray:
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:  # a newer format: let numpy read it whole
            return np.load(path, allow_pickle=False)[info.filename.removesuffix(".npy")]
        shape, fortran_order, dtype = read_header(stream)
        if dtype.hasobject:
            raise BadInputError(f"{path}: {info.filename!r} holds Python objects, not numbers")
        header_size = stream.tell()
        if info.compress_type == zipfile.ZIP_STORED and math.prod(shape) > 0:
            # Local file header: 30 bytes, then the file name and the extra field.
            raw.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", raw.read(4))
            offset = info.header_offset + 30 + name_length + extra_length + header_size
            return np.memmap(path, dtype, "r", offset, shape, "F" if fortran_order else "C")
        if headers_only:
            return np.broadcast_to(np.zeros((), dtype), shape)
        return np.lib.format.read_array(archive.open(info), allow_pickle=False)


def _check_names(label: str, specs: Sequence[InputSpec], arrays: Mapping[str, object]) -> None:
    wanted = {s.name for s in specs}
    missing, extra = sorted(wanted - set(arrays)), sorted(set(arrays) - wanted)
    if missing or extra:
        raise BadInputError(
            f"{label}: names do not match the model's inputs: missing {missing}, "
            f"unknown {extra}; the model takes {sorted(wanted)}"
        )


def _cap(parts: Sequence[_Part], samples, specs, notes) -> tuple[list, int]:
    """(part, [(batch, rows)]) up to `samples` rows; a fixed batch size keeps whole batches."""
    can_truncate = all(not s.dims or not isinstance(s.dims[0], int) for s in specs)
    plan, total = [], 0
    for part in parts:
        taken = []
        for b in range(part.batches):
            rows = part.rows
            if samples is not None and total + rows > samples:
                if can_truncate and total < samples:
                    rows = samples - total
                elif total > 0:
                    break
            taken.append((b, rows))
            total += rows
            if samples is not None and total >= samples:
                break
        if taken:
            plan.append((part, taken))
        if samples is not None and total >= samples:
            break
    if samples is not None and total != samples:
        available = sum(part.batches * part.rows for part in parts)
        why = "all the data holds" if total == available else "whole batches of the model's size"
        notes.append(f"--calib-samples {samples}: calibrating on {total} samples ({why})")
    return plan, total


def _read(plan, specs) -> Iterator[Feeds]:
    for part, taken in plan:
        arrays = part.open()
        for b, rows in taken:
            feeds = {}
            for name, layout in part.layouts.items():
                batch = take_batch(arrays[name], layout, b)
                if rows != layout.rows and batch.ndim > 0:  # a scalar input has no rows
                    batch = batch[:rows]
                feeds[name] = np.array(batch)  # a plain in-memory copy of a memory-mapped slice
                _check_finite(part.label, name, b, feeds[name])
            yield feeds
        del arrays


def _check_finite(label: str, name: str, b: int, array: np.ndarray) -> None:
    if array.dtype.kind not in "fc":
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        kinds = (
            "NaN/Inf"
            if np.isnan(array).any() and np.isinf(array).any()
            else ("NaN" if np.isnan(array).any() else "Inf")
        )
        raise BadInputError(
            f"{label}: input {name!r} batch {b} holds {bad} {kinds} value(s); clean the data"
        )


def _rows(specs: Sequence[InputSpec], feeds: Feeds) -> int:
    for spec in specs:
        if spec.dims:
            return int(feeds[spec.name].shape[0])
    return 1


def _image_parts(folder, files, specs, preprocess: Preprocess, batch_size, notes) -> list[_Part]:
    try:
        from PIL import Image
    except ImportError:
        raise BadInputError(
            f"--calib {folder}: reading images needs Pillow: pip install pillow"
        ) from None
    if len(specs) != 1 or len(specs[0].dims) != 4:
        raise BadInputError(
            f"--calib {folder}: images feed one 4-D input; the model takes "
            f"{[(s.name, show_dims(s.dims)) for s in specs]}; use .npz files"
        )
    spec = specs[0]
    size = image_size(folder, spec, preprocess)
    batch = spec.dims[0] if isinstance(spec.dims[0], int) else batch_size
    for path in files:  # fail before the first run, not after an hour of calibration
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018  (opening reads the header only)
        except Exception as error:
            raise BadInputError(f"{path}: unreadable image ({first_line(error)})") from None
    whole = len(files) - len(files) % batch
    if whole < len(files):
        notes.append(
            f"--calib {folder}: last {len(files) - whole} image(s) left out "
            f"(the model's batch size is {batch})"
        )
    if whole == 0:
        raise BadInputError(
            f"--calib {folder}: {len(files)} image(s), fewer than the model's batch size {batch}"
        )
    layouts = {spec.name: BatchLayout("one", 1, batch)}
    return [
        _Part(
            str(files[i]),
            _image_loader(files[i : i + batch], spec, preprocess, size),
            layouts,
            1,
            batch,
        )
        for i in range(0, whole, batch)
    ]


def _image_loader(files, spec: InputSpec, preprocess: Preprocess, size) -> Callable[[], Feeds]:
    return lambda: {spec.name: np.stack([load_image(p, spec, preprocess, size) for p in files])}
