"""QuantizeLinear / DequantizeLinear arithmetic and graph edits (shared by quantize-int8).

Weights, symmetric int8 per channel c along `axis` (per tensor when axis is None):
    s_c = max|W_c| / q_max  (q_max = 127, or 63 with reduce_range; s_c = 1 for an all-zero c)
    q = clip(round(W / s_c), -q_max, q_max)
Activations, asymmetric uint8 from a range [lo, hi] widened to include 0 (so 0 is exact,
which zero padding and Relu need):
    s = (hi - lo) / 255,   zero_point = clip(round(-lo / s), 0, 255)
Bias, int32 in the scale the integer kernel accumulates in: s_b[c] = s_input · s_weight[c],
    q_b = round(b / s_b).
Scales are computed in float64 and cast once to float32; quantized values are rounded
from the float32 scale that is stored, so the graph dequantizes exactly what was meant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import tempfile
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes._graph import (
    NameSource,
    constant,
    float32_blocks,
    new_initializer,
    new_lazy_initializer,
)

from onnxopt.measure import runtime

__all__ = [
    "BIAS_LIMIT",
    "CLIP_METHODS",
    "INT32_MAX",
    "WeightOptions",
    "activation_qparams",
    "add_dequantized",
    "bias_index",
    "block_rows",
    "cpu_needs_reduce_range",
    "infer_dtypes",
    "insert_qdq",
    "is_zero_floor_activation",
    "optimized_kernel_counts",
    "ort_kernel_counts",
    "quantize_bias",
    "quantize_weight",
    "quantize_weights",
    "symmetric_qparams",
    "weight_axis",
    "weight_rounding_error",
    "weight_scale",
]

INT32_MAX = 2**31 - 1
# Largest |int32 bias| we write: half of int32 leaves the other half for the kernel's
# accumulated products (255 · 127 · K), which ORT adds the bias to in int32.
BIAS_LIMIT = 2**30


CLIP_METHODS = ("max", "mse", "percentile")
_CLIP_PERCENTILE = 99.99
_CLIP_STEPS = 40  # candidate clipping ranges between 0.5 and 1.0 of the channel's max


def weight_scale(w: np.ndarray, axis: int | None, reduce_range: bool,
                 clip: str = "max") -> np.ndarray:
    """s_c = r_c / q_max in float64 (a scalar array when axis is None), where r_c is the
    channel's max |W| (`clip` max), the range minimising the channel's squared quantization
    error (mse), or its 99.99th percentile of |W| (percentile). Clipping a few outlier weights
    buys finer steps for all the others."""
    q_max = 63.0 if reduce_range else 127.0
    if clip == "max":  # |w| and its max are exact in w's own dtype: no float64 copy of w
        peak = _abs_max(w, axis).astype(np.float64)
        return np.where(peak > 0, peak / q_max, 1.0)
    w = np.abs(w.astype(np.float64))
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    peak = rows.max(axis=1) if rows.size else np.zeros(len(rows))
    if clip == "percentile" and rows.size:
        peak = np.percentile(rows, _CLIP_PERCENTILE, axis=1)
    elif clip == "mse" and rows.size:
        peak = _mse_ranges(rows, peak, q_max)
    peak = peak.reshape(()) if axis is None else peak
    return np.where(peak > 0, peak / q_max, 1.0)  # an all-zero channel quantizes to 0 anyway


def _abs_max(w: np.ndarray, axis: int | None) -> np.ndarray:
    """max |w| over everything (axis None) or per index of `axis`, a block of rows at a time:
    no |w| copy of a whole 786 MB weight."""
    if w.size == 0:
        return np.zeros(() if axis is None else w.shape[axis], dtype=w.dtype)
    if w.ndim == 0:
        return np.abs(w)
    rows = block_rows(w.shape)
    others = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    peaks = [np.abs(w[start:start + rows]).max(axis=others) for start in range(0, len(w), rows)]
    if axis == 0:  # each block holds its own channels
        return np.concatenate(peaks)
    return np.max(np.stack(peaks), axis=0)


def block_rows(shape: Sequence[int]) -> int:
    """Rows (first-axis entries) of a tensor of `shape` that make about _BLOCK_ELEMENTS
    elements: the block weights are scanned and rounded in."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, _BLOCK_ELEMENTS // max(1, row))


