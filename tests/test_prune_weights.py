"""prune-weights: exact sparsity per layer and globally, N:M along the reduction axis, refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import make_model, run, tensor, to_ir, value_info
from onnx import helper
from onnxopt.passes import FoldBatchNormPass
from onnxopt.passes.prune_weights import PruneWeightsOptions, PruneWeightsPass

from onnxopt.api import default_model_path
from onnxopt.errors import BadInputError


def mixed_net(seed: int = 0, *, big_scale: float = 1.0):
    """x[1,8,10,10] -> Conv 3x3 (16) -> Relu -> Conv 3x3 (16, group 2) -> Relu -> depthwise Conv
    -> GlobalAveragePool -> Flatten -> Gemm transB=1 (24) -> MatMul [24,12] -> Gemm transB=0."""
    rng = np.random.default_rng(seed)
    inits = [
        tensor("w1", rng.standard_normal((16, 8, 3, 3))), tensor("b1", rng.standard_normal(16)),
        tensor("w2", big_scale * rng.standard_normal((16, 8, 3, 3))),
        tensor("w3", rng.standard_normal((16, 1, 3, 3))),
        tensor("g1", rng.standard_normal((24, 16))), tensor("m1", rng.standard_normal((24, 12))),
        tensor("g2", rng.standard_normal((12, 8))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=2),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="dw", pads=[1, 1, 1, 1], group=16),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "g1"], ["h1"], name="fc1", transB=1),
        helper.make_node("MatMul", ["h1", "m1"], ["h2"], name="mm"),
        helper.make_node("Gemm", ["h2", "g2"], ["y"], name="fc2"),
    ]
    return make_model(nodes, [value_info("x", [1, 8, 10, 10])], [value_info("y", [1, 8])],
                      inits)


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {n.name: n.inputs[1].const_value.numpy() for n in model.graph
            if n.op_type in ("Conv", "Gemm", "MatMul")}


def prune(proto, **kwargs):
    model = to_ir(proto)
    report = PruneWeightsPass(PruneWeightsOptions(**kwargs))(model)
    return model, report


def zeros(array: np.ndarray) -> int:
    return int(array.size - np.count_nonzero(array))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_each_layer_gets_exactly_its_share_of_zeros(sparsity):
    model, report = prune(mixed_net(), sparsity=sparsity, keep_first_last=False)
    found = weights(model)
    for name, array in found.items():
        assert zeros(array) == round(sparsity * array.size), name
    assert report.modified and {s.node for s in report.layers} == set(found)
    assert all(abs(s.sparsity - sparsity) < 1 / s.size + 1e-9 for s in report.layers)


def test_pruned_weights_are_the_smallest_and_the_rest_unchanged():
    dense = weights(to_ir(mixed_net()))
    model, _ = prune(mixed_net(), sparsity=0.5, keep_first_last=False)
    for name, array in weights(model).items():
        kept = array != 0
        np.testing.assert_array_equal(array[kept], dense[name][kept])
        assert np.abs(dense[name][~kept]).max() <= np.abs(dense[name][kept]).min()


def test_global_scope_hits_the_total_and_normalizes_a_layer_with_large_weights():
    model, report = prune(mixed_net(big_scale=100.0), sparsity=0.5, scope="global",
                          keep_first_last=False)
    found = weights(model)
    total = sum(a.size for a in found.values())
    assert abs(sum(zeros(a) for a in found.values()) - 0.5 * total) <= len(found)
    shares = {s.node: s.sparsity for s in report.layers}
    # Without per-layer normalization conv2 (100x larger weights) would keep everything.
    assert 0.3 < shares["conv2"] < 0.7, shares
    assert len({round(v, 2) for v in shares.values()}) > 1  # layers end at different shares


def _assert_n_m(blocks: np.ndarray, n: int) -> None:
    """blocks [..., m]: at most n nonzeros in each run (exactly n: the weights were random)."""
    assert (np.count_nonzero(blocks, axis=-1) == n).all()


def test_2_4_runs_along_input_channels_of_conv_and_k_of_gemm_and_matmul():
    model, report = prune(mixed_net(), pattern="2:4", keep_first_last=False)
    found = weights(model)
    w1 = found["conv1"]  # [16, 8, 3, 3]: runs of 4 input channels at each kernel position
    _assert_n_m(np.moveaxis(w1, 1, -1).reshape(16, 3, 3, 2, 4), 2)
    w2 = found["conv2"]  # group 2: 8 input channels per group
    _assert_n_m(np.moveaxis(w2, 1, -1).reshape(16, 3, 3, 2, 4), 2)
    _assert_n_m(found["fc1"].reshape(24, 4, 4), 2)  # transB=1: [N, K], K last
    _assert_n_m(found["mm"].T.reshape(12, 6, 4), 2)  # [K, N]: K first
    _assert_n_m(found["fc2"].T.reshape(8, 3, 4), 2)
    assert np.count_nonzero(found["dw"]) == found["dw"].size  # depthwise: 1 input channel
    assert any("'dw' (Conv) dense: 2:4 needs input channels per group divisible by 4 (1)" in line
               for line in report.log), report.log


def test_n_m_on_conv_transpose_runs_along_its_input_channels():
    rng = np.random.default_rng(3)
    proto = make_model(
        [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", strides=[2, 2])],
        [value_info("x", [1, 8, 4, 4])], [value_info("y", [1, 6, 8, 8])],
        [tensor("w", rng.standard_normal((8, 6, 2, 2)))])
    model, _ = prune(proto, pattern="1:4", keep_first_last=False)
    w = model.graph.node(0).inputs[1].const_value.numpy()  # [C_in, C_out, kh, kw]
    _assert_n_m(np.moveaxis(w, 0, -1).reshape(6, 2, 2, 2, 4), 1)
    assert run(model, {"x": rng.standard_normal((1, 8, 4, 4)).astype(np.float32)})[0].shape == (
        1, 6, 8, 8)


def test_first_and_last_layers_stay_dense_by_default_and_skip_names_more():
    model, report = prune(mixed_net(), sparsity=0.5, skip=("^mm$",))
    found = weights(model)
    assert zeros(found["conv1"]) == 0 and zeros(found["fc2"]) == 0 and zeros(found["mm"]) == 0
    assert zeros(found["conv2"]) == round(0.5 * found["conv2"].size)
    assert any("'conv1' (Conv) dense: first or last layer" in line for line in report.log)
    assert any("'mm' (MatMul) dense: matches --sparsity-skip" in line for line in report.log)


def test_pruned_model_runs_and_keeps_its_outputs_shape():
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)}
    [dense] = run(mixed_net(), feeds)
    model, _ = prune(mixed_net(), sparsity=0.3)
    [sparse] = run(model, feeds)
    assert sparse.shape == dense.shape and np.isfinite(sparse).all()
    assert not np.allclose(sparse, dense)


def test_second_run_changes_nothing_and_sparsity_zero_is_a_no_op():
    model, _ = prune(mixed_net(), sparsity=0.5)
    again = PruneWeightsPass(PruneWeightsOptions(sparsity=0.5))(model)
    assert not again.modified
    _, report = prune(mixed_net(), sparsity=0.0)
    assert not report.modified


def test_shared_or_non_constant_weights_are_refused():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "w"], ["b"], name="again"),
             helper.make_node("Gemm", ["b", "v"], ["y"], name="input_weight", transB=1)]
    proto = make_model(nodes, [value_info("x", [2, 6]), value_info("v", [6, 6])],
                       [value_info("y", [2, 6])], [tensor("w", rng.standard_normal((6, 6)))])
    model, report = prune(proto, sparsity=0.5, keep_first_last=False)
    assert not report.modified
    assert any("'first' (MatMul) dense: weight 'w' is shared with another node" in line
               for line in report.log)
    assert any("'input_weight' (Gemm) dense: its weight is not a constant" in line
               for line in report.log)


@pytest.mark.parametrize("kwargs", [{"sparsity": 1.0}, {"sparsity": -0.1},
                                    {"pattern": "4:2"}, {"pattern": "dense"},
                                    {"scope": "network"}])
def test_bad_options_are_one_line_errors(kwargs):
    with pytest.raises(BadInputError):
        prune(mixed_net(), **kwargs)


def test_embedded_default_prunes_after_batchnorm_folding():
    model = ir.load(default_model_path())
    FoldBatchNormPass()(model)
    report = PruneWeightsPass(PruneWeightsOptions(sparsity=0.5))(model)
    assert report.counts["pruned"] == 15  # 17 layers; the stem Conv and the fc Gemm stay dense
    samples = np.load(default_model_path().parent / "digits_samples.npz")
    [logits] = run(model, {"image": samples["image"][:8]})
    assert logits.shape == (8, 10) and np.isfinite(logits).all()
