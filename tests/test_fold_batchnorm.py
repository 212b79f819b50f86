"""fold-batchnorm against ONNX Runtime numerics: every fold site, refusals, idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    assert_same_outputs,
    bn_node,
    bn_params,
    make_model,
    op_count,
    run,
    tensor,
    to_ir,
    value_info,
)
from onnx import TensorProto, helper
from onnxopt.passes import FoldBatchNormOptions, FoldBatchNormPass


def fold(model: onnx.ModelProto, **options):
    ir_model = to_ir(model)
    report = FoldBatchNormPass(FoldBatchNormOptions(**options))(ir_model)
    return report


def conv_bn_model(seed, *, dims=2, group=1, channels=8, out_channels=8, has_bias=True,
                  pads=True, transpose=False):
    rng = np.random.default_rng(seed)
    kernel = (3,) * dims
    spatial = [9] * dims
    if transpose:
        weight = rng.standard_normal((channels, out_channels // group, *kernel))
    else:
        weight = rng.standard_normal((out_channels, channels // group, *kernel))
    inits = [tensor("W", weight), *bn_params("bn", out_channels, rng)]
    inputs = ["x", "W"]
    if has_bias:
        inits.append(tensor("b", rng.standard_normal(out_channels)))
        inputs.append("b")
    attrs = {"group": group, "pads": [1] * (2 * dims) if pads else [0] * (2 * dims)}
    op = "ConvTranspose" if transpose else "Conv"
    nodes = [helper.make_node(op, inputs, ["c"], name="conv", **attrs),
             bn_node("bn", "c", "y")]
    model = make_model(nodes, [value_info("x", ["N", channels, *spatial])],
                       [value_info("y", None)], inits)
    feeds = {"x": rng.standard_normal((2, channels, *spatial)).astype(np.float32)}
    return model, feeds


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dims=2),
        dict(dims=2, has_bias=False),
        dict(dims=1),
        dict(dims=3, channels=4, out_channels=4),
        dict(dims=2, group=4),
        dict(dims=2, group=8, channels=8, out_channels=8),  # depthwise
        dict(dims=2, group=2, channels=4, out_channels=8),  # channel multiplier 4
        dict(dims=2, transpose=True),
        dict(dims=2, transpose=True, group=2, channels=4, out_channels=6),
        dict(dims=1, transpose=True, has_bias=False),
    ],
    ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()),
)
def test_bn_after_conv_folds(kwargs):
    model, feeds = conv_bn_model(0, **kwargs)
    report = fold(model)
    assert report.modified
    assert op_count(report.model, "BatchNormalization") == 0
    assert report.counts["folded"] == 1
    assert any("folded 'bn' (BatchNormalization) into 'conv'" in line for line in report.log)
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def gemm_bn_model(seed, *, trans_b=0, alpha=1.0, beta=1.0, bias_shape=(6,)):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((6, 5) if trans_b else (5, 6))
    inits = [tensor("W", weight), *bn_params("bn", 6, rng)]
    inputs = ["x", "W"]
    if bias_shape is not None:
        inits.append(tensor("C", rng.standard_normal(bias_shape)))
        inputs.append("C")
    nodes = [helper.make_node("Gemm", inputs, ["g"], name="gemm", transB=trans_b, alpha=alpha,
                              beta=beta),
             bn_node("bn", "g", "y")]
    model = make_model(nodes, [value_info("x", [4, 5])], [value_info("y", [4, 6])], inits)
    return model, {"x": rng.standard_normal((4, 5)).astype(np.float32)}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), None])
def test_bn_after_gemm_folds(trans_b, alpha, beta, bias_shape):
    model, feeds = gemm_bn_model(1, trans_b=trans_b, alpha=alpha, beta=beta, bias_shape=bias_shape)
    report = fold(model)
    assert op_count(report.model, "BatchNormalization") == 0
    assert op_count(report.model, "Gemm") == 1
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("has_bias_add", [False, True])
def test_bn_after_matmul_folds(has_bias_add):
    rng = np.random.default_rng(2)
    inits = [tensor("W", rng.standard_normal((5, 6))), *bn_params("bn", 6, rng),
             tensor("b", rng.standard_normal(6))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul")]
    if has_bias_add:
        nodes.append(helper.make_node("Add", ["m", "b"], ["a"], name="bias"))
    nodes.append(bn_node("bn", "a" if has_bias_add else "m", "y"))
    model = make_model(nodes, [value_info("x", ["N", 5])], [value_info("y", ["N", 6])], inits)
    report = fold(model)
    assert op_count(report.model, "BatchNormalization") == 0
    assert op_count(report.model, "MatMul") == 1 and op_count(report.model, "Add") == 1
    assert_same_outputs(model, report.model, {"x": rng.standard_normal((3, 5)).astype(np.float32)},
                        rtol=1e-4, atol=1e-5)


def test_bn_before_conv_without_padding_folds_into_it():
    rng = np.random.default_rng(3)
    for group in (1, 2):
        inits = [*bn_params("bn", 4, rng), tensor("W", rng.standard_normal((6, 4 // group, 3, 3))),
                 tensor("b", rng.standard_normal(6))]
        nodes = [bn_node("bn", "x", "n"),
                 helper.make_node("Conv", ["n", "W", "b"], ["y"], name="conv", group=group)]
        model = make_model(nodes, [value_info("x", [1, 4, 8, 8])], [value_info("y", None)], inits)
        report = fold(model)
        assert op_count(report.model, "BatchNormalization") == 0
        assert op_count(report.model, "Mul") == 0
        assert "folded 'bn' (BatchNormalization) into the next 'conv' (Conv)" in report.log
        feeds = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
        assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-4)


def padded_conv_after_bn(rng):
    inits = [*bn_params("bn", 4, rng), tensor("W", rng.standard_normal((6, 4, 3, 3)))]
    nodes = [bn_node("bn", "x", "n"),
             helper.make_node("Conv", ["n", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return make_model(nodes, [value_info("x", [1, 4, 8, 8])], [value_info("y", None)], inits)


def test_bn_before_padded_conv_is_explained_and_kept():
    """Nothing can absorb it, and ORT runs one BatchNormalization faster than Mul+Add."""
    model = padded_conv_after_bn(np.random.default_rng(4))
    report = fold(model)
    assert not report.modified
    assert op_count(report.model, "BatchNormalization") == 1 and op_count(report.model, "Mul") == 0
    [line] = report.log
    assert "pads its input" in line and "would not fold either" in line
    assert len(report.model.graph.initializers) == 5  # the trial's scale/shift are gone again


def test_bn_as_mul_add_on_request():
    rng = np.random.default_rng(4)
    model = padded_conv_after_bn(rng)
    report = fold(model, keep_unfolded_mul_add=True)
    assert op_count(report.model, "BatchNormalization") == 0
    assert op_count(report.model, "Mul") == 1 and op_count(report.model, "Add") == 1
    feeds = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def test_bn_as_mul_add_that_folds_into_a_biased_convtranspose():
    """ConvTranspose -> Add(bias) -> BN (PP-OCR det): as Mul+Add, both fold into the
    ConvTranspose, so the rewrite is kept."""
    rng = np.random.default_rng(5)
    inits = [tensor("W", rng.standard_normal((4, 6, 2, 2))), tensor("b", rng.standard_normal((1, 6, 1, 1))),
             *bn_params("bn", 6, rng)]
    nodes = [helper.make_node("ConvTranspose", ["x", "W"], ["c"], name="up", strides=[2, 2]),
             helper.make_node("Add", ["c", "b"], ["a"], name="bias"), bn_node("bn", "a", "y")]
    model = make_model(nodes, [value_info("x", [1, 4, 5, 5])], [value_info("y", [1, 6, 10, 10])],
                       inits)
    report = fold(model)
    assert [n.op_type for n in report.model.graph] == ["ConvTranspose"]
    feeds = {"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_bn_before_gemm_or_matmul_folds(op):
    rng = np.random.default_rng(5)
    inits = [*bn_params("bn", 5, rng), tensor("W", rng.standard_normal((5, 3)))]
    nodes = [bn_node("bn", "x", "n"), helper.make_node(op, ["n", "W"], ["y"], name="lin")]
    model = make_model(nodes, [value_info("x", [4, 5])], [value_info("y", [4, 3])], inits)
    report = fold(model)
    assert op_count(report.model, "BatchNormalization") == 0
    assert_same_outputs(model, report.model, {"x": rng.standard_normal((4, 5)).astype(np.float32)},
                        rtol=1e-4, atol=1e-5)


def test_shared_producer_output_is_not_folded():
    """The Conv's output also feeds a Relu: folding BN into the Conv would change the Relu."""
    model, feeds = conv_bn_model(6)
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
    model.graph.output.append(value_info("r", None))
    report = fold(model)
    assert op_count(report.model, "Conv") == 1
    assert op_count(report.model, "BatchNormalization") == 1  # Mul+Add would not fold either
    assert any("has another consumer" in line for line in report.log)
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def test_bn_with_graph_input_statistics_is_refused():
    model, feeds = conv_bn_model(7)
    var = next(i for i in model.graph.initializer if i.name == "bn.var")
    model.graph.input.append(value_info("bn.var", [8]))
    feeds["bn.var"] = onnx.numpy_helper.to_array(var)
    model.graph.initializer.remove(var)
    report = fold(model)
    assert not report.modified
    assert op_count(report.model, "BatchNormalization") == 1
    assert any("input_var 'bn.var' is not a constant" in line for line in report.log)
    assert report.counts["refused"] == 1


