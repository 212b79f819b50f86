"""smooth-activations (SmoothQuant): exact in float, folded where it can be, and it lowers the
error of dynamic int8 on activations with outlier channels."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from helpers import (
    assert_same_outputs,
    make_model,
    op_count,
    run,
    stub_variant,
    tensor,
    to_ir,
    value_info,
)
from onnx import helper
from onnxopt.passes.quantize_dynamic import QuantizeDynamicOptions, QuantizeDynamicPass
from onnxopt.passes.quantize_int8 import cpu_needs_reduce_range
from onnxopt.passes.smooth_activations import SmoothActivationsOptions, SmoothActivationsPass
from typer.testing import CliRunner

from onnxopt.cli import app
from onnxopt.quant import int8, smoothing

K, N = 64, 128  # 8192-element weights: above quantize-dynamic's min_weight_elements
OUTLIERS = (3, 17, 40)  # input channels 50x larger than the rest, as after LayerNorm in BERT


def _x(seed: int, batch: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 8, K)).astype(np.float32)
    x[..., list(OUTLIERS)] *= 50.0
    return x


def _weights(rng: np.random.Generator, n: int = N) -> np.ndarray:
    return (rng.standard_normal((K, n)) / np.sqrt(K)).astype(np.float32)


def layernorm_model(*, residual: bool = False, decomposed: bool = False):
    """x -> LayerNorm (fused, or Mul(g) + Add(c) after a plain normalization) -> h; h feeds two
    MatMuls (q, v) and a Shape; with `residual`, also an Add that is a graph output."""
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 1.5, K)
    gamma[list(OUTLIERS)] = 40.0  # the outlier channels come from LayerNorm's scale
    inits = [tensor("gamma", gamma), tensor("beta", rng.standard_normal(K) * 0.1),
             tensor("Wq", _weights(rng)), tensor("Wv", _weights(rng))]
    if decomposed:
        nodes = [helper.make_node("LayerNormalization", ["x", "ones"], ["n"], name="norm"),
                 helper.make_node("Mul", ["n", "gamma"], ["g"], name="ln_scale"),
                 helper.make_node("Add", ["g", "beta"], ["h"], name="ln_shift")]
        inits.append(tensor("ones", np.ones(K)))
    else:
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"],
                                  name="ln")]
    nodes += [helper.make_node("MatMul", ["h", "Wq"], ["q"], name="q"),
              helper.make_node("MatMul", ["h", "Wv"], ["v"], name="v"),
              helper.make_node("Shape", ["h"], ["shape"], name="shape")]
    outputs = [value_info("q", ["b", 8, N]), value_info("v", ["b", 8, N]),
               value_info("shape", [3], 7)]
    if residual:
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"], name="residual"))
        outputs.append(value_info("r", ["b", 8, K]))
    return to_ir(make_model(nodes, [value_info("x", ["b", 8, K])], outputs, inits))


def gemm_model(trans_b: int):
    """x [M, K] with outlier channels -> Gemm(W, c) -> y."""
    rng = np.random.default_rng(1)
    w = _weights(rng)
    node = helper.make_node("Gemm", ["x", "W", "c"], ["y"], name="gemm", transB=trans_b)
    return to_ir(make_model([node], [value_info("x", [32, K])], [value_info("y", None)],
                            [tensor("W", w.T if trans_b else w),
                             tensor("c", rng.standard_normal(N))]))


def _absmax(model, batches) -> dict[str, np.ndarray]:
    names = [n.inputs[0].name for n in model.graph if n.op_type in ("MatMul", "Gemm")]
    return smoothing.channel_absmax(model, list(dict.fromkeys(names)), batches)


def _smooth(model, batches):
    return SmoothActivationsPass(SmoothActivationsOptions(absmax=_absmax(model, batches)))(
        model.clone())


@pytest.mark.parametrize("decomposed", [False, True])
def test_layernorm_takes_the_scales_when_only_matmuls_read_it(decomposed):
    model = layernorm_model(decomposed=decomposed)
    report = _smooth(model, [{"x": _x(0)}])
    assert report.counts == {"smoothed": 1}
    assert "folded into" in report.log[0], report.log
    assert op_count(report.model, "Mul") == op_count(model, "Mul")  # no Mul added
    assert_same_outputs(model, report.model, {"x": _x(5)}, rtol=1e-4, atol=1e-4)
    # The LayerNorm output is balanced now: its outlier channels are no longer outliers.
    smoothed = _absmax(report.model, [{"x": _x(0)}])
    (before,), (after,) = _absmax(model, [{"x": _x(0)}]).values(), smoothed.values()
    assert before.max() / np.median(before) > 20
    assert after.max() / np.median(after) < before.max() / np.median(before) / 3


def test_a_residual_reader_keeps_the_original_and_the_matmuls_share_one_mul():
    model = layernorm_model(residual=True)
    report = _smooth(model, [{"x": _x(0)}])
    assert "Mul by 1/s" in report.log[0]
    assert op_count(report.model, "Mul") == 1
    residual = next(n for n in report.model.graph if n.name == "residual")
    assert residual.inputs[0].producer().op_type == "LayerNormalization"
    readers = [n for n in report.model.graph if n.op_type == "MatMul"]
    assert {n.inputs[0].producer().op_type for n in readers} == {"Mul"}
    assert_same_outputs(model, report.model, {"x": _x(5)}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weights_are_scaled_along_the_input_channels(trans_b):
    model = gemm_model(trans_b)
    x = _x(0, batch=4).reshape(32, K)
    report = _smooth(model, [{"x": x}])
    assert report.counts == {"smoothed": 1}
    assert_same_outputs(model, report.model, {"x": _x(3, batch=4).reshape(32, K)},
                        rtol=1e-4, atol=1e-4)


def test_dead_channels_keep_their_scale():
    model = gemm_model(0)
    x = _x(0, batch=4).reshape(32, K)
    x[:, 5] = 0.0  # a channel that never fires: 1/s would be infinite
    report = _smooth(model, [{"x": x}])
    factor = next(v for v in report.model.graph.initializers.values() if v.name.endswith("_smooth"))
    assert factor.const_value.numpy()[5] == 1.0
    assert np.all(np.isfinite(factor.const_value.numpy()))


def _dynamic_error(model) -> float:
    """Worst-output SQNR (dB) of dynamic int8 vs float on fresh inputs."""
    quantized = model.clone()
    QuantizeDynamicPass(QuantizeDynamicOptions(reduce_range=cpu_needs_reduce_range()))(quantized)
    feeds = {"x": _x(7)}
    worst = np.inf
    for a, b in zip(run(model, feeds)[:2], run(quantized, feeds)[:2]):
        a, b = a.astype(np.float64), b.astype(np.float64)
        worst = min(worst, 10 * np.log10(np.sum(a * a) / np.sum((a - b) ** 2)))
    return worst


def test_smoothing_lowers_the_dynamic_int8_error():
    model = layernorm_model(residual=True)
    smoothed = _smooth(model, [{"x": _x(s)} for s in range(3)]).model
    plain_db, smoothed_db = _dynamic_error(model), _dynamic_error(smoothed)
    assert smoothed_db > plain_db + 4.0, (plain_db, smoothed_db)


def test_int8_dynamic_with_calibration_data_keeps_smoothing_where_it_helps(tmp_path):
    model = layernorm_model(residual=True)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.stack([_x(s) for s in range(10)]))
    notes: list[str] = []
    result = int8.quantize(model, int8.Int8Options(calib=str(data), mode="dynamic",
                                                   check_speed=False, split_outliers=False,
                                                   budget=int8.Budget(0.999)), notes)
    said = " ".join(notes)
    assert "SmoothQuant" in said and "left out" not in said, notes
    assert result.is_quantized, notes
    assert op_count(result.model, "DynamicQuantizeMatMul") == 2
    assert op_count(result.model, "Mul") == 1  # the shared 1/s before q and v
    off: list[str] = []
    plain = int8.quantize(model, int8.Int8Options(calib=str(data), mode="dynamic",
                                                  check_speed=False, smooth=False,
                                                  split_outliers=False,
                                                  budget=int8.Budget(0.999)), off)
    assert "SmoothQuant" not in " ".join(off)
    assert op_count(plain.model, "Mul") == 0


def test_cli_no_smooth_and_smooth(tmp_path):
    model = layernorm_model(residual=True)
    src = tmp_path / "m.onnx"
    ir.save(model, src)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.stack([_x(s) for s in range(10)]))
    for flag in ("--smooth", "--no-smooth"):
        out, report = tmp_path / f"{flag[2:]}.onnx", tmp_path / f"{flag[2:]}.json"
        result = CliRunner().invoke(app, [
            "optimize", str(src), "-o", str(out), "--int8", "--quant-mode", "dynamic",
            "--calib", str(data), "--allow-slower", "--bench", "none", "--quiet",
            "--max-error", "cosine>=0.9", "--report", str(report), flag])
        assert result.exit_code == 0, result.output
        notes = json.dumps(json.loads(report.read_text()))
        assert ("SmoothQuant" in notes) == (flag == "--smooth"), notes


# ---------------------------------------------------------------- what the robustness sweep found


def _dynamic_with_calib(model, tmp_path, inputs: dict[str, np.ndarray], **options):
    data = tmp_path / "calib.npz"
    np.savez(data, **inputs)
    notes: list[str] = []
    result = int8.quantize(model, int8.Int8Options(calib=str(data), mode="dynamic",
                                                   check_speed=False, **options), notes)
    return result, notes


def test_an_overridable_initializer_read_by_a_matmul_is_not_smoothed(tmp_path):
    """`p` is an initializer that is also a graph input: a weight the caller may replace, not
    an activation, so smoothing leaves it alone instead of failing calibration."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["p", "w2"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    proto = make_model(nodes, [value_info("x", [2, K]), value_info("p", [2, K])],
                       [value_info("y", [2, N])],
                       [tensor("w1", _weights(rng)), tensor("w2", _weights(rng)),
                        tensor("p", rng.standard_normal((2, K)))])
    x = rng.standard_normal((10, 2, K)).astype(np.float32)
    x[..., list(OUTLIERS)] *= 50.0
    result, notes = _dynamic_with_calib(to_ir(proto), tmp_path, {"x": x}, smooth=True)
    assert result.is_quantized, notes
    smoothed = [n for n in result.model.graph if n.op_type == "Mul"]
    assert [n.inputs[0].name for n in smoothed] == ["x"]


