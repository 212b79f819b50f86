"""Small graph helpers the passes share: constants, node names, fresh value names."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.errors import BadInputError

__all__ = ["constant", "constant_tensor", "float32_blocks", "describe", "all_graphs", "NameSource", "matching_node_names",
           "opset_version", "annotate_ranks", "rank_of", "new_initializer", "new_lazy_initializer",
           "tensor_chunks", "is_dequantized", "new_switch", "select"]

_RANK_KEY = "onnxopt.rank"


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is a true constant (see constant_tensor), else None."""
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind the value when it is a true constant: an initializer that is not also
    a graph input (a caller could override that), or a Constant node's output. Else None. An
    external tensor stays unread (float32_blocks reads it a block at a time)."""
    if value is None or value.is_graph_input():
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node (no value attribute, or two): not a constant
        return None


def is_dequantized(value: ir.Value | None) -> bool:
    """`value` is a DequantizeLinear's output (a quantized model's weight or activation)."""
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear" \
        and producer.domain in ("", "ai.onnx", "com.microsoft")


CHUNK_BYTES = 1 << 26


def tensor_chunks(tensor: ir.TensorProtocol, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A tensor's bytes, `size` at a time: an external one read from its file (not mapped, so
    no page stays resident), an in-memory one sliced."""
    if isinstance(tensor, ir.ExternalTensor):
        with open(tensor.path, "rb") as source:
            source.seek(tensor.offset or 0)
            left = tensor.length if tensor.length is not None else tensor.nbytes
            while left > 0:
                chunk = source.read(min(size, left))
                if not chunk:
                    raise OSError(f"external data of {tensor.name!r} ends early")
                left -= len(chunk)
                yield chunk
        return
    flat = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, size):
        yield flat[start:start + size].tobytes()


def float32_blocks(tensor: ir.ExternalTensor, elements: int) -> Iterator[np.ndarray]:
    """A float32 external tensor's values, flattened, `elements` at a time, read from its file
    (tensor_chunks: no page stays mapped and resident, so a 786 MB weight costs a block of
    memory, not itself)."""
    for chunk in tensor_chunks(tensor, elements * 4):
        yield np.frombuffer(chunk, dtype="<f4")


def describe(node: ir.Node) -> str:
    """`'bn3' (BatchNormalization)`; an unnamed node by its first output, which is unique:
    `<unnamed Constant -> 'p2o.Constant.12'>`."""
    if node.name:
        return f"{node.name!r} ({node.op_type})"
    output = node.outputs[0].name if node.outputs and node.outputs[0].name else "?"
    return f"<unnamed {node.op_type} -> {output!r}>"


def all_graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, every subgraph (If/Loop/Scan bodies), and every function body."""
    yield from model.graphs()
    yield from model.functions.values()


def matching_node_names(model: ir.Model, patterns: str | None,
                        flag: str = "--keep-float") -> dict[str, list[str]]:
    """Per comma-separated regular expression of `patterns`, the node names (every graph) it
    matches whole; a pattern that is not a regular expression is a one-line error."""
    names = [n.name for g in model.graphs() for n in g if n.name]
    found: dict[str, list[str]] = {}
    for pattern in filter(None, (p.strip() for p in (patterns or "").split(","))):
        try:
            matcher = re.compile(pattern)
        except re.error as error:
            raise BadInputError(f"{flag} {pattern!r}: not a regular expression ({error})") from None
        found[pattern] = [name for name in names if matcher.fullmatch(name)]
    return found


def opset_version(graph: ir.Graph | ir.Function, domain: str = "") -> int:
    return graph.opset_imports.get(domain, graph.opset_imports.get("ai.onnx", 1))


class NameSource:
    """Unique names for new values in one graph (initializer names must be unique on creation)."""

    def __init__(self, graph: ir.Graph, *more: ir.Graph):
        """Names taken in `graph` and `more` (pass every graph of a model when new values go
        into subgraphs too: an inner name must not shadow an outer one)."""
        self._taken = set()
        for g in (graph, *more):
            self._taken.update(v.name for v in g.initializers.values())
            self._taken.update(v.name for v in g.inputs)
            for node in g:
                self._taken.update(v.name for v in node.outputs if v.name)

    def __call__(self, base: str) -> str:
        name, index = base, 1
        while name in self._taken:
            name, index = f"{base}_{index}", index + 1
        self._taken.add(name)
        return name


def annotate_ranks(model: ir.Model) -> None:
    """Record each value's rank from ONNX shape inference in `value.meta` (never saved).

    Inference runs on a clone, so the saved model keeps exactly the shapes the user gave it;
    exporters often leave intermediate shapes out, and a fold needs only the rank."""
    copy = model.clone()
    common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(copy)
    for graph, inferred in zip(model.graphs(), copy.graphs()):
        ranks = {name: v.shape.rank() for name, v in
                 ir.convenience.create_value_mapping(inferred).items() if v.shape is not None}
        for name, value in ir.convenience.create_value_mapping(graph).items():
            if name in ranks:
                value.meta[_RANK_KEY] = ranks[name]


def rank_of(value: ir.Value) -> int | None:
    """The value's rank from its own shape, else from `annotate_ranks`, else None."""
    if value.shape is not None:
        return value.shape.rank()
    return value.meta.get(_RANK_KEY)


def new_initializer(graph: ir.Graph, names: NameSource, base: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer named after `base` (made unique)."""
    name = names(base)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def new_lazy_initializer(graph: ir.Graph, names: NameSource, base: str, dtype: ir.DataType,
                         shape: Sequence[int], compute: Callable[[], np.ndarray]) -> ir.Value:
    """Register a new initializer named after `base` whose data `compute()` makes each time it
    is asked for (a save, a spill, a session) and nobody keeps: a pass rewriting a big model's
    weights from their file holds none of them in memory (ir.LazyTensor)."""
    name = names(base)
    tensor = ir.LazyTensor(lambda: ir.tensor(compute(), dtype=dtype, name=name), dtype,
                           ir.Shape(shape), name=name)
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def new_switch(graph: ir.Graph, names: NameSource, base: str) -> ir.Value:
    """A boolean scalar graph input named after `base`: one model then runs as several
    variants of itself in one session (the accuracy budget's ranking of layers)."""
    value = ir.Value(name=names(base), shape=ir.Shape([]), type=ir.TensorType(ir.DataType.BOOL))
    graph.inputs.append(value)
    return value


def select(graph: ir.Graph, names: NameSource, condition: ir.Value, when_true: ir.Value,
           when_false: ir.Value, readers: Sequence, after: ir.Node | None = None
           ) -> None:
    """`readers` (uses of `when_true`) read Where(condition, when_true, when_false) instead;
    the Where goes after `after`, or else just before the first of the readers."""
    where = ir.node("Where", [condition, when_true, when_false],
                    name=names(f"{when_true.name}_switch"))
    where.outputs[0].name = names(f"{when_true.name}_switched")
    where.outputs[0].type, where.outputs[0].shape = when_true.type, when_true.shape
    if after is not None:
        graph.insert_after(after, where)
    else:
        reading = {use.node for use in readers}
        graph.insert_before(next(node for node in graph if node in reading), where)
    for use in readers:
        use.node.replace_input_with(use.idx, where.outputs[0])
