"""prune-channels: coupled channel removal checked against ONNX Runtime, refusals, MAC target.

The oracle: zero a channel in every producer of its group (weights, bias, and what follows
before the ReLU), so the channel is exactly zero everywhere it flows; removing exactly those
channels with `remove=` must then leave the outputs unchanged. A coupling the dependency graph
got wrong shows up as a shape error or as a different output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import bn_node, bn_params, make_model, run, tensor, to_ir, value_info
from onnx import helper, numpy_helper
from onnxopt.passes import CleanupPass, FoldBatchNormPass
from onnxopt.passes.prune_channels import (
    PruneChannelsOptions,
    PruneChannelsPass,
    channel_groups,
)

from onnxopt.errors import BadInputError

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def digits() -> ir.Model:
    return ir.load(str(ROOT / "onnxopt" / "data" / "digits_resnet.onnx"))


def conv(name, x, y, shape, rng, inits, *, group=1, pads=1, bias=True):
    """A Conv node with weight `<name>.W` of `shape` (and bias `<name>.b`) added to inits."""
    inits.append(tensor(f"{name}.W", rng.standard_normal(shape) * 0.5))
    inputs = [x, f"{name}.W"]
    if bias:
        inits.append(tensor(f"{name}.b", rng.standard_normal(shape[0]) * 0.5))
        inputs.append(f"{name}.b")
    return helper.make_node("Conv", inputs, [y], name=name, group=group, pads=[pads] * 4)


def relu(x, y):
    return helper.make_node("Relu", [x], [y], name=f"relu_{y}")


def residual_model(seed=0):
    """x -> conv_a -> BN -> Relu -> conv_b ; x -> conv_s (1x1) ; Add -> Relu -> conv_o -> y."""
    rng, inits = np.random.default_rng(seed), []
    nodes = [conv("conv_a", "x", "a", (8, 4, 3, 3), rng, inits), bn_node("bn_a", "a", "an"),
             relu("an", "ar"), conv("conv_b", "ar", "b", (8, 8, 3, 3), rng, inits),
             conv("conv_s", "x", "s", (8, 4, 1, 1), rng, inits, pads=0),
             helper.make_node("Add", ["b", "s"], ["h"], name="add"), relu("h", "hr"),
             conv("conv_o", "hr", "y", (6, 8, 3, 3), rng, inits)]
    inits += bn_params("bn_a", 8, rng)
    return make_model(nodes, [value_info("x", ["N", 4, 8, 8])], [value_info("y", ["N", 6, 8, 8])],
                      inits)


def feeds_for(model: onnx.ModelProto, seed=1, batch=2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or batch for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def arrays(model) -> dict[str, np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def zeroed(model: onnx.ModelProto, positions: dict[str, tuple[int, list[int]]]):
    """A copy with `positions` (initializer -> (axis, indices)) set to zero."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for t in model.graph.initializer:
        if t.name in positions:
            axis, index = positions[t.name]
            array = numpy_helper.to_array(t).copy()
            np.moveaxis(array, axis, 0)[index] = 0
            t.CopyFrom(numpy_helper.from_array(array, t.name))
    return model


def prune(model: onnx.ModelProto, **options):
    ir_model = to_ir(model)
    report = PruneChannelsPass(PruneChannelsOptions(**options))(ir_model)
    onnx.checker.check_model(ir.to_proto(ir_model), full_check=True)
    return report


def assert_oracle(model, remove: dict, zero: dict, kept: dict, *, atol=1e-5):
    """Zeroed channels removed: outputs equal; every listed tensor is the original minus the
    removed positions (kept slices bit-exact); the output shapes are unchanged."""
    model = zeroed(model, zero)
    report = prune(model, sparsity=0.0, remove=remove)
    assert report.modified
    assert report.removed == {k: sorted(v) for k, v in remove.items()}
    feeds = feeds_for(model)
    for expected, actual in zip(run(model, feeds), run(report.model, feeds), strict=True):
        assert actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol)
    before, after = arrays(model), arrays(report.model)
    for name, (axis, index) in kept.items():
        np.testing.assert_array_equal(after[name], np.delete(before[name], index, axis=axis))
    return report


