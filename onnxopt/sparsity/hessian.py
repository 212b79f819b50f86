"""Second moments of a linear layer's input, reduced batch by batch into fixed-size matrices.

A Conv is a matrix product once its input is unfolded: every output position reads one patch,
    U[(n, p), (c, j)] = x_pad[n, g·C/g + c, p·stride + j·dilation]      (per group g)
so the layer computes U Wᵍᵀ with Wᵍ = W[group rows].reshape(C_out/g, -1): the columns of U
follow the weight's own (c_in, *k) order. Gemm reads x [M, K] (xᵀ with transA), MatMul
x [..., K] as rows of K. Per batch the accumulators add
    H += Uᵀ U            (InputHessian: the layer's input Hessian, K × K per group)
    C += U_aᵀ U_b        (CrossMoment: two inputs of the same geometry on the same samples)
in float64, a slice of rows at a time (MAX_CHUNK_BYTES), so memory is the K × K sums plus one
slice, whatever the number of batches. `with_bias` appends a column of ones (last), so a least-
squares re-fit can solve for the bias too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

__all__ = ["CrossMoment", "InputHessian", "LayerInput", "MAX_CHUNK_BYTES", "MAX_WIDTH",
           "layer_input", "too_wide", "unfold"]

MAX_CHUNK_BYTES = 64 << 20  # one unfolded slice in float64; the sums do not depend on it
# The widest input (K per group) a layer is re-fitted for: at 6144 its two K × K float64 sums
# are 0.3 GB each and a solve holds two more (ResNet's last stage, K = 512 · 3 · 3 = 4608,
# fits; so does a 4096-wide transformer). A 3-D Conv of 512 channels (K = 13824) would take
# 1.5 GB per matrix and minutes per layer.
MAX_WIDTH = 6144


@dataclasses.dataclass(frozen=True)
class LayerInput:
    """How a layer reads its input (ONNX attribute names; absent Conv attributes take the
    spec's defaults: strides and dilations 1, pads 0)."""

    op_type: str  # Conv, Gemm or MatMul
    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # [x1_begin, x2_begin, ..., x1_end, x2_end]
    dilations: tuple[int, ...] = ()
    group: int = 1
    auto_pad: str = "NOTSET"
    trans_a: bool = False

    def __post_init__(self):
        rank = len(self.kernel_shape)
        for name, default in (("strides", (1,) * rank), ("pads", (0,) * 2 * rank),
                              ("dilations", (1,) * rank)):
            if not getattr(self, name):
                object.__setattr__(self, name, default)


def layer_input(node: ir.Node) -> LayerInput:
    """The LayerInput of a Conv (kernel from the weight when the attribute is absent), Gemm or
    MatMul node."""
    attrs = node.attributes
    if node.op_type == "Gemm":
        return LayerInput("Gemm", trans_a=bool(attrs.get_int("transA", 0)))
    if node.op_type == "MatMul":
        return LayerInput("MatMul")
    kernel = tuple(attrs.get_ints("kernel_shape", ())) or tuple(node.inputs[1].shape[2:])
    rank = len(kernel)
    return LayerInput(
        "Conv", kernel, tuple(attrs.get_ints("strides", (1,) * rank)),
        tuple(attrs.get_ints("pads", (0,) * 2 * rank)),
        tuple(attrs.get_ints("dilations", (1,) * rank)), attrs.get_int("group", 1),
        attrs.get_string("auto_pad", "NOTSET"))


def too_wide(node: ir.Node) -> str | None:
    """Why a Conv/Gemm/MatMul is not re-fitted from its input statistics: its unfolded input
    is wider than MAX_WIDTH (the reason, for the log), else None."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    tensor = weight.const_value if weight is not None else None
    shape = tuple(tensor.shape if tensor is not None else (weight.shape or ()) if weight else ())
    if not shape or not all(isinstance(d, int) for d in shape):
        return None
    if node.op_type == "Conv":
        width = int(np.prod(shape[1:]))
    elif node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        width = shape[-1]
    else:
        width = shape[0]
    if width <= MAX_WIDTH:
        return None
    gigabytes = (width + 1) ** 2 * 8 / 1e9
    return (f"its input is {width} wide (> {MAX_WIDTH}): re-fitting would hold "
            f"{gigabytes:.1f} GB sums and solve for {width}³")


def unfold(x: np.ndarray, spec: LayerInput) -> np.ndarray:
    """[groups, rows, K]: the rows the layer multiplies by its weight, per group."""
    return np.concatenate(list(_slices(np.asarray(x), spec, max_bytes=None)), axis=1)


def _columns(x: np.ndarray, spec: LayerInput) -> int:
    if spec.op_type == "Conv":
        return x.shape[1] * int(np.prod(spec.kernel_shape))
    return x.shape[0] if spec.trans_a else x.shape[-1]


def _slices(x: np.ndarray, spec: LayerInput, max_bytes: int | None,
            width: int | None = None) -> Iterator[np.ndarray]:
    """unfold(x) in slices of rows, each at most `max_bytes` in float64 (None: one slice) for
    `width` columns (default: its own): two inputs sliced with one width give the same rows."""
    width = width or _columns(x, spec)
    if spec.op_type != "Conv":
        rows = (x.T if spec.trans_a else x).reshape(-1, x.shape[0 if spec.trans_a else -1])
        step = _step(width, 1, max_bytes)
        for start in range(0, rows.shape[0], step):
            yield rows[None, start:start + step].astype(np.float64)
        return
    padded = _pad(x, spec)
    rank = len(spec.kernel_shape)
    extent = [(k - 1) * d + 1 for k, d in zip(spec.kernel_shape, spec.dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent,
                                                       axis=tuple(range(2, 2 + rank)))
    index = (slice(None), slice(None), *(slice(None, None, s) for s in spec.strides),
             *(slice(None, None, d) for d in spec.dilations))
    windows = windows[index]  # [N, C, *out, *k]
    n, channels, out = windows.shape[0], windows.shape[1], windows.shape[2:2 + rank]
    per_group = channels // spec.group
    k = per_group * int(np.prod(spec.kernel_shape))
    # Slices of whole samples when one fits, else of one sample's first output axis: each is a
    # copy of its own rows only.
    positions = int(np.prod(out[1:])) if rank > 1 else 1
    samples = _step(width, positions * out[0], max_bytes)
    step = _step(width, positions, max_bytes) if samples == 1 else out[0]
    for b in range(0, n, samples):
        for start in range(0, out[0], step):
            part = windows[b:b + samples, :, start:start + step]  # [n', C, o1', *out', *k]
            part = np.moveaxis(part, 1, 1 + rank)  # [n', *out, C, *k]
            part = part.reshape(-1, spec.group, k).astype(np.float64)
            yield part.transpose(1, 0, 2)


def _step(columns: int, rows_per_step: int, max_bytes: int | None) -> int:
    """How many units of `rows_per_step` rows fit in one slice."""
    if max_bytes is None:
        return 1 << 62
    return max(1, max_bytes // max(1, 8 * columns * rows_per_step))


def _pad(x: np.ndarray, spec: LayerInput) -> np.ndarray:
    rank = len(spec.kernel_shape)
    if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for size, k, s, d in zip(x.shape[2:], spec.kernel_shape, spec.strides, spec.dilations):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            pads_begin.append(large if spec.auto_pad == "SAME_LOWER" else small)
            pads_end.append(small if spec.auto_pad == "SAME_LOWER" else large)
    elif spec.auto_pad == "VALID":
        pads_begin = pads_end = [0] * rank
    else:
        pads_begin, pads_end = spec.pads[:rank], spec.pads[rank:]
    if not any(pads_begin) and not any(pads_end):
        return x
    return np.pad(x, [(0, 0), (0, 0), *zip(pads_begin, pads_end)])


class _Moment:
    """Σ aᵀb over slices of rows, per group; with `with_bias` the appended ones column is kept
    as column sums (Σa, Σb) and the count instead of being concatenated to every slice."""

    def __init__(self, with_bias: bool, max_chunk_bytes: int):
        self.with_bias, self.max_chunk_bytes = with_bias, max_chunk_bytes
        self.sum: np.ndarray | None = None  # [groups, K_a, K_b] float64
        self._sum_a: np.ndarray | None = None  # [groups, K_a]: Σ of each column of a
        self._sum_b: np.ndarray | None = None
        self.count = 0  # rows (samples x output positions) seen

    def _add(self, part_a: np.ndarray, part_b: np.ndarray) -> None:
        product = np.matmul(part_a.transpose(0, 2, 1), part_b)
        if self.sum is None:
            self.sum = product
            self._sum_a, self._sum_b = part_a.sum(axis=1), part_b.sum(axis=1)
        else:
            self.sum += product
            self._sum_a += part_a.sum(axis=1)
            self._sum_b += part_b.sum(axis=1)
        self.count += part_a.shape[1]

    @property
    def size(self) -> int:
        """Columns of the moment, the ones column included."""
        if self.sum is None:
            return 0
        return self.sum.shape[-1] + (1 if self.with_bias else 0)

    def _mean(self, what: str) -> np.ndarray:
        if self.sum is None:
            raise ValueError(f"{what}: no batch was added")
        if not self.with_bias:
            return self.sum / self.count
        groups, k_a, k_b = self.sum.shape
        full = np.empty((groups, k_a + 1, k_b + 1))
        full[:, :k_a, :k_b] = self.sum
        full[:, :k_a, k_b] = self._sum_a
        full[:, k_a, :k_b] = self._sum_b
        full[:, k_a, k_b] = self.count
        return full / self.count


class InputHessian(_Moment):
    """Σ UᵀU over every batch added, per group: `hessian` is that sum / rows seen."""

    def __init__(self, spec: LayerInput, *, with_bias: bool = False,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES):
        super().__init__(with_bias, max_chunk_bytes)
        self.spec = spec

    def add(self, x: np.ndarray) -> None:
        for part in _slices(np.asarray(x), self.spec, self.max_chunk_bytes):
            self._add(part, part)

    @property
    def hessian(self) -> np.ndarray:
        """[groups, K(+1), K(+1)]: the mean of UᵀU per row (raises before any batch)."""
        return self._mean("InputHessian")


class CrossMoment(_Moment):
    """Σ U_aᵀ U_b for two inputs read with geometries `a` and `b` on the same samples (e.g. a
    layer's input in the pruned model and in the dense one), per group, / rows seen."""

    def __init__(self, a: LayerInput, b: LayerInput, *, with_bias: bool = False,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES):
        super().__init__(with_bias, max_chunk_bytes)
        self.a, self.b = a, b

    def add(self, x_a: np.ndarray, x_b: np.ndarray) -> None:
        x_a, x_b = np.asarray(x_a), np.asarray(x_b)
        width = max(_columns(x_a, self.a), _columns(x_b, self.b))
        parts_b = _slices(x_b, self.b, self.max_chunk_bytes, width)
        for part_a, part_b in zip(_slices(x_a, self.a, self.max_chunk_bytes, width),
                                  parts_b, strict=True):
            if part_a.shape[1] != part_b.shape[1]:
                raise ValueError(f"CrossMoment: the two inputs give {part_a.shape[1]} and "
                                 f"{part_b.shape[1]} rows; they must read the same positions")
            self._add(part_a, part_b)

    @property
    def moment(self) -> np.ndarray:
        """[groups, K_a(+1), K_b(+1)]: the mean of U_aᵀU_b per row."""
        return self._mean("CrossMoment")
