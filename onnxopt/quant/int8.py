"""`--int8`: calibrate, insert QDQ, hold the accuracy budget, count the integer kernels ORT runs.

Steps, on the model the exact passes produced:
  1. calibration data (`--calib`): batches are split 80/20 (the held-out part capped at 32
     batches); the first part is read from the source and reduced batch by batch into streamed
     histograms of every tensor the pass will quantize (never all in memory), the held-out part
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
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt import io
from onnxopt.calib import activations
from onnxopt.errors import BadInputError
from onnxopt.measure import verify
from onnxopt.passes import (
    EqualizeCrossLayerPass,
    QuantizeDynamicOptions,
    QuantizeDynamicPass,
    _qdq,
    quantize_int8,
)
from onnxopt.quant import bias_correction
from onnxopt.quant.budget import (
    ONE_SESSION_BYTES,
    Budget,
    Outcome,
    fall_back,
    latency_ratio,
    parse_budget,
    quantized_layers,
    slower,
    switched_scores,
)
from onnxopt.quant.dynamic import quantize_dynamic, quantize_unjudged
from onnxopt.quant.options import (
    CLIP_WEIGHTS,
    METHODS,
    MODES,
    TARGETS,
    Int8Options,
    Int8Result,
    check_choices,
    keep_float_names,
    kept_float,
)
from onnxopt.quant.prepare import (
    at_int8_opset,
    calibration_data,
    check_quantizable,
    named,
    split_data,
)

__all__ = [
    "CLIP_WEIGHTS",
    "METHODS",
    "MODES",
    "TARGETS",
    "Budget",
    "Int8Options",
    "Int8Result",
    "calibration_data",
    "check_quantizable",
    "integer_kernel_summary",
    "keep_float_names",
    "parse_budget",
    "quantize",
    "quantize_dynamic",
    "quantize_unjudged",
]

logger = logging.getLogger(__name__)



def quantize(
    model: ir.Model,
    options: Int8Options,
    notes: list[str],
    *,
    feeds: list | None = None,
    progress: Callable[[str], None] | None = None,
    reference: list | None = None,
) -> Int8Result:
    """Static int8 from calibration data, or dynamic int8 without it (see Int8Options.mode);
    `feeds` judge the dynamic model's budget (static holds out calibration batches)."""
    say = progress or (lambda _: None)
    check_choices(options)
    model = named(model)
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
            return quantize_dynamic(model, options, feeds or [], notes, progress=say,
                                    reference=reference)
        calib_batches, check_batches = split_data(model, options, notes)
        return quantize_dynamic(model, options, check_batches, notes, progress=say,
                                calib_batches=calib_batches)
    _check(options)
    for flag, name in ((options.smooth, "--smooth"), (options.split_outliers, "--split-outliers")):
        if flag and options.mode == "static":
            notes.append(f"{name} applies to dynamic int8 (MatMul/Gemm); static int8 does not "
                         "use it")
    calib_batches, check_batches = split_data(model, options, notes)
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
    ratio, low, high = latency_ratio(static.model, dynamic.model, feeds)
    winner = "dynamic" if ratio < 1.0 else "static"
    notes.append(f"both held the budget; kept {winner} int8 (dynamic / static latency "
                 f"{ratio:.2f}, 95% CI {low:.2f}-{high:.2f})")
    return dynamic if ratio < 1.0 else static


def _dynamic_candidates(model: ir.Model) -> bool:
    return bool(QuantizeDynamicPass().call(model.clone()).counts.get("quantized"))


