"""quantize-int8: static QDQ int8 that ONNX Runtime's CPU provider fuses into integer kernels
(target ort-cpu, below), or the placement TensorRT expects (target tensorrt, `_plan_tensorrt`).

Per quantized op (formulas in `_qdq`):
  * Conv / Gemm / MatMul with a constant weight: W → int8 initializer + DequantizeLinear,
    symmetric per output channel (Conv axis 0; Gemm transB=1 axis 0, transB=0 axis 1; MatMul
    [K, N] axis 1), s_c = max|W_c| / 127 (63 with reduce_range; `clip_weights` mse/percentile
    picks a smaller range per channel); bias (Conv B, Gemm C of
    shape [N]) → int32 with s_b[c] = s_input · s_c, raised s_c where |b| / s_b would overflow.
  * every activation input and the output: one QuantizeLinear → DequantizeLinear pair (uint8,
    s = (max - min) / 255 over the calibrated range widened to include 0), shared by all
    consumers. ORT turns DQ → op → Q into QLinearConv, QGemm, QLinearMatMul, QLinearAdd,
    QLinearConcat, QLinear(Global)AveragePool, QLinearLeakyRelu, and QLinearSigmoid and
    QLinearMul: a SiLU (x · sigmoid(x), every activation of YOLO and EfficientNet) then stays
    in uint8 between its Convs instead of a DequantizeLinear and a QuantizeLinear around each
    Sigmoid and Mul.
  * a Relu / Clip(min 0) that is the sole consumer of a Conv/Gemm/MatMul/Add output takes the
    output pair instead (its range starts at 0, so zero point 0 and the uint8 clamp is the Relu;
    ORT removes it and fuses).
  * MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze: the output reuses the input's
    scale and zero point, so ORT drops the pair and moves uint8 data.
Refused (logged, graph unchanged there): 1. a node named in `exclude`; 2. a weight or bias that
is not a constant (graph input or computed); 3. a data input or output with no calibrated range
(Conv/Gemm/MatMul keep a float output instead); 4. float tensors other than float32;
5. opset < 13 (per-channel DequantizeLinear needs `axis`). Main graph only: calibration cannot
see into If/Loop/Scan bodies, so `--int8` gives them quantize-dynamic (`graphs="subgraphs"`).
ConvTranspose stays float, with that reason logged: ORT's CPU provider has no integer kernel
for it. Not covered yet: function bodies, MatMul of two activations, Resize, Mul by a
constant, HardSigmoid/HardSwish (ORT's CPU provider has no integer kernel for them), Gemm C
not of shape [N] (kept float, so ORT leaves that Gemm float); a Conv whose output only leaves
the graph gets no output pair, so ORT keeps it a float Conv (graph outputs stay float).
Embedding tables (Gather of a constant [V, D], >= 64k elements) become int8 per row (`_gather`).
Ops already reading a DequantizeLinear are skipped, so a second run changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes import _gather, _qdq
from onnxopt.passes._graph import (
    NameSource,
    constant,
    describe,
    new_initializer,
    new_switch,
    opset_version,
    select,
)
from onnxopt.passes._qdq import cpu_needs_reduce_range, optimized_kernel_counts, ort_kernel_counts
from onnxopt.passes._report import PassReport

from onnxopt import io

__all__ = [
    "CONV_TRANSPOSE_FLOAT",
    "QuantizeInt8Options",
    "QuantizeInt8Pass",
    "cpu_needs_reduce_range",
    "optimized_kernel_counts",
    "ort_kernel_counts",
    "quantizable_tensors",
    "with_switches",
]

logger = logging.getLogger(__name__)

# op -> indices of its data inputs (None: all of them); what ORT's QDQ selectors fuse.
_LINEAR = {"Conv": (0,), "Gemm": (0,), "MatMul": (0,)}
# Sigmoid, Mul, LeakyRelu: measured fused by ORT 1.32 (QLinearSigmoid, QLinearMul,
# QLinearLeakyRelu); Tanh, Elu and HardSigmoid are not (they would only add a Q/DQ pair).
_OWN_SCALE = {"Add": (0, 1), "Concat": None, "GlobalAveragePool": (0,), "AveragePool": (0,),
              "Sigmoid": (0,), "Mul": (0, 1), "LeakyRelu": (0,)}
_SHARED_SCALE = {op: (0,) for op in
                 ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")}
_DATA_INPUTS = {**_LINEAR, **_OWN_SCALE, **_SHARED_SCALE}
_RELU_FUSES_AFTER = ("Conv", "Gemm", "MatMul", "Add")
# Measured with ORT 1.32: DQ -> ConvTranspose -> Q stays a float ConvTranspose behind a
# DequantizeLinear of its weight on every run, so int8 would only add work there.
CONV_TRANSPOSE_FLOAT = ("ONNX Runtime's CPU provider has no integer ConvTranspose kernel (a "
                        "QDQ ConvTranspose runs as float after dequantizing its weight)")


@dataclasses.dataclass(frozen=True)
class QuantizeInt8Options:
    # Activation ranges from calibration: tensor name -> (min, max). A tensor without a range
    # stays float (its consumers are not quantized on that input).
    ranges: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    per_channel: bool = True  # per-tensor int8 loses ~10x SQNR on BN-folded convs
    reduce_range: bool = False  # 7-bit weights for x86 CPUs without VNNI (VPMADDUBSW saturation)
    exclude: tuple[str, ...] = ()  # node names to keep float (the accuracy budget's fallback list)
    clip_weights: str = "max"  # per-channel weight range: max, mse or percentile (_qdq.weight_scale)
    # ort-cpu: the QDQ patterns ORT's CPU provider fuses (above). tensorrt: QDQ only at the
    # inputs of Conv/Gemm/MatMul and on a residual Add's other input, symmetric int8
    # activations, float bias: the placement TensorRT's explicit-quantization fusions expect.
    target: str = "ort-cpu"
    # Element types of the graph's values (infer_dtypes), when the caller already has them: the
    # accuracy budget's sensitivity pass quantizes the same model once per layer, and type
    # inference is a third of each run.
    dtypes: Mapping[str, ir.DataType] | None = None


@dataclasses.dataclass
class _Site:
    node: ir.Node
    inputs: list[ir.Value]  # activations that get a Q/DQ pair before the node
    output: ir.Value | None  # the tensor whose pair is the node's output (maybe a Relu's output)


class QuantizeInt8Pass(ir.passes.InPlacePass):
    """Static int8 QDQ (uint8 activations, per-channel int8 weights) for ONNX Runtime CPU."""

    name = "quantize-int8"
    lossy = True
    min_opset = 13  # per-channel DequantizeLinear needs axis (opset 13)

    def __init__(self, options: QuantizeInt8Options | None = None):
        super().__init__()
        self.options = options or QuantizeInt8Options()

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        graph, ranges = model.graph, self.options.ranges
        if opset_version(graph) < self.min_opset:
            report.refuse(f"kept the model float: opset {opset_version(graph)} < 13 has no "
                          "per-channel DequantizeLinear; upgrade the opset first")
            return report
        tensorrt = self.options.target == "tensorrt"
        plan = _plan_tensorrt if tensorrt else _plan
        dtypes = self.options.dtypes if self.options.dtypes is not None else \
            _qdq.infer_dtypes(model)
        sites, refusals = plan(graph, dtypes, lambda v: v.name in ranges,
                               set(self.options.exclude))
        for line in refusals:
            report.refuse(line)
        qparams = _qdq.symmetric_qparams if tensorrt else _qdq.activation_qparams
        params: dict[ir.Value, tuple] = {}
        for site in sites:  # topological order: a shared-scale input is set before its output
            for value in site.inputs:
                if value not in params:
                    params[value] = qparams(*ranges[value.name])
            if site.output is not None and site.node.op_type in _SHARED_SCALE:
                params[site.output] = params[site.inputs[0]]
            elif site.output is not None and site.output not in params:
                params[site.output] = qparams(*ranges[site.output.name])
        names, weights = NameSource(graph), {}
        weight_options = _qdq.WeightOptions(self.options.per_channel, self.options.reduce_range,
                                            self.options.clip_weights, int32_bias=not tensorrt)
        activation = "int8 symmetric" if tensorrt else "uint8"
        for site in sites:
            detail = ""
            if site.node.op_type in _LINEAR and constant(site.node.inputs[1]) is not None:
                input_scale = params[site.node.inputs[0]][0]
                weight = site.node.inputs[1].const_value
                detail = _qdq.quantize_weights(graph, names, site.node, input_scale, weights,
                                               weight_options) + ", "
                io.release_tensor(weight)  # one float weight resident at a time
            what = ("input/output" if site.output is not None else
                    "inputs" if tensorrt else "input (output stays float)")
            report.change("quantized",
                          f"quantized {describe(site.node)}: {detail}{what} {activation}")
        for value, (scale, zero_point) in params.items():
            _qdq.insert_qdq(graph, names, value, scale, zero_point)
        _gather.quantize_tables(graph, names, self.options.exclude, report)
        if report.modified:
            common.RemoveUnusedNodesPass()(model)  # the float weights the int8 ones replaced
        return report


def _plan(graph: ir.Graph, dtypes, has_range, exclude) -> tuple[list[_Site], list[str]]:
    sites, refusals, planned = [], [], set()
    for node in graph:
        site = _site(node, dtypes, lambda v: v in planned or has_range(v), exclude)
        if isinstance(site, str):
            refusals.append(f"kept {describe(node)}: {site}")
        elif site is not None:
            sites.append(site)
            planned.update(v for v in [*site.inputs, site.output] if v is not None)
    return sites, refusals


def _site(node: ir.Node, dtypes, has_range, exclude) -> _Site | str | None:
    """The node's quantization plan, the reason it stays float, or None if it is no candidate."""
    if node.op_type == "ConvTranspose" and node.domain in ("", "ai.onnx"):
        return CONV_TRANSPOSE_FLOAT
    if node.op_type not in _DATA_INPUTS or node.domain not in ("", "ai.onnx"):
        return None
    indices = _DATA_INPUTS[node.op_type] or range(len(node.inputs))
    inputs = [node.inputs[i] for i in indices if i < len(node.inputs)]
    if any(v is None or constant(v) is not None or v.is_initializer() for v in inputs):
        return None  # Add of a constant, Concat with a constant: not a tensor pair ORT fuses
    if any(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
           for v in node.inputs if v is not None):
        return None  # already quantized
    if node.op_type == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].uses():
        return None  # MaxPool with Indices has no uint8 kernel
    if node.name in exclude:
        return "excluded (kept float on request)"
    why = (_dtype_refusal(inputs, dtypes)
           or (_check_linear(node) if node.op_type in _LINEAR else None)
           or _range_refusal(inputs, has_range))
    if why:
        return why
    output = _output_tensor(node, exclude)
    if output is not None and node.op_type not in _SHARED_SCALE and not has_range(output):
        if node.op_type not in _LINEAR:
            return f"output {output.name!r} has no calibrated range"
        output = None
    if output is None and node.op_type not in _LINEAR:
        return "its output is only a graph output; a lone uint8 input gains nothing"
    return _Site(node, inputs, output)


