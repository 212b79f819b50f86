"""SmoothQuant for int8 MatMuls: per-channel activation ranges from calibration data, then the
smooth-activations pass on a copy of the model.

The ranges are reduced batch by batch into one running max |x| per channel (memory: one vector
per smoothed activation, whatever the number of batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import activations
from onnxopt.inputs import Feeds

__all__ = ["ALPHA", "channel_absmax", "smoothed"]

ALPHA = 0.5  # SmoothQuant's default; the int8 step keeps smoothing only where it measures better


def channel_absmax(model: ir.Model, names: Sequence[str],
                   batches: Iterable[Feeds]) -> dict[str, np.ndarray]:
    """Value name -> max |x| over every batch and position, per channel of its last axis."""
    found: dict[str, np.ndarray] = {}
    for batch in activations.iter_activations(model, batches, names):
        for name in names:
            array = np.asarray(batch[name])  # float: iter_activations refuses anything else
            if array.ndim == 0:
                continue
            peak = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0).astype(np.float64)
            found[name] = peak if name not in found else np.maximum(found[name], peak)
    return found


def smoothed(model: ir.Model, nodes: Sequence[str], batches: Sequence[Feeds],
             alpha: float = ALPHA) -> tuple[ir.Model, int]:
    """A smoothed copy of `model` for the MatMul/Gemm `nodes` (node names), and how many
    activations were smoothed (0: the copy is unchanged)."""
    from onnxopt.passes import smooth_activations as smooth  # passes import onnxopt: late

    wanted = frozenset(nodes)
    names = smooth.candidate_inputs(model.graph, wanted)
    if not names or not batches:
        return model, 0
    absmax = channel_absmax(model, names, batches)
    copy = model.clone()
    report = smooth.SmoothActivationsPass(smooth.SmoothActivationsOptions(
        absmax=absmax, alpha=alpha, nodes=wanted))(copy)
    return report.model, report.counts.get("smoothed", 0)
