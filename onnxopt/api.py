"""The Python API; the CLI is a thin layer over these functions.

    model, report = onnxopt.optimize("in.onnx", "out.onnx")
    stats = onnxopt.inspect("in.onnx")
    verification = onnxopt.validate("a.onnx", "b.onnx")
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from onnxopt import inputs, io, pipeline, stages
from onnxopt.calib import sources
from onnxopt.errors import BadInputError, CannotGenerateError
from onnxopt.measure import bench, budget, runtime, stats
from onnxopt.measure import validation as validate_mod
from onnxopt.measure import validity as validity_mod
from onnxopt.measure import verify as verify_mod
from onnxopt.measure.verify import Tolerance
from onnxopt.passes import DEFAULT_PIPELINE
from onnxopt.passes import REGISTRY as REWRITE_PASSES
from onnxopt.precision.half import HalfOptions, check_convertible
from onnxopt.quant import int8
from onnxopt.quant.int8 import Int8Options
from onnxopt.report import LatencyComparison, Report
from onnxopt.sparsity import sensitivity as sensitivity_mod
from onnxopt.sparsity.options import CHANNELS, SparsityOptions
from onnxopt.stages import load_feeds
from onnxopt.transfer import TransferOptions, TransferPass

__all__ = ["OptimizeOptions", "inspect", "load_feeds", "optimize", "sensitivity", "validate"]

Progress = Callable[[str], None]

# Every pass `--passes` accepts: the rewrites of onnxopt.passes, and the transfer stage's pass
# (it needs --transfer-from; it lives above the passes because it runs fold-batchnorm on SRC).
REGISTRY = {**REWRITE_PASSES, TransferPass.name: TransferPass}


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    passes: tuple[str, ...] = DEFAULT_PIPELINE  # exact rewrites only unless asked
    skip: tuple[str, ...] = ()
    verify: bool = True  # every rewrite is checked against the original unless --no-verify
    verify_each: bool = False  # check after every pass, not only at the end (slower)
    inputs: str | None = None  # .npz of real inputs; generated from declared shapes otherwise
    shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    batches: int = 3  # generated batches: more than one, so one lucky input proves nothing
    seed: int = 0
    tolerance: Tolerance = Tolerance()
    bench: tuple[str, ...] = ("cpu",)  # providers to time original vs optimized on; () skips
    bench_seconds: float = 2.0
    # A rewrite that runs measurably slower than the original (LatencyComparison.is_slower) is
    # not kept, the original is written instead, unless this is set.
    allow_slower: bool = False
    # Weight pruning after the exact passes, before int8 (onnxopt.sparsity): int8 then sees the
    # pruned model.
    sparsity: SparsityOptions | None = None
    int8: Int8Options | None = None  # static int8 QDQ after the exact passes (see onnxopt.quant.int8)
    half: HalfOptions | None = None  # --fp16/--bf16 after the exact passes (onnxopt.precision)
    transfer_from: str | None = None  # --transfer-from SRC: its weights first (_transfer_first)


def _load(src: str | os.PathLike | ir.Model | onnx.ModelProto) -> tuple[ir.Model, str | None]:
    if isinstance(src, ir.Model):
        return src, None
    if isinstance(src, onnx.ModelProto):
        return ir.serde.deserialize_model(src), None
    return io.load(src), str(src)


def _upgrade_ir(model: ir.Model, notes: list[str]) -> None:
    """IR < 4 lists every initializer as a graph input, which makes weights overridable, so ORT
    can neither constant-fold nor pre-pack them. Moving to IR 4 drops those inputs."""
    if model.ir_version >= 4:
        return
    count = sum(1 for v in model.graph.inputs if v.is_initializer())
    common.RemoveInitializersFromInputsPass()(model)
    notes.append(f"upgraded IR {model.ir_version} -> 4: {count} initializers are no longer "
                 "graph inputs, so ONNX Runtime can constant-fold and pre-pack them")
    model.ir_version = 4


def _upgrade_opset_for(passes, model: ir.Model, notes: list[str]) -> ir.Model:
    """onnx's version converter, only when a pass declares a newer `min_opset` than the model's."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    needs = [(getattr(p, "min_opset", 0), p.name) for p in passes]
    target, name = max(needs, default=(0, ""))
    if target <= opset:
        return model
    upgraded = pipeline.upgrade_opset(model, target)
    notes.append(f"upgraded opset {opset} -> {target} with onnx's version converter "
                 f"(pass {name!r} needs it)")
    return upgraded


