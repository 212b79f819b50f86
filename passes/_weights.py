"""Weights computed from constants become initializers, when a pass needs them as weights.

The ONNX model-zoo copies in onnx's test data write every Conv weight as a ConstantOfShape, and
exporters write Cast / Reshape / Transpose / Expand of an initializer. cleanup's constant
folding stops at a size limit (so a Tile nobody reads as a weight does not balloon the file), so
these weights stay computed, and a pass that needs a weight's values (fold-batchnorm, int8,
sparsity) would refuse the layer. Here exactly the subgraph behind each weight slot a pass
names is evaluated (onnx's reference evaluator, node by node) and replaced by one initializer.

Bound: every tensor of that subgraph may be at most as large as the weight it computes (the
declared size while evaluating, else MAX_ELEMENTS, then the computed weight's own size); a
larger intermediate (a Tile that is then sliced) leaves the weight computed. A subgraph that reads a graph input,
a non-deterministic op (Random*), a custom domain or a node with subgraphs is left alone, and so
is a DequantizeLinear: a weight stored int8 on purpose (a quantized model) stays int8, where
folding would store it as float, 4x the bytes, and stop ONNX Runtime's integer fusions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
from onnxopt.passes._graph import describe, opset_version

__all__ = ["WEIGHT_SLOTS", "fold_weights", "computed_from_constants"]

logger = logging.getLogger(__name__)

# The inputs of each op that passes read as weights (biases and BN parameters included).
WEIGHT_SLOTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),  # either side may be the constant one
    "BatchNormalization": (1, 2, 3, 4),
}
# While evaluating a weight whose size the graph does not declare: 256 Mi elements (1 GiB of
# float32), as large as a layer weight gets in a model under the 2 GB protobuf limit.
MAX_ELEMENTS = 1 << 28
_NON_DETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                      "Multinomial", "Bernoulli"}


def fold_weights(graph: ir.Graph, nodes: Iterable[ir.Node]) -> list[str]:
    """Fold the constant-only subgraph behind every weight slot of `nodes` into an initializer;
    returns the names of the weights folded (the dead nodes are left for the caller's cleanup)."""
    folded = []
    for node in nodes:
        for slot in WEIGHT_SLOTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            value = node.inputs[slot] if slot < len(node.inputs) else None
            if (value is None or value.const_value is not None or value.producer() is None
                    or value.is_graph_output()):
                continue
            tensor = _evaluate(graph, value)
            if tensor is not None:
                _replace_with_initializer(graph, value, tensor)
                folded.append(value.name)
    return folded


def computed_from_constants(value: ir.Value | None) -> bool:
    """`value` is an op's output whose every leaf is a constant (fold_weights can fold it)."""
    return (value is not None and value.producer() is not None
            and _constant_cone(value) is not None)


def _evaluate(graph: ir.Graph, weight: ir.Value) -> np.ndarray | None:
    """The weight's data, or None when its subgraph is not constant or exceeds the bound."""
    cone = _constant_cone(weight)
    if cone is None:
        return None
    bound = _declared_elements(weight) or MAX_ELEMENTS
    opset = opset_version(graph)
    values: dict[ir.Value, np.ndarray] = {}
    largest = 0
    for node in cone:  # producers first
        arrays = [None if v is None else values.get(v) if v in values else v.const_value.numpy()
                  for v in node.inputs]
        try:
            outputs = _run_node(node, arrays, opset)
        except Exception as error:  # the reference evaluator lacks an op, or the data is bad
            logger.debug("weight %r not folded: %s failed: %s", weight.name, describe(node), error)
            return None
        for value, array in zip(node.outputs, outputs):
            if array is not None and np.asarray(array).size > bound:
                logger.debug("weight %r not folded: %s makes %d elements (bound %d)",
                             weight.name, describe(node), np.asarray(array).size, bound)
                return None
            values[value] = np.asarray(array)
            largest = max(largest, values[value].size)
    result = values.get(weight)
    if result is None or largest > result.size:
        logger.debug("weight %r not folded: an intermediate is larger than the weight", weight.name)
        return None
    return result


def _constant_cone(weight: ir.Value) -> list[ir.Node] | None:
    """The nodes computing `weight`, producers first, when all its leaves are constants."""
    order: list[ir.Node] = []
    seen: set[ir.Node] = set()

    def visit(value: ir.Value) -> bool:
        if value.const_value is not None and not value.is_graph_input():
            return True
        node = value.producer()
        if node is None or value.is_graph_input():
            return False  # a graph input: not a constant
        if node in seen:
            return True
        if (node.domain not in ("", "ai.onnx") or node.op_type in _NON_DETERMINISTIC
                or node.op_type == "DequantizeLinear"  # int8 on purpose: folded, 4x the bytes
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for a in node.attributes.values())):
            return False
        seen.add(node)
        if not all(visit(v) for v in node.inputs if v is not None):
            return False
        order.append(node)
        return True

    return order if visit(weight) else None


def _declared_elements(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape)


def _run_node(node: ir.Node, arrays: list, opset: int) -> list:
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    names = [v.name if v is not None else "" for v in node.inputs]
    evaluator = ReferenceEvaluator(proto, opsets={"": opset})
    return evaluator.run(None, {n: a for n, a in zip(names, arrays) if n})


def _replace_with_initializer(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> None:
    name = value.name
    value.name = f"{name}__computed"  # frees the name for the initializer that replaces it
    array = array.astype(value.dtype.numpy(), copy=False) if value.dtype is not None else array
    folded = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(
        ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array, name=name))
    graph.register_initializer(folded)
    ir.convenience.replace_all_uses_with(value, folded)
