"""quantize-dynamic: DynamicQuantizeMatMul with per-column int8 weights, bias fold, refusals."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from helpers import make_model, op_count, run, tensor, to_bytes, to_ir, value_info
from onnx import TensorProto, helper
from onnxopt.passes.quantize_dynamic import QuantizeDynamicOptions, QuantizeDynamicPass
from onnxopt.passes.quantize_int8 import cpu_needs_reduce_range, ort_kernel_counts

# This CPU's ORT u8×s8 kernels saturate without VNNI; the CLI makes the same choice.
REDUCE_RANGE = cpu_needs_reduce_range()
K, H, N = 64, 128, 96  # weights of 8192 and 12288 elements: above min_weight_elements


def quantize(model: ir.Model, **options):
    options.setdefault("reduce_range", REDUCE_RANGE)
    return QuantizeDynamicPass(QuantizeDynamicOptions(**options))(model)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def feeds(seed: int, shape) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]


def mlp(seed: int, *, k: int = K, h: int = H):
    """x [batch, seq, K] -> MatMul W1 -> Add b1 -> Relu -> MatMul W2 -> y; columns of very
    different magnitudes (per-column scales pay)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((k, h)) * rng.uniform(0.01, 1.0, h)[None, :] / np.sqrt(k)
    w2 = rng.standard_normal((h, N)) * rng.uniform(0.01, 1.0, N)[None, :] / np.sqrt(h)
    inits = [tensor("W1", w1), tensor("b1", rng.standard_normal(h)), tensor("W2", w2)]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    model = make_model(nodes, [value_info("x", ["batch", "seq", k])], [value_info("y", None)],
                       inits)
    return to_ir(model), {"W1": w1, "W2": w2}


def gemm(seed: int, trans_b: int):
    """x [4, K] -> Gemm(W, c) -> y, W stored as [K, N] or [N, K] (transB)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, H)).astype(np.float32)
    c = rng.standard_normal(H).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "c"], ["y"], name="gemm", transB=trans_b)
    model = make_model([node], [value_info("x", [4, K])], [value_info("y", None)],
                       [tensor("W", w.T if trans_b else w), tensor("c", c)])
    return to_ir(model)


def run_optimized(model, batch) -> list[np.ndarray]:
    """ORT CPU with every graph optimization: the kernels users actually run."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(to_bytes(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, batch)


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values())


def test_mlp_becomes_dynamic_quantize_matmul_with_bias_folded():
    model, _ = mlp(0)
    original, _ = mlp(0)
    before = weight_bytes(model)
    report = quantize(model)
    assert report.modified and report.counts["quantized"] == 2
    assert any("quantized 'fc1' (MatMul)" in line and "fc1_bias" in line for line in report.log)
    assert op_count(model, "DynamicQuantizeMatMul") == 2
    assert op_count(model, "MatMul") == 0 and op_count(model, "Add") == 0
    assert model.opset_imports["com.microsoft"] == 1
    fc1 = next(n for n in model.graph if n.name == "fc1")
    assert fc1.domain == "com.microsoft" and fc1.inputs[4].name == "b1"
    assert fc1.inputs[1].const_value.dtype == ir.DataType.INT8
    assert weight_bytes(model) < before / 3.5  # int8 weights (+ [N] scales, kept float bias)
    assert [v.name for v in model.graph.outputs] == ["y"]
    for batch in feeds(1, [2, 5, K]):
        [got], [want] = run(model, batch), run(original, batch)
        assert got.shape == want.shape == (2, 5, N)
        assert cosine(got, want) >= 0.99
    # The file itself shrinks too (what the user sees on disk).
    assert len(to_bytes(model)) < len(to_bytes(original)) / 3.5


def test_scales_are_per_output_column():
    model, weights = mlp(2)
    quantize(model, reduce_range=False)
    for name in ("fc1", "fc2"):
        node = next(n for n in model.graph if n.name == name)
        q, scale, zero_point = (v.const_value.numpy() for v in node.inputs[1:4])
        w = weights["W1" if name == "fc1" else "W2"]
        assert scale.shape == zero_point.shape == (w.shape[1],)
        assert zero_point.dtype == np.int8 and not zero_point.any()
        np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
        assert np.all(np.abs(q * scale - w) <= scale / 2 * (1 + 1e-5))