def test_training_mode_bn_is_refused():
    model, _ = conv_bn_model(8)
    model.opset_import[0].version = 15
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    report = fold(model)
    assert not report.modified and "training_mode=1" in report.log[0]


def test_mul_add_after_conv_fold_in():
    rng = np.random.default_rng(9)
    inits = [tensor("W", rng.standard_normal((8, 3, 3, 3))), tensor("s", rng.uniform(0.5, 2, (8, 1, 1))),
             tensor("t", rng.standard_normal((1, 8, 1, 1))), tensor("d", np.float32(3.0))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Mul", ["s", "c"], ["m"], name="mul"),
             helper.make_node("Sub", ["m", "t"], ["a"], name="sub"),
             helper.make_node("Div", ["a", "d"], ["y"], name="div")]
    model = make_model(nodes, [value_info("x", [1, 3, 8, 8])], [value_info("y", None)], inits)
    report = fold(model)
    assert [n.op_type for n in report.model.graph] == ["Conv"]
    assert report.counts == {"Mul folded": 1, "Sub folded": 1, "Div folded": 1}
    assert_same_outputs(model, report.model, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)},
                        rtol=1e-4, atol=1e-5)


def test_spatial_mul_is_not_folded():
    """A Mul that varies over H, W is not per-channel: left alone, outputs bit-identical."""
    rng = np.random.default_rng(10)
    inits = [tensor("W", rng.standard_normal((8, 3, 3, 3))), tensor("s", rng.standard_normal((1, 1, 6, 6)))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    model = make_model(nodes, [value_info("x", [1, 3, 8, 8])], [value_info("y", None)], inits)
    report = fold(model)
    assert not report.modified
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    for a, b in zip(run(model, feeds), run(report.model, feeds)):
        assert np.array_equal(a, b)


def test_second_run_changes_nothing():
    model, feeds = conv_bn_model(11)
    first = fold(model)
    second = FoldBatchNormPass()(first.model)
    assert first.modified and not second.modified
    assert_same_outputs(model, second.model, feeds, rtol=1e-4, atol=1e-5)


def test_fp16_conv_bn_folds_in_float64_and_casts_once():
    model, feeds = conv_bn_model(12)
    for init in model.graph.initializer:
        array = onnx.numpy_helper.to_array(init).astype(np.float16)
        init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    for info in (*model.graph.input, *model.graph.output):
        info.type.tensor_type.elem_type = TensorProto.FLOAT16
    feeds = {"x": feeds["x"].astype(np.float16)}
    report = fold(model)
    assert op_count(report.model, "BatchNormalization") == 0
    [expected], [actual] = run(model, feeds), run(report.model, feeds)
    assert actual.dtype == np.float16
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32),
                               rtol=2e-2, atol=2e-2)