def test_residual_block_with_batchnorm_and_shortcut():
    model = residual_model()
    a, res = [1, 6], [0, 3, 5]
    report = assert_oracle(
        model, remove={"conv_a": a, "conv_b": res},
        zero={"conv_a.W": (0, a), "conv_a.b": (0, a), "bn_a.scale": (0, a), "bn_a.B": (0, a),
              "conv_b.W": (0, res), "conv_b.b": (0, res), "conv_s.W": (0, res),
              "conv_s.b": (0, res)},
        kept={"conv_a.W": (0, a), "conv_a.b": (0, a), **{f"bn_a.{p}": (0, a) for p in
              ("scale", "B", "mean", "var")}, "conv_s.W": (0, res), "conv_s.b": (0, res),
              "conv_o.W": (1, res), "conv_o.b": (0, [])})
    w_b = arrays(residual_model())["conv_b.W"]
    np.testing.assert_array_equal(arrays(report.model)["conv_b.W"],
                                  np.delete(np.delete(w_b, res, 0), a, 1))
    assert set(report.consumers) == {"conv_b", "conv_o"}
    assert any(line.startswith("pruned 2 of 8 channels of group 'conv_a' (Conv 'conv_a' -> "
                               "BatchNormalization -> Relu -> Conv 'conv_b'): MACs -")
               for line in report.log)
    assert "refused group 'conv_o': feeds graph output 'y'" in report.log


def test_weights_in_constant_nodes():
    """TF and Paddle exports keep weights in Constant nodes; they shrink the same way."""
    a = [2, 7]
    model = zeroed(residual_model(), {"conv_a.W": (0, a), "conv_a.b": (0, a),
                                      "bn_a.scale": (0, a), "bn_a.B": (0, a)})
    constants = [helper.make_node("Constant", [], [t.name], value=t)
                 for t in model.graph.initializer]
    nodes = constants + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    report = prune(model, sparsity=0.0, remove={"conv_a": a})
    assert report.removed == {"conv_a": a}
    feeds = feeds_for(model)
    np.testing.assert_allclose(run(report.model, feeds)[0], run(model, feeds)[0], rtol=1e-5,
                               atol=1e-5)
    weight = next(n for n in report.model.graph if n.name == "conv_b").inputs[1]
    assert ir.convenience.get_const_tensor(weight).shape == (8, 6, 3, 3)


def test_channel_groups_lists_producers_consumers_and_activations():
    groups = {g.key: g for g in channel_groups(to_ir(residual_model()))}
    assert sorted(groups) == ["conv_a", "conv_b", "conv_o"]
    residual = groups["conv_b"]
    assert [n.name for n in residual.producers] == ["conv_b", "conv_s"]
    assert [(s.node.name, s.input, s.axis) for s in residual.consumers] == [("conv_o", 1, 1)]
    assert {a.value.name for a in residual.activations} == {"b", "s", "h", "hr"}
    assert all(a.axis == 1 and list(a.index) == list(range(8)) for a in residual.activations)
    assert residual.refused is None and groups["conv_o"].refused == "feeds graph output 'y'"
    # conv_b: 8 out x 8 in x 9 x 64 positions per channel; conv_s 4 x 64; conv_o 6 x 9 x 64
    assert residual.macs_per_channel == 64 * (8 * 9 + 4 + 6 * 9)


def grouped_model(seed=0):
    """x -> conv1 (16) -> Relu -> conv_g (group 4) -> Relu -> conv3 (1x1) -> y."""
    rng, inits = np.random.default_rng(seed), []
    nodes = [conv("conv1", "x", "c1", (16, 8, 3, 3), rng, inits), relu("c1", "r1"),
             conv("conv_g", "r1", "cg", (16, 4, 3, 3), rng, inits, group=4), relu("cg", "rg"),
             conv("conv3", "rg", "y", (6, 16, 1, 1), rng, inits, pads=0)]
    return make_model(nodes, [value_info("x", ["N", 8, 6, 6])], [value_info("y", ["N", 6, 6, 6])],
                      inits)


