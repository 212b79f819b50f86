"""split-outliers: a MatMul's few outlier input channels computed apart in float. Exact in float,
shared by the MatMuls that read one activation, and it lowers dynamic int8's error where a few
channels set the per-tensor activation scale."""

from __future__ import annotations

import json

import numpy as np
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
from onnxopt.passes.split_outliers import SplitOutliersOptions, SplitOutliersPass, outlier_channels
from typer.testing import CliRunner

from onnxopt.cli import app
from onnxopt.quant import int8, smoothing

K, N = 96, 128  # 12288-element weights: above quantize-dynamic's min_weight_elements
OUTLIERS = [5, 40]  # input channels 30x larger than the rest (MiniLM's FFN input: 16-22x)


def _x(seed: int, batch: int = 4, rows: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, rows, K)).astype(np.float32)
    x[..., OUTLIERS] *= 30.0
    return x


def _weights(rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)


def shared_input_model():
    """x -> Relu-free pass-through: q = x @ Wq + bq (a bias Add), v = x @ Wv (a graph output),
    r = x + x (a residual-like reader that must keep the original x)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q0"], name="q"),
             helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
             helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v"),
             helper.make_node("Add", ["x", "x"], ["r"], name="residual")]
    inits = [tensor("Wq", _weights(rng)), tensor("Wv", _weights(rng)),
             tensor("bq", rng.standard_normal(N))]
    outputs = [value_info("q", ["b", 8, N]), value_info("v", ["b", 8, N]),
               value_info("r", ["b", 8, K])]
    return to_ir(make_model(nodes, [value_info("x", ["b", 8, K])], outputs, inits))


def gemm_model(trans_b: int, alpha: float = 1.0):
    rng = np.random.default_rng(1)
    w = _weights(rng)
    node = helper.make_node("Gemm", ["x", "W", "c"], ["y"], name="gemm", transB=trans_b,
                            alpha=alpha)
    return to_ir(make_model([node], [value_info("x", [32, K])], [value_info("y", None)],
                            [tensor("W", w.T if trans_b else w),
                             tensor("c", rng.standard_normal(N))]))


def _split(model, batches):
    names = list(dict.fromkeys(n.inputs[0].name for n in model.graph
                               if n.op_type in ("MatMul", "Gemm")))
    absmax = smoothing.channel_absmax(model, names, batches)
    rewrite = SplitOutliersPass(SplitOutliersOptions(absmax=absmax))
    return rewrite(model.clone()), rewrite.outlier_products


def test_the_split_is_exact_and_shares_one_mask_and_gather_per_activation():
    model = shared_input_model()
    report, products = _split(model, [{"x": _x(0)}])
    assert report.counts == {"split": 1}, report.log
    assert f"channels {OUTLIERS}" in report.log[0], report.log
    out = report.model
    assert op_count(out, "Mul") == 1 and op_count(out, "Gather") == 1
    assert len(products) == 2 and op_count(out, "MatMul") == 4
    residual = next(n for n in out.graph if n.name == "residual")
    assert residual.inputs[0].name == "x"  # the other reader keeps the original
    # The graph outputs keep their names; the model computes the same function.
    assert [v.name for v in out.graph.outputs] == ["q", "v", "r"]
    assert_same_outputs(model, out, {"x": _x(5)}, rtol=1e-4, atol=1e-4)


def test_the_outlier_part_is_added_after_the_bias_so_dynamic_int8_still_folds_it():
    report, products = _split(shared_input_model(), [{"x": _x(0)}])
    quantized = report.model.clone()
    QuantizeDynamicPass(QuantizeDynamicOptions(exclude=tuple(products)))(quantized)
    q = next(n for n in quantized.graph if n.name == "q")
    assert q.op_type == "DynamicQuantizeMatMul" and len(q.inputs) == 5  # bias folded in
    assert op_count(quantized, "MatMul") == 2  # the two outlier products stayed float


@pytest.mark.parametrize(("trans_b", "alpha"), [(0, 1.0), (1, 1.0), (1, 0.5)])
def test_gemm_weights_lose_the_outlier_rows_along_the_input_axis(trans_b, alpha):
    model = gemm_model(trans_b, alpha)
    report, products = _split(model, [{"x": _x(0).reshape(32, K)}])
    assert report.counts == {"split": 1} and len(products) == 1
    gemm = next(n for n in report.model.graph if n.op_type == "Gemm")
    w = gemm.inputs[1].const_value.numpy()
    rows = w.T if trans_b else w
    assert np.all(rows[OUTLIERS] == 0) and np.count_nonzero(rows) == (K - len(OUTLIERS)) * N
    assert_same_outputs(model, report.model, {"x": _x(3).reshape(32, K)}, rtol=1e-4,
                        atol=1e-4)


def test_outliers_are_only_a_few_channels_far_above_the_median():
    flat = np.ones(64)
    assert outlier_channels(flat, 6.0, 8) is None
    few = flat.copy()
    few[[3, 9]] = [20.0, 10.0]
    assert outlier_channels(few, 6.0, 8).tolist() == [3, 9]
    many = flat.copy()
    many[:12] = 20.0  # more than max_channels: removing 8 leaves the range where it was
    assert outlier_channels(many, 6.0, 8) is None
    mild = flat.copy()
    mild[3] = 4.0  # under 6x the median: per-tensor int8 copes
    assert outlier_channels(mild, 6.0, 8) is None


def _dynamic_error(model, exclude=()) -> float:
    quantized = model.clone()
    QuantizeDynamicPass(QuantizeDynamicOptions(reduce_range=cpu_needs_reduce_range(),
                                               exclude=tuple(exclude)))(quantized)
    feeds = {"x": _x(7)}
    a, b = (np.asarray(run(m, feeds)[0], dtype=np.float64) for m in (model, quantized))
    return float(10 * np.log10(np.sum(a * a) / np.sum((a - b) ** 2)))


def test_the_split_lowers_the_dynamic_int8_error():
    model = shared_input_model()
    report, products = _split(model, [{"x": _x(s)} for s in range(3)])
    plain_db, split_db = _dynamic_error(model), _dynamic_error(report.model, products)
    # Removing two 30x channels shrinks the activation's range about 8x: +18 dB in theory.
    assert split_db > plain_db + 8.0, (plain_db, split_db)


def test_int8_dynamic_with_calibration_data_keeps_the_split_where_it_holds_the_budget(tmp_path):
    model = shared_input_model()
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.stack([_x(s) for s in range(10)]))
    notes: list[str] = []
    budget = int8.Budget(min_sqnr_db=_dynamic_error(model) + 4.0)  # plain int8 cannot hold it
    result = int8.quantize(model, int8.Int8Options(calib=str(data), mode="dynamic",
                                                   check_speed=False, smooth=False,
                                                   budget=budget), notes)
    said = " ".join(notes)
    assert "outlier split" in said, notes
    assert result.is_quantized and result.kept_float == 0, notes
    assert op_count(result.model, "DynamicQuantizeMatMul") == 2
    assert op_count(result.model, "Gather") == 1 and op_count(result.model, "MatMul") == 2


@pytest.mark.parametrize("flag", ["--split-outliers", "--no-split-outliers"])
def test_cli_split_outliers_flag(tmp_path, flag):
    src, out, data = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "calib.npz"
    import onnx_ir as ir

    ir.save(shared_input_model(), src)
    np.savez(data, x=np.stack([_x(s) for s in range(10)]))
    result = CliRunner().invoke(app, ["optimize", str(src), "-o", str(out), "--int8",
                                      "--quant-mode", "dynamic", "--calib", str(data),
                                      "--no-smooth", flag, "--bench", "none",
                                      "--allow-slower", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert "quantize-dynamic" in {p["name"] for p in report["passes"]}  # the pass kept
    assert ("outlier split" in result.output) == (flag == "--split-outliers"), result.output
    assert (op_count(ir.load(out), "Gather") == 1) == (flag == "--split-outliers")


def test_the_split_is_not_kept_where_the_plain_variant_needs_no_more_float_layers():
    from onnxopt.quant import dynamic

    # Both hold with every layer int8: the split is closer, but its extra ops buy nothing.
    plain, split = stub_variant("", 0.995, set()), stub_variant(dynamic.SPLIT, 0.999, set())
    chosen, _ = dynamic._chosen_variant([plain, split], [], lambda _: None)
    assert chosen is plain
    # Both need one layer float: a tie in the float count also keeps the plain variant.
    plain = stub_variant("", 0.95, {"layer3"})
    split = stub_variant(dynamic.SPLIT, 0.97, {"layer5"})
    chosen, _ = dynamic._chosen_variant([plain, split], [], lambda _: None)
    assert chosen is plain
    # The split needs fewer layers float: kept, and the note says what each needed.
    split = stub_variant(dynamic.SPLIT, 0.97, {"layer6"})
    plain = stub_variant("", 0.95, {"layer1", "layer3"})
    notes: list[str] = []
    chosen, outcome = dynamic._chosen_variant([plain, split], notes, lambda _: None)
    assert chosen is split and outcome.excluded == ("layer6",)
    # The split ran first (closer with all int8) and held with 1; plain could only win with 1.
    assert any("kept outlier split (plain: not with 1 or fewer layers float; outlier split: "
               "held with 1 layer float)" in n for n in notes), notes


def _spread_x(seed: int) -> np.ndarray:
    """_x plus a moderate spread among the ordinary channels (5x on a quarter of them): what is
    left for SmoothQuant once the split has taken the extreme ones."""
    x = _x(seed)
    x[..., 48:72] *= 5.0
    return x


def test_smoothquant_after_the_split_folds_into_the_mask_and_lowers_the_error():
    model = shared_input_model()
    batches = [{"x": _spread_x(s)} for s in range(3)]
    names = ["q", "v"]
    split, count, products = smoothing.split(
        model, names, smoothing.input_ranges(model, names, batches))
    both, smoothed = smoothing.smoothed(split, names, smoothing.input_ranges(split, names, batches))
    assert count == 1 and smoothed == 1
    assert op_count(both, "Mul") == 1  # 1/s went into the inlier mask, no Mul added
    feeds = {"x": _spread_x(7)}
    assert_same_outputs(model, both, feeds, rtol=1e-4, atol=1e-4)

    def error(m) -> float:  # 7-bit weights: no int16 saturation on any CPU, same numbers
        quantized = m.clone()
        QuantizeDynamicPass(QuantizeDynamicOptions(reduce_range=True, exclude=products))(quantized)
        a, b = (np.asarray(run(x, feeds)[0], dtype=np.float64) for x in (model, quantized))
        return float(10 * np.log10(np.sum(a * a) / np.sum((a - b) ** 2)))

    assert error(both) > error(split) + 1.0, (error(split), error(both))


def test_dynamic_int8_measures_all_four_combinations_of_the_two_rewrites():
    from onnxopt.quant import dynamic

    model = shared_input_model()
    calib = [{"x": _spread_x(s)} for s in range(6)]
    feeds = [{"x": _spread_x(s)} for s in range(6, 8)]
    notes: list[str] = []
    options = int8.Int8Options(mode="dynamic", reduce_range=True, check_speed=False)
    variants = dynamic._dynamic_variants(model, options, feeds, calib, notes)
    worst = {v.rewrite: v.worst for v in variants}
    both = f"{dynamic.SPLIT} + {dynamic.SMOOTH}"
    assert set(worst) == {"", dynamic.SMOOTH, dynamic.SPLIT, both}, worst
    assert worst[both] > worst[dynamic.SPLIT] > worst[""], worst
    assert sum("with all int8" in n for n in notes) == 3, notes
    # Forcing one rewrite keeps only the variants with it.
    only = dynamic._dynamic_variants(
        model, int8.Int8Options(mode="dynamic", reduce_range=True, split_outliers=True),
        feeds, calib, [])
    assert {v.rewrite for v in only} == {dynamic.SPLIT, both}


def test_forced_split_on_a_model_without_outliers_says_so_and_quantizes_plainly(tmp_path):
    model = shared_input_model()
    data = tmp_path / "calib.npz"
    plain = np.stack([np.random.default_rng(s).standard_normal((4, 8, K)).astype(np.float32)
                      for s in range(10)])
    np.savez(data, x=plain)
    notes: list[str] = []
    result = int8.quantize(model, int8.Int8Options(calib=str(data), mode="dynamic",
                                                   split_outliers=True, smooth=False,
                                                   check_speed=False,
                                                   budget=int8.Budget(None, None)), notes)
    assert any("--split-outliers: no MatMul input has a few outlier channels" in n
               for n in notes), notes
    assert result.is_quantized and op_count(result.model, "DynamicQuantizeMatMul") == 2
    assert op_count(result.model, "Gather") == 0
