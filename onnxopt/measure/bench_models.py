"""`onnxopt bench`: several models, several providers and batch sizes, measured side by side.

For each (provider, batch) all models are timed interleaved on the same inputs; every model after
the first gets its latency ratio to the first with a bootstrap 95% CI. Each session also reports
its peak memory (measured alone in a fresh process, see memprobe) and, from ORT's profiler,
which provider ran each node. A provider that is not installed, or a model a provider
cannot load, becomes a row with the reason; the other providers and models still run. A provider
that is installed but does not register (TensorRT without its libraries) leaves a row labelled
with the provider that ran instead, and a note saying why. CUDA keeps ORT's default TF32 math for
fp32 Conv/MatMul unless `tf32` says otherwise; each GPU row says which it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import inputs, io
from onnxopt.errors import BadInputError, OnnxoptError
from onnxopt.measure import bench, memprobe, placement, runtime

__all__ = ["BenchOptions", "ModelTiming", "BenchResult", "bench_models", "batch_feeds"]

SCHEMA = "onnxopt.measure.bench/1"


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    eps: tuple[str, ...] = ("cpu",)
    batches: tuple[int, ...] = (1,)
    threads: int = 0  # ORT's default: one intra-op thread per physical core
    warmup: bench.Warmup = "auto"  # until the median settles; first runs pay for allocations
    runs: int | None = None  # fixed rounds instead of a time budget
    seconds: float = 5.0  # per (provider, batch), all models together
    inputs: str | None = None
    shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    cuda_graph: bool = False  # replay the CUDA graph: removes launch overhead, needs fixed shapes
    placement: bool = True  # one extra profiled run per session
    tf32: bool | None = None  # CUDA's use_tf32; None: ORT's default (on), as deployed sessions run


@dataclasses.dataclass
class ModelTiming:
    model: str
    ep: str
    batch: int
    latency: bench.Latency | None = None
    ratio: tuple[float, float, float] | None = None  # vs the first model: (ratio, low, high)
    memory_mb: float | None = None  # peak resident memory of the session alone (memprobe)
    placement: placement.Placement | None = None
    error: str | None = None
    fp32_math: str | None = None  # GPU rows: TF32 or exact fp32 (runtime.fp32_math)
    note: str | None = None  # the provider asked for did not register: why, and what ran


@dataclasses.dataclass
class BenchResult:
    models: list[str]
    options: BenchOptions
    rows: list[ModelTiming]
    machine: dict[str, str]
    schema: str = SCHEMA

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["options"]["shapes"] = {k: list(v) for k, v in self.options.shapes.items()}
        for row, timing in zip(data["rows"], self.rows):
            if timing.latency is not None:
                row["latency"]["throughput"] = timing.latency.throughput
        return data


def bench_models(
    paths: Sequence[str | os.PathLike],
    options: BenchOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    options = options or BenchOptions()
    say = progress or (lambda _: None)
    models = [io.load(p) for p in paths]
    names = [str(p) for p in paths]
    _same_inputs(models, names)
    rows: list[ModelTiming] = []
    for ep in options.eps:
        for batch in options.batches:
            say(f"timing on {ep}, batch {batch}")
            rows += _bench_group(models, names, ep, batch, options)
    return BenchResult(names, options, rows, _machine())


def _same_inputs(models: list[ir.Model], names: list[str]) -> None:
    first = sorted(s.name for s in inputs.input_specs(models[0]))
    for model, name in zip(models[1:], names[1:]):
        other = sorted(s.name for s in inputs.input_specs(model))
        if other != first:
            raise BadInputError(f"{name}: inputs {other} differ from {names[0]}'s {first}")


def _bench_group(models, names, ep: str, batch: int, options: BenchOptions) -> list[ModelTiming]:
    rows = [ModelTiming(name, ep, batch) for name in names]
    try:
        feeds = batch_feeds(models[0], batch, options)
    except BadInputError as error:
        for row in rows:
            row.error = str(error)
        return rows
    with contextlib.ExitStack() as stack:
        runners, timed = [], []
        for model, row in zip(models, rows):
            try:
                session = stack.enter_context(runtime.model_session(
                    model, ep=ep, threads=options.threads, cuda_graph=options.cuda_graph,
                    tf32=options.tf32))
                _label(row, session, options.tf32)
                runner = runtime.runner(session, feeds, row.ep)
                runner()  # a model that cannot run on these inputs fails here, alone
                runners.append(runner)
                timed.append(row)
            except OnnxoptError as error:  # not installed, or this provider cannot load it
                row.error = str(error)
        if runners:
            latencies = bench.measure_runners(runners, ep=ep, batch=batch, warmup=options.warmup,
                                              runs=options.runs, seconds=options.seconds)
            for row, latency in zip(timed, latencies):
                row.latency = dataclasses.replace(latency, ep=row.ep)
    _add_ratios(rows)
    if options.placement:
        for model, row in zip(models, rows):
            if row.error is None:
                row.placement, row.memory_mb = _probe(model, feeds, row.ep, options)
    return rows


def _label(row: ModelTiming, session, tf32: bool | None) -> None:
    """The row takes the provider that really runs the session, not the one asked for."""
    ran, note = runtime.ran_on(session, row.ep)
    row.ep, row.note = ran, note or None
    row.fp32_math = runtime.fp32_math(ran, tf32)


def _add_ratios(rows: list[ModelTiming]) -> None:
    base = rows[0].latency
    for row in rows[1:]:
        if base is not None and row.latency is not None:
            row.ratio = bench.ratio_ci(base.times_ms, row.latency.times_ms)


def _probe(model: ir.Model, feeds, ep: str, options: BenchOptions):
    """(placement, peak MB) of one session, each from a run of its own."""
    threads = options.threads
    with tempfile.TemporaryDirectory(prefix="onnxopt-probe-") as tmp:
        path = Path(tmp) / "model.onnx"
        io.save(model, path)
        try:
            where = placement.node_placement(str(path), feeds, ep=ep, threads=threads,
                                             tf32=options.tf32)
        except OnnxoptError:
            where = None
        return where, memprobe.session_peak_mb(str(path), feeds, ep, threads, tmp)


def batch_feeds(model: ir.Model, batch: int, options: BenchOptions) -> inputs.Feeds:
    """One feed at `batch`: from the inputs file (first batch, rows repeated or cut along axis 0)
    or generated, with the batch size put on every input whose first dim is not fixed."""
    specs = inputs.input_specs(model)
    for spec in specs:
        if spec.dims and isinstance(spec.dims[0], int) and spec.dims[0] != batch:
            raise BadInputError(f"input {spec.name!r} has a fixed batch of {spec.dims[0]}; "
                                f"--batch {batch} cannot be fed")
    if options.inputs:
        first = inputs.load_npz(options.inputs, model)[0]
        return {name: _resize_batch(array, batch) for name, array in first.items()}
    shapes = dict(options.shapes)
    for spec in specs:
        if spec.name not in shapes and spec.dims:
            given = inputs.generate(model, shapes=options.shapes, warnings=[])[0][spec.name].shape
            shapes[spec.name] = (batch, *given[1:])
        elif spec.name in shapes:
            shapes[spec.name] = (batch, *shapes[spec.name][1:])
    return inputs.generate(model, shapes=shapes, warnings=[])[0]


def _resize_batch(array: np.ndarray, batch: int) -> np.ndarray:
    if array.ndim == 0 or array.shape[0] == batch:
        return array
    repeats = -(-batch // array.shape[0])
    return np.concatenate([array] * repeats, axis=0)[:batch]


def _machine() -> dict[str, str]:
    ort = runtime.onnxruntime()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ",".join(ort.get_available_providers()),
    }