def test_grouped_conv_loses_as_many_channels_in_each_group():
    model = grouped_model()
    first, second = [0, 5, 10, 15], [3, 4, 9, 14]  # one per block of 4 channels
    report = assert_oracle(
        model, remove={"conv1": first, "conv_g": second},
        zero={"conv1.W": (0, first), "conv1.b": (0, first), "conv_g.W": (0, second),
              "conv_g.b": (0, second)},
        kept={"conv1.W": (0, first), "conv_g.b": (0, second), "conv3.W": (1, second)})
    w_g = arrays(model)["conv_g.W"]  # [16, 4, 3, 3]: output block i reads inputs 4i..4i+3
    rows = [[r for r in range(4 * i, 4 * i + 4) if r not in second] for i in range(4)]
    columns = [[c - 4 * i for c in range(4 * i, 4 * i + 4) if c not in first] for i in range(4)]
    expected = np.concatenate([w_g[rows[i]][:, columns[i]] for i in range(4)])
    np.testing.assert_array_equal(arrays(report.model)["conv_g.W"], expected)
    node = next(n for n in report.model.graph if n.name == "conv_g")
    assert node.attributes.get_int("group") == 4
    with pytest.raises(BadInputError, match="as many from each of its 4"):
        prune(model, sparsity=0.0, remove={"conv1": [0, 1]})