def test_bn_inside_if_branch_is_folded():
    rng = np.random.default_rng(13)
    inner, _ = conv_bn_model(13)
    branch = helper.make_graph(list(inner.graph.node), "then", [], [value_info("y", None)],
                               list(inner.graph.initializer))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [],
                              [value_info("z", None)])
    nodes = [helper.make_node("If", ["cond"], ["out"], name="if", then_branch=branch,
                              else_branch=other)]
    model = make_model(nodes, [value_info("cond", [], TensorProto.BOOL),
                               value_info("x", [2, 8, 9, 9])], [value_info("out", None)])
    report = fold(model)
    assert op_count(report.model, "BatchNormalization") == 0
    feeds = {"cond": np.array(True), "x": rng.standard_normal((2, 8, 9, 9)).astype(np.float32)}
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def test_fold_is_computed_in_float64():
    """With a tiny variance, float32 folding loses digits that float64 keeps."""
    rng = np.random.default_rng(14)
    model, feeds = conv_bn_model(14, pads=False)
    for init in model.graph.initializer:
        if init.name == "bn.var":
            init.CopyFrom(tensor("bn.var", rng.uniform(1e-7, 1e-6, 8)))
    report = fold(model)
    x = feeds["x"].astype(np.float64)
    params = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    # Exact reference in float64: conv as a sum over windows, then BN.
    from numpy.lib.stride_tricks import sliding_window_view
    windows = sliding_window_view(x, (3, 3), axis=(2, 3))  # N, C, H', W', 3, 3
    conv = np.einsum("nchwij,ocij->nohw", windows, params["W"]) + params["b"][None, :, None, None]
    s = params["bn.scale"] / np.sqrt(params["bn.var"] + np.float64(np.float32(1e-5)))
    exact = (conv - params["bn.mean"][None, :, None, None]) * s[None, :, None, None] + params["bn.B"][None, :, None, None]
    [folded] = run(report.model, feeds)
    rel = np.abs(folded - exact) / (np.abs(exact) + 1e-3)
    assert rel.max() < 1e-4