def test_reduce_range_and_per_tensor():
    model, weights = mlp(3)
    quantize(model, reduce_range=True, per_channel=False)
    node = next(n for n in model.graph if n.name == "fc1")
    q, scale = (v.const_value.numpy() for v in node.inputs[1:3])
    assert scale.shape == () and np.abs(q).max() == 63
    np.testing.assert_allclose(scale, np.abs(weights["W1"]).max() / 63, rtol=1e-6)
    original, _ = mlp(3)
    for batch in feeds(3, [1, 7, K]):  # ORT takes the scalar (per-tensor) b_scale too
        [got], [want] = run_optimized(model, batch), run(original, batch)
        assert cosine(got, want) >= 0.98  # 6-bit magnitudes, one scale for columns 100x apart


def test_gemm_trans_b_matches_matmul_form():
    plain, transposed = gemm(4, 0), gemm(4, 1)
    for model in (plain, transposed):
        report = quantize(model)
        assert report.modified and "quantized 'gemm' (Gemm)" in report.log[0]
        assert op_count(model, "Gemm") == 0 and op_count(model, "DynamicQuantizeMatMul") == 1
    for batch in feeds(5, [4, K]):
        [a], [b], [want] = run(plain, batch), run(transposed, batch), run(gemm(4, 0), batch)
        np.testing.assert_array_equal(a, b)  # same int8 weights, scales and bias
        assert cosine(a, want) >= 0.99


def test_matmul_of_two_activations_stays():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = to_ir(make_model(nodes, [value_info("x", [4, K]), value_info("w", [K, H])],
                             [value_info("y", None)]))
    report = quantize(model)
    assert not report.modified
    assert "kept 'mm' (MatMul): weight 'w' is not a constant" in report.log[0]
    assert op_count(model, "MatMul") == 1 and "com.microsoft" not in model.opset_imports


def test_excluded_node_stays():
    model, _ = mlp(6)
    report = quantize(model, exclude=("fc2",))
    assert "kept 'fc2' (MatMul): excluded (kept float on request)" in report.log
    assert op_count(model, "MatMul") == 1 and op_count(model, "DynamicQuantizeMatMul") == 1


def test_small_weight_stays():
    model, _ = mlp(7, k=8, h=16)  # W1 has 128 elements, W2 1536: both below 4096
    report = quantize(model)
    assert not report.modified and op_count(model, "MatMul") == 2
    assert any("'W1' has 128 elements < min_weight_elements 4096" in line for line in report.log)


def test_float16_weight_is_refused():
    w = np.ones((K, H), dtype=np.float16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = to_ir(make_model(nodes, [value_info("x", [4, K], TensorProto.FLOAT16)],
                             [value_info("y", None)], [tensor("W", w, np.float16)]))
    report = quantize(model)
    assert not report.modified and "is float16, not float32" in report.log[0]


def test_second_run_changes_nothing():
    model, _ = mlp(8)
    assert quantize(model).modified
    second = quantize(model)
    assert not second.modified and second.log == []


def test_ort_runs_the_integer_kernel():
    model, _ = mlp(9)
    quantize(model)
    counts = ort_kernel_counts(to_bytes(model))
    assert counts.get("DynamicQuantizeMatMul") == 2
    assert "MatMul" not in counts and "Gemm" not in counts and "FusedMatMul" not in counts
    original, _ = mlp(9)
    for batch in feeds(10, [3, 4, K]):
        [got], [want] = run_optimized(model, batch), run(original, batch)
        assert cosine(got, want) >= 0.99


def test_conv_and_no_candidate_change_nothing():
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Softmax", ["c"], ["y"], name="softmax")]
    proto = make_model(nodes, [value_info("x", [1, 64, 8, 8])], [value_info("y", None)],
                       [tensor("W", rng.standard_normal((64, 64, 3, 3)))])
    model = to_ir(proto)
    report = quantize(model)
    assert not report.modified and report.log == []
    batch = {"x": rng.standard_normal((1, 64, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run(model, batch)[0], run(proto, batch)[0])
