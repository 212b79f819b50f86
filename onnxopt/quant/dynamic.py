"""Dynamic int8 (`--int8` without `--calib`, or when static int8 does not pay): MatMul/Gemm
weights int8 per column, activations quantized by ORT at run time (DynamicQuantizeMatMul).

Variants measured against fp32 on the budget's batches: 8- or 7-bit weights (reduce_range), and
with calibration data the same after SmoothQuant, after the outlier split, and after both
(`onnxopt.quant.smoothing`); the closest to fp32 is kept, or, when none holds the budget with every
layer int8, the one whose fallback keeps the fewest layers float.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable

import onnx_ir as ir

from onnxopt import io
from onnxopt.errors import BadInputError
from onnxopt.measure import runtime, verify
from onnxopt.passes import QuantizeDynamicOptions, QuantizeDynamicPass, _qdq, quantize_int8
from onnxopt.quant import smoothing
from onnxopt.quant.budget import (
    ONE_SESSION_BYTES,
    Budget,
    Outcome,
    fall_back,
    quantized_layers,
    slower,
)
from onnxopt.quant.options import Int8Options, Int8Result, keep_float_names, kept_float

__all__ = ["quantize_dynamic", "quantize_unjudged"]


def quantize_dynamic(model: ir.Model, options: Int8Options, feeds: list, notes: list[str], *,
                     progress: Callable[[str], None], after_static: bool = False,
                     calib_batches: list | None = None,
                     reference: list | None = None) -> Int8Result:
    """Calibration-free: MatMul/Gemm weights int8 per column, activations quantized at run time
    (ORT's DynamicQuantizeMatMul); judged by the budget on `feeds`, and kept only if faster.
    With `calib_batches`, SmoothQuant is tried as well (per-channel activation ranges)."""
    progress("dynamic int8 of MatMul/Gemm weights")
    if not feeds:
        raise BadInputError("dynamic int8 needs inputs to judge the accuracy budget: drop "
                            "--no-verify, or pass --inputs")
    variants = _dynamic_variants(model, options, feeds, calib_batches, notes, reference)
    chosen, outcome = _chosen_variant(variants, notes, progress)
    del variants  # the int8 copies not chosen: a big model's speed check needs the memory
    if io.weight_bytes(model) > ONE_SESSION_BYTES:
        runtime.release_memory()
    reduce_range = chosen.reduce_range
    quantized, report, checked = outcome.model, outcome.report, outcome.verification
    holds, why = outcome.holds, outcome.why
    if reduce_range:
        notes.append("dynamic int8 with 7-bit weights (reduce_range): measured closer to fp32 "
                     "on this CPU")
    convs = sum(1 for n in model.graph if n.op_type == "Conv")
    if convs and not after_static:
        how = "--quant-mode auto or static" if calib_batches else "pass --calib"
        notes.append(f"{how} for static int8 of the {convs} Conv layers (dynamic int8 "
                     "covers MatMul/Gemm only: quantizing activations at run time does not pay "
                     "for convolutions on CPU)")
    if not report.counts.get("quantized"):
        notes.append("int8 (dynamic): no MatMul/Gemm with a large constant weight; kept float")
        return kept_float(model, outcome, 0, {}, why="no MatMul/Gemm for dynamic int8")
    if not holds:
        notes.append(f"int8 (dynamic) missed the accuracy budget ({why}); kept the float model")
        return kept_float(model, outcome, 0, quantize_int8.ort_kernel_counts(quantized))
    if options.check_speed:
        too_slow, kernels = _slower_counting_kernels(model, quantized, feeds[0])
    else:
        too_slow, kernels = "", quantize_int8.ort_kernel_counts(quantized)
    if too_slow:
        notes.append(f"int8 (dynamic) ran slower than float on ORT CPU ({too_slow}); kept float")
        return kept_float(model, outcome, 0, kernels, why=f"slower: {too_slow}")
    return Int8Result(quantized, True, checked, kernels, len(calib_batches or []),
                      list(report.log), dict(report.counts), kept_float=len(outcome.excluded),
                      mode="dynamic")


def _slower_counting_kernels(model: ir.Model, quantized: ir.Model, feeds) -> tuple[str, dict]:
    """The speed check (see slower) and the kernels ORT runs the int8 model with, counted from
    the graph its timing session saves: on a 2.4 GB MLP a session of their own would cost a
    second and another write of the int8 weights."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-kernels-") as tmp:
        graph = os.path.join(tmp, "optimized.onnx")
        too_slow = slower(model, quantized, feeds, after_graph=graph)
        return too_slow, quantize_int8.optimized_kernel_counts(graph)