def _plan_tensorrt(graph: ir.Graph, dtypes, has_range, exclude) -> tuple[list[_Site], list[str]]:
    """TensorRT: a Q/DQ pair on the data inputs of Conv/Gemm/MatMul (a MatMul of two
    activations gets both), none on outputs: TensorRT fuses Conv+bias+Relu behind one input
    pair and propagates scales itself. A residual Add joining a Conv(+activation) branch gets a
    pair on its other (skip) input only, so TensorRT can fuse the Add into that Conv."""
    sites, refusals = [], []
    for node in graph:
        if node.op_type == "ConvTranspose" and node.domain in ("", "ai.onnx"):
            refusals.append(f"kept {describe(node)}: ConvTranspose is not quantized for "
                            "TensorRT yet")
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in (*_LINEAR, "Add"):
            continue
        if any(v is not None and v.producer() is not None
               and v.producer().op_type == "DequantizeLinear" for v in node.inputs):
            continue  # already quantized
        activations = [v for v in node.inputs[:2]
                       if v is not None and constant(v) is None and not v.is_initializer()]
        if node.op_type == "Add":
            if len(activations) != 2:
                continue  # an Add of a constant is a bias: TensorRT fuses it as float
            fused = [_fusable_branch(v) for v in activations]
            if not any(_from_linear(v) for v in activations):
                continue  # not a residual join of a Conv/Gemm/MatMul branch
            activations = [v for v, f in zip(activations, fused) if not f] or activations[1:]
        elif node.op_type == "MatMul" and len(activations) == 2:
            pass  # activation x activation (attention): both inputs get a pair
        else:
            why = _check_linear(node)
            if why:
                refusals.append(f"kept {describe(node)}: {why}")
                continue
            activations = activations[:1]
        why = ("excluded (kept float on request)" if node.name in exclude else
               _dtype_refusal(activations, dtypes) or _range_refusal(activations, has_range))
        if why:
            refusals.append(f"kept {describe(node)}: {why}")
        else:
            sites.append(_Site(node, activations, None))
    return sites, refusals