def _build_passes(options: OptimizeOptions) -> list[ir.passes.PassBase]:
    unknown = [n for n in (*options.passes, *options.skip) if n not in REGISTRY]
    if unknown:
        raise BadInputError(f"unknown pass {unknown[0]!r}; `onnxopt passes` lists them")
    names = list(options.passes)
    if (options.int8 is not None or options.sparsity is not None) and "fold-weights" not in names:
        names.append("fold-weights")  # their layers' weights must be initializers
    return [REGISTRY[name]() for name in names if name not in options.skip]


def optimize(
    src: str | os.PathLike | ir.Model | onnx.ModelProto,
    dst: str | os.PathLike | None = None,
    options: OptimizeOptions | None = None,
    *,
    feeds: Sequence[inputs.Feeds] | None = None,
    progress: Progress | None = None,
) -> tuple[ir.Model, Report]:
    """Load, rewrite, verify against the original, time both, save; returns (model, report).

    `feeds` (batches of inputs by name) take precedence over `options.inputs`."""
    options = options or OptimizeOptions()
    say = progress or (lambda _: None)
    clock = _Clock()
    say("loading")
    model, path = _load(src)
    if dst is not None:
        io.check_destination(model, dst, path)
    had_external_data = bool(io.external_files(model))
    original_stats = stats.model_stats(model, path, shapes=options.shapes)
    notes: list[str] = []
    _upgrade_ir(model, notes)
    # What every output is held to; the ONNX Runtime level is settled by _checker.
    validity = validity_mod.required_of(model, load=False)
    model, transferred = _transfer_first(model, options, say, validity)
    where = str(src) if path else "the model"
    if options.int8 is not None:  # before any work: --int8 on a model it cannot touch is an error
        int8.check_quantizable(model, where)
    if options.half is not None:
        if options.int8 is not None:
            raise BadInputError(f"{where}: --{'fp16' if options.half.dtype == 'float16' else 'bf16'}"
                                " and --int8 together: choose one (int8 QDQ keeps float "
                                "activations between its layers; half precision is the GPU's "
                                "answer, int8 the CPU's)")
        check_convertible(model, options.half.dtype, where)
    original = model.clone()  # shares tensors; passes build new ones instead of editing
    clock.lap("load")
    unverifiable = None
    if options.verify:
        say("running the original")
        try:
            feeds = list(feeds) if feeds is not None else load_feeds(model, options, notes)
        except CannotGenerateError as error:  # inputs only serve the check here: go on without
            unverifiable = verify_mod.Verification("skipped", reason=str(error))
    checker, verification, validity = stages.reference_checker(
        original, feeds if not unverifiable else None, options, validity, notes)
    verification = unverifiable or verification
    passes = _build_passes(options)
    model = _upgrade_opset_for(passes, model, notes)
    model, runs, checked = pipeline.run_pipeline(model, passes, checker=checker,
                                                 verify_each=options.verify_each, on_pass=say)
    verification = checked or verification
    runs = transferred + runs
    clock.lap("passes + verify")
    sparsity_summary = None
    if options.sparsity is not None:
        model, verification, sparsity_summary = stages.sparsity_stage(
            model, verification, runs, options, feeds, validity, notes, say)
        clock.lap("sparsity")
    # --fp16/--bf16 or --int8 (never both), judged against the original's outputs when known.
    known = checker.reference if isinstance(checker, pipeline.Checker) else None
    summaries = {}
    for key, stage in (("half", stages.half_stage), ("int8", stages.int8_stage)):
        if getattr(options, key) is not None:
            model, verification, summaries[key] = stage(
                model, verification, runs, options, feeds, known, validity, notes, say)
            clock.lap(key)
    report = Report(str(src) if path else "<in-memory model>", str(dst) if dst else None,
                    original_stats, original_stats, runs, verification, notes=notes,
                    int8=summaries.get("int8"), sparsity=sparsity_summary,
                    half=summaries.get("half"),
                    validity=validity.describe())
    if options.bench:
        say("timing original vs optimized")
        model = _keep_if_not_slower(report, original, model, feeds, options)
        clock.lap("bench")
    if dst is not None:
        say("saving")
        io.save(model, dst, source=path, is_external=had_external_data)
        clock.lap("save")
    report.optimized = stats.model_stats(model, dst, shapes=options.shapes)
    report.seconds = clock.done()
    return model, report


class _Clock:
    """Seconds per step, and the total, for the report."""

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = now - self.mark
        self.mark = now

    def done(self) -> dict[str, float]:
        self.seconds["total"] = time.perf_counter() - self.start
        return self.seconds