def quantize_unjudged(model: ir.Model, options: Int8Options, notes: list[str]) -> Int8Result:
    """`--int8 --no-verify` without calibration data: every eligible MatMul/Gemm weight int8,
    and nothing run. The budget and the speed check each need an ONNX Runtime session holding
    the float model, which a multi-GB model cannot afford next to its int8 copy; the user
    turned checking off, so the weights are quantized one at a time and the report says that
    neither ran. Weights are 8-bit unless --reduce-range says otherwise."""
    quantized = model.clone()  # shares the float tensors; the pass adds int8 ones
    report = QuantizeDynamicPass(QuantizeDynamicOptions(
        reduce_range=bool(options.reduce_range), clip_weights=options.clip_weights,
        exclude=keep_float_names(model, options)))(quantized)
    io.release_external(model)
    if not report.counts.get("quantized"):
        notes.append("int8 (dynamic): no MatMul/Gemm with a large constant weight; kept float")
        checked = verify.Verification("skipped", reason="no MatMul/Gemm for dynamic int8")
        return Int8Result(model, False, checked, {}, 0, list(report.log), dict(report.counts),
                          mode="dynamic")
    notes.append("--no-verify: dynamic int8 was applied unjudged: no accuracy budget and no "
                 "speed check ran (each needs ONNX Runtime sessions); drop --no-verify to have "
                 "both")
    checked = verify.Verification("skipped", reason="--no-verify: the int8 budget was not judged")
    return Int8Result(quantized, True, checked, {}, 0, list(report.log), dict(report.counts),
                      mode="dynamic")


@dataclasses.dataclass
class _Variant:
    """One way to quantize dynamically: its best weight width and its all-int8 outcome."""

    worst: float  # the worst output's cosine with every candidate int8
    reduce_range: bool
    trial: _DynamicTrial
    outcome: Outcome
    rewrite: str  # "": the model as given; else SMOOTH, SPLIT or both, applied first


SMOOTH, SPLIT = "SmoothQuant", "outlier split"


def _dynamic_variants(model: ir.Model, options: Int8Options, feeds: list,
                      calib_batches: list | None, notes: list[str],
                      reference: list | None = None) -> list[_Variant]:
    """The plain variant and, with calibration data, the same after SmoothQuant, after the
    outlier split, and after both: per-tensor activation scales lose the small channels next to
    a few outlier ones; SmoothQuant moves the outliers into the weights, the split computes the
    few extreme ones apart in float, and the two together also balance what is left. Each is
    measured, not assumed (MiniLM, all int8: plain 0.926, SmoothQuant 0.954, split 0.985, both
    0.997 worst cosine). 7-bit weights avoid int16 saturation without VNNI but cost precision,
    and with activations quantized per call the balance differs per model (MiniLM: cosine 0.96
    at 8 bits, 0.72 at 7), so unless told, each variant keeps the closer of the two widths.
    --smooth/--split-outliers keep only the variants with (or without) that rewrite."""
    if reference is None:  # else: the original's outputs on these feeds, already run
        reference = verify.reference_outputs(model, feeds)
    choices = [options.reduce_range] if options.reduce_range is not None else [False, True]
    if len(choices) == 2 and io.weight_bytes(model) > ONE_SESSION_BYTES:
        choices = [False]  # each width is a full pass over the weights and an ORT session
        notes.append("dynamic int8: 8-bit weights only on a model this big (Int8Options."
                     "reduce_range=True chooses 7-bit; measuring both would double the time)")
    kept = keep_float_names(model, options)

    def measured(base: ir.Model, rewrite: str, extra: tuple[str, ...] = ()) -> _Variant:
        found = []
        for reduce_range in choices:
            trial = _DynamicTrial(base, reduce_range, options.clip_weights, feeds, reference,
                                  options.budget, kept=kept + extra)
            outcome = trial.run(())
            worst = min((o.cosine for o in outcome.verification.outputs), default=-1.0)
            found.append(_Variant(worst, reduce_range, trial, outcome, rewrite))
            if not outcome.report.counts.get("quantized"):
                break
        return max(found, key=lambda v: v.worst)

    plain = measured(model, "")
    layers = quantized_layers(plain.outcome.report.log)
    for flag, name in ((options.smooth, "--smooth"), (options.split_outliers, "--split-outliers")):
        if flag and not calib_batches:
            notes.append(f"{name} needs --calib (per-channel activation ranges); not applied")
    if not calib_batches or not layers:
        return [plain]
    absmax = smoothing.input_ranges(model, layers, calib_batches)
    split_model, split_count, products = smoothing.split(model, layers, absmax) \
        if True in _allowed(options.split_outliers) else (model, 0, ())
    if options.split_outliers and not split_count:
        notes.append("--split-outliers: no MatMul input has a few outlier channels; nothing "
                     "to split")
    variants = []
    for split in _allowed(options.split_outliers):
        if split and not split_count:
            continue
        base = split_model if split else model
        split_text = (f"{SPLIT} (the few outlier input channels of {split_count} MatMul "
                      f"group{'s' * (split_count != 1)} computed apart in float)")
        labels, parts = ([SPLIT], [split_text]) if split else ([], [])
        for smooth in _allowed(options.smooth):
            if not (split or smooth):
                variants.append(plain)
                continue
            rewritten, what = base, parts
            if smooth:  # ranges measured again after the split: its outlier channels are 0 now
                ranges = smoothing.input_ranges(base, layers, calib_batches) if split else absmax
                rewritten, count = smoothing.smoothed(base, layers, ranges)
                if not count:
                    if options.smooth:
                        notes.append("--smooth: no MatMul input SmoothQuant could rescale")
                    continue
                smooth_text = (f"{SMOOTH} (alpha {smoothing.ALPHA}) on the inputs of {count} "
                               f"MatMul group{'s' * (count != 1)}")
                what = [*parts, smooth_text]
            variant = measured(rewritten, " + ".join(labels + [SMOOTH] * smooth),
                               products if split else ())
            variants.append(variant)
            notes.append(f"{' + '.join(what)}: worst-output cosine {plain.worst:.4f} -> "
                         f"{variant.worst:.4f} with all int8")
    return variants or [plain]