def _quantize_static(model: ir.Model, options: Int8Options, notes: list[str], say,
                     calib_batches, check_batches) -> Int8Result:
    base = at_int8_opset(model, notes)  # before choosing tensors: the pass needs 13
    if options.equalize:
        base = _equalized(base, notes)
    tensors = quantize_int8.quantizable_tensors(base, options.target)
    say(f"calibrating on {len(calib_batches)} batches")
    stats = activations.collect_stats(base, calib_batches, tensors)
    ranges = {name: _range(s, options.calib_method) for name, s in stats.items()
              if not s.set_by_sentinels()}
    _say_sentinels(stats, ranges, notes)
    reduce_range = False if options.target == "tensorrt" else _reduce_range(options, notes)
    trial = _Trial(base, ranges, reduce_range, check_batches,
                   verify.reference_outputs(model, check_batches), options.budget,
                   options.clip_weights, options.target, kept=keep_float_names(base, options))
    say("inserting QDQ")
    result = trial.run(())
    if result.report.counts.get("quantized", 0) == 0:
        refused = [line for line in result.report.log if line.startswith("kept ")]
        why = f" ({len(refused)} refused; first: {refused[0]})" if refused else ""
        notes.append(f"int8: nothing in this model could be quantized{why}; kept the float "
                     "model")
        return kept_float(model, result, len(calib_batches), {})
    if options.bias_correction is not False:
        say("bias correction")
        trial, result = _bias_corrected(trial, result, calib_batches, options, notes)
    if not result.holds:
        say("finding the layers that break the budget")
        result = fall_back(trial, result, notes)
    kernels = quantize_int8.ort_kernel_counts(result.model)
    if not result.holds:
        notes.append(f"int8 missed the accuracy budget ({result.why}); kept the float model")
        return kept_float(model, result, len(calib_batches), kernels)
    if options.target == "tensorrt":
        notes.append("--target tensorrt: QDQ placed for TensorRT (symmetric int8 at the inputs "
                     "of Conv/Gemm/MatMul and residual Adds); accuracy checked with ONNX "
                     "Runtime CPU, latency not measured (no TensorRT here)")
        return _quantized(base, result, kernels, len(calib_batches), check_batches)
    if not _integer_kernels(kernels):
        notes.append("int8: ONNX Runtime fuses none of the quantized ops into an integer kernel "
                     "here (it would only add Q/DQ work); kept the float model")
        return kept_float(model, result, len(calib_batches), kernels, why="no integer kernels")
    say("timing int8 against float")
    too_slow = slower(model, result.model, check_batches[0]) if options.check_speed else ""
    if too_slow:
        notes.append(f"int8 ran slower than float on ORT CPU ({too_slow}); kept the float model")
        return kept_float(model, result, len(calib_batches), kernels, why=f"slower: {too_slow}")
    return _quantized(base, result, kernels, len(calib_batches), check_batches)


def _quantized(base: ir.Model, result: Outcome, kernels, batches: int, check_batches) -> Int8Result:
    quantized = Int8Result(result.model, True, result.verification, kernels, batches,
                           list(result.report.log), dict(result.report.counts),
                           kept_float=len(result.excluded))
    quantized.layer_sqnr = layer_sqnr(base, result.model, result.report.log, check_batches[:2])
    return quantized


