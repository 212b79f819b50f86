"""`--int8`: calibrate, insert QDQ, hold the accuracy budget, count the integer kernels ORT runs.

Steps, on the model the exact passes produced:
  1. calibration data (`--calib`): batches are split 80/20; the first part is reduced batch by
     batch into streamed histograms of every tensor the pass will quantize, the held-out part
     judges the result;
  2. ranges per tensor by `--calib-method` (minmax, percentile, entropy, mse);
  3. the quantize-int8 pass (per-channel int8 weights, uint8 activations, QDQ that ORT's CPU
     provider fuses), after an opset upgrade to 13 when the model is older;
  4. the budget (`--max-error`, default cosine >= 0.99 on every output) on the held-out batches:
     a quantized model that misses it is not kept; the float model is, and the report says why;
  5. ORT loads the result with all optimizations and the kernels it really runs are counted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt import bench, calibrate, pipeline, runtime, verify
from onnxopt.errors import BadInputError

__all__ = [
    "Budget",
    "Int8Options",
    "Int8Result",
    "integer_kernel_summary",
    "parse_budget",
    "quantize",
]

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
MODES = ("auto", "static", "dynamic")
TARGETS = ("ort-cpu", "ort-cuda", "tensorrt")
CLIP_WEIGHTS = ("max", "mse", "percentile")
_HELD_OUT = 0.2
_TIMING_SECONDS = 1.5  # int8 vs float, interleaved: enough to see a 5% difference on 2 cores


@dataclasses.dataclass(frozen=True)
class Budget:
    """What int8 may cost, per output vs fp32: cosine >= x and/or SQNR >= y dB (None: no bound)."""

    min_cosine: float | None = 0.99  # conservative: `--int8` alone must never wreck a model
    min_sqnr_db: float | None = None

    def judge(self, model: ir.Model, reference, feeds) -> tuple[verify.Verification, bool, str]:
        """Run `model` on `feeds` against the float `reference`: (verification, holds, why).
        Int8 is never elementwise close; only this budget decides."""
        checked = verify.verify(model, reference, feeds, verify.Tolerance(elementwise=False))
        holds, why = self.holds(checked.outputs) if checked.outputs else (False, checked.reason)
        checked.status, checked.reason = ("passed" if holds else "failed"), why
        return checked, holds, why

    def holds(self, errors: list[verify.OutputError]) -> tuple[bool, str]:
        for out in errors:
            if out.exact_only:  # integer output (argmax, counts): the share of equal elements
                if not out.cosine >= (self.min_cosine or 0.0):
                    return False, (f"{out.name}: {out.cosine:.4f} of its elements equal "
                                   f"< {self.min_cosine}")
                continue
            if self.min_cosine is not None and not out.cosine >= self.min_cosine:
                return False, f"{out.name}: cosine {out.cosine:.4f} < {self.min_cosine}"
            if self.min_sqnr_db is not None and not out.sqnr_db >= self.min_sqnr_db:
                return False, f"{out.name}: SQNR {out.sqnr_db:.1f} dB < {self.min_sqnr_db}"
        return True, ""


def parse_budget(text: str) -> Budget:
    """`cosine>=0.99`, `sqnr>=30`, both joined by `,`, or `none`."""
    if text.strip().lower() == "none":
        return Budget(None, None)
    fields: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(cosine|sqnr)\s*>=\s*([0-9.eE+-]+)", part.lower())
        if not match:
            raise BadInputError(f"--max-error {text!r}: expected cosine>=0.99, sqnr>=30, "
                                "both (comma-separated) or none")
        fields["min_cosine" if match[1] == "cosine" else "min_sqnr_db"] = float(match[2])
    return Budget(fields.get("min_cosine"), fields.get("min_sqnr_db"))


@dataclasses.dataclass(frozen=True)
class Int8Options:
    calib: str | None = None  # .npz, folder of .npy/.npz/images, or "random"
    calib_method: str = "minmax"
    calib_samples: int | None = None
    preprocess: str | None = None  # for image folders
    budget: Budget = Budget()
    shapes: dict = dataclasses.field(default_factory=dict)
    # 7-bit weights: None = decide by the CPU (x86 without VNNI saturates VPMADDUBSW's int16
    # pair sums with full 8-bit weights; measured on the default model: top-1 98.4% -> 93.8%).
    reduce_range: bool | None = None
    # int8 that runs slower than float on ORT CPU is not kept (tiny layers pay more for Q/DQ
    # than they gain); False keeps it anyway (--allow-slower).
    check_speed: bool = True
    # auto: static with --calib, else dynamic (MatMul/Gemm weights int8, activations quantized at
    # run time: what pays on CPU without calibration data); static or dynamic force one.
    mode: str = "auto"
    target: str = "ort-cpu"  # see TARGETS and quantize-int8's placements
    clip_weights: str = "max"  # per-channel weight ranges: max, mse or percentile
    # None: tried, kept only where it brings the held-out error down; True/False force it.
    bias_correction: bool | None = None
    # Node names to keep float whatever the budget says: comma-separated regular expressions,
    # each matched against whole node names (`--keep-float '/bert/.*/output/dense/MatMul'`).
    keep_float: str | None = None
    # Cross-layer equalization of Conv -> Relu -> Conv before calibrating: exact, and measured
    # to help (PP-OCR rec held-out cosine 0.90 -> 0.94, the default model 0.99991 -> 0.99992).
    equalize: bool = True
    # SmoothQuant before dynamic int8 (needs --calib for per-channel activation ranges):
    # None: measured both ways, kept where the worst output is closer to fp32; True/False force.
    smooth: bool | None = None


@dataclasses.dataclass
class Int8Result:
    model: ir.Model  # the quantized model, or the float one when the budget was missed
    is_quantized: bool
    verification: verify.Verification  # held-out batches, budget as the tolerance
    kernels: dict[str, int]  # ORT's optimized graph: op type -> count
    calibration_batches: int
    log: list[str]
    counts: dict[str, int]
    layer_sqnr: dict[str, float] = dataclasses.field(default_factory=dict)  # see layer_sqnr
    kept_float: int = 0  # quantized layers the budget sent back to float


def quantize(
    model: ir.Model,
    options: Int8Options,
    notes: list[str],
    *,
    feeds: list | None = None,
    progress: Callable[[str], None] | None = None,
) -> Int8Result:
    """Static int8 from calibration data, or dynamic int8 without it (see Int8Options.mode);
    `feeds` judge the dynamic model's budget (static holds out calibration batches)."""
    say = progress or (lambda _: None)
    _check_choices(options)
    kept = keep_float_names(model, options)  # a pattern naming nothing fails before calibrating
    if kept:
        shown = ", ".join(repr(n) for n in kept[:5]) + (", ..." if len(kept) > 5 else "")
        notes.append(f"kept float on request (--keep-float): {len(kept)} nodes: {shown}")
    if options.target == "ort-cuda":
        return _cuda_keeps_float(model, notes)
    if options.mode == "dynamic" or (options.mode == "auto" and options.calib is None):
        if options.target == "tensorrt":
            raise BadInputError("--target tensorrt needs static int8: pass --calib DATA "
                                "(TensorRT has no dynamic int8)")
        if options.calib is None:
            return quantize_dynamic(model, options, feeds or [], notes, progress=say)
        calib_batches, check_batches = _split_data(model, options, notes)
        return quantize_dynamic(model, options, check_batches, notes, progress=say,
                                calib_batches=calib_batches)
    _check(options)
    calib_batches, check_batches = _split_data(model, options, notes)
    result = _quantize_static(model, options, notes, say, calib_batches, check_batches)
    if (result.is_quantized and not result.kept_float) or options.mode != "auto" \
            or options.target != "ort-cpu" or not _dynamic_candidates(model):
        return result
    # Static int8 was not kept (budget, speed), or kept only with layers back in float:
    # weights-only int8 with activations quantized per call is the other CPU path, and often
    # the one transformers tolerate.
    why = ("was not kept" if not result.is_quantized else
           f"kept {result.kept_float} layer{'s' * (result.kept_float != 1)} float to hold "
           "the budget")
    say(f"static int8 {why}: trying dynamic int8 of the MatMul/Gemm weights")
    notes.append(f"static int8 {why}; tried dynamic int8 of the MatMul/Gemm weights, "
                 "judged on the held-out calibration batches")
    dynamic = quantize_dynamic(model, options, check_batches, notes, progress=say,
                               after_static=True, calib_batches=calib_batches)
    if not dynamic.is_quantized:
        return result
    if not result.is_quantized:
        return dynamic
    return _faster(result, dynamic, check_batches[0], notes)