def _allowed(flag: bool | None) -> tuple[bool, ...]:
    """A rewrite's settings to measure: both unless the user forced one."""
    return (False, True) if flag is None else (flag,)


def _chosen_variant(variants: list[_Variant], notes: list[str],
                    progress: Callable[[str], None]) -> tuple[_Variant, Outcome]:
    """The variant whose all-int8 model holds the budget closest to fp32; when none holds,
    the one whose fallback keeps the fewest layers float (then: the better worst SQNR). The
    split adds a Mul, a Gather and a small MatMul per activation, so it is kept only where it
    saves layers from float: not when another variant holds with every layer int8, nor on a
    tie in the float count."""
    holding = [v for v in variants if v.outcome.holds]
    if any(SPLIT not in v.rewrite for v in holding):
        holding = [v for v in holding if SPLIT not in v.rewrite]
    if holding or not variants[0].outcome.report.counts.get("quantized"):
        chosen = max(holding or variants, key=lambda v: v.worst)
        return chosen, chosen.outcome
    progress("finding the MatMuls that break the budget")
    results: list[tuple[_Variant, Outcome, list[str]]] = []
    # The variant closest to fp32 with all int8 first: it tends to need the fewest layers
    # float, and the others' searches then stop once they could no longer do better.
    for variant in sorted(variants, key=lambda v: -v.worst):
        said: list[str] = []
        held = [o for _, o, _ in results if o.holds]
        most = None
        if held:  # a tie in the float count keeps a variant without the split's extra ops
            fewest = min(len(o.excluded) for o in held)
            most = fewest if SPLIT not in variant.rewrite else fewest - 1
        results.append((variant, fall_back(variant.trial, variant.outcome, said, most=most),
                        said))
    results.sort(key=lambda r: variants.index(r[0]))  # notes in the variants' order
    chosen, outcome, said = max(results, key=lambda r: (r[1].holds, -len(r[1].excluded),
                                                        SPLIT not in r[0].rewrite, r[1].score))
    if len(results) > 1:
        notes.append(_fallback_verdict([(v.rewrite, o) for v, o, _ in results], chosen))
    notes.extend(said)
    return chosen, outcome


def _fallback_verdict(outcomes: list[tuple[str, Outcome]], chosen: _Variant) -> str:
    """One line: what the budget's fallback needed with each rewrite, and which was kept."""
    if not any(outcome.holds for _, outcome in outcomes):
        return ("the budget was missed with every variant (" +
                ", ".join(rewrite or "plain" for rewrite, _ in outcomes) +
                "), even with layers back in float")
    fewest = min(len(o.excluded) for _, o in outcomes if o.holds)
    held = [f"{rewrite or 'plain'}: " +
            (f"held with {len(o.excluded)} layer{'s' * (len(o.excluded) != 1)} float"
             if o.holds else f"not with {fewest} or fewer layers float")
            for rewrite, o in outcomes]
    return f"kept {chosen.rewrite or 'plain dynamic int8'} ({'; '.join(held)})"


@dataclasses.dataclass
class _DynamicTrial:
    """Dynamic int8 of a copy of `base` with some MatMul/Gemm kept float, judged on `feeds`."""

    base: ir.Model
    reduce_range: bool
    clip_weights: str
    feeds: list
    reference: list
    budget: Budget
    dtypes: dict | None = None  # of `base`'s values, inferred on the first run
    kept: tuple[str, ...] = ()  # --keep-float: float in every trial

    def run(self, exclude: tuple[str, ...], *, batches: int | None = None) -> Outcome:
        if self.dtypes is None:
            self.dtypes = _qdq.infer_dtypes(self.base)
        model = self.base.clone()
        report = QuantizeDynamicPass(QuantizeDynamicOptions(
            reduce_range=self.reduce_range, clip_weights=self.clip_weights,
            exclude=self.kept + exclude, dtypes=self.dtypes))(model)
        io.release_external(self.base)  # the float weights it read: one mapping at a time
        if io.weight_bytes(self.base) > ONE_SESSION_BYTES:
            io.spill(model)  # to a file: ORT reads it from there, no serialized copies in memory
            runtime.release_memory()
        checked, holds, why = self.budget.judge(model, self.reference[:batches],
                                                self.feeds[:batches])
        return Outcome(model, report, checked, holds, why, exclude)
