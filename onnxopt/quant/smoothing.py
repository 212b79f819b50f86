"""Per-channel activation ranges for int8 MatMuls, and the two exact rewrites built on them:
SmoothQuant (smooth-activations) and the outlier split (split-outliers), each on a copy.

The ranges are reduced batch by batch into one running max |x| per channel (memory: one vector
per activation, whatever the number of batches); both rewrites share one measurement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.calib import activations
from onnxopt.inputs import Feeds
from onnxopt.passes import _matmul_inputs, split_outliers
from onnxopt.passes import smooth_activations as smooth

__all__ = ["ALPHA", "channel_absmax", "input_ranges", "smoothed", "split"]

ALPHA = 0.5  # SmoothQuant's default; the int8 step keeps smoothing only where it measures better


def channel_absmax(model: ir.Model, names: Sequence[str],
                   batches: Iterable[Feeds]) -> dict[str, np.ndarray]:
    """Value name -> max |x| over every batch and position, per channel of its last axis."""
    found: dict[str, np.ndarray] = {}
    for batch in activations.iter_activations(model, batches, names):
        for name in names:
            array = np.asarray(batch[name])  # float: iter_activations refuses anything else
            if array.ndim == 0 or array.dtype != np.float32:
                continue  # the rewrites insert float32 constants: float16 values stay as they are
            peak = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0).astype(np.float64)
            found[name] = peak if name not in found else np.maximum(found[name], peak)
    return found


def input_ranges(model: ir.Model, nodes: Sequence[str],
                 batches: Iterable[Feeds]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of the inputs of the MatMul/Gemm `nodes` (node names) that the
    rewrites below could act on; {} when there are none."""
    names = _matmul_inputs.candidate_inputs(model.graph, frozenset(nodes))
    return channel_absmax(model, names, batches) if names else {}


def smoothed(model: ir.Model, nodes: Sequence[str], absmax: Mapping[str, np.ndarray],
             alpha: float = ALPHA) -> tuple[ir.Model, int]:
    """A smoothed copy of `model` for the MatMul/Gemm `nodes`, and how many activations were
    smoothed (0: the copy is unchanged)."""
    if not absmax:
        return model, 0
    copy = model.clone()
    report = smooth.SmoothActivationsPass(smooth.SmoothActivationsOptions(
        absmax=absmax, alpha=alpha, nodes=frozenset(nodes)))(copy)
    return report.model, report.counts.get("smoothed", 0)


def split(model: ir.Model, nodes: Sequence[str], absmax: Mapping[str, np.ndarray]
          ) -> tuple[ir.Model, int, tuple[str, ...]]:
    """A copy of `model` whose MatMul/Gemm `nodes` have their outlier input channels computed
    apart; how many activations were split, and the new float MatMuls (int8 must skip them)."""
    if not absmax:
        return model, 0, ()
    copy = model.clone()
    rewrite = split_outliers.SplitOutliersPass(split_outliers.SplitOutliersOptions(
        absmax=absmax, nodes=frozenset(nodes)))
    report = rewrite(copy)
    return report.model, report.counts.get("split", 0), tuple(rewrite.outlier_products)
