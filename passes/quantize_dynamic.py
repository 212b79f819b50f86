"""quantize-dynamic: calibration-free int8 MatMul for ONNX Runtime CPU (DynamicQuantizeMatMul).

Rewrites  Y = A @ W (+ b)  with a constant float32 W [K, N] into one com.microsoft
DynamicQuantizeMatMul(A, W_q, s, zero_point = 0, b). Weights are symmetric int8 per output
column n (per tensor without per_channel), computed in float64 and cast once (`_qdq`):
    s_n = max|W[:, n]| / q_max   (q_max = 127, or 63 with reduce_range)
    W_q[:, n] = clip(round(W[:, n] / s_n), -q_max, q_max)
At run time ORT quantizes A to uint8 per call from its own min/max, so no calibration is needed.
Matched: MatMul with a 2-D constant B (A of any rank >= 2); Gemm with constant B, transA=0,
alpha=beta=1, any transB (B^T is stored) and C absent or of shape [N]. The bias b is Gemm's C,
or the constant [N] of an Add that is the MatMul output's only consumer (folded in).
Refused (logged, graph unchanged there): 1. a node named in `exclude`; 2. B not a constant
(a graph input or computed); 3. B not float32 or A known not float32; 4. B not 2-D; 5. B with
fewer than `min_weight_elements` elements (quantizing A each call costs more than the int8
product saves); 6. Gemm with transA, alpha or beta != 1, or C not a constant [N].
ORT's contrib schema (DynamicQuantizeMatMul, com.microsoft v1): inputs A, B, b_scale,
b_zero_point (optional), bias (optional); b_scale and b_zero_point are a scalar or 1-D [N]
(per column). Embedding tables (Gather of a constant [V, D], >= 64k elements) become int8 per
row (`_gather`). Conv, LayerNormalization, Softmax are left alone (ORT's dynamic Conv is
slower than float on CPU). Subgraphs (If/Loop/Scan bodies) are covered like the main graph.
DynamicQuantizeMatMul is no MatMul, so a second run changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes import _gather, _qdq
from onnxopt.passes._graph import (
    NameSource,
    constant,
    describe,
    new_initializer,
    new_lazy_initializer,
)
from onnxopt.passes._report import PassReport

from onnxopt import io

__all__ = ["QuantizeDynamicOptions", "QuantizeDynamicPass"]

logger = logging.getLogger(__name__)

_MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class QuantizeDynamicOptions:
    per_channel: bool = True  # one scale per output column: per-tensor loses outlier columns
    reduce_range: bool = False  # 7-bit weights for x86 CPUs without VNNI (VPMADDUBSW saturation)
    clip_weights: str = "max"  # per-column range: max, mse or percentile (_qdq.weight_scale)
    exclude: tuple[str, ...] = ()  # node names to keep float (the accuracy budget's fallback list)
    min_weight_elements: int = 4096  # tiny MatMuls cost more in (de)quantization than they save
    # "all", or "subgraphs": only If/Loop/Scan bodies, where static int8 (quantize-int8, main
    # graph only) has no calibrated ranges
    graphs: str = "all"
    # Element types of the main graph's values (_qdq.infer_dtypes) when the caller has them:
    # the accuracy budget quantizes the same model once per MatMul (see quantize-int8's).
    dtypes: Mapping[str, ir.DataType] | None = None


@dataclasses.dataclass
class _Site:
    node: ir.Node
    weight: np.ndarray  # [K, N] float32, Gemm's transB already applied
    bias: ir.Value | None  # float32 [N]
    add: ir.Node | None  # the Add whose constant became the bias (removed with the node)


class QuantizeDynamicPass(ir.passes.InPlacePass):
    """Dynamic int8 MatMul/Gemm (com.microsoft DynamicQuantizeMatMul) for ONNX Runtime CPU."""

    name = "quantize-dynamic"
    lossy = True

    def __init__(self, options: QuantizeDynamicOptions | None = None):
        super().__init__()
        self.options = options or QuantizeDynamicOptions()

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        graphs = list(model.graphs())  # If/Loop/Scan bodies too: weights need no calibration
        if self.options.graphs == "subgraphs":
            graphs = graphs[1:]
        dtypes = self.options.dtypes  # main graph; subgraph values are judged on weights
        if dtypes is None:
            dtypes = _qdq.infer_dtypes(model)
        names = NameSource(*model.graphs())
        for graph in graphs:
            cache: dict = {}  # per graph: an int8 weight must live where all its readers see it
            for node in list(graph):
                weight = node.inputs[1] if len(node.inputs) > 1 else None
                site = self._site(node, dtypes)
                if isinstance(site, str):
                    report.refuse(f"kept {describe(node)}: {site}")
                elif site is not None:
                    detail = self._rewrite(graph, names, site, cache)
                    report.change("quantized", f"quantized {describe(node)}: {detail}")
                del site  # its view of the float weight, so that the mapping can go
                # one float weight resident at a time
                io.release_tensor(weight.const_value if weight is not None else None)
            _gather.quantize_tables(graph, names, self.options.exclude, report)
        if report.modified:
            model.opset_imports.setdefault(_MS_DOMAIN, 1)
            common.RemoveUnusedNodesPass()(model)  # the float weights the int8 ones replaced
        return report

    def _site(self, node: ir.Node, dtypes) -> _Site | str | None:
        """The rewrite plan, the reason the node stays float, or None if it is no candidate."""
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            return None
        if node.name in self.options.exclude:
            return "excluded (kept float on request)"
        b_value = node.inputs[1]
        w = constant(b_value)
        if w is None:
            return f"weight {b_value.name!r} is not a constant (a graph input or computed)"
        if w.dtype != np.float32:
            return f"weight {b_value.name!r} is {w.dtype}, not float32"
        if w.ndim != 2:
            return f"weight {b_value.name!r} is {w.ndim}-D, not 2-D"
        a_dtype = dtypes.get(node.inputs[0].name)
        if a_dtype is not None and a_dtype != ir.DataType.FLOAT:
            return f"input {node.inputs[0].name!r} is {a_dtype.name}, not FLOAT"
        if w.size < self.options.min_weight_elements:
            return (f"weight {b_value.name!r} has {w.size} elements < min_weight_elements "
                    f"{self.options.min_weight_elements}")
        if node.op_type == "MatMul":
            bias, add = _following_bias(node, w.shape[1])
            return _Site(node, w, bias, add)
        attrs = node.attributes
        if (attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0
                or attrs.get_float("beta", 1.0) != 1.0):
            return "Gemm with transA, alpha or beta other than the defaults"
        w = w.T if attrs.get_int("transB", 0) else w
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            c = constant(bias)
            if c is None or c.dtype != np.float32 or c.shape != (w.shape[1],):
                return f"bias {bias.name!r} is not a float32 constant of shape [{w.shape[1]}]"
        return _Site(node, w, bias, None)

    def _quantized(self, graph: ir.Graph, names: NameSource, base: str, site: _Site, scale,
                   axis) -> tuple[ir.Value, np.ndarray]:
        """(the int8 weight's initializer, its float32 scale): lazily from the file for a
        weight read from one (_qdq.int8_weight), rounded now for one in memory."""
        source, node = site.node.inputs[1].const_value, site.node
        if isinstance(source, ir.ExternalTensor) and node.op_type == "Gemm" and \
                node.attributes.get_int("transB", 0):  # stored [N, K]: rounded as [K, N]
            compute = functools.partial(_transposed_int8_from_file, source, scale, axis,
                                        self.options.reduce_range)
            return (new_lazy_initializer(graph, names, base, ir.DataType.INT8, site.weight.shape,
                                         compute), scale.astype(np.float32))
        return _qdq.int8_weight(graph, names, base, source, site.weight, scale, axis,
                                self.options.reduce_range)

    def _rewrite(self, graph: ir.Graph, names: NameSource, site: _Site, cache: dict) -> str:
        node, b_value = site.node, site.node.inputs[1]
        axis = 1 if self.options.per_channel else None
        key = (b_value, node.op_type == "Gemm" and node.attributes.get_int("transB", 0))
        if key not in cache:  # a weight shared by several ops is stored once
            scale = _qdq.weight_scale(site.weight, axis, self.options.reduce_range,
                                      self.options.clip_weights)
            base = b_value.name or "weight"
            quantized, scale32 = self._quantized(graph, names, f"{base}_quantized", site,
                                                 scale, axis)
            cache[key] = [quantized, new_initializer(graph, names, f"{base}_scale", scale32),
                          new_initializer(graph, names, f"{base}_zero_point",
                                          np.zeros(scale32.shape, dtype=np.int8))]
        inputs = [node.inputs[0], *cache[key]]
        if site.bias is not None:
            inputs.append(site.bias)
        new = ir.node("DynamicQuantizeMatMul", inputs, domain=_MS_DOMAIN,
                      name=node.name or None)
        old_nodes = [node] if site.add is None else [node, site.add]
        old_output = old_nodes[-1].outputs[0]
        ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, [new],
                                                [old_output], [new.outputs[0]])
        kind = "per-column int8" if axis is not None else "per-tensor int8"
        if site.add is not None:
            return f"weight {kind}, bias from {describe(site.add)} folded in"
        return f"weight {kind}" + (", bias kept float" if site.bias is not None else "")


def _transposed_int8_from_file(source: ir.ExternalTensor, scale, axis,
                               reduce_range: bool) -> np.ndarray:
    """The int8 [K, N] of a float weight stored [N, K] (Gemm's transB), through its mapping,
    released once rounded."""
    weight = source.numpy()
    q, _ = _qdq.quantize_weight(weight.T, scale, axis, reduce_range)
    del weight  # its view of the mapping, so that the mapping can go
    io.release_tensor(source)
    return q


def _following_bias(node: ir.Node, columns: int) -> tuple[ir.Value | None, ir.Node | None]:
    """The constant [N] float32 of an Add that is the MatMul output's only consumer."""
    output = node.outputs[0]
    if output.is_graph_output() or len(output.uses()) != 1:
        return None, None
    add = output.consumers()[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    if other is output:
        return None, None  # x + x
    c = constant(other)
    if c is None or c.dtype != np.float32 or c.shape != (columns,):
        return None, None
    return other, add
