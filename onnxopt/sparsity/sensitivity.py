"""`onnxopt sensitivity`: how much each layer's pruning costs the model's outputs.

For every prunable layer and sparsity level s (0.1 ... 0.9), that layer alone is pruned by
magnitude at s (N:M: the pattern's own level) and the model's outputs on the calibration
batches are compared with the dense model's: the worst output's cosine and SQNR. One ONNX
Runtime session serves every trial: the prunable weights become overridable graph inputs
(an initializer that is also a graph input), and each trial feeds one pruned weight, so the
cost is runs, not session builds. For channels, each channel group alone loses the share s of
its channels (the least important by the prune-channels pass's weight norms); shapes change,
so each trial is its own session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.inputs import Feeds
from onnxopt.measure import runtime, verify
from onnxopt.passes import _sparsity
from onnxopt.passes._channel_groups import ChannelGraph
from onnxopt.passes.prune_channels import (
    PruneChannelsOptions,
    PruneChannelsPass,
    channel_importance,
)

__all__ = ["LEVELS", "LayerSensitivity", "channel_sensitivity", "overridable_session",
           "pruned_weight", "sensitivity"]

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclasses.dataclass
class LayerSensitivity:
    node: str
    op_type: str
    weights: int
    cosine: dict[float, float]  # level -> worst output cosine vs dense
    sqnr_db: dict[float, float]  # level -> worst output SQNR (dB) vs dense
    note: str = ""  # why a level could not be measured (N:M on odd widths)


def pruned_weight(layer: _sparsity.Layer, level: float, n_m: tuple[int, int] | None
                  ) -> np.ndarray | None:
    """The layer's weight pruned by magnitude at `level` (or N:M); None if it cannot take N:M."""
    weight = layer.weight.const_value.numpy()
    rows = _sparsity.to_rows(layer, weight)
    if n_m is not None:
        if layer.input_channels % n_m[1]:
            return None
        keep = _sparsity.n_m_mask(rows, *n_m)
    else:
        keep = _sparsity.magnitude_mask(np.abs(rows), int(round(level * rows.size)))
    return _sparsity.from_rows(layer, rows * keep).astype(weight.dtype)


@contextlib.contextmanager
def overridable_session(model: ir.Model, weights: Sequence[ir.Value]) -> Iterator[object]:
    """A session (graph optimizations off) in which `weights` can be fed like inputs."""
    copy = model.clone()
    names = {value.name for value in weights}
    for value in copy.graph.initializers.values():
        if value.name in names and not value.is_graph_input():
            copy.graph.inputs.append(value)
    with runtime.model_session(copy, optimize=False) as session:
        yield session


def sensitivity(model: ir.Model, batches: Sequence[Feeds], *, pattern: str = "unstructured",
                levels: Sequence[float] = LEVELS, skip: Sequence[str] = (),
                progress: Callable[[int, int], None] | None = None) -> list[LayerSensitivity]:
    """Per prunable layer (first and last included: this is where to see what they cost),
    the worst output's cosine and SQNR with that layer alone pruned at each level."""
    n_m = None if pattern == "unstructured" else _sparsity.parse_pattern(pattern)
    layers, _ = _sparsity.prunable_layers(model, skip, keep_first_last=False)
    levels = [1 - n_m[0] / n_m[1]] if n_m is not None else list(levels)
    rows = []
    with overridable_session(model, [layer.weight for layer in layers]) as session:
        reference = [runtime.run(session, batch) for batch in batches]
        tolerance = verify.Tolerance(elementwise=False)
        for index, layer in enumerate(layers):
            row = LayerSensitivity(layer.name, layer.node.op_type, layer.weight.const_value.size,
                                   {}, {})
            for level in levels:
                weight = pruned_weight(layer, level, n_m)
                if weight is None:
                    row.note = f"{pattern} needs input channels divisible by {n_m[1]}"
                    break
                outputs = [runtime.run(session, {**batch, layer.weight.name: weight})
                           for batch in batches]
                errors = verify.compare(reference, outputs, tolerance)
                row.cosine[level] = min(e.cosine for e in errors)
                row.sqnr_db[level] = min((e.sqnr_db for e in errors), default=math.inf)
            rows.append(row)
            if progress is not None:
                progress(index + 1, len(layers))
    return rows


def channel_sensitivity(model: ir.Model, batches: Sequence[Feeds], *,
                        levels: Sequence[float] = LEVELS, skip: Sequence[str] = (),
                        progress: Callable[[int, int], None] | None = None
                        ) -> list[LayerSensitivity]:
    """Per channel group (named by its first producer; `weights`: its channels), the worst
    output's cosine and SQNR with that group alone cut by each share of its channels."""
    shapes = {name: tuple(np.shape(a)) for name, a in batches[0].items()}
    graph = ChannelGraph(model, shapes)
    options = PruneChannelsOptions(sparsity=0.0, shapes=shapes)
    patterns = [re.compile(p) for p in skip]
    groups = [g for g in graph.groups if g.refused is None
              and not any(p.search(g.key) for p in patterns)]
    reference = verify.reference_outputs(model, batches)
    tolerance = verify.Tolerance(elementwise=False)
    rows = []
    for index, group in enumerate(groups):
        order = np.argsort(channel_importance(graph, group, options), kind="stable")
        row = LayerSensitivity(group.key, group.producers[0].op_type, group.channels, {}, {},
                               note=f"channel group: {group.chain}")
        for level in levels:
            count = int(round(level * group.channels))
            count -= count % group.blocks  # grouped Convs lose as many channels per block
            if not 0 < count < group.channels:
                continue
            pruned = model.clone()
            PruneChannelsPass(dataclasses.replace(
                options, remove={group.key: [int(c) for c in order[:count]]}))(pruned)
            errors = verify.verify(pruned, reference, batches, tolerance).outputs
            if errors:
                row.cosine[level] = min(e.cosine for e in errors)
                row.sqnr_db[level] = min(e.sqnr_db for e in errors)
        rows.append(row)
        if progress is not None:
            progress(index + 1, len(groups))
    return rows
