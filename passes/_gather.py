"""int8 embedding tables: Gather(E, ids) with a large constant E [V, D] stored as int8.

Symmetric int8 per row (one scale per token), computed in float64 and cast once:
    s_v = max|E_v| / 127,   Q_v = round(E_v / s_v)
and the lookup dequantizes only the rows it gathers:
    Gather(E, ids)  ->  Cast(Gather(Q, ids), float) * Gather(s, ids)       (s stored as [V, 1])
which is DequantizeLinear's arithmetic with a per-row scale (DequantizeLinear itself would need
the whole table dequantized on every call, as ORT does not constant-fold it). The table is ~4x
smaller in the file and in memory; the lookup stays a lookup. Used by quantize-int8 and
quantize-dynamic (transformers: word and position embeddings are most of the file).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxopt.passes._graph import NameSource, constant, describe, new_initializer

__all__ = ["MIN_TABLE_ELEMENTS", "gather_refusal", "quantize_gather", "quantize_tables"]

MIN_TABLE_ELEMENTS = 65536  # smaller tables save < 200 kB: not worth three extra nodes


def gather_refusal(node: ir.Node) -> str | None:
    """Why `node` (a Gather) keeps a float table; None when quantize_gather applies, '' when it
    is no candidate (not a constant table, too small: nothing to report)."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return ""
    table = constant(node.inputs[0])
    if table is None or table.ndim != 2 or table.size < MIN_TABLE_ELEMENTS:
        return ""
    if table.dtype != np.float32:
        return f"table {node.inputs[0].name!r} is {table.dtype}, not float32"
    if node.attributes.get_int("axis", 0) != 0:
        return "gathers along axis 1, not rows"
    return None


def quantize_gather(graph: ir.Graph, names: NameSource, node: ir.Node, cache: dict) -> str:
    """Rewrite `node` as the int8 lookup above; `cache` shares one int8 table among Gathers."""
    table_value = node.inputs[0]
    if table_value not in cache:
        q, scale = _int8_rows(ir.convenience.get_const_tensor(table_value))
        base = table_value.name or "table"
        cache[table_value] = (new_initializer(graph, names, f"{base}_quantized", q),
                              new_initializer(graph, names, f"{base}_row_scale", scale))
    q_value, s_value = cache[table_value]
    ids, base = node.inputs[1], node.name or "gather"
    rows = ir.node("Gather", [q_value, ids], {"axis": 0}, name=names(f"{base}_int8"))
    scales = ir.node("Gather", [s_value, ids], {"axis": 0}, name=names(f"{base}_scale"))
    cast = ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.FLOAT},
                   name=names(f"{base}_cast"))
    mul = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=names(f"{base}_dequantize"))
    for new in (rows, scales, cast):
        new.outputs[0].name = names(f"{new.name}_output")
    old = node.outputs[0]
    mul.outputs[0].type, mul.outputs[0].shape = old.type, old.shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], [rows, scales, cast, mul],
                                            [old], [mul.outputs[0]])
    return f"table {table_value.name!r} int8 per row ({q_value.const_value.size} elements)"


# The accuracy budget quantizes clones of one model once per layer; clones share their tensors,
# so the int8 rows of a table are computed once (MiniLM's 30522 x 384 word embeddings: 0.26 s
# a time, 43 s over a fallback search). Keyed by the tensor object, which the entry keeps alive.
_ROWS: dict[int, tuple[ir.TensorProtocol, np.ndarray, np.ndarray]] = {}
_ROWS_KEPT = 4


def _int8_rows(tensor: ir.TensorProtocol) -> tuple[np.ndarray, np.ndarray]:
    """(int8 rows, float32 [V, 1] scales) of a [V, D] table, computed in float64."""
    hit = _ROWS.get(id(tensor))
    if hit is not None and hit[0] is tensor:
        return hit[1], hit[2]
    table = tensor.numpy().astype(np.float64)
    peak = np.abs(table).max(axis=1, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(table / scale.astype(np.float64)), -127, 127).astype(np.int8)
    if len(_ROWS) >= _ROWS_KEPT:
        _ROWS.pop(next(iter(_ROWS)))
    _ROWS[id(tensor)] = (tensor, q, scale)
    return q, scale


def quantize_tables(graph: ir.Graph, names: NameSource, exclude, report) -> None:
    """Every eligible Gather of the graph, logged on `report` (a PassReport) like the layers,
    so the accuracy budget's fallback can put a table back in float by its node name."""
    cache: dict = {}
    for node in list(graph):
        why = gather_refusal(node)
        if why == "":
            continue
        if why is None and node.name in exclude:
            why = "excluded (kept float on request)"
        if why:
            report.refuse(f"kept {describe(node)}: {why}")
            continue
        report.change("quantized", f"quantized {describe(node)}: "
                      f"{quantize_gather(graph, names, node, cache)}")
