"""The stages of `optimize` around the exact pipeline, as the API runs them: the inputs that
verify and time it (`load_feeds`), the reference run that judges every pass and settles what
the output is held to (`reference_checker`), the lossy stages (`int8_stage`, `sparsity_stage`,
`half_stage`) with their report rows, each undone when its model is not valid.
`options` is an api.OptimizeOptions (this module sits below the API and does not import it).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from onnxopt import inputs, io, pipeline
from onnxopt.calib import sources
from onnxopt.measure import runtime
from onnxopt.measure import validity as validity_mod
from onnxopt.measure import verify as verify_mod
from onnxopt.passes._graph import opset_version
from onnxopt.precision import half as half_flow
from onnxopt.quant import int8
from onnxopt.sparsity import prune as sparsity_flow
from onnxopt.sparsity.options import CHANNELS

__all__ = [
    "LOAD_CHECK_BYTES",
    "half_stage",
    "int8_stage",
    "load_feeds",
    "reference_checker",
    "sparsity_stage",
]


def load_feeds(model: ir.Model, options, notes: list[str]) -> list[inputs.Feeds]:
    """--inputs; else, with --calib DATA (int8 or sparsity), the last batches of DATA (real
    inputs of the real shapes, for verification and for timing); else inputs generated from
    declared shapes."""
    if options.inputs:
        return inputs.load_npz(options.inputs, model)
    stage = options.int8 or options.sparsity
    calib = stage.calib if stage is not None else None
    if calib is not None and str(calib) != sources.RANDOM:
        data = sources.calibration_data(calib, model, preprocess=stage.preprocess,
                                        samples=stage.calib_samples, shapes=stage.shapes)
        feeds = data.batches(max(0, len(data) - options.batches))[:]
        notes.append(f"verification and timing inputs: the last {len(feeds)} batches of --calib "
                     "(pass --inputs for others)")
        return feeds
    return inputs.generate(model, shapes=options.shapes, batches=options.batches,
                           seed=options.seed, warnings=notes)


def reference_checker(original: ir.Model, feeds, options, validity, notes: list[str]):
    """(the judge of every pass, why verification is skipped or None, the validity levels with
    the ONNX Runtime one settled): the reference run proves the original loads, so no session
    is made for that alone when there is one."""
    skipped = None
    if options.verify and feeds is not None:
        try:
            reference = verify_mod.reference_outputs(original, feeds)
        except runtime.RuntimeFailure as error:
            skipped = verify_mod.Verification(
                "skipped", reason=f"the original does not run on these inputs: {error}")
        else:
            validity = dataclasses.replace(validity, loads=True)
            floor = verify_mod.NoiseFloor(original, reference, feeds)
            return (pipeline.Checker(feeds, reference, options.tolerance, floor, validity), None,
                    validity)
    validity = dataclasses.replace(validity, loads=_loads(original, options, notes))
    return pipeline.ValidityOnly(validity), skipped, validity


# Over this, --no-verify also skips the ORT load check of the guard: a session holds every weight.
LOAD_CHECK_BYTES = 1 << 28


def _loads(model: ir.Model, options, notes: list[str]) -> bool:
    """Whether outputs must load in ONNX Runtime: when the original does, unless --no-verify on
    a big model, where a session holding every weight would break the memory bound."""
    if not options.verify and io.weight_bytes(model) > LOAD_CHECK_BYTES:
        notes.append(f"the output is not loaded in ONNX Runtime to check it: with --no-verify a "
                     f"model over {LOAD_CHECK_BYTES >> 20} MiB keeps memory bounded instead "
                     "(the ONNX checker still runs)")
        return False
    return not validity_mod.load_problem(model)


def _undo_if_invalid(runs: list, validity, before: tuple, after: tuple):
    """A stage (int8, sparsity) whose model falls short of the input's validity is undone and
    its row says why: (model, verification) of before it, or `after` when it is valid."""
    model, verification = after
    if model is before[0]:
        return after
    ran = verification is not None and bool(verification.outputs)  # ORT ran it: it loads
    problem = validity.problem(model, loaded=ran)
    if not problem:
        return after
    row = runs[-1]
    row.modified, row.reverted, row.reason = False, True, f"invalid model, undone: {problem}"
    return before


def _calibration_summary(result: int8.Int8Result, options: int8.Int8Options) -> str:
    if result.mode == "dynamic" and result.calibration_batches:
        return f"dynamic int8; {result.calibration_batches} calibration batches"
    if result.mode == "dynamic" or not result.calibration_batches:
        return "none: dynamic int8"
    return f"{result.calibration_batches} batches, {options.calib_method}"


def _kernels_summary(result: int8.Int8Result) -> str:
    """What ORT runs for the model written; for a float model kept, what int8 would have run."""
    if not result.kernels:
        return "none measured: the float model was kept"
    summary = int8.integer_kernel_summary(result.kernels)
    return summary if result.is_quantized else f"the int8 model (not kept): {summary}"


def int8_stage(model, verification, runs, options, feeds, reference, validity, notes, say):
    """Run --int8 on the exactly rewritten model: (model, verification, report summary); an
    int8 model short of `validity` is undone. `reference`: the original's outputs on `feeds`
    where verification has them (dynamic int8 judges against those instead of running the
    float model once more)."""
    stage = options.int8
    if not options.verify and stage.calib is None and stage.mode in ("auto", "dynamic") \
            and stage.target == "ort-cpu":
        say("dynamic int8 of MatMul/Gemm weights (--no-verify: unjudged)")
        result = int8.quantize_unjudged(int8.named(model), stage, notes)
    else:
        if not feeds and stage.calib is None:
            feeds, reference = load_feeds(model, options, notes), None  # the budget's inputs
        result = int8.quantize(model, stage, notes, feeds=feeds, progress=say,
                               reference=reference if stage.calib is None else None)
    # The row names the pass whose model was kept (auto mode may end with dynamic int8).
    name = "quantize-dynamic" if result.mode == "dynamic" else "quantize-int8"
    kept, verification = _stage_row(runs, name, result.is_quantized, result,
                                    (model, verification), validity)
    summary = {
        "quantized": result.is_quantized and not runs[-1].reverted,
        "calibration": _calibration_summary(result, options.int8),
        "budget": result.verification.reason or "held",
        "ort_cpu_kernels": _kernels_summary(result),
        "kernels": result.kernels,
        "layer_sqnr_db": result.layer_sqnr,
    }
    return kept, verification, summary


def sparsity_stage(model, verification, runs, options, feeds, validity, notes, say):
    """Run --sparsity on the exactly rewritten model: (model, verification, report summary);
    a pruned model short of `validity` is undone."""
    if not feeds and options.sparsity.calib is None:
        feeds = load_feeds(model, options, notes)  # magnitude pruning judges its budget on these
    stage = dataclasses.replace(options.sparsity, timed="cpu" in options.bench)
    result = sparsity_flow.sparsify(model, stage, notes, feeds=feeds, progress=say)
    name = "prune-channels" if options.sparsity.pattern == CHANNELS else "prune-weights"
    kept, verification = _stage_row(runs, name, result.is_pruned, result,
                                    (model, verification), validity)
    return kept, verification, result.summary


# bfloat16 Conv, Gemm's and most ops' bfloat16 types arrive in ONNX opset 22 (float16 has been
# there from the start): a bfloat16 model below it keeps those float32, so it is upgraded first.
BF16_OPSET = 22


def half_stage(model, verification, runs, options, feeds, reference, validity, notes, say):
    """Run --fp16/--bf16 on the exactly rewritten model: (model, verification, report
    summary); a half model short of `validity` is undone. `reference`: the original's outputs
    on `feeds` when verification has them."""
    stage = options.half
    base = model
    if stage.dtype == "bfloat16":
        base = _opset_at_least(model, BF16_OPSET, notes)
    if not options.verify:
        say(f"{stage.dtype} from the graph alone (--no-verify: unjudged)")
        result = half_flow.to_half_unjudged(base, stage, notes)
    else:
        if not feeds:
            feeds, reference = load_feeds(model, options, notes), None
        if reference is None:
            reference = verify_mod.reference_outputs(base, feeds)
        result = half_flow.to_half(base, stage, notes, feeds=feeds, reference=reference,
                                   progress=say)
    if result.is_half and result.judged_on in ("emulation", "none"):
        # ORT never ran the half model itself: load it on the CPU now, as the guard would. ORT
        # CPU has no bfloat16 kernels for most ops; such a model is held to the checker only.
        problem = validity.loads and validity_mod.load_problem(result.model)
        if problem:
            validity = dataclasses.replace(validity, loads=False)
            notes.append(f"ONNX Runtime's CPU provider cannot load this {stage.dtype} model "
                         f"({problem}); it is held to the ONNX checker only")
    elif result.judged_on != "cpu":  # the GPU session loaded it
        validity = dataclasses.replace(validity, loads=False)
    ops = {node.name: node.op_type for node in result.model.graph}
    kept, verification = _stage_row(runs, "to-half", result.is_half, result,
                                    (model, verification), validity)
    summary = {
        "dtype": stage.dtype,
        "target": stage.target,
        "converted": result.is_half and not runs[-1].reverted,
        "judged_on": result.judged_on,
        "budget": result.verification.reason or "held",
        "speed": result.speed,
        # "name": "OpType: why" (NameFixPass names unnamed nodes node_N: the op says more)
        "kept_float32": {name: f"{ops.get(name, '?')}: {why}"
                         for name, why in result.kept_float.items()},
        "casts": result.counts.get("casts", 0),
        "nodes_half": result.counts.get("converted", 0),
    }
    return kept, verification, summary


def _opset_at_least(model, target: int, notes: list[str]):
    opset = opset_version(model.graph)
    if opset >= target:
        return model
    try:
        upgraded = pipeline.upgrade_opset(model, target)
    except Exception as error:  # noqa: BLE001 (the converter's errors are its own types)
        notes.append(f"--bf16: opset {opset} could not be upgraded to {target} ({error}); "
                     "ops without bfloat16 types there stay float32")
        return model
    notes.append(f"--bf16: upgraded opset {opset} -> {target} with onnx's version converter "
                 "(bfloat16 Conv, Gemm and most ops need it)")
    return upgraded


def _stage_row(runs: list, name: str, is_kept: bool, result, before: tuple, validity):
    """A lossy stage's row in the report, and the (model, verification) that stands: the
    stage's when it kept its model and that model is valid, else `before`, the exact model with
    its own verification."""
    runs.append(pipeline.PassRun(name, modified=is_kept, reverted=not is_kept,
                                 reason=result.verification.reason, log=result.log,
                                 counts=result.counts))
    if not is_kept:
        return before
    return _undo_if_invalid(runs, validity, before, (result.model, result.verification))
