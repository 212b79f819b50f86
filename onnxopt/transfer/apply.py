"""`onnxopt transfer`: move trained weights from one exported model (SRC) into another (DST).

    model, report = onnxopt.transfer.transfer("trained.onnx", "new_export.onnx", "out.onnx")

Matching (onnxopt.transfer.match): --map, exact name, normalized name, then structure. When SRC
has BatchNormalization nodes that DST does not (DST folded them: a TorchScript export in eval
mode, an `onnxopt optimize` output), the match is repeated against a copy of SRC that the
fold-batchnorm pass folded, exactly (float64, cast once):
    W' = s W,   b' = s b + t,   s = scale / sqrt(var + epsilon),   t = B - mean s
and DST tensors found that way are reported with the rule `folded`. Of the two rounds, the one
matching more DST tensors decides; the other fills in what it left.

Every DST tensor keeps its name, dtype, shape and place (initializer or Constant node); only its
values change: copied, transposed (a Gemm transB=1 / Transpose->MatMul weight against a plain
MatMul one) or reshaped ([C] against [1, C, 1, 1]). New values are `ir.LazyTensor`s, so bytes
are produced when the model is saved.

Verification: when SRC and the result have the same inputs and outputs, both run on the same
inputs and every output is compared (onnxopt.measure.verify). It is expected to pass when every
DST weight was transferred; otherwise the errors are reported with the coverage only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import inputs, io
from onnxopt.errors import BadInputError
from onnxopt.measure import runtime
from onnxopt.measure import verify as verify_mod
from onnxopt.measure.verify import Tolerance, Verification
from onnxopt.passes import FoldBatchNormPass
from onnxopt.transfer import match as tm

__all__ = ["RULES", "SCHEMA", "Tensor", "TransferOptions", "TransferReport", "load_map",
           "log_lines", "rule_counts", "summary_lines", "transfer", "transfer_into"]

SCHEMA = "onnxopt.transfer/1"
RULES = {"auto": ("name", "normalized", "structure"), "name": ("name",),
         "normalized": ("name", "normalized"), "structure": ("structure",)}


@dataclasses.dataclass(frozen=True)
class TransferOptions:
    match: str = "auto"  # every rule: names where they agree, structure for the rest
    only: str | None = None  # regex on DST (or matched SRC) names: move a backbone only
    mapping: Mapping[str, str] = dataclasses.field(default_factory=dict)  # {dst: src}, wins
    verify: bool = True  # run SRC and the result on the same inputs when their I/O agree
    inputs: str | None = None  # .npz of real inputs; generated from SRC's declared shapes else
    shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    batches: int = 2  # generated batches: more than one, so one lucky input proves nothing
    seed: int = 0
    # Exporters order float sums differently, so not bitwise: the exact-rewrite bound of verify.
    tolerance: Tolerance = dataclasses.field(default_factory=Tolerance)


@dataclasses.dataclass
class Tensor:
    name: str
    shape: list[int]
    dtype: str
    src: str = ""  # transferred: where from ("c1.weight folded with BN 'bn1'" for folds)
    rule: str = ""  # map, name, normalized, structure, folded
    transform: str = ""  # transpose or reshape when the layouts differ
    reason: str = ""  # refused: why
    candidates: list[str] = dataclasses.field(default_factory=list)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass
class TransferReport:
    source: str
    destination: str
    output: str | None
    match: str = "auto"
    only: str | None = None
    transferred: list[Tensor] = dataclasses.field(default_factory=list)
    refused: list[Tensor] = dataclasses.field(default_factory=list)
    unmatched_dst: list[Tensor] = dataclasses.field(default_factory=list)
    unmatched_src: list[Tensor] = dataclasses.field(default_factory=list)
    outside_only: int = 0  # DST weights --only left out
    dst_weights: int = 0  # DST weights in scope (after --only)
    dst_params: int = 0
    is_same_signature: bool = False  # SRC and the result have the same inputs and outputs
    verification: Verification | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def transferred_params(self) -> int:
        return sum(t.params for t in self.transferred)

    @property
    def is_complete(self) -> bool:
        return bool(self.transferred) and len(self.transferred) == self.dst_weights

    @property
    def expects_same_outputs(self) -> bool:
        """Every weight moved into a graph with SRC's inputs and outputs: OUT must compute
        SRC's function, so a verification failure is a failed check, not a coverage figure."""
        return self.is_complete and self.is_same_signature and self.only is None

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for group in ("transferred", "refused", "unmatched_dst", "unmatched_src"):
            for row, tensor in zip(data[group], getattr(self, group)):
                row["params"] = tensor.params
        data["coverage"] = {"tensors": [len(self.transferred), self.dst_weights],
                            "params": [self.transferred_params, self.dst_params]}
        data["expects_same_outputs"] = self.expects_same_outputs
        return {"schema": SCHEMA, **data}