_POINTWISE_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish",
                          "Tanh", "Elu", "Selu", "Softplus")


def _from_linear(value: ir.Value) -> bool:
    """`value` is a Conv/Gemm/MatMul output, maybe through one pointwise activation."""
    producer = value.producer()
    if producer is not None and producer.op_type in _POINTWISE_ACTIVATIONS:
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer is not None and producer.op_type in _LINEAR


def _fusable_branch(value: ir.Value) -> bool:
    """A Conv(+activation) output read only by this Add: TensorRT fuses the Add into it."""
    return _from_linear(value) and len(value.uses()) == 1


def _dtype_refusal(inputs, dtypes) -> str | None:
    for value in inputs:
        dtype = dtypes.get(value.name)
        if dtype is not None and dtype != ir.DataType.FLOAT:
            return f"input {value.name!r} is {dtype.name}, not FLOAT"
    return None


def _range_refusal(inputs, has_range) -> str | None:
    for value in inputs:
        if not has_range(value):
            return f"input {value.name!r} has no calibrated range"
    return None


def _check_linear(node: ir.Node) -> str | None:
    weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        name = node.inputs[1].name if len(node.inputs) > 1 and node.inputs[1] else "<missing>"
        return f"weight {name!r} is not a constant (a graph input or computed)"
    if weight.dtype != np.float32:
        return f"weight {node.inputs[1].name!r} is {weight.dtype}, not float32"
    if node.op_type == "MatMul" and weight.ndim != 2:
        return f"weight {node.inputs[1].name!r} is {weight.ndim}-D, not 2-D"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant(node.inputs[2])
        if bias is None or bias.dtype != np.float32:
            return f"bias {node.inputs[2].name!r} is not a float32 constant"
    return None


