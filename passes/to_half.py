"""`to-half`: float32 compute and weights to float16 or bfloat16, Casts only at the borders.

A node goes to half when its op's schema admits the half type for the constraint that types its
first output (Conv's T, Attention's T1, ...): every input and output of that constraint switches
together, other inputs keep their types (Resize's scales, Pad's pads, a Cast's target). Nodes the
options name, nodes of other domains, nodes with subgraphs and Range stay float32.

    weights   w_half = half(w)           one rounding, from the float32 weight
    borders   float32 -> half: one Cast per value, shared by all half consumers
              half -> float32: one Cast per value, shared by all float32 consumers
A value that is Cast back to float32 and needed in half again is read in half directly, so no
Cast pair that cancels is ever written; a Cast that became half-to-half is removed. Model inputs
and outputs keep float32 (`keep_io_types`): a Cast after each input, one before each output, the
output keeping its name. Refused, with a log line, and left float32: a node whose float32 weight
leaves the half range (|w| > 65504 for float16) or whose small values would be lost in it
(|w - half(w)| > 0.05 |w|, where plain rounding costs about 2.4e-4).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnxopt.passes._graph import (
    NameSource,
    constant_tensor,
    float32_blocks,
    new_initializer,
    new_lazy_initializer,
    opset_version,
)
from onnxopt.passes._qdq import infer_dtypes
from onnxopt.passes._report import PassReport

__all__ = ["FP16_MAX", "HALF_TYPES", "ToHalfOptions", "ToHalfPass", "computes_float32", "fill_dtypes",
           "half_inputs"]

HALF_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
_LOST_SHARE = 0.05  # a weight float16 moves by more than this share of its norm stays float32
_BLOCK = 1 << 20  # elements of a weight checked at a time (4 MB of float32)
# Always float32: Range's output is an index sequence whose step must stay exact.
_ALWAYS_FLOAT = {"Range"}
# Any precision in, the `to` attribute decides the output: no Cast needed before them.
_CASTS = {"Cast", "CastLike"}
# Their output's type is their `value` attribute's: converted by rewriting that tensor.
_VALUE_ATTRIBUTE = {"Constant", "ConstantOfShape"}
# Only move or select data: a model whose convertible nodes are all of these gains nothing.
_DATA_MOVEMENT = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Concat",
                  "Slice", "Gather", "Split", "Expand", "Tile", "Pad", "Cast", "Shape", "Size"}
# Read any element type at input 0 (Shape and Size only look at the shape).
_ANY_TYPE_INPUT = _CASTS | {"Shape", "Size"}


@dataclasses.dataclass(frozen=True)
class ToHalfOptions:
    dtype: str = "float16"  # or "bfloat16": the float32 range, 8 bits of mantissa instead of 11
    keep_float: frozenset[str] = frozenset()  # node names decided float32 (onnxopt.precision)
    keep_io_types: bool = True  # callers feed and read float32, as with the original


class ToHalfPass(ir.passes.InPlacePass):
    """Float32 nodes and weights to float16/bfloat16 with Casts only at float32 borders."""

    name = "to-half"
    lossy = True

    def __init__(self, options: ToHalfOptions | None = None):
        super().__init__()
        self.options = options or ToHalfOptions()
        if self.options.dtype not in HALF_TYPES:
            raise ValueError(f"dtype {self.options.dtype!r}: expected float16 or bfloat16")

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        half = HALF_TYPES[self.options.dtype]
        graph = model.graph
        opset = opset_version(graph)
        fill_dtypes(model)
        chosen = {}
        for node in graph:
            positions = half_inputs(node, opset, self.options.dtype)
            why = self._refusal(node, positions, half)
            if why:
                if why != "-":
                    report.log.append(f"{node.name}: stays float32 ({why})")
                continue
            chosen[node] = positions
        if not any(node.op_type not in _DATA_MOVEMENT for node in chosen):
            report.log.append("no float32 node that computes could be converted")
            return report
        rewriter = _Rewriter(graph, half, NameSource(graph), self.options.keep_io_types, opset)
        for node in graph:  # graph order: producers are rewritten before their consumers
            if node in chosen:
                rewriter.convert(node, chosen[node])
        rewriter.finish(chosen)
        report.modified = True
        report.counts.update(converted=len(chosen), casts=rewriter.casts,
                             weights=rewriter.weights)
        report.log.append(f"{len(chosen)} nodes and {rewriter.weights} weights to "
                          f"{self.options.dtype}, {rewriter.casts} Casts at float32 borders")
        return report

    def _refusal(self, node: ir.Node, positions: tuple[int, ...] | None, half) -> str:
        """Why `node` stays float32 ("-": not a float32 node at all, nothing to say)."""
        if positions is None or not computes_float32(node):
            return "-"
        if node.name in self.options.keep_float:
            return "decided float32"
        if node.op_type in _ALWAYS_FLOAT:
            return f"{node.op_type} stays exact"
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for attr in node.attributes.values()):
            return "has a subgraph"
        for index in positions:
            value = node.inputs[index] if index < len(node.inputs) else None
            source = _float_source(value) if half == ir.DataType.FLOAT16 else None
            problem = _fp16_problem(_blocks(source)) if source is not None else ""
            if problem:
                return f"weight {value.name!r} {problem}"
        return ""


def half_inputs(node: ir.Node, opset: int, dtype: str = "float16") -> tuple[int, ...] | None:
    """Input positions that share the type constraint of `node`'s first output, when that
    constraint admits `dtype` at the model's opset (else None: the node cannot go to half;
    bfloat16 Conv needs opset 22). Casts take any input type and their `to` decides: () for
    them."""
    if node.domain not in ("", "ai.onnx") or not node.outputs:
        return None
    if node.op_type in _CASTS:
        return ()
    schema = _schema(node.op_type, opset)
    if schema is None or not schema.outputs:
        return None
    constraint = schema.outputs[0].type_str
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    if f"tensor({dtype})" not in allowed.get(constraint, set()):
        return None
    formal = [p.type_str for p in schema.inputs]
    positions = []
    for index in range(len(node.inputs)):
        # A variadic last parameter (Concat's inputs, Sum's data_0) covers the rest.
        param = formal[min(index, len(formal) - 1)] if formal else None
        if param == constraint:
            positions.append(index)
    if not positions and node.op_type not in _VALUE_ATTRIBUTE:
        return None  # typed by an attribute this pass does not rewrite (RandomNormal's dtype)
    return tuple(positions)


@functools.cache
def _schema(op_type: str, opset: int):
    try:
        return onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None


def computes_float32(node: ir.Node) -> bool:
    """Whether the node computes in float32: its first output is float32 (for a Cast: its `to`)."""
    if node.op_type == "Cast":
        to = node.attributes.get("to")
        return to is not None and to.value == ir.DataType.FLOAT
    if node.op_type == "CastLike":
        return False  # its second input decides: converted with that input's producer
    return node.outputs[0].dtype == ir.DataType.FLOAT


def _float_source(value: ir.Value | None) -> ir.ExternalTensor | np.ndarray | None:
    """A float32 constant's data (see constant_tensor): its external tensor, unread, when it
    is read from a file (see _blocks), else the array; None when `value` is no float32
    constant."""
    tensor = constant_tensor(value)
    if tensor is None or tensor.dtype != ir.DataType.FLOAT:
        return None
    return tensor if isinstance(tensor, ir.ExternalTensor) else tensor.numpy()


def _blocks(source: ir.ExternalTensor | np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
    """The float32 `source` (see _float_source), flattened, _BLOCK values at a time, as often
    as asked; an external one from its file (float32_blocks)."""
    if isinstance(source, ir.ExternalTensor):
        return lambda: float32_blocks(source, _BLOCK)
    flat = source.reshape(-1)
    return lambda: (flat[start:start + _BLOCK] for start in range(0, flat.size, _BLOCK))


def _half_data(source: ir.ExternalTensor | np.ndarray, half: ir.DataType) -> np.ndarray:
    """The float32 `source` in half, one rounding to nearest even, a block at a time."""
    data = np.empty(math.prod(source.shape), dtype=half.numpy())
    start = 0
    for block in _blocks(source)():
        data[start:start + block.size] = block
        start += block.size
    return data.reshape(tuple(source.shape))


def _fp16_problem(blocks: Callable[[], Iterator[np.ndarray]]) -> str:
    """Why this float32 weight (its `blocks`, see _blocks) cannot be float16: past its range,
    or too small for it (values below 2^-14 are subnormal in float16 and lose precision, below
    2^-25 they flush to zero)."""
    # Sums of squares per block in float32 (no float64 copy), added up in float64.
    peak, norm2, small_lost2 = 0.0, 0.0, 0.0
    for part in blocks():
        magnitude = np.abs(part)
        peak = max(peak, float(np.max(magnitude)) if part.size else 0.0)
        if not np.isfinite(peak) or peak > FP16_MAX:
            return f"reaches {peak:.3g}, past float16's {FP16_MAX:g}"
        norm2 += float(np.dot(part, part))
        small_lost2 += _lost2(part[magnitude < FP16_MIN_NORMAL])  # subnormal in float16: few
    # Normal float16 values round by at most 2^-11 of themselves, so what they lose is at most
    # 2^-22 of the squared norm: only the subnormal ones are converted to measure theirs. 5% of
    # the norm lost means values deep in the subnormal range carry the weight (a LayerNorm
    # epsilon of 1e-6 loses 1.4e-3 and is harmless: the accuracy budget, not this guard, judges
    # small effects).
    if norm2 > 0 and small_lost2 + 2.0**-22 * norm2 > _LOST_SHARE**2 * norm2:
        share = math.sqrt(sum(_lost2(part) for part in blocks()) / norm2)
        if share > _LOST_SHARE:
            return f"loses {share:.1e} of its norm in float16 (values too small for it)"
    return ""


def _lost2(values: np.ndarray) -> float:
    """The squared norm float16 rounding takes from float32 `values`."""
    return float(np.sum(np.square(values - values.astype(np.float16).astype(np.float32)),
                        dtype=np.float64))


def fill_dtypes(model: ir.Model) -> None:
    """Element types on every value of the main graph that lacks one, from ONNX type inference
    (exporters leave intermediate types out; which nodes compute in float32 depends on them)."""
    dtypes = infer_dtypes(model)
    for value in _values(model.graph):
        if value.dtype is None and value.name in dtypes:
            value.type = ir.TensorType(dtypes[value.name])


def _values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


class _Rewriter:
    """The edits of one conversion: half copies of weights, Casts at borders, shared per value."""

    def __init__(self, graph: ir.Graph, half: ir.DataType, names: NameSource, keep_io: bool,
                 opset: int):
        self.graph, self.half, self.names, self.opset = graph, half, names, opset
        self.keep_io = keep_io
        self.to_half: dict[ir.Value, ir.Value] = {}  # float32 value -> its half twin
        self.to_float: dict[ir.Value, ir.Value] = {}  # half value -> its float32 twin
        self.made_half: set[ir.Value] = set()  # values this pass turned (or made) half
        self.inserted: set[ir.Node] = set()  # the Casts this pass wrote
        self.weights = 0
        if not keep_io:
            for value in graph.inputs:
                if value.dtype == ir.DataType.FLOAT and not value.is_initializer():
                    value.type = ir.TensorType(half)
                    self.made_half.add(value)

    def convert(self, node: ir.Node, positions: tuple[int, ...]) -> None:
        for index in positions:
            value = node.inputs[index]
            if value is not None and value.dtype in (ir.DataType.FLOAT, None) \
                    and value not in self.made_half:
                node.replace_input_with(index, self._half_of(value))
        if node.op_type == "Cast":
            node.attributes["to"] = ir.AttrInt64("to", self.half)
        if node.op_type in _VALUE_ATTRIBUTE:
            self._half_value_attribute(node)
        for output in node.outputs:
            if output.dtype == ir.DataType.FLOAT and self._shares_constraint(node, output):
                output.type = ir.TensorType(self.half)
                self.made_half.add(output)

    def _half_value_attribute(self, node: ir.Node) -> None:
        """Constant / ConstantOfShape: their value (a ConstantOfShape without one fills 0.0,
        a Constant may say value_float(s)) as a half tensor."""
        attributes = node.attributes
        if "value" in attributes:
            data = attributes["value"].as_tensor().numpy()
        elif "value_float" in attributes:
            data = np.asarray(attributes.pop("value_float").as_float(), dtype=np.float32)
        elif "value_floats" in attributes:
            data = np.asarray(attributes.pop("value_floats").as_floats(), dtype=np.float32)
        else:
            data = np.zeros(1, dtype=np.float32)
        attributes["value"] = ir.AttrTensor("value", ir.tensor(data.astype(self.half.numpy()),
                                                               dtype=self.half))

    def _shares_constraint(self, node: ir.Node, output: ir.Value) -> bool:
        """Outputs typed by the same constraint as the first (BatchNormalization's running
        stats too; TopK's int64 indices never are). A Cast has one output."""
        if output is node.outputs[0]:
            return True
        schema = _schema(node.op_type, self.opset)
        formal = [p.type_str for p in schema.outputs] if schema is not None else []
        index = list(node.outputs).index(output)
        return bool(formal) and formal[min(index, len(formal) - 1)] == formal[0]

    def _half_of(self, value: ir.Value) -> ir.Value:
        """The half version of a float32 input: a half weight, or a new Cast shared by every
        half reader of `value`."""
        if value not in self.to_half:
            source = _float_source(value)
            self.to_half[value] = (self._half_weight(value, source) if source is not None else
                                   self._cast(value, self.half, f"{value.name}_{_short(self.half)}"))
            self.made_half.add(self.to_half[value])
        return self.to_half[value]

    def _half_weight(self, value: ir.Value, source: ir.ExternalTensor | np.ndarray) -> ir.Value:
        self.weights += 1
        base = f"{value.name}_{_short(self.half)}"
        if isinstance(source, ir.ExternalTensor):
            # Read from its file when the data is asked for (a save, a spill), then dropped:
            # a big model's half weights are never all in memory at once.
            return new_lazy_initializer(self.graph, self.names, base, self.half, source.shape,
                                        functools.partial(_half_data, source, self.half))
        return new_initializer(self.graph, self.names, base, _half_data(source, self.half))

    def _cast(self, value: ir.Value, to: ir.DataType, name: str) -> ir.Value:
        cast = ir.node("Cast", [value], {"to": to}, name=self.names(f"{name}_Cast"))
        out = cast.outputs[0]
        out.name, out.type, out.shape = self.names(name), ir.TensorType(to), value.shape
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, [cast])
        elif len(self.graph):
            self.graph.insert_before(next(iter(self.graph)), [cast])
        else:
            self.graph.append(cast)
        self.inserted.add(cast)
        return out

    @property
    def casts(self) -> int:
        return sum(1 for node in self.inserted if node.graph is self.graph)

    def finish(self, chosen: dict) -> None:
        """Float32 readers of half values get a shared Cast back; model outputs keep float32
        (and their names) when asked; what no node reads any more goes."""
        # Subgraphs too: an If or Loop body may read a value of this graph that went to half.
        for node in list(ir.traversal.RecursiveGraphIterator(self.graph)):
            if node in self.inserted:
                continue
            half_positions = chosen.get(node, ())
            for index, value in enumerate(node.inputs):
                if value in self.made_half and index not in half_positions \
                        and not (index == 0 and node.op_type in _ANY_TYPE_INPUT):
                    node.replace_input_with(index, self._float_of(value))
        if self.keep_io:
            for position, value in enumerate(list(self.graph.outputs)):
                if value in self.made_half:
                    self._float_output(position, value)
        self._drop_identity_casts()
        self._drop_unused()

    def _float_of(self, value: ir.Value) -> ir.Value:
        """A half value in float32: the float32 value it was Cast from, when there is one (no
        Cast pair that cancels), else a new Cast shared by every float32 reader."""
        if value not in self.to_float:
            source = next((f for f, h in self.to_half.items() if h is value), None)
            self.to_float[value] = source if source is not None else self._cast(
                value, ir.DataType.FLOAT, f"{value.name}_float")
        return self.to_float[value]

    def _float_output(self, position: int, value: ir.Value) -> None:
        """The model output keeps its name and float32: the half value is renamed and a Cast
        produces the output (the float32 twin that float32 readers share, when there is one)."""
        name = value.name
        value.name = self.names(f"{name}_{_short(self.half)}")
        out = self._float_of(value)
        if out.producer() is None or out.producer() not in self.inserted or out.is_graph_output():
            out = self._cast(value, ir.DataType.FLOAT, f"{name}_float")
        out.name = name
        self.graph.outputs[position] = out

    def _drop_identity_casts(self) -> None:
        """A model's own Cast to float32, converted, that now reads a half value casts half to
        half: its readers take its input."""
        for node in list(self.graph):
            if node.op_type != "Cast" or not node.inputs or node.inputs[0] is None:
                continue
            source, out = node.inputs[0], node.outputs[0]
            if source.dtype != out.dtype or out.is_graph_output():
                continue
            out.replace_all_uses_with(source)
            self.graph.remove(node, safe=True)

    def _drop_unused(self) -> None:
        """Float32 weights and Constant nodes whose readers all went to half."""
        for weight in self.to_half:
            if weight.uses() or weight.is_graph_output():
                continue
            producer = weight.producer()
            if producer is not None and producer.op_type == "Constant":
                self.graph.remove(producer, safe=True)
            elif weight.name in self.graph.initializers and not weight.is_graph_input():
                del self.graph.initializers[weight.name]


def _short(dtype: ir.DataType) -> str:
    return "fp16" if dtype == ir.DataType.FLOAT16 else "bf16"