def load_map(path: str | os.PathLike) -> dict[str, str]:
    """--map: a JSON object {dst_tensor: src_tensor}."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(f"--map {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise BadInputError(f"--map {path}: not readable JSON ({error})") from None
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise BadInputError(f"--map {path}: expected a JSON object {{dst_tensor: src_tensor}}")
    return data


def transfer(src: str | os.PathLike | ir.Model, dst: str | os.PathLike | ir.Model,
             output: str | os.PathLike | None = None, options: TransferOptions | None = None
             ) -> tuple[ir.Model, TransferReport]:
    """Load both, transfer, verify, save `output` (nothing is written when `output` is None or
    when nothing matched); DST's file is never modified."""
    start = time.perf_counter()
    src_model = src if isinstance(src, ir.Model) else io.load(src)
    dst_model = dst if isinstance(dst, ir.Model) else io.load(dst)
    report = transfer_into(src_model, dst_model, options)
    report.source, report.destination = _label(src), _label(dst)
    report.output = str(output) if output is not None else None
    if output is not None:
        if not isinstance(src, ir.Model) and Path(output).resolve() == Path(src).resolve():
            raise BadInputError(f"{output}: output path is SRC; inputs are never modified, "
                                "choose another -o")
        source = None if isinstance(dst, ir.Model) else dst
        io.save(dst_model, output, source=source,
                is_external=bool(io.external_files(dst_model)))
    report.seconds = time.perf_counter() - start
    return dst_model, report


def _label(model) -> str:
    return "<in-memory model>" if isinstance(model, ir.Model) else str(model)


def transfer_into(src: ir.Model, dst: ir.Model, options: TransferOptions | None = None
                  ) -> TransferReport:
    """Write SRC's weights into `dst` (in place) and verify; raises BadInputError when nothing
    could be transferred (then `dst` is unchanged)."""
    options = options or TransferOptions()
    if options.match not in RULES:
        raise BadInputError(f"--match {options.match!r}: expected one of {', '.join(RULES)}")
    only = _compile(options.only)
    src_weights, dst_weights = tm.weights(src), tm.weights(dst)
    if not dst_weights:
        raise BadInputError("DST has no floating-point weights to transfer into")
    fixed = _validate_map(options.mapping, src_weights, dst_weights)
    chosen, refusals, sources, provenance = _decide(src, src_weights, dst_weights, fixed, options)
    report = TransferReport("", "", None, options.match, options.only)
    _fill(report, chosen, refusals, sources, provenance, src_weights, dst_weights, only)
    if not report.transferred:
        raise BadInputError(_nothing_matched(report))
    for tensor in report.transferred:
        _write(dst_weights[tensor.name], sources[tensor.name], tensor.transform)
    if options.verify:
        report.is_same_signature, report.verification = _verify(src, dst, options, report.notes)
    return report