def test_grouped_conv_greedy_keeps_blocks_equal():
    report = prune(grouped_model(), sparsity=0.4, channel_multiple=1)
    for key in ("conv1", "conv_g"):
        removed = np.array(report.removed.get(key, []))
        assert len(set(np.bincount(removed // 4, minlength=4))) == 1
    feeds = feeds_for(grouped_model())
    assert run(report.model, feeds)[0].shape == (2, 6, 6, 6)


def depthwise_model(multiplier, seed=0):
    """x -> conv1 (8) -> x·sigmoid(x) -> depthwise (group 8, x multiplier) -> Relu -> pointwise."""
    rng, inits = np.random.default_rng(seed), []
    nodes = [conv("conv1", "x", "c1", (8, 4, 1, 1), rng, inits, pads=0),
             helper.make_node("Sigmoid", ["c1"], ["g1"], name="sigmoid"),
             helper.make_node("Mul", ["c1", "g1"], ["r1"], name="swish"),
             conv("dw", "r1", "d", (8 * multiplier, 1, 3, 3), rng, inits, group=8),
             relu("d", "rd"), conv("pw", "rd", "y", (6, 8 * multiplier, 1, 1), rng, inits, pads=0)]
    return make_model(nodes, [value_info("x", ["N", 4, 6, 6])], [value_info("y", ["N", 6, 6, 6])],
                      inits)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_passes_the_channels_through(multiplier):
    removed = [2, 5]
    positions = [c * multiplier + j for c in removed for j in range(multiplier)]
    report = assert_oracle(
        depthwise_model(multiplier), remove={"conv1": removed},
        zero={"conv1.W": (0, removed), "conv1.b": (0, removed), "dw.b": (0, positions)},
        kept={"conv1.W": (0, removed), "dw.W": (0, positions), "dw.b": (0, positions),
              "pw.W": (1, positions)})
    node = next(n for n in report.model.graph if n.name == "dw")
    assert node.attributes.get_int("group") == 6
    assert [g.key for g in channel_groups(report.model)][:2] == ["conv1", "pw"]


def concat_split_model(cut: str, seed=0):
    """conv_a (6) and conv_b (5) and x (4) -> Concat -> conv_c (8) -> Relu -> Split [3, 5]
    (opset 11: an attribute) or two Slices -> conv_d, conv_e -> Concat -> y."""
    rng = np.random.default_rng(seed)
    inits = [tensor("sizes", [3, 5], np.int64)] if cut == "split" else []
    nodes = [conv("conv_a", "x", "a", (6, 4, 3, 3), rng, inits), relu("a", "ra"),
             conv("conv_b", "x", "b", (5, 4, 1, 1), rng, inits, pads=0), relu("b", "rb"),
             helper.make_node("Concat", ["ra", "rb", "x"], ["cat"], name="cat", axis=1),
             conv("conv_c", "cat", "c", (8, 15, 3, 3), rng, inits), relu("c", "rc")]
    if cut == "split":
        nodes.append(helper.make_node("Split", ["rc", "sizes"], ["s0", "s1"], name="split",
                                      axis=1))
    elif cut == "split-opset11":
        nodes.append(helper.make_node("Split", ["rc"], ["s0", "s1"], name="split", axis=1,
                                      split=[3, 5]))
    else:
        for i, (start, end) in enumerate([(0, 3), (3, 100)]):
            inits += [tensor(f"start{i}", [start], np.int64), tensor(f"end{i}", [end], np.int64),
                      tensor(f"axes{i}", [1], np.int64)]
            nodes.append(helper.make_node("Slice", ["rc", f"start{i}", f"end{i}", f"axes{i}"],
                                          [f"s{i}"], name=f"slice{i}"))
    nodes += [conv("conv_d", "s0", "d", (4, 3, 1, 1), rng, inits, pads=0),
              conv("conv_e", "s1", "e", (4, 5, 1, 1), rng, inits, pads=0),
              helper.make_node("Concat", ["d", "e"], ["y"], name="out", axis=1)]
    return make_model(nodes, [value_info("x", ["N", 4, 6, 6])], [value_info("y", ["N", 8, 6, 6])],
                      inits, opset=11 if cut == "split-opset11" else 17)


@pytest.mark.parametrize("cut", ["split", "split-opset11", "slice"])
def test_concat_and_split_offsets(cut):
    a, b, c = [1, 4], [0], [2, 6]
    report = assert_oracle(
        concat_split_model(cut), remove={"conv_a": a, "conv_b": b, "conv_c": c},
        zero={"conv_a.W": (0, a), "conv_a.b": (0, a), "conv_b.W": (0, b), "conv_b.b": (0, b),
              "conv_c.W": (0, c), "conv_c.b": (0, c)},
        kept={"conv_a.W": (0, a), "conv_b.b": (0, b), "conv_d.W": (1, [2]),
              "conv_e.W": (1, [3]), "conv_d.b": (0, [])})
    w_c = arrays(concat_split_model(cut))["conv_c.W"]  # columns: a 0..5, b 6..10, x 11..14
    np.testing.assert_array_equal(arrays(report.model)["conv_c.W"],
                                  np.delete(np.delete(w_c, c, 0), [1, 4, 6], 1))
    shapes = {n.name: n for n in report.model.graph}
    if cut == "split":
        assert list(shapes["split"].inputs[1].const_value.numpy()) == [2, 4]
    elif cut == "split-opset11":
        assert list(shapes["split"].attributes["split"].value) == [2, 4]
    else:
        assert [int(shapes["slice1"].inputs[i].const_value.numpy()[0]) for i in (1, 2)] == [2, 6]


def flatten_gemm_model(kind, seed=0):
    """x -> conv (6) -> Relu -> [GlobalAveragePool] -> Flatten | Reshape -> Gemm -> y."""
    rng, inits = np.random.default_rng(seed), []
    nodes = [conv("conv", "x", "c", (6, 3, 3, 3), rng, inits), relu("c", "r")]
    if kind == "gap":
        nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
                  helper.make_node("Flatten", ["p"], ["f"], name="flatten")]
        inits.append(tensor("fc.W", rng.standard_normal((6, 5))))  # transB=0: [K, N]
    elif kind == "flatten":
        nodes.append(helper.make_node("Flatten", ["r"], ["f"], name="flatten"))
        inits.append(tensor("fc.W", rng.standard_normal((5, 96))))
    elif kind == "reshape":
        inits.append(tensor("target", [-1, 96], np.int64))
        nodes.append(helper.make_node("Reshape", ["r", "target"], ["f"], name="reshape"))
        inits.append(tensor("fc.W", rng.standard_normal((5, 96))))
    else:  # x.view(x.size(0), -1) as TorchScript writes it
        inits += [tensor("zero", 0, np.int64), tensor("axis0", [0], np.int64),
                  tensor("rest", [-1], np.int64), tensor("fc.W", rng.standard_normal((5, 96)))]
        nodes += [helper.make_node("Shape", ["r"], ["shape"], name="shape"),
                  helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch"),
                  helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"], name="unsqueeze"),
                  helper.make_node("Concat", ["n1", "rest"], ["target"], name="target", axis=0),
                  helper.make_node("Reshape", ["r", "target"], ["f"], name="reshape")]
    inits.append(tensor("fc.b", rng.standard_normal(5)))
    nodes.append(helper.make_node("Gemm", ["f", "fc.W", "fc.b"], ["y"], name="fc",
                                  transB=int(kind != "gap")))
    return make_model(nodes, [value_info("x", ["N", 3, 4, 4])], [value_info("y", ["N", 5])],
                      inits)


@pytest.mark.parametrize("kind", ["flatten", "reshape", "view", "gap"])
def test_flatten_to_gemm_maps_channel_blocks(kind):
    removed = [1, 4]
    rows = [16 * c + i for c in removed for i in range(16)] if kind != "gap" else removed
    report = assert_oracle(
        flatten_gemm_model(kind), remove={"conv": removed},
        zero={"conv.W": (0, removed), "conv.b": (0, removed)},
        kept={"conv.W": (0, removed), "fc.W": (1 if kind != "gap" else 0, rows),
              "fc.b": (0, [])})
    if kind == "reshape":
        target = next(n for n in report.model.graph if n.name == "reshape").inputs[1]
        assert list(target.const_value.numpy()) == [-1, 64]


def passthrough_model(seed=0):
    """conv -> Mul by a per-channel scale -> Add a per-channel shift -> x2 (scalar) -> Relu ->
    Pad -> MaxPool -> Resize x2 -> Slice (spatial) -> conv2 -> y."""
    rng, inits = np.random.default_rng(seed), []
    inits += [tensor("scale", rng.uniform(0.5, 2, (1, 8, 1, 1))),
              tensor("shift", rng.standard_normal((1, 8, 1, 1))), tensor("two", 2.0),
              tensor("pads", [0, 0, 1, 1, 0, 0, 1, 1], np.int64),
              tensor("scales", [1, 1, 2, 2]), tensor("starts", [1], np.int64),
              tensor("ends", [9], np.int64), tensor("axes", [2], np.int64)]
    nodes = [conv("conv", "x", "c", (8, 4, 3, 3), rng, inits),
             helper.make_node("Mul", ["c", "scale"], ["m"], name="affine_mul"),
             helper.make_node("Add", ["m", "shift"], ["a"], name="affine_add"),
             helper.make_node("Mul", ["a", "two"], ["d"], name="double"), relu("d", "r"),
             helper.make_node("Pad", ["r", "pads"], ["p"], name="pad"),
             helper.make_node("MaxPool", ["p"], ["q"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Resize", ["q", "", "scales"], ["u"], name="resize"),
             helper.make_node("Slice", ["u", "starts", "ends", "axes"], ["v"], name="crop"),
             conv("conv2", "v", "y", (4, 8, 3, 3), rng, inits)]
    return make_model(nodes, [value_info("x", ["N", 4, 6, 6])], [value_info("y", ["N", 4, 7, 8])],
                      inits)


def test_passthrough_ops_and_per_channel_constants():
    removed = [0, 5, 6]
    assert_oracle(passthrough_model(), remove={"conv": removed},
                  zero={"conv.W": (0, removed), "conv.b": (0, removed), "shift": (1, removed)},
                  kept={"conv.W": (0, removed), "scale": (1, removed), "shift": (1, removed),
                        "conv2.W": (1, removed), "scales": (0, []), "pads": (0, [])})


def mlp_model(kind, seed=0):
    """x[N, 12] -> Gemm | MatMul+Add (16) -> Relu -> Gemm | MatMul -> y[N, 5]."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((12, 16)), rng.standard_normal((16, 5))
    inits = [tensor("b1", rng.standard_normal(16))]
    if kind == "matmul":
        inits += [tensor("w1", w1), tensor("w2", w2)]
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="fc1"),
                 helper.make_node("Add", ["m", "b1"], ["h"], name="bias1"),
                 relu("h", "r"), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    else:
        trans = int(kind == "gemm_transB")
        inits += [tensor("w1", w1.T if trans else w1), tensor("w2", w2.T if trans else w2),
                  tensor("b2", rng.standard_normal(5))]
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=trans),
                 relu("h", "r"),
                 helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=trans)]
    return make_model(nodes, [value_info("x", ["N", 12])], [value_info("y", ["N", 5])], inits)


@pytest.mark.parametrize("kind", ["gemm", "gemm_transB", "matmul"])
def test_mlp_hidden_features(kind):
    removed, trans = [3, 7, 11], int(kind == "gemm_transB")
    assert_oracle(mlp_model(kind), remove={"fc1": removed},
                  zero={"w1": (1 - trans, removed), "b1": (0, removed)},
                  kept={"w1": (1 - trans, removed), "b1": (0, removed), "w2": (trans, removed)})


def test_residual_and_mlp_prune_by_sparsity_and_run():
    for model in (residual_model(), mlp_model("matmul"), concat_split_model("split")):
        report = prune(model, sparsity=0.3, channel_multiple=1)
        assert report.modified and report.macs_after <= 0.7 * report.macs_before
        feeds = feeds_for(model)
        assert [o.shape for o in run(report.model, feeds)] == [o.shape for o in run(model, feeds)]


def shared_weight_model(seed=0):
    """conv1 -> Relu -> conv2 (W2) -> Relu -> conv3 (W2 again) -> y."""
    rng, inits = np.random.default_rng(seed), []
    nodes = [conv("conv1", "x", "c1", (8, 4, 3, 3), rng, inits), relu("c1", "r1"),
             conv("conv2", "r1", "c2", (8, 8, 3, 3), rng, inits, bias=False), relu("c2", "r2"),
             helper.make_node("Conv", ["r2", "conv2.W"], ["y"], name="conv3", pads=[1] * 4)]
    return make_model(nodes, [value_info("x", ["N", 4, 6, 6])], [value_info("y", ["N", 8, 6, 6])],
                      inits)


def transpose_model(seed=0):
    """conv -> Relu -> Transpose -> y, and conv_p -> Relu -> conv_q -> z (still prunable)."""
    rng, inits = np.random.default_rng(seed), []
    nodes = [conv("conv", "x", "c", (8, 4, 3, 3), rng, inits), relu("c", "r"),
             helper.make_node("Transpose", ["r"], ["y"], name="tr", perm=[0, 2, 3, 1]),
             conv("conv_p", "x", "p", (8, 4, 3, 3), rng, inits), relu("p", "rp"),
             conv("conv_q", "rp", "z", (4, 8, 3, 3), rng, inits)]
    return make_model(nodes, [value_info("x", ["N", 4, 6, 6])],
                      [value_info("y", ["N", 6, 6, 8]), value_info("z", ["N", 4, 6, 6])], inits)


def subgraph_model(seed=0):
    """conv -> Relu -> r, read by conv2 and inside an If branch."""
    rng, inits = np.random.default_rng(seed), []
    branch = helper.make_graph([helper.make_node("Identity", ["r"], ["t"])], "branch", [],
                               [value_info("t", ["N", 8, 6, 6])])
    nodes = [conv("conv", "x", "c", (8, 4, 3, 3), rng, inits), relu("c", "r"),
             conv("conv2", "r", "y", (4, 8, 3, 3), rng, inits),
             helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch,
                              else_branch=branch)]
    return make_model(nodes, [value_info("x", ["N", 4, 6, 6]),
                              value_info("cond", [], onnx.TensorProto.BOOL)],
                      [value_info("y", ["N", 4, 6, 6]), value_info("z", ["N", 8, 6, 6])], inits)


def graph_input_model(seed=0, *, weight_is_input=False):
    """conv -> Add a graph input x2 -> Relu -> conv2 -> y (or: conv2's weight is an input)."""
    rng, inits = np.random.default_rng(seed), []
    nodes = [conv("conv", "x", "c", (8, 4, 3, 3), rng, inits),
             helper.make_node("Add", ["c", "x2"], ["a"], name="add"), relu("a", "r"),
             conv("conv2", "r", "y", (4, 8, 3, 3), rng, inits)]
    inputs = [value_info("x", ["N", 4, 6, 6])]
    if weight_is_input:
        nodes[1] = helper.make_node("Identity", ["c"], ["a"], name="identity")
        inits = [t for t in inits if t.name != "conv2.W"]
        inputs.append(value_info("conv2.W", [4, 8, 3, 3]))
    else:
        inputs.append(value_info("x2", ["N", 8, 6, 6]))
    return make_model(nodes, inputs, [value_info("y", ["N", 4, 6, 6])], inits)


@pytest.mark.parametrize("model, key, reason", [
    (residual_model(), "conv_o", "feeds graph output 'y'"),
    (shared_weight_model(), "conv1",
     "constant 'conv2.W' is shared by 'conv2' (Conv) and 'conv3' (Conv)"),
    (transpose_model(), "conv", "read by 'tr' (Transpose), which moves the channel axis"),
    (subgraph_model(), "conv", "read inside a subgraph by <unnamed Identity -> 't'>"),
    (graph_input_model(), "conv",
     "'add' (Add) combines it with 'x2', whose channels no group owns"),
    (graph_input_model(weight_is_input=True), "conv",
     "read by 'conv2' (Conv), whose weight is not a constant"),
], ids=["graph-output", "shared-weight", "transpose", "subgraph", "graph-input",
        "weight-is-input"])
def test_refusals_are_logged_and_leave_the_group_alone(model, key, reason):
    before = arrays(model)
    report = prune(model, sparsity=0.5)
    assert f"refused group {key!r}: {reason}" in report.log
    assert key not in report.removed
    after = arrays(report.model)  # its own rows stay (its inputs may belong to another group)
    np.testing.assert_array_equal(after[f"{key}.b"], before[f"{key}.b"])
    assert after[f"{key}.W"].shape[0] == before[f"{key}.W"].shape[0]
    feeds = feeds_for(model)
    feeds["cond"] = np.array(True)
    assert [o.shape for o in run(report.model, feeds)] == [o.shape for o in run(model, feeds)]


def test_transpose_refusal_leaves_other_groups_prunable():
    report = prune(transpose_model(), sparsity=0.3, channel_multiple=1)
    assert list(report.removed) == ["conv_p"]
    with pytest.raises(BadInputError, match="unknown group"):
        prune(transpose_model(), remove={"nope": [0]})


def test_sparsity_zero_changes_nothing():
    model = residual_model()
    report = prune(model, sparsity=0.0)
    assert not report.modified and report.removed == {}
    feeds = feeds_for(model)
    for expected, actual in zip(run(model, feeds), run(report.model, feeds), strict=True):
        np.testing.assert_array_equal(actual, expected)
    with pytest.raises(BadInputError, match="--sparsity"):
        prune(model, sparsity=1.0)


def test_scores_replace_the_weight_norm_and_skip_keeps_a_group():
    scores = {"conv_a": np.arange(8)[::-1].astype(float), "conv_b": np.arange(8.0)}
    report = prune(residual_model(), sparsity=0.3, scores=scores, channel_multiple=1)
    for key, removed in report.removed.items():
        lowest = np.argsort(scores[key], kind="stable")[:len(removed)]
        assert removed == sorted(lowest.tolist())
    report = prune(residual_model(), sparsity=0.3, skip=("conv_s",), channel_multiple=1)
    assert "conv_b" not in report.removed
    assert "refused group 'conv_b': 'conv_s' (Conv) matches skip 'conv_s'" in report.log


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "with-batchnorm"])
def test_default_model_meets_the_mac_target(fold):
    model = digits()
    if fold:
        FoldBatchNormPass()(model)
    proto = ir.to_proto(model)
    report = PruneChannelsPass(PruneChannelsOptions(sparsity=0.3, channel_multiple=1))(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    before, after = report.macs_before, report.macs_after
    assert 0.68 * before < after <= 0.7 * before  # the greedy stops one step past the target
    image = np.random.default_rng(0).standard_normal((3, 1, 64, 64)).astype(np.float32)
    assert run(model, {"image": image})[0].shape == run(proto, {"image": image})[0].shape == (3, 10)
    for node in model.graph:  # every BN shrank with its Conv
        if node.op_type == "BatchNormalization":
            channels = node.inputs[0].producer().inputs[1].const_value.shape[0]
            assert all(v.const_value.shape == (channels,) for v in node.inputs[1:]
                       if v.const_value is not None)


@pytest.mark.parametrize("sparsity, multiple", [(0.3, 16), (0.99, 8)])
def test_default_model_channel_multiple_and_min_keep(sparsity, multiple):
    report = PruneChannelsPass(PruneChannelsOptions(sparsity=sparsity,
                                                    channel_multiple=multiple))(digits())
    assert report.modified and report.macs_after <= (1 - sparsity) * report.macs_before or \
        report.log[-2].startswith("MAC target not reached")
    groups = {g.key: g for g in channel_groups(digits())}
    for key, removed in report.removed.items():
        kept = groups[key].channels - len(removed)
        assert kept % multiple == 0 and kept >= groups[key].channels / 4


EXPORTS = ["prune_cnn_ts", "prune_cnn_dynamo", "prune_mlp_ts", "prune_mlp_dynamo"]


@pytest.mark.parametrize("name", [*EXPORTS, "digits"])
def test_real_exports_every_group_passes_the_oracle(name):
    """Per group: zero a third of its channels (as many per grouped-Conv block) in every
    producer-side constant, prune exactly those: the outputs must not move."""
    base = digits() if name == "digits" else ir.load(str(MODELS / f"{name}.onnx"))
    CleanupPass()(base)  # as the pipeline does: folds the exporters' shape arithmetic
    feeds = feeds_for(ir.to_proto(base), batch=3)
    rng = np.random.default_rng(0)
    for key in [g.key for g in channel_groups(base) if not g.refused]:
        model = base.clone()
        group = {g.key: g for g in channel_groups(model)}[key]
        per_block = group.channels // group.blocks
        channels = np.concatenate([i * per_block + rng.choice(per_block, per_block // 3,
                                                               replace=False)
                                   for i in range(group.blocks)]).tolist()
        for site in group.parameters:
            value = site.node.inputs[site.input]
            array = value.const_value.numpy().copy()
            np.moveaxis(array, site.axis, 0)[np.isin(site.index, channels)] = 0
            value.const_value = ir.tensor(array, name=value.name)
        expected = run(model, feeds)
        report = PruneChannelsPass(PruneChannelsOptions(sparsity=0.0, remove={key: channels}))(
            model)
        assert report.removed == {key: sorted(channels)}
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        for want, got in zip(expected, run(model, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", EXPORTS)
def test_real_exports_prune_and_run(name):
    model = ir.load(str(MODELS / f"{name}.onnx"))
    CleanupPass()(model)  # as the pipeline does: folds the exporters' shape arithmetic
    proto = ir.to_proto(model)
    report = PruneChannelsPass(PruneChannelsOptions(sparsity=0.3))(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert report.modified and report.macs_after <= 0.7 * report.macs_before
    refused = [line for line in report.log if line.startswith("refused")]
    assert len(refused) == 1 and "feeds graph output 'output'" in refused[0]
    feeds = feeds_for(proto, batch=3)
    assert [o.shape for o in run(model, feeds)] == [o.shape for o in run(proto, feeds)]


def test_a_rank_shape_inference_cannot_give_comes_from_the_observed_sizes():
    """x is reshaped to a shape fed at run time, so ONNX shape inference knows neither the
    Reshape's nor fc1's output rank; the sizes seen at run time (what `--sparsity-pattern
    channels` passes) give it, and fc1's channels can be pruned."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
             helper.make_node("MatMul", ["flat", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    proto = make_model(nodes, [value_info("x", [2, 3, 16]),
                               value_info("target", [None], onnx.TensorProto.INT64)],
                       [value_info("y", [None, 8])],
                       [tensor("w1", rng.standard_normal((16, 32))),
                        tensor("w2", rng.standard_normal((32, 8)))])
    model = to_ir(proto)
    observed = {"flat": (6, 16), "h": (6, 32), "r": (6, 32)}
    [group] = [g for g in channel_groups(model, observed) if g.channels == 32]
    assert group.refused is None  # was: "the output rank of 'fc1' (MatMul) is unknown"