def test_matmul_input_from_a_contrib_op_is_calibrated(tmp_path):
    """ONNX shape inference cannot type com.microsoft Gelu's output; ORT can, so its ranges are
    measured (for SmoothQuant, and for static int8) instead of refused."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
             helper.make_node("Gelu", ["m"], ["g"], domain="com.microsoft", name="gelu"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="mm2")]
    proto = make_model(nodes, [value_info("x", ["b", 8, K])], [value_info("y", ["b", 8, K])],
                       [tensor("w1", _weights(rng)),
                        tensor("w2", rng.standard_normal((N, K)) / np.sqrt(N))],
                       extra_opsets={"com.microsoft": 1})
    model = to_ir(proto)
    found = smoothing.channel_absmax(model, ["g"], [{"x": _x(0)}])
    assert found["g"].shape == (N,) and np.all(found["g"] >= 0)
    batches = np.stack([_x(s) for s in range(10)])
    result, notes = _dynamic_with_calib(model, tmp_path, {"x": batches}, smooth=True)
    assert result.is_quantized and any("SmoothQuant" in n for n in notes), notes


def test_unnamed_matmuls_are_smoothed_and_can_fall_back(tmp_path):
    """Layers are picked by node name; unnamed nodes get names first, so --smooth and the
    budget's fallback reach them too."""
    model = layernorm_model(residual=True)
    proto = ir.to_proto(model)
    for node in proto.graph.node:
        node.name = ""
    result, notes = _dynamic_with_calib(to_ir(proto), tmp_path,
                                        {"x": np.stack([_x(s) for s in range(10)])},
                                        smooth=True, budget=int8.Budget(0.9))
    assert result.is_quantized, notes
    assert any("SmoothQuant" in n for n in notes), notes
    assert op_count(result.model, "DynamicQuantizeMatMul") == 2


