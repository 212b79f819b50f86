"""`--fp16` / `--bf16`: the float32 model in half precision where the data, the provider and the
accuracy budget allow it, float32 elsewhere, and never slower than float32 where that can be
measured.

  1. Decide (decide.py): nodes the target provider has no half kernel for, long sums, shape
     arithmetic, and (float16) tensors the float32 model drives past 65504 or below 2^-14 on
     the verification inputs stay float32; `--keep-float` adds names.
  2. Convert (passes/to_half.py) and judge against the float32 model's outputs on the same
     inputs: no NaN/Inf where float32 has none, every output within the budget (cosine >= 0.999
     unless `--max-error` says otherwise). Judged by running the half model on the target
     provider when this machine has it, else by emulation (emulate.py: float32 arithmetic,
     every half tensor rounded where the target would store it in half).
  3. Fall back: when the budget is missed, the nodes whose own rounding adds the most error
     (one emulated run, each node's output error against the float32 model's, minus the error
     already in its inputs) go back to float32, the worst 1, 2, 4, ... then a bisection to the
     fewest that hold. When nothing holds, the float32 model stays.
  4. On a CUDA machine: the half model's nodes that ONNX Runtime still runs on the CPU go back
     to float32, and half is kept only if it is not measurably slower than float32 there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from onnxopt import io
from onnxopt.calib.activations import iter_activations
from onnxopt.errors import BadInputError
from onnxopt.measure import placement, runtime, verify
from onnxopt.measure.budget import ONE_SESSION_BYTES, Budget, latency_ratio
from onnxopt.passes._graph import matching_node_names, opset_version
from onnxopt.passes.to_half import HALF_TYPES, ToHalfOptions, ToHalfPass, fill_dtypes, half_inputs
from onnxopt.precision import decide
from onnxopt.precision.emulate import emulated

__all__ = ["TARGETS", "HalfOptions", "HalfResult", "check_convertible", "to_half"]

TARGETS = ("ort-cuda", "ort-cpu", "tensorrt")
_PROVIDER = {"ort-cuda": "cuda", "tensorrt": "cuda", "ort-cpu": "cpu"}
_MAX_FALLBACK = 0.5  # past half the converted nodes back in float32, half has little left


@dataclasses.dataclass(frozen=True)
class HalfOptions:
    dtype: str = "float16"  # or bfloat16 (--bf16): float32's range, fewer mantissa bits
    target: str = "ort-cuda"  # what half is for: GPUs; ort-cpu is allowed and measured too
    keep_io_types: bool = True  # inputs and outputs stay float32: callers need not change
    # The half tolerance of `onnxopt validate`: every output's cosine with float32 >= 0.999.
    budget: Budget = dataclasses.field(default_factory=lambda: Budget(min_cosine=0.999))
    keep_float: str | None = None  # node names, comma-separated regular expressions
    # Half that runs slower than float32 on the target, where the target is here to time it,
    # is not kept; False keeps it anyway (--allow-slower).
    check_speed: bool = True


@dataclasses.dataclass
class HalfResult:
    model: ir.Model
    is_half: bool
    verification: verify.Verification
    kept_float: dict[str, str]  # node name -> why it stays float32
    judged_on: str  # "cuda", "cpu" or "emulation"
    speed: str  # what was measured about speed, or why nothing was
    log: list[str] = dataclasses.field(default_factory=list)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu_failure: str = ""  # why ORT CPU could not run the half model, when it was tried


def check_convertible(model: ir.Model, dtype: str, where: str) -> None:
    """A one-line error for a model with nothing to convert: already in half, or no float32
    weights and compute at all."""
    floats = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT]
    halves = [v for v in model.graph.initializers.values() if v.dtype in HALF_TYPES.values()]
    computes = any(node.outputs and node.outputs[0].dtype == ir.DataType.FLOAT
                   for node in model.graph)
    flag = "--fp16" if dtype == "float16" else "--bf16"
    if not floats and halves:
        raise BadInputError(f"{where}: {flag}: the model is already in half precision "
                            f"({len(halves)} half weights, no float32 ones)")
    if not floats and not computes:
        raise BadInputError(f"{where}: {flag}: the model has no float32 weights or compute "
                            "to convert")


def to_half(model: ir.Model, options: HalfOptions, notes: list[str], *, feeds: list,
            reference: list, progress: Callable[[str], None] = lambda _: None) -> HalfResult:
    """The flow of the module docstring on `model` (float32), judged on `feeds` against the
    float32 model's `reference` outputs."""
    model = _named(model)
    opset = opset_version(model.graph)
    inputs_of = functools.partial(half_inputs, opset=opset, dtype=options.dtype)
    progress(f"deciding which nodes stay float32 ({options.dtype})")
    reasons = decide.graph_reasons(model, options.dtype, options.target, inputs_of)
    ranges = decide.activation_ranges(model, feeds)
    reasons.update({k: v for k, v in decide.data_reasons(model, options.dtype, ranges,
                                                         inputs_of).items() if k not in reasons})
    for name in _user_kept(model, options.keep_float):
        reasons.setdefault(name, "--keep-float")
    trial = _Trial(model, options, feeds, reference)
    progress(f"converting to {options.dtype} and checking against float32")
    outcome = trial.run(reasons)
    if trial.ep != "cpu" and outcome.holds:  # what ORT still runs on the CPU goes back
        outcome = _placed(trial, outcome, reasons, feeds[0])
    if not outcome.holds and outcome.converted:
        progress("finding the nodes that break the budget")
        outcome = _fall_back(trial, outcome, reasons, notes)
    speed = _speed_note(trial, options)
    if outcome.holds and outcome.converted and options.check_speed and trial.ep != "emulation" \
            and trial.ep == _PROVIDER[options.target]:
        ratio, low, high = latency_ratio(model, outcome.model, feeds[0], ep=trial.ep)
        speed = (f"{options.dtype} / float32 latency on {trial.ep}: {ratio:.2f}x "
                 f"(95% CI {low:.2f}-{high:.2f})")
        if low > 1.0:
            notes.append(f"{options.dtype} ran slower than float32 on {trial.ep} ({speed}); "
                         "kept float32")
            hint = _larger_batch_hint(model, outcome.model, feeds[0], trial.ep, options.dtype)
            notes.extend([hint] if hint else [])
            return _float_kept(model, outcome, reasons, trial, speed, f"slower: {speed}")
    if not outcome.holds or not outcome.converted:
        why = outcome.why if outcome.converted else "no node could go to half"
        return _float_kept(model, outcome, reasons, trial, speed, why)
    return HalfResult(outcome.model, True, outcome.verification, outcome.kept, trial.judged_on,
                      speed, outcome.log, outcome.counts, trial.cpu_failure)


