"""Re-fitting pruned layers from calibration data, layer after layer, with the dense model as
the teacher (SparseGPT, corrected toward the dense outputs).

Per layer, with its input X' in the pruned model and X in the dense one (onnxopt.sparsity.
teacher; both unfolded, with a column of ones), H = [X' 1]ᵀ[X' 1] and C = [X' 1]ᵀ[X 1]:
1. correct: [W̃ b̃] = argmin ‖[X' 1][W̃ b̃]ᵀ − [X 1][W b]ᵀ‖² = ((H + λI)⁻¹ C [W b]ᵀ)ᵀ: what the
   layers before it changed, and the shift of the means, are compensated here;
2. prune W̃ with SparseGPT (Frantar & Alistarh 2023): the mask by w² / [H⁻¹]ⱼⱼ², each pruned
   weight's contribution moved onto the weights still to come in its row (OBS updates), so
   ‖X'(W̃ − W')ᵀ‖² stays small; since ‖X'W'ᵀ − XWᵀ‖² = ‖X'(W̃ − W')ᵀ‖² + const, this is the
   distance to the dense layer's output;
3. re-centre: b' = b̃ + (W̃ − W') E[x'], so the pruning itself does not move the output's mean.
With few rows per input (squeeze-excite Convs on pooled 1×1 maps, a head), H and C are shrunk
toward their diagonals by K / rows (reconstruct.shrunk): their off-diagonal part would only
describe the calibration batches.

Order: layers are grouped in waves (a layer's wave is the longest chain of prunable layers
before it); each wave's inputs are measured on the model with every earlier wave already pruned
and re-fitted. Memory: per layer two (K+1)² float64 matrices, accumulated batch by batch; one
batch of activations of each model at a time. ConvTranspose has no unfolded input here, and an
input wider than hessian.MAX_WIDTH would take GBs and minutes: those are pruned by magnitude,
and the log says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.inputs import Feeds
from onnxopt.passes import _sparsity
from onnxopt.passes._graph import NameSource, describe
from onnxopt.sparsity import hessian, reconstruct, teacher
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
    twin = dict(zip(copy.graph, model.graph))  # clone keeps the node order
    layers, _ = _sparsity.prunable_layers(copy, options.skip,
                                          keep_first_last=options.keep_first_last)
    targets = layer_targets(layers, options)
    used = batches if len(batches) <= MAX_BATCHES else batches[:MAX_BATCHES]
    names = NameSource(copy.graph)
    log, pruned, refitted = [], [], set()
    ordered = waves(copy, layers)
    for index, wave in enumerate(ordered):
        progress(f"re-fitting pruned layers: wave {index + 1} of {len(ordered)}")
        readers = {layer.name: teacher.Reader(layer.node, twin[layer.node])
                   for layer in wave if _fits(layer, options)}
        teacher.accumulate(model, copy, list(readers.values()), used)
        for layer in wave:
            reader = readers.get(layer.name)
            line = _prune_layer(layer, targets[layer.name], options.n_m, reader, names)
            if line is None:
                continue
            pruned.append(layer.name)
            log.append(line)
            if reader is not None:
                refitted.add(layer.name)
    order = {layer.name: i for i, layer in enumerate(layers)}
    return Candidate(copy, "reconstructed", sorted(pruned, key=order.get), log,
                     frozenset(refitted), target=options.target)


def _fits(layer: _sparsity.Layer, options: SparsityOptions) -> bool:
    """Whether the layer is re-fitted: it can take the pattern, and its input unfolds and is
    not too wide (hessian.too_wide)."""
    n_m = options.n_m
    if n_m is not None and layer.input_channels % n_m[1]:
        return False
    return layer.node.op_type != "ConvTranspose" and hessian.too_wide(layer.node) is None


def _prune_layer(layer: _sparsity.Layer, target: float, n_m, reader: teacher.Reader | None,
                 names: NameSource) -> str | None:
    """Prune one layer (re-fitted when its reader is there); its log line, or None."""
    if target <= 0.0 or (n_m is not None and layer.input_channels % n_m[1]):
        return None  # the pass's log names a layer that cannot take N:M; it stays dense
    if reader is None:
        rows = _sparsity.to_rows(layer, layer.weight.const_value.numpy().astype(np.float64))
        keep = (_sparsity.n_m_mask(rows, *n_m) if n_m is not None else
                _sparsity.magnitude_mask(np.abs(rows), int(round(target * rows.size))))
        _sparsity.write_weight(layer, _sparsity.from_rows(layer, rows * keep))
        why = hessian.too_wide(layer.node) or f"{layer.node.op_type} is not re-fitted"
        return f"pruned {describe(layer.node)} by magnitude: {target:.1%} zero ({why})"
    rows, bias = teacher.rows_and_bias(reader.dense)
    has_bias = teacher.bias_input(layer.node) is not None or layer.node.op_type != "MatMul"
    per_group = rows.shape[0] // layer.group
    order = _row_order(layer)
    errors = []
    for g in range(layer.group):
        part = slice(g * per_group, (g + 1) * per_group)
        rows[part], bias[part], error = _fit_group(
            rows[part], bias[part], reader.hessian.hessian[g], reader.cross.moment[g],
            reader.rows, order, target, n_m, has_bias)
        errors.append(error)
    teacher.write_rows(layer.node, rows)
    if has_bias:
        teacher.write_bias(layer.node, bias, names)
    ratio = sum(e for e, _ in errors) / max(sum(m for _, m in errors), 1e-300)
    zeros = 1 - np.count_nonzero(rows) / rows.size
    return (f"pruned and re-fitted {describe(layer.node)} to the dense layer's output: "
            f"{zeros:.1%} zero, its own pruning error {ratio:.2f}x magnitude pruning's")


def _fit_group(rows, bias, h_aug, c_aug, count: int, order, target, n_m, has_bias):
    """One group: correct toward the dense output, prune with SparseGPT, re-centre the bias.
    Returns (rows, bias, (SparseGPT's error, magnitude pruning's error) on the corrected rows)."""
    k = rows.shape[1]
    h_aug = reconstruct.shrunk(h_aug, count, bias=True)
    c_aug = reconstruct.shrunk(c_aug, count, bias=True)
    dense = np.concatenate([rows, bias[:, None]], axis=1)
    if has_bias:  # [W b]: the upstream errors and the mean shift corrected at once
        corrected = reconstruct.refit(h_aug, c_aug, dense, prior=dense)
        rows, bias = corrected[:, :k], corrected[:, k]
    else:
        rows = reconstruct.refit(h_aug[:k, :k], c_aug[:k], dense, prior=rows)
    h = h_aug[:k, :k][np.ix_(order, order)]
    ordered = rows[:, order]
    if n_m is not None:
        new, _ = reconstruct.prune_with_hessian(ordered, h, n=n_m[0], m=n_m[1])
        keep = _sparsity.n_m_mask(ordered[None], *n_m)[0]
    else:
        zeros = int(round(target * ordered.size))
        new, _ = reconstruct.prune_with_hessian(ordered, h, sparsity=zeros / ordered.size)
        keep = _sparsity.magnitude_mask(np.abs(ordered), zeros)
    error = (reconstruct.layer_error(h, ordered, new),
             reconstruct.layer_error(h, ordered, ordered * keep))
    pruned = np.empty_like(new)
    pruned[:, order] = new
    if has_bias:  # E[y] unchanged by the pruning: b' = b + (W − W') E[x]
        bias = bias + (rows - pruned) @ h_aug[:k, k]
    return pruned, bias, error


def _row_order(layer: _sparsity.Layer) -> np.ndarray:
    """Column order of _sparsity's rows (input channel fastest) in the unfolded input's
    (c_in, *k): the N:M runs are M input channels at one kernel position."""
    if layer.node.op_type != "Conv":
        k = layer.shape[0] if layer.is_transposed else layer.shape[1]
        return np.arange(k)
    shape = layer.shape  # [C_out, C_in/g, *k]
    per_channel = int(np.prod(shape[2:]))
    return np.arange(shape[1] * per_channel).reshape(shape[1], per_channel).T.ravel()