def _compile(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise BadInputError(f"--only {pattern!r}: not a regular expression ({error})") from None


def _validate_map(mapping: Mapping[str, str], src: dict, dst: dict) -> dict[str, tm.Match]:
    fixed = {}
    for dst_name, src_name in mapping.items():
        if dst_name not in dst:
            raise BadInputError(f"--map: {dst_name!r} is not a weight of DST "
                                f"(e.g. {', '.join(repr(n) for n in list(dst)[:3])})")
        if src_name not in src:
            raise BadInputError(f"--map: {src_name!r} (for {dst_name!r}) is not a weight of SRC "
                                f"(e.g. {', '.join(repr(n) for n in list(src)[:3])})")
        why = tm.compatible(dst[dst_name], src[src_name], check_bn=False)
        if why:
            raise BadInputError(f"--map: {dst_name!r} <- {src_name!r}: {why}")
        fixed[dst_name] = tm.Match(src_name, "map")
    return fixed


def _decide(src: ir.Model, src_weights, dst_weights, fixed, options: TransferOptions):
    """Round 1 against SRC, round 2 against SRC with its BatchNormalizations folded (only when
    round 1 left DST tensors and SRC has any). Returns (matches, refusals, {dst: the SRC weight
    to read}, {folded SRC tensor: what it was folded from})."""
    rules = RULES[options.match]
    matches, refusals = tm.match(src_weights, dst_weights, rules=rules, fixed=fixed)
    rounds = [(matches, refusals, src_weights)]
    provenance: dict[str, tuple[str, list[str]]] = {}
    has_bn = any(node.op_type == "BatchNormalization" for node in src.graph)
    if has_bn and len(matches) < len(dst_weights):
        folded, provenance = _fold(src)
        folded_weights = tm.weights(folded)
        anchors = {d: m for d, m in matches.items()
                   if m.src in folded_weights and m.rule != "structure"}
        matches2, refusals2 = tm.match(folded_weights, dst_weights, rules=rules, fixed=anchors)
        for match in matches2.values():
            if match.src in provenance:
                match.rule = "folded"
        rounds.append((matches2, refusals2, folded_weights))
        rounds.sort(key=lambda r: -len(r[0]))  # stable: round 1 wins a tie
    chosen, sources, refused = {}, {}, {}
    for found, _, weights in rounds:
        for name, match in found.items():
            if name not in chosen:
                chosen[name], sources[name] = match, weights[match.src]
    for _, why, _ in reversed(rounds):
        refused.update({name: r for name, r in why.items() if name not in chosen})
    return chosen, refused, sources, provenance


def _fold(src: ir.Model) -> tuple[ir.Model, dict[str, tuple[str, list[str]]]]:
    """A copy of SRC (sharing its tensors) with its BatchNormalizations folded, and for every
    folded tensor: what it was folded from, and the SRC tensors it used. Constants are folded
    first (a dynamo export computes a bias-less Conv's zero bias at run time), except nodes that
    read a weight: those must keep SRC's tensors and names."""
    from onnxscript.optimizer import constant_folding  # a second to import: only when needed

    folded = src.clone()
    constant_folding.FoldConstantsPass(shape_inference=False, input_size_limit=1 << 16,
                                       output_size_limit=1 << 20, should_fold=_reads_no_weight)(folded)
    sites: dict[str, tuple[list[str], str, list[str]]] = {}
    for bn in (n for n in folded.graph if n.op_type == "BatchNormalization"):
        producer = bn.inputs[0].producer()
        nodes = [producer] if producer is not None else []
        if producer is not None and producer.op_type == "Add":  # MatMul + bias Add
            nodes += [v.producer() for v in producer.inputs if v is not None and v.producer()]
        params = [v.name for v in bn.inputs[1:] if v is not None]
        for node in nodes:
            if node.name:
                sites[node.name] = ([v.name if v is not None else "" for v in node.inputs],
                                    bn.name or "<unnamed BatchNormalization>", params)
    old = set(folded.graph.initializers)
    FoldBatchNormPass()(folded)
    provenance = {}
    for name, value in folded.graph.initializers.items():
        site = sites.get(value.uses()[0].node.name or "") if value.uses() else None
        if name in old or site is None:
            continue
        inputs_before, bn, params = site
        slot = value.uses()[0].idx
        was = inputs_before[slot] if slot < len(inputs_before) else ""
        used = [was, *params] if was in src.graph.initializers else params
        what = was if was in src.graph.initializers else "a zero bias"
        provenance[name] = (f"{what} folded with BatchNormalization {bn!r}", used)
    return folded, provenance


def _reads_no_weight(node: ir.Node) -> bool | None:
    """For the constant folder: never fold a node that reads a weight (Shape only reads dims)."""
    if node.op_type in ("Shape", "Size"):
        return None
    for value in node.inputs:
        tensor = value.const_value if value is not None and value.is_initializer() else None
        if tensor is not None and tensor.dtype.is_floating_point() and tensor.size > 1:
            return False
    return None


def _fill(report, chosen, refusals, sources, provenance, src_weights, dst_weights, only) -> None:
    used = set()
    for name, weight in dst_weights.items():
        match = chosen.get(name)
        in_scope = only is None or only.search(name) or (match and only.search(match.src))
        if not in_scope:
            report.outside_only += 1
            continue
        report.dst_weights += 1
        report.dst_params += weight.size
        row = Tensor(name, list(weight.shape), weight.dtype.name.lower())
        if match is None:
            refusal = refusals.get(name)
            if refusal is None:
                report.unmatched_dst.append(row)
            else:
                row.reason, row.candidates = refusal.reason, list(refusal.candidates)
                report.refused.append(row)
            continue
        row.src, row.rule = match.src, match.rule
        if match.src in provenance:
            row.src, folded_from = provenance[match.src]
            used.update(folded_from)
        row.transform = _transform(weight, sources[name])
        report.transferred.append(row)
        used.add(match.src)
    for name, weight in src_weights.items():
        if name not in used:
            report.unmatched_src.append(Tensor(name, list(weight.shape), weight.dtype.name.lower()))


def _transform(dst: tm.Weight, src: tm.Weight) -> str:
    if dst.role == src.role == "linear" and dst.is_transposed != src.is_transposed:
        return "transpose"
    return "reshape" if dst.shape != src.shape else ""


def _nothing_matched(report: TransferReport) -> str:
    where = f" under --only {report.only!r}" if report.only else ""
    if report.refused:
        first = report.refused[0]
        return (f"nothing to transfer{where}: all {len(report.refused)} candidate DST tensors "
                f"were refused (first: {first.name!r}: {first.reason}); nothing written")
    return (f"nothing to transfer{where}: none of DST's {report.dst_weights} weights matches a "
            "SRC weight by name or structure; check that SRC is the right model, or give --map")


def _write(weight: tm.Weight, source: tm.Weight, transform: str) -> None:
    tensor = _tensor_of(source)
    shape = weight.shape

    def produce() -> ir.TensorProtocol:
        array = tensor.numpy()
        if transform == "transpose":
            array = array.T
        return ir.tensor(np.ascontiguousarray(array.reshape(shape)), name=weight.name)

    lazy = ir.LazyTensor(produce, dtype=weight.dtype, shape=ir.Shape(shape), name=weight.name)
    if weight.node is None:
        weight.value.const_value = lazy
    else:
        weight.node.attributes["value"] = ir.AttrTensor("value", lazy)


def _tensor_of(weight: tm.Weight) -> ir.TensorProtocol:
    if weight.node is None:
        return weight.value.const_value
    return weight.node.attributes["value"].as_tensor()


def _verify(src: ir.Model, out: ir.Model, options: TransferOptions, notes: list[str]
            ) -> tuple[bool, Verification | None]:
    """(same inputs and outputs?, SRC vs OUT on the same inputs, when they are the same)."""
    src_inputs = {s.name: s.dtype for s in inputs.input_specs(src)}
    out_inputs = {s.name: s.dtype for s in inputs.input_specs(out)}
    src_outputs = [v.name for v in src.graph.outputs]
    if src_inputs != out_inputs or src_outputs != [v.name for v in out.graph.outputs]:
        notes.append("SRC and OUT differ in inputs or outputs: coverage only, no output check")
        return False, None
    if options.inputs:
        feeds = inputs.load_npz(options.inputs, src)
    else:
        feeds = inputs.generate(src, shapes=options.shapes, batches=options.batches,
                                seed=options.seed, warnings=notes)
    try:
        reference = verify_mod.reference_outputs(src, feeds)
    except runtime.RuntimeFailure as error:
        return True, Verification("skipped", reason=f"SRC: {error}")
    floor = verify_mod.NoiseFloor(src, reference, feeds)
    return True, verify_mod.verify(out, reference, feeds, options.tolerance, floor)


def log_lines(report: TransferReport) -> list[str]:
    """One line per transferred or refused tensor, for a pass's log."""
    lines = [f"{t.name!r} <- {t.src!r} ({t.rule}{', ' + t.transform if t.transform else ''})"
             for t in report.transferred]
    lines += [f"kept {t.name!r}: {t.reason}" for t in report.refused]
    return lines


def summary_lines(report: TransferReport) -> list[str]:
    """Coverage, then what the verification against SRC found."""
    lines = [(f"coverage: {len(report.transferred)} of {report.dst_weights} DST tensors, "
              f"{report.transferred_params:,} of {report.dst_params:,} parameters; "
              f"{len(report.refused)} refused, {len(report.unmatched_dst)} unmatched in DST, "
              f"{len(report.unmatched_src)} SRC tensors unused")]
    check = report.verification
    if check is None:
        lines.append("outputs vs SRC: not compared (" + (
            "different inputs or outputs" if not report.is_same_signature else "--no-verify") + ")")
    elif check.status == "skipped":
        lines.append(f"outputs vs SRC: skipped ({check.reason})")
    else:
        verdict = ("reproduces SRC" if check.passed else
                   "does NOT reproduce SRC" if report.expects_same_outputs else
                   "differs from SRC, as expected of a partial transfer")
        lines.append(f"outputs vs SRC on {check.batches} batches: {verdict}; worst "
                     f"{check.worst()}")
    return lines


def rule_counts(report: TransferReport) -> Counter:
    counts = Counter(f"by {t.rule}" for t in report.transferred)
    if report.refused:
        counts["refused"] = len(report.refused)
    return counts