def _mse_ranges(rows: np.ndarray, peak: np.ndarray, q_max: float) -> np.ndarray:
    """Per row of |W|, the clipping range among 0.5..1.0 x max with the least squared error."""
    best, best_error = peak.copy(), np.full(len(rows), np.inf)
    for fraction in np.linspace(1.0, 0.5, _CLIP_STEPS):
        r = np.where(peak > 0, peak * fraction, 1.0)[:, None]
        step = r / q_max
        error = np.sum((np.minimum(np.round(rows / step), q_max) * step - rows) ** 2, axis=1)
        better = error < best_error
        best[better], best_error[better] = r[better, 0], error[better]
    return best


def quantize_weight(w: np.ndarray, scale: np.ndarray, axis: int | None,
                    reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale) for a float64 `scale` from `weight_scale` (maybe raised).
    round(w / s) in float64, a block of rows at a time in place: no float64 copy of the whole
    weight (a 200 MB weight would take 400 MB more), and the blocks stay in cache."""
    q_max = 63 if reduce_range else 127
    scale32 = scale.astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    divisor = scale32.astype(np.float64).reshape(shape)
    if w.ndim == 0:
        return np.clip(np.round(np.float64(w) / divisor), -q_max, q_max).astype(np.int8), scale32
    q = np.empty(w.shape, dtype=np.int8)
    rows = block_rows(w.shape)
    for start in range(0, len(w), rows):
        block = w[start:start + rows].astype(np.float64)
        block /= divisor[start:start + rows] if axis == 0 else divisor
        np.round(block, out=block)
        np.clip(block, -q_max, q_max, out=block)
        q[start:start + rows] = block
    return q, scale32


_BLOCK_ELEMENTS = 1 << 18  # 2 MB of float64 per block


def activation_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / 255.0) if hi > lo else np.float32(1.0)
    zero_point = np.clip(np.round(-lo / np.float64(scale)), 0, 255)
    return scale, np.uint8(zero_point)


def symmetric_qparams(lo: float, hi: float) -> tuple[np.float32, np.int8]:
    """int8 with zero point 0, s = max(|lo|, |hi|) / 127: what TensorRT's int8 kernels take."""
    peak = max(abs(float(lo)), abs(float(hi)))
    return (np.float32(peak / 127.0) if peak > 0 else np.float32(1.0)), np.int8(0)