# Half pays where arithmetic dominates: on an H200, PP-OCR det in float16 is 1.04x slower than
# float32 (TF32) at batch 1 and 1.32x faster at batch 16. When the inputs judged had a small
# batch, the speed at this one is measured too, and said, so the user can declare their batch.
THROUGHPUT_BATCH = 16


def _larger_batch_hint(model: ir.Model, half: ir.Model, feeds: dict, ep: str,
                       dtype: str) -> str:
    """A note when half, slower at the judged batch, is faster at THROUGHPUT_BATCH."""
    batched = _at_batch(model, feeds, THROUGHPUT_BATCH)
    if batched is None:
        return ""
    ratio, low, high = latency_ratio(model, half, batched, ep=ep)
    if high >= 1.0:
        return ""
    name = next(iter(batched))
    return (f"{dtype} is {1 / ratio:.2f}x faster than float32 at batch {THROUGHPUT_BATCH} on "
            f"{ep} (95% CI {1 / high:.2f}-{1 / low:.2f}x): if you run batches, declare them "
            f"(--shape {name}:{THROUGHPUT_BATCH},... or --inputs of that batch) and "
            f"{dtype} is judged at that batch")


def _at_batch(model: ir.Model, feeds: dict, batch: int) -> dict | None:
    """`feeds` tiled along axis 0 to `batch`; None when an input fixes its first dim or the
    feeds are already that large."""
    tiled = {}
    for value in model.graph.inputs:
        if value.name not in feeds:
            continue
        array = np.asarray(feeds[value.name])
        dims = list(value.shape) if value.shape is not None else []
        if not dims or isinstance(dims[0], int) or array.ndim == 0 or array.shape[0] >= batch:
            return None
        repeats = -(-batch // max(1, array.shape[0]))
        tiled[value.name] = np.concatenate([array] * repeats, axis=0)[:batch]
    return tiled or None


def to_half_unjudged(model: ir.Model, options: HalfOptions, notes: list[str]) -> HalfResult:
    """--no-verify: half where the graph allows it (the provider's kernels, long sums, shape
    arithmetic, weights float16 can hold, --keep-float), with no inputs run: no activation
    ranges, no accuracy budget, no timing (only the validity guard may load the result in ONNX
    Runtime, and not a big model's: its memory stays bounded). The report says what was not
    checked."""
    model = _named(model)
    opset = opset_version(model.graph)
    inputs_of = functools.partial(half_inputs, opset=opset, dtype=options.dtype)
    reasons = decide.graph_reasons(model, options.dtype, options.target, inputs_of)
    for name in _user_kept(model, options.keep_float):
        reasons.setdefault(name, "--keep-float")
    half = model.clone()
    report = ToHalfPass(ToHalfOptions(options.dtype, frozenset(reasons),
                                      options.keep_io_types))(half)
    io.release_external(model)
    why = ("--no-verify: no inputs were run, so activations past the half range, the accuracy "
           "budget and the speed were not checked")
    notes.append(f"{options.dtype} {why}")
    converted = report.counts.get("converted", 0) > 0
    checked = verify.Verification("skipped", reason=why)
    return HalfResult(half if converted else model, converted, checked, reasons, "none",
                      "not measured (--no-verify)", list(report.log), dict(report.counts))


def _named(model: ir.Model) -> ir.Model:
    """A copy (sharing the weights) whose nodes all have names, since nodes are kept float32
    by name, and whose values all have element types, since that decides which compute in
    float32."""
    copy = model.clone()
    common.NameFixPass()(copy)
    fill_dtypes(copy)
    return copy


def _user_kept(model: ir.Model, patterns: str | None) -> list[str]:
    return [name for names in matching_node_names(model, patterns).values() for name in names]


@dataclasses.dataclass
class _Outcome:
    model: ir.Model
    verification: verify.Verification
    holds: bool
    why: str
    kept: dict[str, str]
    converted: int
    log: list[str]
    counts: dict[str, int]


class _Trial:
    """Half of a copy of the model with some nodes kept float32, judged on the feeds."""

    def __init__(self, model: ir.Model, options: HalfOptions, feeds: list, reference: list):
        self.model, self.options, self.feeds, self.reference = model, options, feeds, reference
        wanted = _PROVIDER[options.target]
        available = runtime.onnxruntime().get_available_providers()
        self.ep = wanted if runtime.PROVIDERS[wanted][0] in available else "cpu"
        # Without the target, the half model's numbers come from emulation, not ORT CPU: for
        # an op without a half kernel ORT CPU computes in float32 between Casts it inserts and
        # then merges, so a float16 overflow or cancellation that CUDA would show is hidden.
        self.emulate = self.ep != wanted
        self.cpu_failure = ""  # why ORT CPU could not run the half model, when it could not

    @property
    def judged_on(self) -> str:
        return "emulation" if self.emulate else self.ep

    def convert(self, kept: dict[str, str]) -> tuple[ir.Model, object]:
        copy = self.model.clone()
        report = ToHalfPass(ToHalfOptions(self.options.dtype, frozenset(kept),
                                          self.options.keep_io_types))(copy)
        io.release_external(self.model)  # the float32 weights it read: unmapped again
        if io.weight_bytes(self.model) > ONE_SESSION_BYTES:
            # The half weights to a file: every session reads them from there (a hard link,
            # not 1.2 GB serialized per session of a 2.4 GB model), and they leave memory.
            io.spill(copy)
            runtime.release_memory()
        return copy, report

    def run(self, kept: dict[str, str]) -> _Outcome:
        half, report = self.convert(kept)
        checked = self._verify(half)
        holds, why = (self.options.budget.holds(checked.outputs) if checked.outputs
                      else (False, checked.reason))
        checked.status, checked.reason = ("passed" if holds else "failed"), why
        return _Outcome(half, checked, holds, why, dict(kept), report.counts.get("converted", 0),
                        list(report.log), dict(report.counts))

    def _verify(self, half: ir.Model) -> verify.Verification:
        tolerance = verify.Tolerance(elementwise=False)
        if not self.emulate:
            checked = verify.verify(half, self.reference, self.feeds, tolerance, ep=self.ep)
            if checked.outputs or self.ep != "cpu":
                return checked
            self.emulate, self.cpu_failure = True, checked.reason  # ORT CPU lacks a kernel
        return verify.verify(emulated(half), self.reference, self.feeds, tolerance)


def _placed(trial: _Trial, outcome: _Outcome, reasons: dict[str, str], feeds) -> _Outcome:
    """Half nodes ONNX Runtime ran on the CPU in the GPU session go back to float32 (a half
    node on the CPU costs two copies and a slow kernel), and the model is judged again. Shape
    arithmetic on the CPU is ORT's normal placement and stays where it is."""
    with runtime.model_file(outcome.model) as source:
        placed = placement.node_placement(source, feeds, ep=trial.ep)
    fell = set(placed.cpu_nodes)
    half_nodes = [node for node in outcome.model.graph if node.name in fell and any(
        v.dtype in HALF_TYPES.values() for v in (*node.inputs, *node.outputs) if v is not None)]
    if not half_nodes:
        return outcome
    kept = dict(reasons)
    for node in half_nodes:
        kept.setdefault(node.name, f"ONNX Runtime ran it on the CPU in {trial.options.dtype}")
    again = trial.run(kept)
    return again if again.holds else outcome


def _fall_back(trial: _Trial, full: _Outcome, reasons: dict[str, str],
               notes: list[str]) -> _Outcome:
    """The worst culprits (by the error their own rounding adds, each with the upstream nodes
    whose rounding it amplifies) back to float32: 1, 2, 4, ... until the budget holds, then a
    bisection to the fewest."""
    try:
        groups = _culprits(trial, full)
    except runtime.RuntimeFailure as error:  # the emulation would not run: nothing to rank by
        notes.append(f"{trial.options.dtype}: no fallback search ({error})")
        return full
    if not groups:
        return full

    def kept(count: int) -> dict[str, str]:
        names = [name for group in groups[:count] for name in group]
        return {**reasons, **{name: "accuracy budget" for name in names}}

    limit = max(1, int(len(groups) * _MAX_FALLBACK))
    missed, count = 0, 1
    while True:
        count = min(count, limit)
        outcome = trial.run(kept(count))
        if outcome.holds:
            break
        if count >= limit:
            notes.append(f"{trial.options.dtype}: the budget was missed ({full.why}) even with "
                         f"the {count} worst of {len(groups)} culprits back in float32")
            return full
        missed, count = count, count * 2
    while count - missed > 1:
        middle = (missed + count) // 2
        candidate = trial.run(kept(middle))
        if candidate.holds:
            count, outcome = middle, candidate
        else:
            missed = middle
    names = [name for group in groups[:count] for name in group]
    notes.append(f"kept float32 to hold the accuracy budget ({full.why} with all in "
                 f"{trial.options.dtype}): " + ", ".join(repr(n) for n in names))
    return outcome


def _culprits(trial: _Trial, full: _Outcome) -> list[list[str]]:
    """Groups of converted nodes, worst first. Each value is compared with float32 as the half
    model stores it (rounded), on one batch. A node's blame is its output's relative error
    minus the largest relative error among its inputs: what its own rounding adds. Its group
    adds the converted producers whose absolute error carries at least half of its own: a
    cancellation (x + 3000 - 3000) shows its error at the subtraction, but the rounding that
    caused it was upstream, and only float32 there removes it."""
    rounded: dict[str, str] = {}
    half = emulated(full.model, rounded)
    graph = trial.model.graph
    converted = {n.name: n for n in graph if n.name not in full.kept and n.outputs
                 and n.outputs[0].name in rounded}
    names = sorted({v.name for n in converted.values() for v in (*n.inputs, *n.outputs)
                    if v is not None and v.name in rounded})
    exact = next(iter_activations(trial.model, trial.feeds[:1], names))
    stored = next(iter_activations(half, trial.feeds[:1], [rounded[n] for n in names]))
    absolute, relative = {}, {}
    for name in names:
        a = np.asarray(exact[name], dtype=np.float64)
        b = np.asarray(stored[rounded[name]], dtype=np.float64)
        finite = np.isfinite(a)
        if not np.all(np.isfinite(b[finite])):
            absolute[name] = relative[name] = np.inf
            continue
        absolute[name] = float(np.linalg.norm(a[finite] - b[finite]))
        norm = float(np.linalg.norm(a[finite]))
        relative[name] = absolute[name] / norm if norm > 0 else 0.0
    blame = {}
    for name, node in converted.items():
        own = relative[node.outputs[0].name]
        inherited = max((relative.get(v.name, 0.0) for v in node.inputs if v is not None),
                        default=0.0)
        blame[name] = own if inherited == np.inf else own - inherited
    groups, taken = [], set()
    for name in sorted(blame, key=lambda n: -blame[n]):
        if name in taken:
            continue
        group = _upstream(converted[name], converted, absolute)
        group = [n for n in group if n not in taken]
        taken.update(group)
        groups.append(group)
    return groups


def _upstream(node: ir.Node, converted: dict[str, ir.Node], absolute: dict[str, float],
              most: int = 8) -> list[str]:
    """`node` and the converted producers upstream whose output's absolute error is at least
    half of what they feed into (the error came from there, not from the node itself)."""
    group, frontier = [node.name], [node]
    while frontier and len(group) < most:
        current = frontier.pop()
        carried = absolute.get(current.outputs[0].name, 0.0)
        for value in current.inputs:
            producer = value.producer() if value is not None else None
            if producer is None or producer.name not in converted or producer.name in group:
                continue
            if carried > 0 and absolute.get(value.name, 0.0) >= 0.5 * carried:
                group.append(producer.name)
                frontier.append(producer)
    return group


def _speed_note(trial: _Trial, options: HalfOptions) -> str:
    wanted = _PROVIDER[options.target]
    if trial.ep == wanted:
        return "" if options.check_speed else "not measured (--allow-slower)"
    return (f"not measured: this ONNX Runtime has no {runtime.PROVIDERS[wanted][0]}; accuracy "
            f"judged {'by emulation' if trial.emulate else 'on ORT CPU'}")


def _float_kept(model: ir.Model, outcome: _Outcome, reasons: dict[str, str], trial: _Trial,
                speed: str, why: str) -> HalfResult:
    verification = dataclasses.replace(outcome.verification, status="failed", reason=why)
    return HalfResult(model, False, verification, reasons, trial.judged_on, speed,
                      outcome.log, outcome.counts, trial.cpu_failure)
