"""Re-fitting pruned layers from calibration data, layer after layer (SparseGPT).

For a layer with weight W (rows × K, _sparsity's view) and input rows X (Conv: unfolded patches),
pruning to W' costs the layer's output ‖X Wᵀ − X W'ᵀ‖² = tr(ΔW H ΔWᵀ) with H = XᵀX. SparseGPT
(Frantar & Alistarh 2023) chooses the mask by w² / [H⁻¹]ⱼⱼ² and moves each pruned weight's
contribution onto the weights still to come in its row (OBS updates), so the layer's output stays
close without any training; the dense model is the teacher.

Order: layers are grouped in waves (a layer's wave is the longest chain of prunable layers
before it); each wave's inputs are measured on the model with every earlier wave already
pruned and re-fitted, so a layer corrects what the layers before it changed. Memory: per layer
one K × K float64 matrix, accumulated batch by batch (onnxopt.sparsity.hessian); activations
of one batch at a time (onnxopt.calib.activations).
ConvTranspose has no unfolded input here: it is pruned by magnitude, and the log says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.calib import activations
from onnxopt.inputs import Feeds
from onnxopt.passes import _sparsity
from onnxopt.passes._graph import describe
from onnxopt.sparsity import hessian, reconstruct
from onnxopt.sparsity.options import Candidate, SparsityOptions

__all__ = ["MAX_BATCHES", "layer_targets", "reconstructed", "waves"]

MAX_BATCHES = 64  # Hessian batches: a Conv input gives N·H·W rows each, plenty for K × K


def waves(model: ir.Model, layers: Sequence[_sparsity.Layer]) -> list[list[_sparsity.Layer]]:
    """Layers grouped by the longest chain of prunable layers before them (graph order)."""
    by_node = {layer.node: layer for layer in layers}
    depth: dict[ir.Value, int] = {}
    grouped: dict[int, list[_sparsity.Layer]] = {}
    for node in model.graph:  # ONNX graphs are topologically sorted
        level = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        if node in by_node:
            grouped.setdefault(level, []).append(by_node[node])
            level += 1
        for output in node.outputs:
            depth[output] = level
    return [grouped[key] for key in sorted(grouped)]


def layer_targets(layers: Sequence[_sparsity.Layer], options: SparsityOptions) -> dict[str, float]:
    """Each layer's share of zeros, as the prune-weights pass would give it."""
    if options.n_m is not None or options.scope == "layer":
        return {layer.name: options.target for layer in layers}
    return _sparsity.global_sparsities(
        [(layer.name, layer.weight.const_value.numpy()) for layer in layers], options.target)


def reconstructed(model: ir.Model, options: SparsityOptions, batches: Sequence[Feeds],
                  progress: Callable[[str], None]) -> Candidate:
    """A copy of `model` with every prunable layer pruned and re-fitted, wave by wave."""
    copy = model.clone()  # shares the dense tensors; each re-fitted weight is a new one
    layers, _ = _sparsity.prunable_layers(copy, options.skip,
                                          keep_first_last=options.keep_first_last)
    targets = layer_targets(layers, options)
    used = batches if len(batches) <= MAX_BATCHES else batches[:MAX_BATCHES]
    log, pruned, refitted = [], [], set()
    ordered = waves(copy, layers)
    for index, wave in enumerate(ordered):
        progress(f"re-fitting pruned layers: wave {index + 1} of {len(ordered)}")
        fits = [layer for layer in wave if _fits(layer, options)]
        sums = _input_hessians(copy, fits, used)
        for layer in wave:
            line = _prune_layer(layer, targets[layer.name], options.n_m, sums.get(layer.name))
            if line is None:
                continue
            pruned.append(layer.name)
            log.append(line)
            if layer.name in sums:
                refitted.add(layer.name)
    order = {layer.name: i for i, layer in enumerate(layers)}
    return Candidate(copy, "reconstructed", sorted(pruned, key=order.get), log,
                     frozenset(refitted))