def quantize_bias(b: np.ndarray, input_scale: np.float32,
                  weight_scale32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 bias, float32 scale s_input · s_weight). The caller raised s_weight where
    |b| / (s_input s_weight) would overflow int32, so the clip below never bites in practice."""
    scale = (np.float64(input_scale) * weight_scale32.astype(np.float64)).astype(np.float32)
    q = np.round(b.astype(np.float64) / scale.astype(np.float64))
    return np.clip(q, -INT32_MAX, INT32_MAX).astype(np.int32), scale


def int8_weight(graph: ir.Graph, names: NameSource, base: str, source: ir.TensorProtocol,
                w: np.ndarray, scale: np.ndarray, axis: int | None,
                reduce_range: bool) -> tuple[ir.Value, np.ndarray]:
    """(the int8 initializer of float weight `w`, its float32 scale). A weight read from a file
    is rounded when the data is asked for (a save, a spill, a session) a block of rows at a
    time and then dropped, so a big model's int8 weights are never all in memory, nor its
    float ones; one in memory is rounded now."""
    if isinstance(source, ir.ExternalTensor) and axis in (None, 0, w.ndim - 1):
        compute = functools.partial(_int8_from_file, source, scale, axis, reduce_range)
        return (new_lazy_initializer(graph, names, base, ir.DataType.INT8, w.shape, compute),
                scale.astype(np.float32))
    q, scale32 = quantize_weight(w, scale, axis, reduce_range)
    return new_initializer(graph, names, base, q), scale32


def _int8_from_file(source: ir.ExternalTensor, scale: np.ndarray, axis: int | None,
                    reduce_range: bool) -> np.ndarray:
    """quantize_weight of a float32 external tensor, read from its file a block of rows at a
    time (no page of it stays resident); per-channel scales along the first or last axis."""
    shape = tuple(source.shape)
    q = np.empty(shape, dtype=np.int8)
    if not q.size:
        return q
    rows = block_rows(shape)
    start = 0
    for flat in float32_blocks(source, rows * (q.size // shape[0])):
        block = flat.reshape(-1, *shape[1:])
        channels = scale[start:start + len(block)] if axis == 0 else scale
        q[start:start + len(block)], _ = quantize_weight(block, channels, axis, reduce_range)
        start += len(block)
    return q


def add_dequantized(graph: ir.Graph, names: NameSource, base: str, q: np.ndarray | ir.Value,
                    scale: np.ndarray, axis: int | None) -> ir.Node:
    """A DequantizeLinear (not inserted) reading `q`: an int8/int32 array, made an
    initializer, or one already made. `axis` is set only for a per-channel (1-D) scale; zero
    points are 0 of q's dtype."""
    if isinstance(q, np.ndarray):
        q = new_initializer(graph, names, f"{base}_quantized", q)
    zero_point = np.zeros(scale.shape, dtype=q.dtype.numpy())
    inputs = [q, new_initializer(graph, names, f"{base}_scale", scale),
              new_initializer(graph, names, f"{base}_zero_point", zero_point)]
    attributes = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
    dq = ir.node("DequantizeLinear", inputs, attributes, name=names(f"{base}_DequantizeLinear"))
    dq.outputs[0].name = names(f"{base}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = ir.Shape(q.shape)
    return dq


def insert_qdq(graph: ir.Graph, names: NameSource, value: ir.Value, scale: np.float32,
               zero_point: np.uint8 | np.int8) -> None:
    """QuantizeLinear → DequantizeLinear after `value`; every consumer reads the DQ output.
    A graph output keeps the float value itself (its name is the model's interface)."""
    base = value.name or "activation"
    uses = list(value.uses())  # before the QuantizeLinear below becomes one of them
    s = new_initializer(graph, names, f"{base}_scale", np.asarray(scale, dtype=np.float32))
    zp = new_initializer(graph, names, f"{base}_zero_point", np.asarray(zero_point))
    q = ir.node("QuantizeLinear", [value, s, zp], name=names(f"{base}_QuantizeLinear"))
    q.outputs[0].name = names(f"{base}_quantized")
    q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(np.asarray(zero_point).dtype))
    dq = ir.node("DequantizeLinear", [q.outputs[0], s, zp],
                 name=names(f"{base}_DequantizeLinear"))
    dq.outputs[0].name = names(f"{base}_dequantized")
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    dq.outputs[0].shape = value.shape
    for use in uses:
        use.node.replace_input_with(use.idx, dq.outputs[0])
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    elif len(graph):
        graph.insert_before(next(iter(graph)), [q, dq])
    else:
        graph.extend([q, dq])


def infer_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Element types of the main graph's values from ONNX type inference on a clone (exports
    often leave intermediate types out; the saved model keeps what the user gave it)."""
    copy = model.clone()
    common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(copy)
    dtypes = {name: v.dtype for name, v in
              ir.convenience.create_value_mapping(copy.graph).items() if v.dtype is not None}
    for name, value in ir.convenience.create_value_mapping(model.graph).items():
        if value.dtype is not None:
            dtypes[name] = value.dtype
    return dtypes


def is_zero_floor_activation(node: ir.Node) -> bool:
    """Relu, or Clip with a constant min of exactly 0: the uint8 clamp at zero point 0 is the
    same function, so ORT drops the node (ReluQuantFusion / ClipQuantFusion)."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip" or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None and constant(node.inputs[2]) is None:
        return False  # ORT folds the Clip away only when it can read both bounds
    low = constant(node.inputs[1])
    return low is not None and low.size == 1 and float(low.item()) == 0.0


@dataclasses.dataclass(frozen=True)
class WeightOptions:
    per_channel: bool = True
    reduce_range: bool = False
    clip: str = "max"  # see weight_scale
    int32_bias: bool = True  # False: the bias stays float (TensorRT fuses a float bias)


