"""quantize-int8: per-channel weights, int32 bias, placement ORT CPU fuses, refusals, accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import make_model, op_count, run, tensor, to_bytes, to_ir, value_info
from onnx import TensorProto, helper
from onnx_ir.passes import common
from onnxopt.passes import CleanupPass, FoldBatchNormPass
from onnxopt.passes.quantize_int8 import (
    QuantizeInt8Options,
    QuantizeInt8Pass,
    cpu_needs_reduce_range,
    ort_kernel_counts,
    quantizable_tensors,
)

from onnxopt.calib.activations import collect_stats

DATA = Path(__file__).resolve().parents[1] / "onnxopt" / "data"
# This CPU's ORT u8×s8 kernels saturate without VNNI; the CLI makes the same choice.
REDUCE_RANGE = cpu_needs_reduce_range()


def calibrate(model: ir.Model, batches: list[dict]) -> dict[str, tuple[float, float]]:
    """Min/max of the tensors the pass asks for (types inferred on a clone for collect_stats)."""
    typed = model.clone()
    common.ShapeInferencePass()(typed)
    stats = collect_stats(typed, batches, quantizable_tensors(model))
    return {name: s.range_minmax() for name, s in stats.items()}


def quantize(model: ir.Model, ranges, **options):
    options.setdefault("reduce_range", REDUCE_RANGE)
    return QuantizeInt8Pass(QuantizeInt8Options(ranges=ranges, **options))(model)


def run_optimized(model, feeds) -> list[np.ndarray]:
    """ORT CPU with every graph optimization: the fused integer kernels users actually run."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(to_bytes(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def dequantize_linear_of(node: ir.Node, index: int):
    """(int8/int32 data, scale, zero point, axis) of the DequantizeLinear feeding an input."""
    dq = node.inputs[index].producer()
    assert dq is not None and dq.op_type == "DequantizeLinear"
    q, scale, zero_point = (v.const_value.numpy() for v in dq.inputs)
    return q, scale, zero_point, dq.attributes.get_int("axis", 1)


