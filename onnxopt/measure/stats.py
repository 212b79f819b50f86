"""What a model is made of: ops, parameters, bytes, I/O, and a MAC estimate per op type.

MACs (multiply-accumulates) come from shapes after ONNX shape inference on the inputs' resolved
shapes (declared, or guessed as in inputs.py):
    Conv:  out_elements * C_in/group * prod(kernel)      ConvTranspose: in_elements * M/group * prod(kernel)
    Gemm / MatMul:  out_elements * K
Ops whose shapes stay unknown are left out of the estimate (and the estimate says "partial").
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt import inputs as inputs_mod
from onnxopt import io
from onnxopt.measure import runtime

__all__ = ["ModelStats", "TensorInfo", "model_stats"]


@dataclasses.dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str | None]

    def __str__(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype}[{dims}]"


@dataclasses.dataclass
class ModelStats:
    ir_version: int
    opsets: dict[str, int]
    nodes: int  # in the main graph and all subgraphs and functions
    ops: dict[str, int]  # op type -> count ("domain::Op" outside the ONNX domain)
    parameters: int  # elements in initializers and Constant tensors
    weight_bytes: int  # including external data
    file_bytes: int | None  # the .onnx file plus its external data, when it is on disk
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    macs: dict[str, int] = dataclasses.field(default_factory=dict)
    macs_partial: bool = False  # some Conv/Gemm/MatMul shapes were unknown

    @property
    def opset(self) -> int:
        return self.opsets.get("", self.opsets.get("ai.onnx", 0))


def model_stats(
    model: ir.Model,
    path: str | os.PathLike | None = None,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    with_macs: bool = True,
) -> ModelStats:
    ops: Counter[str] = Counter()
    graphs = list(model.graphs()) + list(model.functions.values())
    for graph in graphs:
        for node in graph:
            ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
    stats = ModelStats(
        ir_version=model.ir_version,
        opsets=dict(model.opset_imports),
        nodes=sum(ops.values()),
        ops=dict(sorted(ops.items())),
        parameters=sum(math.prod(t.shape.numpy()) for t in io.iter_tensors(model)),
        weight_bytes=io.weight_bytes(model),
        file_bytes=_file_bytes(model, path),
        inputs=[_info(v) for v in model.graph.inputs if not v.is_initializer()],
        outputs=[_info(v) for v in model.graph.outputs],
    )
    if with_macs:
        stats.macs, stats.macs_partial = _macs(model, shapes)
    return stats


def _info(value: ir.Value) -> TensorInfo:
    dtype = value.dtype.name.lower() if value.dtype is not None else str(value.type)
    dims = [] if value.shape is None else [
        d if isinstance(d, int) else d.value for d in value.shape
    ]
    return TensorInfo(value.name, dtype, dims)


def _file_bytes(model: ir.Model, path) -> int | None:
    if path is None or not os.path.isfile(path):
        return None
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in io.external_files(model))


def _macs(model: ir.Model, shapes) -> tuple[dict[str, int], bool]:
    """MACs per op type, and whether some Conv/Gemm/MatMul shapes were unknown."""
    per_node = node_macs(model, shapes)
    if per_node is None:
        return {}, True
    macs: Counter[str] = Counter()
    for op_type, count in per_node.values():
        if count is not None:
            macs[op_type] += count
    return dict(macs), any(count is None for _, count in per_node.values())


def node_macs(model: ir.Model, shapes=None, feeds: Mapping[str, np.ndarray] | None = None
              ) -> dict[str, tuple[str, int | None]] | None:
    """Node name -> (op type, MACs) of every Conv/ConvTranspose/Gemm/MatMul, from ONNX shape
    inference on a copy with concrete input shapes (None: a count needs an unknown shape).
    With `feeds` (one batch), what inference leaves unknown is read from one ORT run instead
    (exports that reshape with computed shapes, such as BERT's attention). None when the
    inputs cannot be resolved or inference fails."""
    found = _inferred_macs(model, shapes)
    if feeds is None or (found is not None and all(c is not None for _, c in found.values())):
        return found
    observed = observed_shapes(model, feeds)
    counts = {}
    for index, node in enumerate(model.graph.all_nodes()):
        if node.op_type in _LINEAR:
            count = _node_macs(node, lambda v: observed.get(v.name) if v is not None else None)
            counts[node.name or f"<unnamed {node.op_type} #{index}>"] = (node.op_type, count)
    return counts


_LINEAR = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def observed_shapes(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    """Value name -> shape, from one run of `model` with every linear node's input and output
    exposed ({} when ORT cannot run it); weights and graph inputs from their own shapes."""
    copy = model.clone()
    wanted = {}
    for node in copy.graph:
        if node.op_type in _LINEAR:
            for value in (node.inputs[0], node.outputs[0]):
                if value is not None and value.name and value.producer() is not None:
                    wanted[value.name] = value
    try:
        if any(v.dtype is None for v in wanted.values()):
            copy = common.ShapeInferencePass(check_type=False, strict_mode=False,
                                             data_prop=False)(copy).model
            wanted = {v.name: v for node in copy.graph for v in node.outputs if v.name in wanted}
        copy.graph.outputs.clear()
        copy.graph.outputs.extend(v for v in wanted.values() if v.dtype is not None)
        with runtime.model_session(copy, optimize=False) as session:
            outputs = runtime.run(session, feeds)
    except Exception:  # an estimate, never a reason to fail the run
        return {}
    found = {name: tuple(np.shape(array)) for name, array in outputs.items()}
    found.update({name: tuple(np.shape(array)) for name, array in feeds.items()})
    for value in copy.graph.initializers.values():
        if value.const_value is not None:
            found[value.name] = tuple(value.const_value.shape)
    return found


def _inferred_macs(model: ir.Model, shapes) -> dict[str, tuple[str, int | None]] | None:
    copy = model.clone()
    try:
        specs = inputs_mod.input_specs(copy)
        feeds = inputs_mod.generate(copy, shapes=shapes, warnings=[])[0]
    except Exception:  # non-tensor inputs: no estimate rather than no report
        return None
    for spec in specs:
        value = next(v for v in copy.graph.inputs if v.name == spec.name)
        value.shape = ir.Shape(feeds[spec.name].shape)
    try:
        copy = common.ShapeInferencePass(strict_mode=False)(copy).model
    except Exception:
        return None
    found = {}
    for index, node in enumerate(copy.graph.all_nodes()):
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            found[node.name or f"<unnamed {node.op_type} #{index}>"] = (node.op_type,
                                                                        _node_macs(node))
    return found


def _static(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return tuple(value.shape.numpy())


def _node_macs(node: ir.Node, shape_of=None) -> int | None:
    """MACs of one linear node from its shapes (`shape_of`: value -> shape or None)."""
    shape_of = shape_of or _static
    out = shape_of(node.outputs[0])
    weight = shape_of(node.inputs[1]) if len(node.inputs) > 1 else None
    if out is None or weight is None:
        return None
    if node.op_type == "Conv":
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    if node.op_type == "ConvTranspose":
        x = shape_of(node.inputs[0])
        return None if x is None else int(np.prod(x)) * weight[1] * int(np.prod(weight[2:]))
    if node.op_type == "Gemm":
        k = weight[1] if node.attributes.get_int("transB", 0) else weight[0]
        return int(np.prod(out)) * k
    x = shape_of(node.inputs[0])  # MatMul: K is the last axis of A
    return None if x is None else int(np.prod(out)) * x[-1]