def quantize_weights(graph: ir.Graph, names: NameSource, node: ir.Node, input_scale: np.float32,
                     cache: dict, options: WeightOptions) -> str:
    """Conv/Gemm/MatMul: weight -> int8 + DequantizeLinear, bias -> int32 + DequantizeLinear
    (both inserted before `node`); returns what was done, for the log. `cache` holds weights
    already quantized, so one shared by several ops is stored once."""
    w = constant(node.inputs[1])
    axis = weight_axis(node) if options.per_channel else None
    reduce_range = options.reduce_range
    scale = weight_scale(w, axis, reduce_range, options.clip)
    b_index = bias_index(node) if options.int32_bias else None
    if b_index is not None:  # keep |b / (s_in s_c)| within BIAS_LIMIT
        b = np.abs(constant(node.inputs[b_index]).astype(np.float64))
        scale = np.maximum(scale, (b if axis is not None else b.max()) /
                           (np.float64(input_scale) * BIAS_LIMIT))
    key = (node.inputs[1], axis, scale.tobytes())
    if key not in cache:  # a weight shared by several ops is stored once
        base = node.inputs[1].name or "weight"
        q, scale32 = int8_weight(graph, names, f"{base}_quantized", node.inputs[1].const_value,
                                 w, scale, axis, reduce_range)
        dq = add_dequantized(graph, names, base, q, scale32, axis)
        graph.insert_before(node, dq)
        cache[key] = (dq.outputs[0], scale32)
    del w  # its view of the float weight, so that the mapping can go (io.release_tensor)
    dq_value, scale32 = cache[key]
    node.replace_input_with(1, dq_value)
    kind = f"per-channel int8 (axis {axis})" if axis is not None else "per-tensor int8"
    if options.clip != "max":
        kind += f", {options.clip}-clipped"
    if b_index is None:
        return f"weight {kind}"
    bias = node.inputs[b_index]
    q_b, bias_scale = quantize_bias(constant(bias).reshape(-1), input_scale, scale32)
    dq_b = add_dequantized(graph, names, bias.name or "bias", q_b, bias_scale, 0)
    graph.insert_before(node, dq_b)
    node.replace_input_with(b_index, dq_b.outputs[0])
    return f"weight {kind}, bias int32"


def weight_rounding_error(node: ir.Node, options: WeightOptions) -> np.ndarray:
    """dequantize(quantize(W)) - W in float64, W being `node`'s constant weight, as
    quantize_weights rounds it (before any raise of the scale for a large bias)."""
    w = constant(node.inputs[1])
    axis = weight_axis(node) if options.per_channel else None
    scale = weight_scale(w, axis, options.reduce_range, options.clip)
    q, scale32 = quantize_weight(w, scale, axis, options.reduce_range)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float64) * scale32.astype(np.float64).reshape(shape) - w.astype(np.float64)


def weight_axis(node: ir.Node) -> int:
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 0 if node.op_type == "Conv" else 1  # MatMul [K, N]: channels are columns


def bias_index(node: ir.Node) -> int | None:
    """Conv's B, or Gemm's C when it is one value per output channel ([N])."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias = constant(node.inputs[2])
    channels = constant(node.inputs[1]).shape[weight_axis(node)]
    return 2 if bias is not None and bias.shape == (channels,) else None


def ort_kernel_counts(model: ir.Model | bytes | str | os.PathLike) -> dict[str, int]:
    """Op-type counts of the graph ONNX Runtime CPU actually runs (graph optimizations
    ENABLE_ALL, the optimized graph saved and read back), subgraphs included: QLinearConv,
    QGemm, leftover Conv... An in-memory model whose weights stay in external files goes to ORT
    as a temporary file (bytes cannot point at external data)."""
    if isinstance(model, ir.Model):
        with runtime.model_file(model) as source:
            return ort_kernel_counts(source)
    source = str(model) if isinstance(model, os.PathLike) else model
    with tempfile.TemporaryDirectory(prefix="onnxopt-kernels-") as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        runtime.make_session(source, prepack=False, save_optimized=optimized)  # counted, not run
        return optimized_kernel_counts(optimized)


def optimized_kernel_counts(path: str) -> dict[str, int]:
    """Op-type counts of a graph ORT saved (runtime.make_session's save_optimized)."""
    import onnx

    optimized = onnx.load(path, load_external_data=False)
    return dict(Counter(node.op_type for node in _all_nodes(optimized.graph)))


def _all_nodes(graph):
    """The nodes of an onnx GraphProto and of its If/Loop/Scan bodies, recursively."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _all_nodes(body)


def cpu_needs_reduce_range() -> bool:
    """True on x86 CPUs without VNNI: ORT's u8×s8 kernels there use VPMADDUBSW, whose int16
    pair sums saturate (255·127·2 > 32767); 7-bit weights keep them exact. Measured on an
    AVX2 CPU: digits_resnet int8 top-1 drops 4.7 points without it, none with it."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = set(cpuinfo.read().split())
    except OSError:
        return True  # unknown x86: 7-bit weights cost little, saturation costs a lot
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