def _output_tensor(node: ir.Node, exclude) -> ir.Value | None:
    """Where the output pair goes: after a sole Relu/Clip(0) consumer when ORT absorbs it;
    None when the output only leaves the graph (a pair there would feed nothing)."""
    output = node.outputs[0]
    consumers = output.consumers()
    if (node.op_type in _RELU_FUSES_AFTER and len(output.uses()) == 1
            and not output.is_graph_output() and _qdq.is_zero_floor_activation(consumers[0])
            and consumers[0].name not in exclude):
        output = consumers[0].outputs[0]
    return output if output.uses() else None


def with_switches(model: ir.Model, options: QuantizeInt8Options,
                  layers: Sequence[str]) -> tuple[ir.Model, dict[str, str]]:
    """The accuracy budget's sensitivity ranking in one model: `model` quantized by the pass
    with `options`, plus a boolean graph input (a switch) per layer of `layers` that, fed
    False (one switch at a time), gives what the pass makes with that layer added to
    `exclude`: its weight, bias or embedding table float again, and each activation pair that
    only it planned gone for every reader (the pass shares a pair among a tensor's consumers).
    Where leaving a layer out turns later layers down too (a MaxPool's output reuses its
    input's scale and has no range of its own: without the MaxPool, the Conv after it is not
    quantized), its switch turns those off with it. Nothing is switched in a model with
    If/Loop/Scan bodies. Returns (model, layer -> switch input name): one session then runs
    every layer's case, where a rewrite and a session per layer cost several times the run."""
    work = model.clone()
    graph = work.graph
    if len(list(work.graphs())) > 1:
        return work, {}
    dtypes = options.dtypes if options.dtypes is not None else _qdq.infer_dtypes(work)
    plan = _plan_tensorrt if options.target == "tensorrt" else _plan
    has_range = lambda v: v.name in options.ranges
    sites, _ = plan(graph, dtypes, has_range, set(options.exclude))
    off = _sites_off(sites, layers, lambda name: plan(
        graph, dtypes, has_range, {*options.exclude, name})[0], has_range)
    turned_off = {name for names in off.values() for name in names}
    constants = {s.node.name: (s.node, {i: (v, constant(v)) for i, v in enumerate(s.node.inputs)
                                        if i > 0 and constant(v) is not None})
                 for s in sites if s.node.name in turned_off}
    planners: dict[str, set[str]] = {}
    for site in sites:
        for value in (*site.inputs, site.output):
            if value is not None:
                planners.setdefault(value.name, set()).add(site.node.name)
    lookups = set(layers) - set(options.exclude)
    tables = {n.name: (n.inputs[1], constant(n.inputs[0]), n.outputs[0].name) for n in graph
              if n.name in lookups
              and _gather.gather_refusal(n) is None and not n.outputs[0].is_graph_output()}
    before = set(graph)  # the nodes the pass found (it adds the Q/DQ and lookups)
    QuantizeInt8Pass(options)(work)
    names = NameSource(graph)
    switches = {layer: new_switch(graph, names, f"{layer}_int8_on") for layer in layers
                if layer in off or layer in tables}
    conditions: dict[frozenset, ir.Value] = {}

    def condition(layers_off: frozenset) -> ir.Value:
        """True unless the switch of one of `layers_off` is False: an And of their switches."""
        if layers_off not in conditions:
            values = [switches[layer] for layer in sorted(layers_off)]
            while len(values) > 1:
                both = ir.node("And", values[:2], name=names("int8_switch_and"))
                both.outputs[0].name = names("int8_switch_and_output")
                graph.insert_before(next(iter(graph)), both)
                values = [both.outputs[0], *values[2:]]
            conditions[layers_off] = values[0]
        return conditions[layers_off]

    def choose(layers_off: frozenset, quantized: ir.Value, exact: ir.Value, after: ir.Node,
               readers: list) -> None:
        select(graph, names, condition(layers_off), quantized, exact, readers, after)

    for site_name, (node, originals) in constants.items():
        layers_off = frozenset(layer for layer, sites_off in off.items() if site_name in sites_off)
        for index, (value, array) in originals.items():
            quantized = node.inputs[index]
            if quantized is not value:  # the pass put a DequantizeLinear there
                exact = new_initializer(graph, names, f"{value.name or 'weight'}_float", array)
                choose(layers_off, quantized, exact, quantized.producer(),
                       [u for u in quantized.uses() if u.node is node and u.idx == index])
    current = {v.name: v for v in graph.inputs} | {v.name: v for n in graph for v in n.outputs}
    for name, planned_by in planners.items():
        layers_off = frozenset(layer for layer, sites_off in off.items()
                               if planned_by <= sites_off)
        value = current.get(name)
        dq = _added_pair(value, before) if layers_off and value is not None else None
        if dq is not None:  # a pair that only layers these switches turn off planned
            choose(layers_off, dq.outputs[0], value, dq, list(dq.outputs[0].uses()))
    for layer, (ids, table, output) in tables.items():
        lookup = current.get(output)
        if lookup is None or lookup.producer() in before:
            continue  # not rewritten
        exact = ir.node("Gather", [new_initializer(graph, names, f"{layer}_table_float", table),
                                   ids], {"axis": 0}, name=names(f"{layer}_float"))
        graph.insert_after(lookup.producer(), exact)
        readers = [u for u in lookup.uses() if u.node is not exact]
        choose(frozenset([layer]), lookup, exact.outputs[0], exact, readers)
    return work, {layer: value.name for layer, value in switches.items()}