def _faster(static: Int8Result, dynamic: Int8Result, feeds, notes: list[str]) -> Int8Result:
    """Both hold the budget: the one ORT CPU runs faster (p50, interleaved)."""
    with runtime.model_session(static.model) as a, runtime.model_session(dynamic.model) as b:
        runners = [runtime.runner(a, feeds), runtime.runner(b, feeds)]
        first, second = bench.measure_runners(runners, seconds=_TIMING_SECONDS)
    ratio, low, high = bench.ratio_ci(first.times_ms, second.times_ms)
    winner = "dynamic" if ratio < 1.0 else "static"
    notes.append(f"both held the budget; kept {winner} int8 (dynamic / static latency "
                 f"{ratio:.2f}, 95% CI {low:.2f}-{high:.2f})")
    return dynamic if ratio < 1.0 else static


def keep_float_names(model: ir.Model, options: Int8Options) -> tuple[str, ...]:
    """The node names `--keep-float` selects (every graph); a pattern naming none is an error."""
    if not options.keep_float:
        return ()
    names = [n.name for g in model.graphs() for n in g if n.name]
    kept: list[str] = []
    for pattern in filter(None, (p.strip() for p in options.keep_float.split(","))):
        try:
            matcher = re.compile(pattern)
        except re.error as error:
            raise BadInputError(f"--keep-float {pattern!r}: not a regular expression "
                                f"({error})") from None
        matched = [name for name in names if matcher.fullmatch(name)]
        if not matched:
            raise BadInputError(f"--keep-float {pattern!r} matches no node name (e.g. "
                                f"{', '.join(repr(n) for n in names[:3])})")
        kept.extend(matched)
    return tuple(dict.fromkeys(kept))