def test_smooth_without_calibration_data_says_it_was_not_applied():
    model = layernorm_model(residual=True)
    notes: list[str] = []
    int8.quantize(model, int8.Int8Options(mode="dynamic", check_speed=False, smooth=True,
                                          budget=int8.Budget(0.9)),
                  notes, feeds=[{"x": _x(s)} for s in range(2)])
    assert any("--smooth needs --calib" in n for n in notes), notes


def test_when_neither_variant_holds_all_int8_the_one_needing_fewer_float_layers_is_kept():
    """MiniLM's case: SmoothQuant brings all-int8 closer to fp32 yet spreads the error, so its
    fallback needs more layers float than the plain variant's; the plain one is kept."""
    from onnxopt.quant import dynamic

    plain = stub_variant("", 0.93, {"layer1", "layer4"})
    smooth = stub_variant(dynamic.SMOOTH, 0.95, {"layer0", "layer2", "layer5", "layer7",
                                                  "layer8"})
    notes: list[str] = []
    chosen, outcome = dynamic._chosen_variant([plain, smooth], notes, lambda _: None)
    assert chosen is plain and set(outcome.excluded) == {"layer1", "layer4"}
    assert any("kept plain dynamic int8 (plain: held with 2 layers float; SmoothQuant: held "
               "with 5 layers float)" in n for n in notes), notes