def _added_pair(value: ir.Value, before: set) -> ir.Node | None:
    """The DequantizeLinear of the pair the pass put after `value` (not one already there)."""
    return next((dq for q in value.consumers() if q not in before
                 and q.op_type == "QuantizeLinear" for dq in q.outputs[0].consumers()
                 if dq.op_type == "DequantizeLinear"), None)


def _sites_off(sites: list[_Site], layers: Sequence[str], replan, has_range) -> dict[str, set]:
    """Per layer of `layers` that is a site: the sites that are gone when it is excluded
    (itself, and later ones that needed a tensor only it planned). A layer whose exclusion
    changes more than which sites there are is left out."""
    names = [s.node.name for s in sites]
    off = {}
    for site in sites:
        layer = site.node.name
        if layer not in layers:
            continue
        if all(has_range(v) for v in (*site.inputs, site.output) if v is not None):
            off[layer] = {layer}  # a tensor with a range never needs a planner's help
            continue
        replanned = replan(layer)
        kept = {s.node.name for s in replanned}
        if [(s.node, s.inputs, s.output) for s in replanned] == [
                (s.node, s.inputs, s.output) for s in sites if s.node.name in kept]:
            off[layer] = {name for name in names if name not in kept}
    return off


def quantizable_tensors(model: ir.Model, target: str = "ort-cpu") -> list[str]:
    """Names of the activation tensors whose ranges the pass would use (inputs and outputs of
    the ops it quantizes), so the caller calibrates exactly those."""
    if opset_version(model.graph) < QuantizeInt8Pass.min_opset:
        return []
    plan = _plan_tensorrt if target == "tensorrt" else _plan
    sites, _ = plan(model.graph, _qdq.infer_dtypes(model), lambda v: True, set())
    shared = {s.output for s in sites if s.node.op_type in _SHARED_SCALE}  # reuse their input's
    values = [v for site in sites for v in [*site.inputs, site.output] if v is not None]
    return list(dict.fromkeys(v.name for v in values if v not in shared))