def _dynamic_candidates(model: ir.Model) -> bool:
    from onnxopt.passes import quantize_dynamic as dynamic

    return bool(dynamic.QuantizeDynamicPass().call(model.clone()).counts.get("quantized"))


def _quantize_static(model: ir.Model, options: Int8Options, notes: list[str], say,
                     calib_batches, check_batches) -> Int8Result:
    from onnxopt.passes import quantize_int8  # passes import onnxopt modules: import late

    base = _at_opset_13(model, notes)  # before choosing tensors: the pass needs opset 13
    if options.equalize:
        base = _equalized(base, notes)
    tensors = quantize_int8.quantizable_tensors(base, options.target)
    say(f"calibrating on {len(calib_batches)} batches")
    stats = calibrate.collect_stats(base, calib_batches, tensors)
    ranges = {name: _range(s, options.calib_method) for name, s in stats.items()}
    reduce_range = False if options.target == "tensorrt" else _reduce_range(options, notes)
    trial = _Trial(base, ranges, reduce_range, check_batches,
                   verify.reference_outputs(model, check_batches), options.budget,
                   options.clip_weights, options.target, kept=keep_float_names(base, options))
    say("inserting QDQ")
    result = trial.run(())
    if result.report.counts.get("quantized", 0) == 0:
        notes.append("int8: nothing in this model could be quantized; kept the float model")
        return _kept_float(model, result, len(calib_batches), {})
    if options.bias_correction is not False:
        say("bias correction")
        trial, result = _bias_corrected(trial, result, calib_batches, options, notes)
    if not result.holds:
        say("finding the layers that break the budget")
        result = _fall_back(trial, result, notes)
    kernels = quantize_int8.ort_kernel_counts(ir.to_proto(result.model).SerializeToString())
    if not result.holds:
        notes.append(f"int8 missed the accuracy budget ({result.why}); kept the float model")
        return _kept_float(model, result, len(calib_batches), kernels)
    if options.target == "tensorrt":
        notes.append("--target tensorrt: QDQ placed for TensorRT (symmetric int8 at the inputs "
                     "of Conv/Gemm/MatMul and residual Adds); accuracy checked with ONNX "
                     "Runtime CPU, latency not measured (no TensorRT here)")
        return _quantized(base, result, kernels, len(calib_batches), check_batches)
    if not _integer_kernels(kernels):
        notes.append("int8: ONNX Runtime fuses none of the quantized ops into an integer kernel "
                     "here (it would only add Q/DQ work); kept the float model")
        return _kept_float(model, result, len(calib_batches), kernels, why="no integer kernels")
    say("timing int8 against float")
    slower = _slower(model, result.model, check_batches[0]) if options.check_speed else ""
    if slower:
        notes.append(f"int8 ran slower than float on ORT CPU ({slower}); kept the float model")
        return _kept_float(model, result, len(calib_batches), kernels, why=f"slower: {slower}")
    return _quantized(base, result, kernels, len(calib_batches), check_batches)


