"""Solvers that re-fit a pruned layer from its input statistics, with no training.

A layer computes Y = X Wᵀ (W: rows × K). With H = XᵀX, a change ΔW costs the layer's output
    ‖X ΔWᵀ‖² = tr(ΔW H ΔWᵀ)                                          (layer_error)

SparseGPT (Frantar & Alistarh 2023), Optimal Brain Surgeon one column at a time: with
U = chol(H⁻¹)ᵀ (upper), zeroing w_j costs w_j² / U_jj², and the error it leaves is spread over
the columns still to come in its row,
    W[:, j:] −= ((W[:, j] − Q[:, j]) / U_jj) · U[j, j:]
Columns are taken in blocks of `block`; within a block the mask is chosen by w² / U_jj²
(unstructured: the block's share of the layer's zeros, so the layer total is exact; N:M: the
M − N smallest of every M consecutive columns of a row, as the block reaches them), and the
block's error updates the columns after it at once (lazy batch updates). H gets
λ = damp · mean(diag H) on its diagonal; a dead input (H_jj = 0) gets H_jj = 1.

Least squares for channel pruning: the layer reads X' (fewer channels, from the pruned model)
and should give what the dense layer gives on X. With H = X'ᵀX' and C = X'ᵀX,
    W' = argmin ‖X' W'ᵀ − X Wᵀ‖² + λ‖W'‖² = ((H + λI)⁻¹ C Wᵀ)ᵀ            (refit)
Everything in float64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["layer_error", "prune_with_hessian", "refit", "shrunk"]


def shrunk(moment: np.ndarray, rows: int, *, bias: bool = False) -> np.ndarray:
    """A second moment (XᵀX, or X'ᵀX over the same inputs) shrunk toward its diagonal by
    γ = min(1, (K / rows)²): with fewer rows than inputs its off-diagonal part describes the
    calibration batches, not the data, while a few rows per input already estimate it (the
    square keeps γ small there: K / rows = 0.25 gives 0.06). Shrink H and C alike, or a
    correction (H⁻¹C) that should be near the identity is not. With `bias`, the last row and
    column (the means, against the appended ones) are kept as they are."""
    k = moment.shape[-1] - (1 if bias else 0)
    gamma = min(1.0, (k / max(rows, 1)) ** 2)
    if gamma <= 0.0:
        return moment
    result = np.array(moment, dtype=np.float64)
    block = result[:k, :k]
    result[:k, :k] = (1.0 - gamma) * block + gamma * np.diag(np.diag(block))
    return result


def layer_error(hessian: np.ndarray, reference: np.ndarray, weight: np.ndarray) -> float:
    """tr((W_ref − W) H (W_ref − W)ᵀ): the squared output error per input row."""
    delta = np.asarray(reference, np.float64) - np.asarray(weight, np.float64)
    return float(np.sum((delta @ hessian) * delta))


def prune_with_hessian(weight: np.ndarray, hessian: np.ndarray, *, sparsity: float | None = None,
                       n: int = 0, m: int = 0, mask: np.ndarray | None = None,
                       block: int = 128, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT on a [rows, K] weight: (new weight, keep mask). Exactly one of `sparsity`
    (round(s · size) zeros), `n`/`m` (at most n nonzeros in every m consecutive columns of a
    row; K % m == 0) or `mask` (True = kept) says what is pruned."""
    w = np.array(weight, dtype=np.float64)
    rows, k = w.shape
    if (sparsity is not None) + bool(m) + (mask is not None) != 1:
        raise ValueError("give exactly one of sparsity, n and m, or mask")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity}: expected 0 <= s < 1")
    if m and not 0 < n < m:
        raise ValueError(f"N:M pruning needs 0 < N < M: N={n}, M={m}")
    if m and k % m:
        raise ValueError(f"N:M pruning needs K divisible by M: K={k}, M={m}")
    if m:
        block = max(m, block - block % m)  # an N:M run never straddles two blocks
    # A dead input (always zero) gets H_jj = 1: its weights are pruned or kept by magnitude like
    # any other, so the count stays exact and a given mask is honoured as given.
    u = _inverse_cholesky(hessian, damp)
    keep = np.ones_like(w, dtype=bool)
    zeros = int(round(sparsity * w.size)) if sparsity is not None else 0
    for start in range(0, k, block):
        stop = min(start + block, k)
        u_block = u[start:stop, start:stop]
        scale = np.square(np.diag(u_block))
        if mask is not None:
            pruned = ~np.asarray(mask[:, start:stop], dtype=bool)
        elif not m:
            share = round(zeros * stop / k) - round(zeros * start / k)  # exact layer total
            pruned = _smallest(np.square(w[:, start:stop]) / scale, share)
        else:
            pruned = None  # chosen run by run below, on the updated weights
        errors = np.zeros((rows, stop - start))
        for j in range(stop - start):
            column = start + j
            if m and j % m == 0:
                run = np.square(w[:, column:column + m]) / scale[j:j + m]
                order = np.argsort(run, axis=1, kind="stable")[:, :m - n]
                keep[np.arange(rows)[:, None], column + order] = False
            elif pruned is not None:
                keep[:, column] = ~pruned[:, j]
            q = np.where(keep[:, column], w[:, column], 0.0)
            errors[:, j] = (w[:, column] - q) / u_block[j, j]
            w[:, column:stop] -= np.outer(errors[:, j], u_block[j, j:])
            w[:, column] = q
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return np.where(keep, w, 0.0), keep


def _smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of exactly `count` smallest scores (ties cannot change the count)."""
    chosen = np.zeros(scores.size, dtype=bool)
    if count > 0:
        chosen[np.argpartition(scores.ravel(), count - 1)[:count]] = True
    return chosen.reshape(scores.shape)


def _inverse_cholesky(hessian: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + λI)⁻¹, dead inputs (H_jj == 0) given H_jj = 1."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    for attempt in range(4):  # a near-singular H needs more damping before it factors
        try:
            lower = np.linalg.cholesky(h)
            break
        except np.linalg.LinAlgError:
            h[np.diag_indices_from(h)] += 10.0 ** attempt * damp * np.mean(np.diag(h))
    else:
        raise np.linalg.LinAlgError("input Hessian is not positive definite even damped")
    inverse_lower = np.linalg.solve(lower, np.eye(len(h)))  # L⁻¹
    inverse = inverse_lower.T @ inverse_lower  # H⁻¹ = L⁻ᵀ L⁻¹
    return np.linalg.cholesky(inverse).T


def refit(hessian: np.ndarray, cross: np.ndarray, weight: np.ndarray, *,
          prior: np.ndarray | None = None, damp: float = 1e-4) -> np.ndarray:
    """W' [rows, K'] minimizing ‖X' W'ᵀ − X Wᵀ‖² + λ‖W' − P‖² (λ = damp · mean(diag H), P the
    `prior`, e.g. the plainly sliced weights, or 0) from H = X'ᵀX' [K', K'], C = X'ᵀX [K', K]
    and the dense W [rows, K]: (H + λI) W'ᵀ = C Wᵀ + λ Pᵀ."""
    h = np.array(hessian, dtype=np.float64)
    strength = damp * max(float(np.mean(np.diag(h))), 1e-30)
    h[np.diag_indices_from(h)] += strength
    target = np.asarray(cross, np.float64) @ np.asarray(weight, np.float64).T  # [K', rows]
    if prior is not None:
        target = target + strength * np.asarray(prior, np.float64).T
    try:
        solved = np.linalg.solve(h, target)
    except np.linalg.LinAlgError:
        solved = np.linalg.lstsq(h, target, rcond=None)[0]
    return solved.T