def _keep_if_not_slower(report: Report, original: ir.Model, model: ir.Model, feeds,
                        options: OptimizeOptions) -> ir.Model:
    """Time both; a rewrite measurably slower on any provider gives way to the original."""
    try:
        bench_feeds = feeds[0] if feeds else load_feeds(original, options, [])[0]
    except CannotGenerateError as error:
        report.notes.append(f"timing skipped: {error}")
        return model
    report.latency = _compare_latency(original, model, bench_feeds, options, report.notes)
    slower = [row.ep for row in report.latency if row.is_slower]
    if slower and not options.allow_slower:
        report.notes.append(f"kept the original model: the rewrite ran slower on "
                            f"{', '.join(slower)} (--allow-slower keeps it anyway)")
        return original
    return model


def _compare_latency(original: ir.Model, model: ir.Model, feeds: inputs.Feeds,
                     options: OptimizeOptions, notes: list[str]) -> list[LatencyComparison]:
    """Original vs optimized on every provider asked for, interleaved (IO binding on GPUs)."""
    rows = []
    for ep in options.bench:
        try:  # a big model's two sessions one at a time (budget.timed_pair)
            before, after, (ran, note) = budget.timed_pair(original, model, feeds, ep=ep,
                                                           seconds=options.bench_seconds)
        except (runtime.RuntimeFailure, BadInputError) as error:  # not installed, or cannot load
            notes.append(f"timing on {ep} skipped: {error}")
            continue
        ratio, low, high = bench.ratio_ci(before.times_ms, after.times_ms)
        if note:  # TensorRT without its libraries: the row says what really ran
            notes.append(note)
        rows.append(LatencyComparison(ran, before, after, ratio, low, high))
    return rows


def sensitivity(
    path: str | os.PathLike,
    calib: str,
    *,
    pattern: str = "unstructured",
    levels: Sequence[float] = sensitivity_mod.LEVELS,
    skip: Sequence[str] = (),
    batches: int = 4,
    calib_samples: int | None = None,
    preprocess: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[sensitivity_mod.LayerSensitivity]:
    """Per prunable layer (channels: per channel group), the model's worst output (cosine,
    SQNR) with that layer alone pruned at each level, on the first `batches` batches of
    `calib`. The exact pipeline runs first, so the layers are the ones `optimize --sparsity`
    prunes (BatchNormalization folded in)."""
    if batches < 1:
        raise BadInputError(f"--batches {batches}: expected at least 1")
    model = io.load(path)
    _upgrade_ir(model, [])
    judge = pipeline.ValidityOnly(validity_mod.required_of(model))
    passes = _build_passes(OptimizeOptions(passes=(*DEFAULT_PIPELINE, "fold-weights")))
    model, _, _ = pipeline.run_pipeline(model, passes, checker=judge)
    data = sources.calibration_data(calib, model, preprocess=preprocess, samples=calib_samples,
                                    shapes=shapes)
    chosen = data.batches(0, batches)[:]
    if pattern == CHANNELS:  # per channel group (it spans several layers), not per layer
        return sensitivity_mod.channel_sensitivity(model, chosen, levels=levels, skip=skip,
                                                   progress=progress)
    return sensitivity_mod.sensitivity(model, chosen, pattern=pattern, levels=levels, skip=skip,
                                       progress=progress)


def inspect(path: str | os.PathLike, *, shapes: Mapping[str, Sequence[int]] | None = None):
    """Op histogram, parameters, bytes, I/O and MACs of one model file."""
    return stats.model_stats(io.load(path), path, shapes=shapes)


def validate(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    inputs_file: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batches: int = 3,
    seed: int = 0,
    tolerance: Tolerance | None = None,
) -> verify_mod.Verification:
    """Run both models on CPU on the same inputs and compare every output (a is the reference).
    `onnxopt.validate.validate_providers` does the same across providers."""
    [comparison] = validate_mod.validate_providers(
        a, b, eps=("cpu",), inputs_file=inputs_file, shapes=shapes, batches=batches, seed=seed,
        tolerance=tolerance)
    return comparison.verification


def default_model_path() -> Path:
    return Path(__file__).parent / "data" / "digits_resnet.onnx"


def default_samples_path() -> Path:
    return Path(__file__).parent / "data" / "digits_samples.npz"


# --- optimize --transfer-from (issue 6) ---------------------------------------------------------

def _transfer_first(model: ir.Model, options: OptimizeOptions, say: Progress, validity):
    """SRC's weights into the model before any pass (onnxopt/transfer/transfer_pass.py). It
    changes the function on purpose, so its result, not the model as loaded, is the original
    that the passes are verified against and that a slower rewrite falls back to."""
    if not options.transfer_from:
        return model, []
    transfer = TransferPass(options.transfer_from, TransferOptions(
        inputs=options.inputs, shapes=options.shapes, seed=options.seed, verify=options.verify))
    judge = pipeline.ValidityOnly(validity)
    model, runs, _ = pipeline.run_pipeline(model, [transfer], checker=judge, on_pass=say)
    return model, runs
