"""What a sparsity run bought: per layer zeros and MACs, bytes raw and compressed, a verdict.

Zeros change no shape, so the raw file does not shrink: unstructured and N:M weights pay only
compressed (zip, gzip: deflate at level 6 here, tensor by tensor) or on a kernel that skips
them, and ONNX Runtime has none on CPU or CUDA (2:4 needs TensorRT's sparse tensor cores).
Effective MACs count only the multiplications by nonzero weights, which is what such a kernel
could save; channel pruning removes real MACs, and only it can be `faster` on ORT.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import io
from onnxopt.measure import stats
from onnxopt.passes import _sparsity
from onnxopt.sparsity.options import CHANNELS, LayerRow, SparsityOptions

__all__ = ["NO_SPEEDUP", "budget_text", "layer_rows", "summarize", "weight_sizes"]

NO_SPEEDUP = ("no ONNX Runtime kernel skips zero weights (CPU or CUDA; 2:4 needs TensorRT's "
              "sparse tensor cores): the gain is the compressed size")


def weight_sizes(model: ir.Model) -> tuple[int, int]:
    """(raw bytes, deflate-compressed bytes) of every weight, one tensor in memory at a time."""
    raw = compressed = 0
    for tensor in io.iter_tensors(model):
        data = tensor.tobytes()
        raw += len(data)
        compressed += len(zlib.compress(data, 6))
    return raw, compressed


def layer_rows(dense: ir.Model, pruned: ir.Model, shapes: Mapping[str, Sequence[int]],
               reconstructed: Iterable[str] = (), feeds=None) -> list[LayerRow]:
    """Every Conv/ConvTranspose/Gemm/MatMul with a constant weight, matched by node name
    (`feeds`: one batch, for the sizes shape inference cannot resolve)."""
    refitted = set(reconstructed)
    macs_before = stats.node_macs(dense, shapes, feeds) or {}
    macs_after = stats.node_macs(pruned, shapes, feeds) or {}
    after = {n.name: n for n in pruned.graph}
    rows = []
    for node in dense.graph:
        if node.op_type not in _sparsity.PRUNABLE_OPS or node.name not in after:
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        new = after[node.name].inputs[1]
        if weight is None or weight.const_value is None or new.const_value is None:
            continue
        size = weight.const_value.size
        nonzero = int(np.count_nonzero(new.const_value.numpy()))
        dense_macs = macs_before.get(node.name, (None, None))[1]
        real_macs = macs_after.get(node.name, (None, None))[1]
        effective = None
        if dense_macs is not None and real_macs is not None:
            density = nonzero / new.const_value.size if new.const_value.size else 0.0
            effective = int(round(real_macs * density))
        rows.append(LayerRow(node.name, node.op_type, size, nonzero, dense_macs, effective,
                             node.name in refitted))
    return rows


def summarize(dense: ir.Model, pruned: ir.Model, layers: list[LayerRow],
              options: SparsityOptions, method: str, budget: str, feeds=None) -> dict:
    """The report's sparsity section (JSON-ready)."""
    raw_before, zip_before = weight_sizes(dense)
    raw_after, zip_after = weight_sizes(pruned)
    weights = sum(row.weights for row in layers)
    nonzero = sum(row.nonzero for row in layers)
    macs = [row for row in layers if row.macs is not None and row.effective_macs is not None]
    total_macs = sum(m for _, m in (stats.node_macs(dense, options.shapes, feeds) or {}).values()
                     if m is not None)
    removed_macs = sum(row.macs - row.effective_macs for row in macs)
    is_channels = options.pattern == CHANNELS
    return {
        "pattern": options.pattern,
        "scope": options.scope,
        "target": options.target,
        "method": method,
        "budget": budget,
        "sparsity": 1 - nonzero / weights if weights else 0.0,  # of the layers' weights
        "layers_pruned": sum(1 for row in layers if row.nonzero < row.weights),
        "macs_dense": total_macs or None,
        "macs_removed": (removed_macs / total_macs) if total_macs else None,
        "weights_raw_bytes": [raw_before, raw_after],
        "weights_zip_bytes": [zip_before, zip_after],
        # Channels: from the pruned model timed against the dense one (sparsity.channels).
        "verdict": "" if is_channels else "smaller only",
        "note": "" if is_channels else NO_SPEEDUP,
        "layers": [dict(node=row.node, op_type=row.op_type, weights=row.weights,
                        nonzero=row.nonzero, sparsity=row.sparsity, macs=row.macs,
                        effective_macs=row.effective_macs, reconstructed=row.reconstructed)
                   for row in layers],
    }


def budget_text(options: SparsityOptions, achieved: float, what: str,
                kept_dense: int | None = None) -> str:
    """The report's budget line: held at the target, or how far it was met."""
    if options.budget.min_cosine is None and options.budget.min_sqnr_db is None:
        return f"not checked (--max-error none); {achieved:.1%} {what}"
    if kept_dense is None and achieved >= options.target - 0.01:
        return "held"
    extra = f", {kept_dense} layers kept dense" if kept_dense else ""
    return f"held at {achieved:.1%} {what} (target {options.target:.0%}){extra}"