def _fits(layer: _sparsity.Layer, options: SparsityOptions) -> bool:
    """Whether the layer is re-fitted: it can take the pattern, and its input unfolds."""
    n_m = options.n_m
    if n_m is not None and layer.input_channels % n_m[1]:
        return False
    return layer.node.op_type != "ConvTranspose"


def _input_hessians(model: ir.Model, layers: Sequence[_sparsity.Layer],
                    batches: Sequence[Feeds]) -> dict[str, hessian.InputHessian]:
    if not layers:
        return {}
    sums = {layer.name: hessian.InputHessian(hessian.layer_input(layer.node))
            for layer in layers}
    names = [layer.node.inputs[0].name for layer in layers]
    for found in activations.iter_activations(model, batches, names):
        for layer in layers:
            sums[layer.name].add(found[layer.node.inputs[0].name])
    return sums


def _prune_layer(layer: _sparsity.Layer, target: float, n_m, sums) -> str | None:
    """Prune one layer (re-fitted when its input Hessian is there); its log line, or None."""
    weight = layer.weight.const_value.numpy()
    if n_m is not None and layer.input_channels % n_m[1]:
        return None  # the pass's log names it; it stays dense here too
    rows = _sparsity.to_rows(layer, weight.astype(np.float64))
    if target <= 0.0:
        return None
    if sums is None:
        keep = (_sparsity.n_m_mask(rows, *n_m) if n_m is not None else
                _sparsity.magnitude_mask(np.abs(rows), int(round(target * rows.size))))
        _sparsity.write_weight(layer, _sparsity.from_rows(layer, rows * keep))
        return (f"pruned {describe(layer.node)} by magnitude: {target:.1%} zero "
                f"({layer.node.op_type} is not re-fitted)")
    new_rows = np.empty_like(rows)
    gain = []
    for group, h in enumerate(_hessians_in_row_order(layer, sums)):
        new_rows[group], magnitude_error, error = _solve(rows[group], h, target, n_m)
        gain.append((error, magnitude_error))
    _sparsity.write_weight(layer, _sparsity.from_rows(layer, new_rows))
    error, magnitude_error = (sum(e for e, _ in gain), sum(m for _, m in gain))
    ratio = error / magnitude_error if magnitude_error > 0 else 1.0
    zeros = 1 - np.count_nonzero(new_rows) / new_rows.size
    return (f"pruned and re-fitted {describe(layer.node)}: {zeros:.1%} zero, layer output "
            f"error {ratio:.2f}x magnitude pruning's")


def _hessians_in_row_order(layer: _sparsity.Layer, sums: hessian.InputHessian) -> list:
    """Per group, H with K ordered as _sparsity's rows (input channel fastest); the unfolded
    input comes channel-major, (c_in, *k), as weight.reshape(C_out, -1)."""
    found = sums.hessian
    found = found if found.ndim == 3 else found[None]
    if layer.node.op_type != "Conv":
        return list(found)
    shape = layer.shape  # [C_out, C_in/g, *k]
    per_channel = int(np.prod(shape[2:]))
    order = np.arange(shape[1] * per_channel).reshape(shape[1], per_channel).T.ravel()
    return [h[np.ix_(order, order)] for h in found]


def _solve(rows: np.ndarray, h: np.ndarray, target: float, n_m) -> tuple[np.ndarray, float,
                                                                          float]:
    """SparseGPT on one group: (new rows, magnitude pruning's layer error, the new error)."""
    if n_m is not None:
        new, _ = reconstruct.prune_with_hessian(rows, h, n=n_m[0], m=n_m[1])
        keep = _sparsity.n_m_mask(rows[None], *n_m)[0]
    else:
        zeros = int(round(target * rows.size))
        new, _ = reconstruct.prune_with_hessian(rows, h, sparsity=zeros / rows.size)
        keep = _sparsity.magnitude_mask(np.abs(rows), zeros)
    return (new, reconstruct.layer_error(h, rows, rows * keep),
            reconstruct.layer_error(h, rows, new))