def _quantized(base: ir.Model, result: _Outcome, kernels, batches: int, check_batches) -> Int8Result:
    quantized = Int8Result(result.model, True, result.verification, kernels, batches,
                           list(result.report.log), dict(result.report.counts),
                           kept_float=len(result.excluded))
    quantized.layer_sqnr = layer_sqnr(base, result.model, result.report.log, check_batches[:2])
    return quantized


def _check_choices(options: Int8Options) -> None:
    for flag, value, choices in (("--quant-mode", options.mode, MODES),
                                 ("--target", options.target, TARGETS),
                                 ("--clip-weights", options.clip_weights, CLIP_WEIGHTS)):
        if value not in choices:
            raise BadInputError(f"{flag} {value!r}: choose from {', '.join(choices)}")


def _cuda_keeps_float(model: ir.Model, notes: list[str]) -> Int8Result:
    """ORT's CUDA provider has no integer Conv/Gemm/MatMul kernel for QDQ graphs (it runs
    DequantizeLinear and then the float op), so int8 would only add work there."""
    linear = sum(1 for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul"))
    notes.append(f"--target ort-cuda: ONNX Runtime's CUDA provider runs none of the {linear} "
                 "Conv/Gemm/MatMul layers in int8 (QDQ there means DequantizeLinear + the float "
                 "op); kept the float model. For speed on CUDA use fp16, or --target tensorrt "
                 "with the TensorRT provider")
    checked = verify.Verification("skipped", reason="ort-cuda: no int8 kernels")
    return Int8Result(model, False, checked, {}, 0, [], {})


def _equalized(base: ir.Model, notes: list[str]) -> ir.Model:
    from onnxopt.passes import EqualizeCrossLayerPass

    equalized = base.clone()
    report = EqualizeCrossLayerPass()(equalized)
    pairs = report.counts.get("equalized", 0)
    if pairs:
        notes.append(f"cross-layer equalization of {pairs} Conv -> Conv pairs before calibrating")
        return equalized
    return base


_BIAS_BATCHES = 8  # per-channel means settle within a few batches


def _bias_corrected(trial: _Trial, result: _Outcome, calib_batches, options: Int8Options,
                    notes: list[str]) -> tuple[_Trial, _Outcome]:
    """Correct biases for the mean shift weight rounding causes; keep the corrected trial when
    asked to (--bias-correction) or when it scores better on the held-out batches."""
    from onnxopt import bias_correction
    from onnxopt.passes import _qdq

    layers = [m[1] for line in result.report.log if (m := _QUANTIZED.match(line))]
    weights = _qdq.WeightOptions(reduce_range=trial.reduce_range, clip=trial.clip_weights)
    shifts = bias_correction.output_shifts(trial.base, layers, calib_batches[:_BIAS_BATCHES],
                                           weights)
    base, count = bias_correction.corrected(trial.base, shifts)
    if not count:
        return trial, result
    corrected_trial = dataclasses.replace(trial, base=base, dtypes=None)
    corrected = corrected_trial.run(())
    gain = corrected.score - result.score
    if options.bias_correction or gain > 0:
        notes.append(f"bias correction of {count} layers: worst-output SQNR {gain:+.1f} dB on "
                     "the held-out batches")
        return corrected_trial, corrected
    notes.append(f"bias correction left out: it moved the worst-output SQNR by {gain:+.1f} dB")
    return trial, result


def layer_sqnr(float_model: ir.Model, int8_model: ir.Model, log: list[str], feeds) -> dict:
    """Per quantized layer (node name, graph order): SQNR in dB of its output in the int8 model
    against the float model's, on the same inputs. Error accumulates through the network,
    so the table shows where it grows; the worst rows are the first to keep float."""
    quantized = {m[1] for line in log if (m := _QUANTIZED.match(line))}
    layers = {n.outputs[0].name: n.name for n in float_model.graph
              if n.name in quantized and n.outputs}
    names = list(layers)
    if not names:
        return {}
    signal: dict[str, float] = dict.fromkeys(names, 0.0)
    noise: dict[str, float] = dict.fromkeys(names, 0.0)
    pairs = zip(calibrate.iter_activations(float_model, feeds, names),
                calibrate.iter_activations(int8_model, feeds, names))
    for reference, got in pairs:
        for name in names:
            a = reference[name].astype(np.float64)
            signal[name] += float(np.sum(a * a))
            noise[name] += float(np.sum((a - got[name].astype(np.float64)) ** 2))
    return {layers[name]: (math.inf if noise[name] == 0 else
                           10 * math.log10(signal[name] / noise[name]) if signal[name] > 0
                           else -math.inf) for name in names}


def _kept_float(model, result: _Outcome, batches: int, kernels, why: str = "") -> Int8Result:
    """The float model, with what was tried: verification of the float model is exact."""
    checked = dataclasses.replace(result.verification, status="skipped",
                                  reason=why or result.why or "nothing to quantize")
    return Int8Result(model, False, checked, kernels, batches, list(result.report.log),
                      dict(result.report.counts))


def _slower(float_model: ir.Model, int8_model: ir.Model, feeds) -> str:
    """'' when int8 is not measurably slower on ORT CPU, else the ratio with its 95% CI."""
    with runtime.model_session(float_model) as a, runtime.model_session(int8_model) as b:
        runners = [runtime.runner(a, feeds), runtime.runner(b, feeds)]
        before, after = bench.measure_runners(runners, seconds=_TIMING_SECONDS)
    ratio, low, high = bench.ratio_ci(before.times_ms, after.times_ms)
    return f"{ratio:.2f}x the float latency, 95% CI {low:.2f}-{high:.2f}" if low > 1.0 else ""


def quantize_dynamic(model: ir.Model, options: Int8Options, feeds: list, notes: list[str], *,
                     progress: Callable[[str], None], after_static: bool = False,
                     calib_batches: list | None = None) -> Int8Result:
    """Calibration-free: MatMul/Gemm weights int8 per column, activations quantized at run time
    (ORT's DynamicQuantizeMatMul); judged by the budget on `feeds`, and kept only if faster.
    With `calib_batches`, SmoothQuant is tried as well (per-channel activation ranges)."""
    from onnxopt.passes import quantize_int8

    progress("dynamic int8 of MatMul/Gemm weights")
    if not feeds:
        raise BadInputError("dynamic int8 needs inputs to judge the accuracy budget: drop "
                            "--no-verify, or pass --inputs")
    variants, smoothed = _dynamic_variants(model, options, feeds, calib_batches)
    chosen, outcome = _chosen_variant(variants, smoothed, notes, progress)
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
        return _kept_float(model, outcome, 0, {}, why="nothing to quantize without --calib")
    kernels = quantize_int8.ort_kernel_counts(ir.to_proto(quantized).SerializeToString())
    if not holds:
        notes.append(f"int8 (dynamic) missed the accuracy budget ({why}); kept the float model")
        return _kept_float(model, outcome, 0, kernels)
    slower = _slower(model, quantized, feeds[0]) if options.check_speed else ""
    if slower:
        notes.append(f"int8 (dynamic) ran slower than float on ORT CPU ({slower}); kept float")
        return _kept_float(model, outcome, 0, kernels, why=f"slower: {slower}")
    return Int8Result(quantized, True, checked, kernels, 0, list(report.log), dict(report.counts),
                      kept_float=len(outcome.excluded))


@dataclasses.dataclass
class _Variant:
    """One way to quantize dynamically: its best weight width and its all-int8 outcome."""

    worst: float  # the worst output's cosine with every candidate int8
    reduce_range: bool
    trial: _DynamicTrial
    outcome: _Outcome
    smoothed: bool


def _dynamic_variants(model: ir.Model, options: Int8Options, feeds: list,
                      calib_batches: list | None) -> tuple[list[_Variant], int]:
    """The plain variant and, with calibration data, a SmoothQuant one (per-tensor activation
    scales lose the small channels next to a few outlier ones); how many activations smoothing
    rescaled. 7-bit weights avoid int16 saturation without VNNI but cost precision, and with
    activations quantized per call the balance differs per model (MiniLM: cosine 0.96 at 8
    bits, 0.72 at 7), so unless told, each variant keeps the closer of the two widths."""
    from onnxopt import smoothing

    reference = verify.reference_outputs(model, feeds)
    choices = [options.reduce_range] if options.reduce_range is not None else [False, True]
    kept = keep_float_names(model, options)

    def measured(base: ir.Model, smoothed: bool) -> _Variant:
        found = []
        for reduce_range in choices:
            trial = _DynamicTrial(base, reduce_range, options.clip_weights, feeds, reference,
                                  options.budget, kept=kept)
            outcome = trial.run(())
            worst = min((o.cosine for o in outcome.verification.outputs), default=-1.0)
            found.append(_Variant(worst, reduce_range, trial, outcome, smoothed))
            if not outcome.report.counts.get("quantized"):
                break
        return max(found, key=lambda v: v.worst)

    plain = measured(model, False)
    layers = [m[1] for line in plain.outcome.report.log if (m := _QUANTIZED.match(line))]
    if not calib_batches or not layers or options.smooth is False:
        return [plain], 0
    base, count = smoothing.smoothed(model, layers, calib_batches)
    if not count:
        return [plain], 0
    smooth = measured(base, True)
    return ([smooth] if options.smooth else [plain, smooth]), count


def _chosen_variant(variants: list[_Variant], count: int, notes: list[str],
                    progress: Callable[[str], None]) -> tuple[_Variant, _Outcome]:
    """The variant whose all-int8 model holds the budget closest to fp32; when none holds,
    the one whose fallback keeps the fewest layers float (then: the better worst SQNR)."""
    from onnxopt import smoothing

    if count:
        worst = {v.smoothed: v.worst for v in variants}
        shown = " -> ".join(f"{worst[k]:.4f}" for k in (False, True) if k in worst)
        notes.append(f"SmoothQuant (alpha {smoothing.ALPHA}) on the inputs of {count} MatMul "
                     f"groups: worst-output cosine {shown} with all int8")
    holding = [v for v in variants if v.outcome.holds]
    if holding or not variants[0].outcome.report.counts.get("quantized"):
        chosen = max(holding or variants, key=lambda v: v.worst)
        return chosen, chosen.outcome
    progress("finding the MatMuls that break the budget")
    tried = []
    for variant in variants:
        said: list[str] = []
        outcome = _fall_back(variant.trial, variant.outcome, said)
        tried.append((outcome.holds, -len(outcome.excluded), outcome.score, variant, outcome,
                      said))
    *_, chosen, outcome, said = max(tried, key=lambda t: t[:3])
    if len(tried) > 1:
        floats = {t[3].smoothed: -t[1] for t in tried}
        notes.append(f"SmoothQuant {'kept' if chosen.smoothed else 'left out'}: the budget "
                     f"needed {floats[True]} layers float with it, {floats[False]} without")
    notes.extend(said)
    return chosen, outcome


def _check(options: Int8Options) -> None:
    if options.calib is None:
        raise BadInputError("--quant-mode static needs calibration data: --calib DATA (an .npz, "
                            "a folder of .npy/.npz or images with --preprocess), or --calib random")
    if options.calib_method not in METHODS:
        raise BadInputError(f"--calib-method {options.calib_method!r}: choose from "
                            f"{', '.join(METHODS)}")


def _split_data(model: ir.Model, options: Int8Options, notes: list[str]):
    """(calibration batches, held-out batches): the last 20% judge the budget."""
    data = calibrate.calibration_data(options.calib, model, preprocess=options.preprocess,
                                      samples=options.calib_samples, shapes=options.shapes)
    notes.extend(data.notes)
    batches = list(data)  # feeds only; activations are reduced one batch at a time
    held = max(1, math.floor(len(batches) * _HELD_OUT)) if len(batches) > 1 else 0
    calib_batches, check_batches = batches[:len(batches) - held], batches[len(batches) - held:]
    if not check_batches:
        notes.append("one calibration batch: the accuracy budget is judged on the same batch")
        check_batches = calib_batches
    return calib_batches, check_batches


def _at_opset_13(model: ir.Model, notes: list[str]) -> ir.Model:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset >= 13:
        return model
    notes.append(f"upgraded opset {opset} -> 13 with onnx's version converter "
                 "(per-channel DequantizeLinear needs its axis attribute)")
    return pipeline.upgrade_opset(model, 13)


def _reduce_range(options: Int8Options, notes: list[str]) -> bool:
    from onnxopt.passes import quantize_int8

    if options.reduce_range is not None:
        return options.reduce_range
    if quantize_int8.cpu_needs_reduce_range():
        notes.append("this CPU has no VNNI: 7-bit weights (reduce_range) avoid int16 "
                     "saturation in ORT's uint8 x int8 kernels")
        return True
    return False


@dataclasses.dataclass
class _Outcome:
    model: ir.Model
    report: object  # PassReport
    verification: verify.Verification
    holds: bool
    why: str
    excluded: tuple[str, ...] = ()  # the layers this trial kept float

    @property
    def score(self) -> float:
        """The worst output's SQNR (dB): what sensitivity ranks by."""
        return min((o.sqnr_db for o in self.verification.outputs), default=-math.inf)


@dataclasses.dataclass
class _Trial:
    """Quantize a copy of `base` with some nodes kept float, and judge it against the budget."""

    base: ir.Model
    ranges: dict
    reduce_range: bool
    feeds: list
    reference: list
    budget: Budget
    clip_weights: str = "max"
    target: str = "ort-cpu"
    dtypes: dict | None = None  # of `base`'s values, inferred on the first run
    kept: tuple[str, ...] = ()  # --keep-float: float in every trial

    def run(self, exclude: tuple[str, ...], *, batches: int | None = None) -> _Outcome:
        from onnxopt.passes import _qdq, quantize_int8

        if self.dtypes is None:
            self.dtypes = _qdq.infer_dtypes(self.base)
        options = quantize_int8.QuantizeInt8Options(
            ranges=self.ranges, exclude=self.kept + exclude, reduce_range=self.reduce_range,
            clip_weights=self.clip_weights, target=self.target, dtypes=self.dtypes)
        report = quantize_int8.QuantizeInt8Pass(options)(self.base.clone())
        if self.target == "ort-cpu" and len(list(report.model.graphs())) > 1:
            _subgraphs_dynamic(report, self.reduce_range, self.clip_weights,
                               self.kept + exclude)
        feeds, reference = self.feeds[:batches], self.reference[:batches]
        checked, holds, why = self.budget.judge(report.model, reference, feeds)
        return _Outcome(report.model, report, checked, holds, why, exclude)


def _subgraphs_dynamic(report, reduce_range: bool, clip_weights: str, exclude) -> None:
    """If/Loop/Scan bodies, which calibration cannot see into: weights-only (dynamic) int8 of
    their MatMul/Gemm, logged on the static pass's `report`."""
    from onnxopt.passes import quantize_dynamic as dynamic

    inner = dynamic.QuantizeDynamicPass(dynamic.QuantizeDynamicOptions(
        reduce_range=reduce_range, clip_weights=clip_weights, exclude=exclude,
        graphs="subgraphs"))(report.model)
    report.log.extend(inner.log)
    report.counts.update(inner.counts)
    report.modified = report.modified or inner.modified


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

    def run(self, exclude: tuple[str, ...], *, batches: int | None = None) -> _Outcome:
        from onnxopt.passes import _qdq
        from onnxopt.passes import quantize_dynamic as dynamic

        if self.dtypes is None:
            self.dtypes = _qdq.infer_dtypes(self.base)
        model = self.base.clone()
        report = dynamic.QuantizeDynamicPass(dynamic.QuantizeDynamicOptions(
            reduce_range=self.reduce_range, clip_weights=self.clip_weights,
            exclude=self.kept + exclude, dtypes=self.dtypes))(model)
        checked, holds, why = self.budget.judge(model, self.reference[:batches],
                                                self.feeds[:batches])
        return _Outcome(model, report, checked, holds, why, exclude)


_QUANTIZED = re.compile(r"^quantized '(.+?)' \(")
_MAX_FALLBACK = 0.5  # past half the layers in float, int8 has nothing left to offer


def _fall_back(trial: _Trial, full: _Outcome, notes: list[str]) -> _Outcome:
    """Sensitivity: each quantized layer alone back in float (one held-out batch), ranked by the
    SQNR it wins back; then the worst 1, 2, 4, ... go back to float until the budget holds, and
    a bisection between the last count that missed and the first that held finds the fewest.
    When error is spread over many layers no short list wins it back; then the longest prefix
    of the network (graph order) that holds the budget stays int8, the rest float."""
    names = [m[1] for line in full.report.log if (m := _QUANTIZED.match(line))]
    gains = {n: trial.run((n,), batches=1).score - full.score for n in names}
    order = sorted(names, key=lambda n: -gains[n])
    limit = max(1, int(len(order) * _MAX_FALLBACK))
    missed, count = 0, 1  # all int8 (0 back in float) missed the budget
    while True:  # 1, 2, 4, ... of the worst back to float: log(n) checks, not n
        count = min(count, limit)
        outcome = trial.run(tuple(order[:count]))
        if outcome.holds:
            break
        if count >= limit:
            return _longest_prefix(trial, full, names, notes)
        missed, count = count, count * 2
    while count - missed > 1:  # holding is close to monotone in the count: bisect
        middle = (missed + count) // 2
        candidate = trial.run(tuple(order[:middle]))
        if candidate.holds:
            count, outcome = middle, candidate
        else:
            missed = middle
    shown = ", ".join(f"{n!r} (+{gains[n]:.1f} dB)" for n in order[:count])
    notes.append(f"kept float to hold the accuracy budget ({full.why} when all were "
                 f"int8): {shown}")
    return outcome


def _longest_prefix(trial: _Trial, full: _Outcome, names: list[str], notes) -> _Outcome:
    """Binary search on k: the first k quantized layers int8, the others float (error that
    accumulates downstream grows with depth, so holding is close to monotone in k)."""
    holding, failing, best = 0, len(names), None
    while failing - holding > 1:
        middle = (holding + failing) // 2
        outcome = trial.run(tuple(names[middle:]))
        if outcome.holds:
            holding, best = middle, outcome
        else:
            failing = middle
    if best is None:
        return full
    notes.append(f"kept float to hold the accuracy budget ({full.why} when all were int8): "
                 f"the last {len(names) - holding} of {len(names)} quantized layers, from "
                 f"{names[holding]!r} on; the first {holding} stay int8")
    return best


def _range(stats, method: str) -> tuple[float, float]:
    if method == "minmax":
        return stats.range_minmax()
    if method == "percentile":
        return stats.range_percentile()
    if method == "entropy":
        return stats.range_entropy()
    return stats.range_mse(symmetric=False)


_INTEGER_KERNELS = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize")


def _integer_kernels(kernels: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in kernels.items() if k.startswith(_INTEGER_KERNELS)}


def integer_kernel_summary(kernels: dict[str, int]) -> str:
    """`QLinearConv 16, QGemm 1; float Conv 0, MatMul 0`."""
    integer = _integer_kernels(kernels)
    floats = {k: kernels.get(k, 0) for k in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul")}
    left = ", ".join(f"{k} {v}" for k, v in floats.items() if v)
    return (", ".join(f"{k} {v}" for k, v in sorted(integer.items())) or "no integer kernels") + (
        f"; float left: {left}" if left else "; no float Conv/Gemm/MatMul left")

