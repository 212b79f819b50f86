"""Activations of a model, batch by batch: the float tensors int8 needs statistics of.

`iter_activations` runs the model once per batch with the requested tensors exposed as graph
outputs (ORT, graph optimizations off, so they are the graph's own: a fused Conv+Relu would
hide the Conv output) and yields one batch's tensors at a time; `collect_stats` reduces each
into a `TensorStats` at once, so peak memory is one batch's activations plus O(bins) per
tensor, whatever the number of batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from onnxopt.calib.histogram import TensorStats
from onnxopt.errors import BadInputError
from onnxopt.inputs import Feeds
from onnxopt.measure import runtime

__all__ = ["collect_stats", "iter_activations"]

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def collect_stats(
    model: ir.Model,
    data: Iterable[Feeds],
    tensors: Sequence[str],
    *,
    bins: int = 2048,
    progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, TensorStats]:
    """Statistics of float `tensors` (node outputs or graph inputs) over all batches of `data`.

    ORT runs with graph optimizations off, so the exposed tensors are the graph's own (a fused
    Conv+Relu would hide the Conv output)."""
    names = list(dict.fromkeys(tensors))
    stats = {name: TensorStats(bins) for name in names}
    total = len(data) if isinstance(data, Sized) else None
    done = 0
    for activations in iter_activations(model, data, names):
        for name, tensor_stats in stats.items():
            tensor_stats.update(activations[name])
        del activations  # the next batch's activations replace these, never add to them
        done += 1
        if progress is not None:
            progress(done, total)
    if not done:
        raise BadInputError("calibration data holds no batches")
    return stats


def iter_activations(
    model: ir.Model, data: Iterable[Feeds], names: Sequence[str], *, prepack: bool = True
) -> Iterator[dict[str, np.ndarray]]:
    """Per batch, the float tensors `names` (node outputs or graph inputs) of one ORT run with
    graph optimizations off: one batch's activations in memory at a time. `prepack=False` for
    a few batches (see runtime.make_session)."""
    exposed, from_feeds = _expose(model, list(dict.fromkeys(names)))
    needs_run = len(exposed.graph.outputs) > 0  # only graph inputs asked for: no session
    session_context = (
        runtime.model_session(exposed, optimize=False, prepack=prepack) if needs_run
        else contextlib.nullcontext()
    )
    with session_context as session:
        for feeds in data:
            outputs = runtime.run(session, feeds) if needs_run else {}
            found = {name: feeds[name] if name in from_feeds else outputs[name] for name in names}
            for name, array in found.items():
                # ONNX shape inference does not type contrib ops' outputs (com.microsoft Gelu,
                # FusedMatMul): ORT does, and the first batch shows what they are.
                if not np.issubdtype(np.asarray(array).dtype, np.floating):
                    raise BadInputError(f"calibration: tensor {name!r} has dtype "
                                        f"{np.asarray(array).dtype}; statistics are for float "
                                        "activations")
            yield found


def _expose(model: ir.Model, names: Sequence[str]) -> tuple[ir.Model, set[str]]:
    """A clone whose graph outputs are exactly the requested node outputs (clones share
    tensors, so this costs no weight copies); graph inputs are read from the feeds instead."""
    clone = model.clone()
    wanted = set(names)
    if any(v.dtype is None for node in clone.graph for v in node.outputs if v.name in wanted):
        # Exporters often leave intermediate types out; a graph output needs one.
        common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(clone)
    graph = clone.graph
    produced = {v.name: v for node in graph for v in node.outputs}
    graph_inputs = {v.name: v for v in graph.inputs if not v.is_initializer()}
    exposed, from_feeds = [], set()
    for name in names:
        value = produced.get(name) or graph_inputs.get(name)
        if value is None:
            what = (
                "a weight (initializer)" if name in graph.initializers else "not in the main graph"
            )
            raise BadInputError(
                f"calibration: tensor {name!r} is {what}; statistics are for activations"
            )
        if value.dtype is not None and value.dtype not in _FLOAT_TYPES:
            raise BadInputError(
                f"calibration: tensor {name!r} has dtype {value.dtype or 'unknown'}; statistics "
                "are for float activations (run shape inference if the dtype is unknown)"
            )
        if name in graph_inputs:
            from_feeds.add(name)
        else:
            exposed.append(value)
    graph.outputs.clear()
    graph.outputs.extend(exposed)
    # Only what the exposed tensors need runs: layer-by-layer calibration of an early layer
    # does not pay for the rest of the network.
    common.RemoveUnusedNodesPass()(clone)
    return clone, from_feeds
