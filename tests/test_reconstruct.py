"""The numerical core of re-fitting: unfolded layer inputs, streamed moments, SparseGPT, refit."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, run, tensor, value_info
from onnx import helper

from onnxopt.sparsity import hessian, reconstruct
from onnxopt.sparsity.hessian import CrossMoment, InputHessian, LayerInput


def conv_case(rng, rank, group, *, kernel=3, stride=2, dilation=1, pads=None, c_in=4, c_out=8):
    spatial = (9,) * rank
    pads = pads or (1,) * rank + (0,) * rank  # asymmetric: begin 1, end 0
    x = rng.standard_normal((2, c_in, *spatial)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in // group, *(kernel,) * rank)).astype(np.float32)
    spec = LayerInput("Conv", (kernel,) * rank, (stride,) * rank, tuple(pads),
                      (dilation,) * rank, group)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[kernel] * rank,
                            strides=[stride] * rank, pads=list(pads),
                            dilations=[dilation] * rank, group=group)
    proto = make_model([node], [value_info("x", list(x.shape))], [value_info("y", None)],
                       [tensor("w", w)])
    [y] = run(proto, {"x": x})
    return x, w, spec, y


@pytest.mark.parametrize(("rank", "group", "dilation"), [
    (1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 4, 1), (2, 1, 2), (3, 1, 1)])
def test_unfold_times_the_weight_is_the_convolution(rank, group, dilation):
    rng = np.random.default_rng(rank * 10 + group + dilation)
    x, w, spec, y = conv_case(rng, rank, group, dilation=dilation)
    patches = hessian.unfold(x, spec)  # [groups, N·positions, K]
    per_group = w.shape[0] // group
    outputs = [patches[g] @ w[g * per_group:(g + 1) * per_group].reshape(per_group, -1).T
               for g in range(group)]
    got = np.concatenate(outputs, axis=1)  # [N·positions, C_out]
    expected = np.moveaxis(y, 1, -1).reshape(-1, w.shape[0])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_auto_pad_same_matches_the_convolution():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 8, 7)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    [y] = run(make_model([node], [value_info("x", [1, 3, 8, 7])], [value_info("y", None)],
                         [tensor("w", w)]), {"x": x})
    spec = LayerInput("Conv", (3, 3), (2, 2), (0, 0, 0, 0), (1, 1), 1, "SAME_UPPER")
    got = hessian.unfold(x, spec)[0] @ w.reshape(5, -1).T
    np.testing.assert_allclose(got, np.moveaxis(y, 1, -1).reshape(-1, 5), rtol=1e-5, atol=1e-4)


def test_gemm_with_trans_a_and_batched_matmul_unfold_to_rows_of_k():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, 4))  # Gemm transA: x is [K, M]
    np.testing.assert_array_equal(hessian.unfold(a, LayerInput("Gemm", trans_a=True))[0], a.T)
    b = rng.standard_normal((2, 3, 5))
    np.testing.assert_array_equal(hessian.unfold(b, LayerInput("MatMul"))[0], b.reshape(6, 5))


def test_streamed_hessian_equals_the_full_product_and_its_memory_is_fixed():
    rng = np.random.default_rng(6)
    spec = LayerInput("Conv", (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2)
    batches = [rng.standard_normal((2, 4, 6, 6)) for _ in range(12)]
    sums = InputHessian(spec, with_bias=True, max_chunk_bytes=2000)  # many slices per batch
    sizes = []
    for x in batches:
        sums.add(x)
        sizes.append(sum(a.nbytes for a in vars(sums).values() if isinstance(a, np.ndarray)))
    full = np.concatenate([hessian.unfold(x, spec) for x in batches], axis=1)
    full = np.concatenate([full, np.ones((*full.shape[:2], 1))], axis=2)
    expected = np.matmul(full.transpose(0, 2, 1), full) / full.shape[1]
    np.testing.assert_allclose(sums.hessian, expected, rtol=1e-10)
    assert sums.count == full.shape[1] and len(set(sizes)) == 1  # the state never grows


def test_cross_moment_of_two_geometries_reads_the_same_rows():
    rng = np.random.default_rng(7)
    dense = rng.standard_normal((2, 6, 5, 5))
    kept = dense[:, [0, 2, 5]]
    a = LayerInput("Conv", (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    moment = CrossMoment(a, a, max_chunk_bytes=500)
    moment.add(kept, dense)
    u_a, u_b = hessian.unfold(kept, a)[0], hessian.unfold(dense, a)[0]
    np.testing.assert_allclose(moment.moment[0], u_a.T @ u_b / len(u_a), rtol=1e-10)


def correlated(rng, rows=2000, k=64, factors=8):
    x = rng.standard_normal((rows, factors)) @ rng.standard_normal((factors, k))
    return x + 0.05 * rng.standard_normal((rows, k))


def magnitude(w, keep_count=None, n=0, m=0):
    if m:
        runs = np.abs(w).reshape(w.shape[0], -1, m)
        keep = np.zeros_like(runs, dtype=bool)
        np.put_along_axis(keep, np.argsort(-runs, axis=-1)[..., :n], True, axis=-1)
        return w * keep.reshape(w.shape)
    flat = np.abs(w).ravel()
    keep = np.zeros(flat.size, dtype=bool)
    keep[np.argsort(-flat)[:keep_count]] = True
    return w * keep.reshape(w.shape)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_hits_the_exact_count_and_beats_magnitude(sparsity):
    rng = np.random.default_rng(8)
    x = correlated(rng, k=70)
    w = rng.standard_normal((33, 70))
    h = x.T @ x / len(x)
    new, keep = reconstruct.prune_with_hessian(w, h, sparsity=sparsity, block=32)
    assert np.count_nonzero(new == 0) == round(sparsity * w.size)
    assert (new[~keep] == 0).all()
    plain = magnitude(w, keep_count=w.size - round(sparsity * w.size))
    assert reconstruct.layer_error(h, w, new) < 0.7 * reconstruct.layer_error(h, w, plain)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_n_m_keeps_n_of_every_m_and_beats_magnitude(n, m):
    rng = np.random.default_rng(9)
    x = correlated(rng)
    w = rng.standard_normal((20, 64))
    h = x.T @ x / len(x)
    new, _ = reconstruct.prune_with_hessian(w, h, n=n, m=m, block=24)
    assert (np.count_nonzero(new.reshape(20, -1, m), axis=-1) <= n).all()
    plain = magnitude(w, n=n, m=m)
    assert reconstruct.layer_error(h, w, new) < 0.7 * reconstruct.layer_error(h, w, plain)


def test_n_m_needs_k_divisible_by_m_and_a_given_mask_is_kept():
    rng = np.random.default_rng(10)
    h = np.eye(6)
    with pytest.raises(ValueError, match="K divisible by M"):
        reconstruct.prune_with_hessian(rng.standard_normal((3, 6)), h, n=2, m=4)
    mask = rng.random((3, 6)) > 0.5
    new, keep = reconstruct.prune_with_hessian(rng.standard_normal((3, 6)), h, mask=mask)
    assert (keep == mask).all() and (new[~mask] == 0).all()


def test_dead_inputs_keep_the_count_exact_and_the_weights_finite():
    rng = np.random.default_rng(11)
    x = correlated(rng, k=16)
    x[:, 3:11] = 0.0  # 8 dead inputs, more than a block's share of zeros
    w = rng.standard_normal((5, 16))
    new, keep = reconstruct.prune_with_hessian(w, x.T @ x, sparsity=0.25, block=8)
    assert np.count_nonzero(~keep) == 20 and np.isfinite(new).all()
    mask = rng.random((5, 16)) > 0.5
    _, kept = reconstruct.prune_with_hessian(w, x.T @ x, mask=mask)
    assert (kept == mask).all()


def test_refit_recovers_dropped_channels_that_the_kept_ones_explain():
    rng = np.random.default_rng(12)
    kept = rng.standard_normal((500, 6))
    dense = np.concatenate([kept, kept[:, :2] @ rng.standard_normal((2, 3))], axis=1)  # 9 ch
    w = rng.standard_normal((4, 9))
    h, c = kept.T @ kept, kept.T @ dense
    new = reconstruct.refit(h, c, w, damp=1e-12)
    np.testing.assert_allclose(kept @ new.T, dense @ w.T, atol=1e-6)
    noisy = np.concatenate([kept, rng.standard_normal((500, 3))], axis=1)  # unexplained
    new = reconstruct.refit(kept.T @ kept, kept.T @ noisy, w)
    sliced = np.sum((kept @ w[:, :6].T - noisy @ w.T) ** 2)
    assert np.sum((kept @ new.T - noisy @ w.T) ** 2) <= sliced


def test_bad_arguments_are_value_errors_and_conv_defaults_are_the_spec_s():
    h = np.eye(8)
    w = np.ones((2, 8))
    for kwargs in ({}, {"sparsity": 1.5}, {"n": 4, "m": 2}, {"sparsity": 0.5, "n": 2, "m": 4}):
        with pytest.raises(ValueError):
            reconstruct.prune_with_hessian(w, h, **kwargs)
    x = np.random.default_rng(13).standard_normal((1, 2, 5, 5))
    plain = hessian.unfold(x, LayerInput("Conv", (3, 3)))
    assert plain.shape == (1, 9, 18)  # stride 1, no padding, dilation 1


def test_batches_of_samples_share_a_slice_when_they_fit():
    spec = LayerInput("Conv", (3, 3), pads=(1, 1, 1, 1))
    x = np.random.default_rng(14).standard_normal((16, 3, 6, 6))
    slices = list(hessian._slices(x, spec, max_bytes=4 * 36 * 27 * 8))
    assert len(slices) == 4 and all(s.shape[1] == 4 * 36 for s in slices)
    np.testing.assert_array_equal(np.concatenate(slices, axis=1), hessian.unfold(x, spec))