def _cuda_keeps_float(model: ir.Model, notes: list[str]) -> Int8Result:
    """ORT's CUDA provider has no integer Conv/Gemm/MatMul kernel for QDQ graphs (it runs
    DequantizeLinear and then the float op), so int8 would only add work there."""
    linear = sum(1 for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul"))
    notes.append(f"--target ort-cuda: ONNX Runtime's CUDA provider runs none of the {linear} "
                 "Conv/Gemm/MatMul layers in int8 (QDQ there means DequantizeLinear + the float "
                 "op); kept the float model. For speed on CUDA run `onnxopt optimize --fp16` "
                 "instead (half precision, verified and timed on CUDA), or --target tensorrt "
                 "with the TensorRT provider")
    checked = verify.Verification("skipped", reason="ort-cuda: no int8 kernels")
    return Int8Result(model, False, checked, {}, 0, [], {})


def _equalized(base: ir.Model, notes: list[str]) -> ir.Model:
    equalized = base.clone()
    report = EqualizeCrossLayerPass()(equalized)
    pairs = report.counts.get("equalized", 0)
    if pairs:
        notes.append(f"cross-layer equalization of {pairs} Conv -> Conv pairs before calibrating")
        return equalized
    return base


_BIAS_BATCHES = 8  # per-channel means settle within a few batches


def _bias_corrected(trial: _Trial, result: Outcome, calib_batches, options: Int8Options,
                    notes: list[str]) -> tuple[_Trial, Outcome]:
    """Correct biases for the mean shift weight rounding causes; keep the corrected trial when
    asked to (--bias-correction) or when it scores better on the held-out batches."""
    layers = quantized_layers(result.report.log)
    weights = _qdq.WeightOptions(reduce_range=trial.reduce_range, clip=trial.clip_weights)
    shifts = bias_correction.output_shifts(trial.base, layers, calib_batches[:_BIAS_BATCHES],
                                           weights)
    base, count = bias_correction.corrected(trial.base, shifts)
    if not count:
        return trial, result
    corrected_trial = dataclasses.replace(trial, base=base, dtypes=None)
    corrected = corrected_trial.run(())
    # equal scores (both exact, inf) gain nothing, where inf - inf would say nan
    gain = 0.0 if corrected.score == result.score else corrected.score - result.score
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
    quantized = set(quantized_layers(log))
    layers = {n.outputs[0].name: n.name for n in float_model.graph
              if n.name in quantized and n.outputs}
    names = list(layers)
    if not names:
        return {}
    signal: dict[str, float] = dict.fromkeys(names, 0.0)
    noise: dict[str, float] = dict.fromkeys(names, 0.0)
    # prepack off: two batches do not repay it (see runtime.make_session)
    floats = activations.iter_activations(float_model, feeds, names, prepack=False)
    if io.weight_bytes(float_model) + io.weight_bytes(int8_model) > ONE_SESSION_BYTES:
        floats = list(floats)  # one session at a time: the float one's outputs kept
    pairs = zip(floats, activations.iter_activations(int8_model, feeds, names, prepack=False))
    for reference, got in pairs:
        for name in names:
            a = reference[name].astype(np.float64)
            signal[name] += float(np.sum(a * a))
            noise[name] += float(np.sum((a - got[name].astype(np.float64)) ** 2))
    return {layers[name]: (math.inf if noise[name] == 0 else
                           10 * math.log10(signal[name] / noise[name]) if signal[name] > 0
                           else -math.inf) for name in names}


def _check(options: Int8Options) -> None:
    if options.calib is None:
        raise BadInputError("--quant-mode static needs calibration data: --calib DATA (an .npz, "
                            "a folder of .npy/.npz or images with --preprocess), or --calib random")
    if options.calib_method not in METHODS:
        raise BadInputError(f"--calib-method {options.calib_method!r}: choose from "
                            f"{', '.join(METHODS)}")


def _reduce_range(options: Int8Options, notes: list[str]) -> bool:
    if options.reduce_range is not None:
        return options.reduce_range
    if quantize_int8.cpu_needs_reduce_range():
        notes.append("this CPU has no VNNI: 7-bit weights (reduce_range) avoid int16 "
                     "saturation in ORT's uint8 x int8 kernels")
        return True
    return False


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

    def options(self, exclude: tuple[str, ...]) -> quantize_int8.QuantizeInt8Options:
        if self.dtypes is None:
            self.dtypes = _qdq.infer_dtypes(self.base)
        return quantize_int8.QuantizeInt8Options(
            ranges=self.ranges, exclude=self.kept + exclude, reduce_range=self.reduce_range,
            clip_weights=self.clip_weights, target=self.target, dtypes=self.dtypes)

    def run(self, exclude: tuple[str, ...], *, batches: int | None = None) -> Outcome:
        report = quantize_int8.QuantizeInt8Pass(self.options(exclude))(self.base.clone())
        if self.target == "ort-cpu" and len(list(report.model.graphs())) > 1:
            _subgraphs_dynamic(report, self.reduce_range, self.clip_weights,
                               self.kept + exclude)
        feeds, reference = self.feeds[:batches], self.reference[:batches]
        checked, holds, why = self.budget.judge(report.model, reference, feeds)
        return Outcome(report.model, report, checked, holds, why, exclude)

    def scores_alone(self, layers: list[str]) -> dict[str, float]:
        """run((layer,), batches=1).score for each layer, from one model with a switch per
        layer (quantize_int8.with_switches) in one session, bit for bit, without a rewrite
        and a session per layer. The switched model holds float and int8 weights both, so
        a model past ONE_SESSION_BYTES gets none; nor do layers without a switch."""
        if io.weight_bytes(self.base) > ONE_SESSION_BYTES:
            return {}
        model, switches = quantize_int8.with_switches(self.base, self.options(()), layers)
        return switched_scores(model, switches, self.feeds[0], self.reference[0])


def _subgraphs_dynamic(report, reduce_range: bool, clip_weights: str, exclude) -> None:
    """If/Loop/Scan bodies, which calibration cannot see into: weights-only (dynamic) int8 of
    their MatMul/Gemm, logged on the static pass's `report`."""
    inner = QuantizeDynamicPass(QuantizeDynamicOptions(
        reduce_range=reduce_range, clip_weights=clip_weights, exclude=exclude,
        graphs="subgraphs"))(report.model)
    report.log.extend(inner.log)
    report.counts.update(inner.counts)
    report.modified = report.modified or inner.modified


def _say_sentinels(stats: dict, ranges: dict, notes: list[str]) -> None:
    """One line on the tensors left float because sentinel values set their range (a tensor
    without a range stays float, and so does the op that would need it quantized)."""
    left = [name for name in stats if name not in ranges]
    if not left:
        return
    peak = max(max(abs(stats[n].min), abs(stats[n].max)) for n in left)
    shown = ", ".join(repr(n) for n in left[:3]) + (", ..." if len(left) > 3 else "")
    notes.append(f"left float: {len(left)} tensor{'s' * (len(left) != 1)} whose range a few "
                 f"huge values set (|x| up to {peak:.3g}, the others under 1% of it, as an "
                 f"attention mask makes): uint8 over that range would flatten the others: "
                 f"{shown}")


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
    # Activation blocks between integer layers that ORT still runs in float (each costs a
    # DequantizeLinear in and a QuantizeLinear out); Mul/Add may also be int64 shape arithmetic.
    between = ", ".join(f"{k} {kernels[k]}" for k in _ACTIVATION_OPS if kernels.get(k))
    return (", ".join(f"{k} {v}" for k, v in sorted(integer.items())) or "no integer kernels") + (
        f"; float left: {left}" if left else "; no float Conv/Gemm/MatMul left") + (
        f"; not integer: {between}" if between else "")


_ACTIVATION_OPS = ("Sigmoid", "Mul", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Add",
                   "Softmax")