def linear_model(op: str, seed: int, *, trans_b: int = 0, has_bias: bool = True):
    """x -> op(W, b) -> Relu -> y, channels with very different magnitudes (per-channel pays)."""
    rng = np.random.default_rng(seed)
    magnitudes = rng.uniform(0.01, 3.0, 6)
    if op == "Conv":
        weight = rng.standard_normal((6, 3, 3, 3)) * magnitudes[:, None, None, None]
        x_shape, attrs = [2, 3, 8, 8], {"pads": [1, 1, 1, 1]}
    elif op == "Gemm":
        weight = rng.standard_normal((5, 6)) * magnitudes[None, :]
        weight = weight.T if trans_b else weight
        x_shape, attrs = [4, 5], {"transB": trans_b}
    else:
        weight = rng.standard_normal((5, 6)) * magnitudes[None, :]
        x_shape, attrs = [4, 5], {}
    inits = [tensor("W", weight)]
    inputs = ["x", "W"]
    if has_bias and op != "MatMul":
        inits.append(tensor("b", rng.standard_normal(6)))
        inputs.append("b")
    nodes = [helper.make_node(op, inputs, ["h"], name="lin", **attrs),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    model = make_model(nodes, [value_info("x", x_shape)], [value_info("y", None)], inits)
    batches = [{"x": rng.standard_normal(x_shape).astype(np.float32)} for _ in range(4)]
    return to_ir(model), weight, batches


@pytest.mark.parametrize("op,trans_b,axis", [("Conv", 0, 0), ("Gemm", 0, 1), ("Gemm", 1, 0),
                                             ("MatMul", 0, 1)])
def test_weights_are_int8_per_output_channel(op, trans_b, axis):
    model, weight, batches = linear_model(op, 0, trans_b=trans_b)
    report = quantize(model, calibrate(model, batches), reduce_range=False)
    assert report.modified and report.counts["quantized"] == 1
    assert f"quantized 'lin' ({op}): weight per-channel int8 (axis {axis})" in report.log[0]
    node = next(n for n in model.graph if n.op_type == op)
    q, scale, zero_point, dq_axis = dequantize_linear_of(node, 1)
    assert dq_axis == axis and q.dtype == np.int8 and zero_point.dtype == np.int8
    assert not zero_point.any() and scale.shape == (6,)
    peak = np.moveaxis(np.abs(weight), axis, 0).reshape(6, -1).max(axis=1)
    np.testing.assert_allclose(scale, peak / 127, rtol=1e-6)
    shape = [1] * weight.ndim
    shape[axis] = -1
    error = np.abs(q * scale.reshape(shape) - weight)
    assert np.all(error <= scale.reshape(shape) / 2 * (1 + 1e-5))
    assert "W" not in model.graph.initializers  # the float copy is gone: the file shrinks
    if op != "Conv":  # a Conv whose output leaves the graph is not fused (no output pair)
        counts = ort_kernel_counts(to_bytes(model))
        assert op not in counts and "DequantizeLinear" not in counts
        assert counts.get("QGemm" if op == "Gemm" else "MatMulIntegerToFloat") == 1
    original, _, _ = linear_model(op, 0, trans_b=trans_b)
    for batch in batches:
        [got], [want] = run(model, batch), run(original, batch)
        assert cosine(got, want) > 0.999


def test_bias_is_int32_in_input_times_weight_scale():
    model, _, batches = linear_model("Conv", 1)
    bias = model.graph.initializers["b"].const_value.numpy()
    quantize(model, calibrate(model, batches))
    conv = next(n for n in model.graph if n.op_type == "Conv")
    _, weight_scale, _, _ = dequantize_linear_of(conv, 1)
    q, scale, zero_point, axis = dequantize_linear_of(conv, 2)
    input_dq = conv.inputs[0].producer()
    input_scale = input_dq.inputs[1].const_value.numpy()
    assert q.dtype == np.int32 and zero_point.dtype == np.int32 and not zero_point.any()
    assert axis == 0 and scale.shape == (6,)
    np.testing.assert_allclose(scale, input_scale * weight_scale, rtol=1e-6)
    assert np.all(np.abs(q * scale - bias) <= scale / 2 * (1 + 1e-5))


def test_reduce_range_and_per_tensor():
    model, weight, batches = linear_model("Conv", 2)
    report = quantize(model, calibrate(model, batches), reduce_range=True, per_channel=False)
    assert "weight per-tensor int8" in report.log[0]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    q, scale, _, _ = dequantize_linear_of(conv, 1)
    assert scale.shape == () and np.abs(q).max() == 63
    np.testing.assert_allclose(scale, np.abs(weight).max() / 63, rtol=1e-6)
    assert conv.inputs[1].producer().attributes.get("axis") is None


def test_bias_that_would_overflow_int32_raises_the_weight_scale():
    model, _, batches = linear_model("Conv", 3)
    w = model.graph.initializers["W"].const_value.numpy().copy()
    w[0] *= 1e-9  # a near-dead channel with a normal bias
    model.graph.initializers["W"].const_value = ir.tensor(w, name="W")
    bias = model.graph.initializers["b"].const_value.numpy()
    quantize(model, calibrate(model, batches))
    conv = next(n for n in model.graph if n.op_type == "Conv")
    q, scale, _, _ = dequantize_linear_of(conv, 2)
    assert np.abs(q.astype(np.int64)).max() <= 2**30
    assert np.all(np.abs(q * scale - bias) <= scale / 2 * (1 + 1e-5))


def small_cnn(seed: int, activation: str = "Relu"):
    """Conv+act -> Conv+act -> residual Add -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [tensor("W1", rng.standard_normal((8, 3, 3, 3)) * 0.3), tensor("B1", rng.normal(0, .1, 8)),
             tensor("W2", rng.standard_normal((8, 8, 3, 3)) * 0.15), tensor("B2", rng.normal(0, .1, 8)),
             tensor("W3", rng.standard_normal((10, 8)) * 0.5), tensor("B3", rng.normal(0, .1, 10)),
             tensor("lo", np.float32(0)), tensor("hi", np.float32(6))]

    def act(x, y, name):
        extra = ["lo", "hi"] if activation == "Clip" else []
        return helper.make_node(activation, [x, *extra], [y], name=name)

    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4),
             act("c1", "r1", "act1"),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1] * 4),
             act("c2", "r2", "act2"),
             helper.make_node("Add", ["r1", "r2"], ["sum"], name="add"),
             helper.make_node("GlobalAveragePool", ["sum"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "W3", "B3"], ["y"], name="fc", transB=1)]
    model = make_model(nodes, [value_info("x", ["N", 3, 12, 12])], [value_info("y", ["N", 10])],
                       inits)
    batches = [{"x": rng.standard_normal((8, 3, 12, 12)).astype(np.float32)} for _ in range(6)]
    return to_ir(model), batches


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
def test_small_cnn_fuses_into_integer_kernels(activation):
    model, batches = small_cnn(4, activation)
    original = model.clone()
    report = quantize(model, calibrate(model, batches[:4]))
    assert report.counts["quantized"] == 6  # conv1, conv2, add, pool, flatten, fc
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    counts = ort_kernel_counts(to_bytes(model))
    assert counts.get("QLinearConv") == 2 and "Conv" not in counts
    assert counts.get(activation, 0) == 0  # the uint8 clamp at zero point 0 is the activation
    assert counts.get("QLinearAdd") == 1 and counts.get("QLinearGlobalAveragePool") == 1
    assert counts.get("QGemm", 0) + counts.get("QLinearMatMul", 0) == 1 and "Gemm" not in counts
    assert "DequantizeLinear" not in counts  # no float island left between the kernels
    for batch in batches[4:]:  # held out, same distribution
        [want] = run(original, batch)
        [got] = run_optimized(model, batch)
        [unfused] = run(model, batch)
        assert cosine(got, want) >= 0.99 and cosine(unfused, want) >= 0.99


def test_data_movement_ops_share_their_input_scale_and_run_uint8():
    rng = np.random.default_rng(5)
    inits = [tensor("W", rng.standard_normal((8, 3, 3, 3)) * 0.3), tensor("W2", rng.normal(0, .3, (128, 4))),
             tensor("shape", np.array([0, -1]), np.int64)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="maxpool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["t"], name="transpose", perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["f"], name="reshape"),
             helper.make_node("MatMul", ["f", "W2"], ["y"], name="matmul")]
    model = to_ir(make_model(nodes, [value_info("x", [2, 3, 8, 8])], [value_info("y", None)],
                             inits))
    batches = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    original = model.clone()
    ranges = calibrate(model, batches)
    assert "p" not in ranges and "t" not in ranges  # shared-scale outputs need no calibration
    quantize(model, ranges)
    pairs = {n.inputs[0].name: (n.inputs[1].const_value.numpy(), n.inputs[2].const_value.numpy())
             for n in model.graph if n.op_type == "QuantizeLinear"}
    assert pairs["p"] == pairs["r"] and pairs["t"] == pairs["r"] and pairs["f"] == pairs["r"]
    counts = ort_kernel_counts(to_bytes(model))
    assert counts.get("QLinearConv") == 1 and "DequantizeLinear" not in counts
    assert counts.get("MatMulIntegerToFloat", 0) + counts.get("QLinearMatMul", 0) == 1
    [want], [got] = run(original, batches[0]), run_optimized(model, batches[0])
    assert cosine(got, want) >= 0.99


def test_concat_average_pool_squeeze_unsqueeze_fuse():
    rng = np.random.default_rng(13)
    inits = [tensor("W1", rng.standard_normal((4, 3, 3, 3)) * 0.3),
             tensor("W2", rng.standard_normal((4, 3, 3, 3)) * 0.3),
             tensor("W3", rng.standard_normal((4, 8, 1, 1)) * 0.3),
             tensor("axes", np.array([0]), np.int64)]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1] * 4),
             helper.make_node("Conv", ["x", "W2"], ["b"], name="conv2", pads=[1] * 4),
             helper.make_node("Concat", ["a", "b"], ["cat"], name="concat", axis=1),
             helper.make_node("AveragePool", ["cat"], ["avg"], name="avgpool",
                              kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["avg", "W3"], ["c"], name="conv3"),
             helper.make_node("Unsqueeze", ["c", "axes"], ["u"], name="unsqueeze"),
             helper.make_node("Squeeze", ["u", "axes"], ["s"], name="squeeze"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    model = to_ir(make_model(nodes, [value_info("x", [2, 3, 8, 8])], [value_info("y", None)],
                             inits))
    batches = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    original = model.clone()
    report = quantize(model, calibrate(model, batches[:3]))
    assert report.counts["quantized"] == 7
    counts = ort_kernel_counts(to_bytes(model))
    assert counts.get("QLinearConv") == 3 and counts.get("QLinearConcat") == 1
    assert counts.get("QLinearAveragePool") == 1
    assert counts.get("DequantizeLinear") == 1  # only before the float Relu on the graph output
    [want], [got] = run(original, batches[3]), run_optimized(model, batches[3])
    assert cosine(got, want) >= 0.99


def test_default_model_keeps_top1_within_one_point_and_fuses_every_conv():
    model = ir.load(DATA / "digits_resnet.onnx")
    CleanupPass()(model)
    FoldBatchNormPass()(model)
    data = np.load(DATA / "digits_samples.npz")
    images, labels = data["image"], data["label"]
    ranges = calibrate(model, [{"image": images[i:i + 16]} for i in range(0, 64, 16)])
    original = model.clone()
    size_before = len(to_bytes(model))
    quantize(model, ranges)
    assert len(to_bytes(model)) < size_before / 3
    counts = ort_kernel_counts(to_bytes(model))
    assert counts.get("QLinearConv") == op_count(original, "Conv") and "Conv" not in counts
    held_out = {"image": images[64:]}
    [fp32] = run_optimized(original, held_out)
    [int8] = run_optimized(model, held_out)
    top1_fp32 = float((fp32.argmax(1) == labels[64:]).mean())
    top1_int8 = float((int8.argmax(1) == labels[64:]).mean())
    assert top1_int8 >= top1_fp32 - 0.01
    assert cosine(int8, fp32) >= 0.99


def test_excluded_node_stays_float():
    model, batches = small_cnn(6)
    report = quantize(model, calibrate(model, batches), exclude=("conv2",))
    conv2 = next(n for n in model.graph if n.name == "conv2")
    assert conv2.inputs[1].name == "W2" and conv2.inputs[1].is_initializer()
    assert "kept 'conv2' (Conv): excluded (kept float on request)" in report.log
    assert report.counts["refused"] == 1 and report.counts["quantized"] == 5


def test_tensor_without_range_stays_float():
    model, batches = small_cnn(7)
    ranges = calibrate(model, batches)
    del ranges["x"]
    report = quantize(model, ranges)
    conv1 = next(n for n in model.graph if n.name == "conv1")
    assert conv1.inputs[0].name == "x" and conv1.inputs[1].name == "W1"
    assert "kept 'conv1' (Conv): input 'x' has no calibrated range" in report.log
    assert op_count(model, "QuantizeLinear") > 0  # the rest is still quantized


def test_weight_that_is_a_graph_input_is_refused():
    model, _, batches = linear_model("Conv", 8)
    ranges = calibrate(model, batches)
    weight = model.graph.initializers.pop("W")
    model.graph.inputs.append(weight)
    report = quantize(model, ranges)
    assert not report.modified
    assert "kept 'lin' (Conv): weight 'W' is not a constant (a graph input or computed)" in report.log


def test_float16_is_refused():
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
                       [value_info("x", [1, 2, 4, 4], TensorProto.FLOAT16)],
                       [value_info("y", None, TensorProto.FLOAT16)],
                       [tensor("W", np.ones((2, 2, 1, 1)), np.float16)])
    report = quantize(to_ir(model), {"x": (-1.0, 1.0), "y": (-1.0, 1.0)})
    assert not report.modified and "is FLOAT16, not FLOAT" in report.log[0]


def test_no_candidate_changes_nothing():
    model = to_ir(make_model([helper.make_node("Softmax", ["x"], ["y"], name="softmax")],
                             [value_info("x", [2, 5])], [value_info("y", [2, 5])]))
    report = quantize(model, {"x": (-3.0, 3.0), "y": (0.0, 1.0)})
    assert not report.modified and report.log == []
    assert quantizable_tensors(model) == []


def test_second_run_changes_nothing():
    model, batches = small_cnn(9)
    ranges = calibrate(model, batches)
    quantize(model, ranges)
    nodes = [n.op_type for n in model.graph]
    second = quantize(model, ranges)
    assert not second.modified and second.log == []
    assert [n.op_type for n in model.graph] == nodes


def test_old_opset_is_refused_whole():
    model, _, batches = linear_model("Conv", 10)
    ranges = calibrate(model, batches)
    model.opset_imports[""] = 12
    report = quantize(model, ranges)
    assert not report.modified and "opset 12 < 13" in report.log[0]


def test_quantizable_tensors_names_inputs_and_outputs_of_quantized_ops():
    model, _ = small_cnn(11)
    # conv1's output goes through act1 (fused), flatten's output shares pool's scale, and the
    # Gemm's output leaves the graph in float.
    assert quantizable_tensors(model) == ["x", "r1", "r2", "sum", "pool"]


def test_ort_kernel_counts_reads_a_path(tmp_path):
    model, batches = small_cnn(12)
    quantize(model, calibrate(model, batches))
    path = tmp_path / "model.onnx"
    path.write_bytes(to_bytes(model))
    assert ort_kernel_counts(path) == ort_kernel_counts(str(path)) == ort_kernel_counts(
        to_bytes(model))


def _conv_then_conv_transpose(rng):
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ConvTranspose", ["r", "T"], ["u"], name="up", strides=[2, 2]),
             helper.make_node("Relu", ["u"], ["y"], name="relu2")]
    inits = [tensor("W", rng.standard_normal((8, 3, 3, 3)) * 0.3),
             tensor("T", rng.standard_normal((8, 4, 2, 2)) * 0.3)]
    return to_ir(make_model(nodes, [value_info("x", [1, 3, 8, 8])], [value_info("y", None)],
                            inits))


def test_conv_transpose_stays_float_with_the_reason_ort_gives():
    """ORT's CPU provider runs a QDQ ConvTranspose as DequantizeLinear + float ConvTranspose
    (no integer kernel, measured with ORT 1.32): the pass keeps it float and says why; if ORT
    gains the kernel, the second half of this test says so."""
    rng = np.random.default_rng(40)
    model = _conv_then_conv_transpose(rng)
    batches = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    report = quantize(model, calibrate(model, batches))
    assert any(line.startswith("kept 'up' (ConvTranspose): ONNX Runtime's CPU provider has no "
                               "integer ConvTranspose kernel") for line in report.log), report.log
    assert op_count(report.model, "QuantizeLinear") > 0  # the Conv is int8
    up = next(n for n in report.model.graph if n.op_type == "ConvTranspose")
    assert up.inputs[1].producer() is None  # its weight is the float initializer
    # What ORT does with the full QDQ pattern around a ConvTranspose: it stays float.
    w = rng.standard_normal((8, 4, 2, 2)).astype(np.float32)
    scale = (np.abs(w).transpose(1, 0, 2, 3).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    inits = [tensor("wq", np.round(w / scale[None, :, None, None]), np.int8),
             tensor("ws", scale), tensor("wz", np.zeros(4), np.int8),
             tensor("s", 0.02), tensor("z", 128, np.uint8),
             tensor("so", 0.05), tensor("zo", 128, np.uint8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("ConvTranspose", ["xd", "wd"], ["u"], strides=[2, 2]),
             helper.make_node("QuantizeLinear", ["u", "so", "zo"], ["uq"]),
             helper.make_node("DequantizeLinear", ["uq", "so", "zo"], ["y"])]
    qdq = to_ir(make_model(nodes, [value_info("x", [1, 8, 8, 8])], [value_info("y", None)],
                           inits, opset=13))
    kernels = ort_kernel_counts(qdq)
    assert kernels.get("ConvTranspose") == 1, kernels