def affine_before_model(rng, *, pads: int, mul_shape=(), add_shape=(), group: int = 1,
                        second_reader: bool = False):
    """x -> Relu -> Mul(a) -> Add(b) -> Conv: PP-LCNetV3's learnable affine after an activation
    (a Relu here, so that nothing before the affine can take it)."""
    channels = 4
    inits = [tensor("a", rng.uniform(0.5, 2.0, mul_shape)),
             tensor("b", rng.standard_normal(add_shape)),
             tensor("W", rng.standard_normal((8, channels // group, 3, 3))),
             tensor("bias", rng.standard_normal(8))]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "a"], ["m"], name="scale"),
             helper.make_node("Add", ["b", "m"], ["n"], name="shift"),
             helper.make_node("Conv", ["n", "W", "bias"], ["y"], name="conv", group=group,
                              pads=[pads] * 4)]
    outputs = [value_info("y", None)]
    if second_reader:
        nodes.append(helper.make_node("Sigmoid", ["n"], ["z"], name="other"))
        outputs.append(value_info("z", None))
    model = make_model(nodes, [value_info("x", [1, channels, 8, 8])], outputs, inits)
    return model, {"x": rng.standard_normal((1, channels, 8, 8)).astype(np.float32)}


@pytest.mark.parametrize("mul_shape,add_shape", [((), ()), ((4, 1, 1), (1, 4, 1, 1))],
                         ids=["scalar", "per-channel"])
def test_affine_before_an_unpadded_conv_folds_into_it(mul_shape, add_shape):
    rng = np.random.default_rng(21)
    model, feeds = affine_before_model(rng, pads=0, mul_shape=mul_shape, add_shape=add_shape)
    report = fold(model)
    assert [n.op_type for n in report.model.graph] == ["Relu", "Conv"]
    assert "folded 'shift' (Add) into the next 'conv' (Conv)" in report.log
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def test_scale_moves_past_the_shift_into_a_padded_conv():
    """A padded Conv cannot take the shift (its border would see -b, not 0) but a scale keeps
    zeros zero: a*h + b = (h + b/a)*a, and the scale folds into the depthwise Conv."""
    rng = np.random.default_rng(22)
    model, feeds = affine_before_model(rng, pads=1, mul_shape=(4, 1, 1), add_shape=(4, 1, 1),
                                       group=4)
    report = fold(model)
    assert [n.op_type for n in report.model.graph] == ["Relu", "Add", "Conv"]
    assert any(line.startswith("moved 'scale' (Mul) past 'shift' (Add)") for line in report.log)
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def test_a_scale_alone_folds_into_a_padded_conv():
    rng = np.random.default_rng(23)
    inits = [tensor("a", rng.uniform(0.5, 2.0, (1, 4, 1, 1))),
             tensor("W", rng.standard_normal((6, 4, 3, 3)))]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Div", ["r", "a"], ["n"], name="div"),
             helper.make_node("Conv", ["n", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [value_info("x", [1, 4, 8, 8])], [value_info("y", None)], inits)
    report = fold(model)
    assert [n.op_type for n in report.model.graph] == ["Relu", "Conv"]
    feeds = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def test_affine_read_by_something_else_stays():
    rng = np.random.default_rng(24)
    model, feeds = affine_before_model(rng, pads=0, second_reader=True)
    report = fold(model)
    assert not report.modified
    for a, b in zip(run(model, feeds), run(report.model, feeds)):
        assert np.array_equal(a, b)


def test_a_scale_varying_in_space_stays_before_the_conv():
    """Only the shift is per channel: it folds; the scale over H, W cannot."""
    rng = np.random.default_rng(26)
    model, feeds = affine_before_model(rng, pads=0, mul_shape=(1, 1, 8, 8))
    report = fold(model)
    assert [n.op_type for n in report.model.graph] == ["Relu", "Mul", "Conv"]
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def test_last_axis_scale_and_shift_fold_into_a_matmul_on_rank3_input():
    """Transformer layout [B, S, K]: a per-feature affine before a constant-weight MatMul."""
    rng = np.random.default_rng(25)
    inits = [tensor("g", rng.uniform(0.5, 2.0, 16)), tensor("c", rng.standard_normal(16)),
             tensor("W", rng.standard_normal((16, 8)))]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "g"], ["m"], name="scale"),
             helper.make_node("Sub", ["m", "c"], ["n"], name="shift"),
             helper.make_node("MatMul", ["n", "W"], ["y"], name="mm")]
    model = make_model(nodes, [value_info("x", [2, 5, 16])], [value_info("y", None)], inits)
    report = fold(model)
    assert [n.op_type for n in report.model.graph] == ["Relu", "MatMul", "Add"]
    feeds = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32)}
    assert_same_outputs(model, report.model, feeds, rtol=1e-4, atol=1e-5)


def _gelu_then_matmul(rng):
    """BERT's FFN as TorchScript writes it: x/sqrt(2) -> Erf -> +1 -> *x -> *0.5 -> MatMul."""
    inits = [tensor("r2", np.sqrt(2.0)), tensor("one", 1.0), tensor("half", 0.5),
             tensor("W", rng.standard_normal((16, 8)))]
    nodes = [helper.make_node("Div", ["x", "r2"], ["d"], name="div"),
             helper.make_node("Erf", ["d"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["a"], name="add"),
             helper.make_node("Mul", ["x", "a"], ["m"], name="mul"),
             helper.make_node("Mul", ["m", "half"], ["g"], name="half"),
             helper.make_node("MatMul", ["g", "W"], ["y"], name="mm")]
    return make_model(nodes, [value_info("x", [2, 5, 16])], [value_info("y", None)], inits)


def _layernorm_then_matmul(rng):
    """A LayerNorm written out op by op (opset < 17 exports), gamma and beta, then a MatMul."""
    inits = [tensor("eps", 1e-5), tensor("two", 2.0), tensor("g", rng.uniform(0.5, 2, 16)),
             tensor("b", rng.standard_normal(16)), tensor("W", rng.standard_normal((16, 8)))]
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], name="mean"),
             helper.make_node("Sub", ["x", "mu"], ["c"], name="center"),
             helper.make_node("Pow", ["c", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="var"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
             helper.make_node("Sqrt", ["ve"], ["sd"], name="sqrt"),
             helper.make_node("Div", ["c", "sd"], ["n"], name="norm"),
             helper.make_node("Mul", ["n", "g"], ["s"], name="gamma"),
             helper.make_node("Add", ["s", "b"], ["h"], name="beta"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    return make_model(nodes, [value_info("x", [2, 5, 16])], [value_info("y", None)], inits,
                      opset=13)


@pytest.mark.parametrize("build", [_gelu_then_matmul, _layernorm_then_matmul],
                         ids=["gelu", "layernorm"])
def test_the_end_of_a_pattern_ort_fuses_is_not_folded(build):
    """ORT fuses these into Gelu / LayerNormalization only with their trailing Mul (and Add);
    folding it into the MatMul would leave four to nine elementwise kernels instead of one."""
    model = build(np.random.default_rng(27))
    report = fold(model)
    assert not report.modified, report.log
