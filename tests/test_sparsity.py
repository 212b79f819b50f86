"""--sparsity end to end: magnitude vs reconstruction, the budget, the report, bad input."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import invoke_cli, make_model, run, tensor, to_ir, value_info
from onnx import helper

from onnxopt import api
from onnxopt.measure.budget import Budget
from onnxopt.sparsity import channels, prune, refit
from onnxopt.sparsity.options import SparsityOptions

DEFAULT = str(api.default_model_path())


def correlated_mlp(seed: int = 0, width: int = 64, hidden: int = 96, out: int = 16):
    """x [N, width] -> Gemm -> Relu -> MatMul -> Relu -> MatMul: the shape SparseGPT helps most
    on, inputs whose channels are strongly correlated (see correlated_inputs)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    inits = [tensor("w1", rng.standard_normal((hidden, width)) / np.sqrt(width)),
             tensor("b1", 0.1 * rng.standard_normal(hidden)),
             tensor("w2", rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)),
             tensor("w3", rng.standard_normal((hidden, out)) / np.sqrt(hidden))]
    return make_model(nodes, [value_info("x", ["N", width])], [value_info("y", ["N", out])],
                      inits)


def correlated_inputs(seed: int, batches: int, rows: int = 32, width: int = 64) -> np.ndarray:
    """[batches, rows, width]: 8 latent factors mixed into 64 channels, plus a little noise."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((8, width))
    latent = rng.standard_normal((batches, rows, 8))
    return (latent @ mixing + 0.05 * rng.standard_normal((batches, rows, width))).astype(
        np.float32)


@pytest.fixture()
def mlp_files(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(correlated_mlp(), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated_inputs(1, 20))
    return path, calib


def _sparsify(model, **kwargs):
    options = SparsityOptions(**kwargs)
    return prune.sparsify(model, options, [], feeds=None, progress=lambda _: None)


def test_reconstruction_lowers_the_output_error_of_magnitude_pruning(mlp_files):
    path, calib = mlp_files
    model = ir.load(path)
    notes: list[str] = []
    options = SparsityOptions(0.5, calib=str(calib), keep_first_last=False,
                              budget=Budget(None, None))
    batches, held = prune.calibration_split(model, options, notes, None)
    reference = [{"y": run(model, batch)[0]} for batch in held]
    errors = {}
    for method in ("magnitude", "reconstructed"):
        if method == "magnitude":
            candidate = prune._magnitude(model, options)
        else:
            candidate = refit.reconstructed(model, options, batches, lambda _: None)
        got = [{"y": run(candidate.model, batch)[0]} for batch in held]
        errors[method] = sum(float(np.sum((g["y"] - r["y"]) ** 2))
                             for g, r in zip(got, reference))
        weights = [n.inputs[1].const_value.numpy() for n in candidate.model.graph
                   if n.op_type in ("Gemm", "MatMul")]
        assert all(abs(np.mean(w == 0) - 0.5) < 1e-3 for w in weights), method
    assert errors["reconstructed"] < 0.5 * errors["magnitude"], errors


def test_reconstruction_2_4_keeps_the_pattern_and_beats_magnitude(mlp_files):
    path, calib = mlp_files
    result = _sparsify(ir.load(path), sparsity=None, pattern="2:4", calib=str(calib),
                       keep_first_last=False, budget=Budget(None, None))
    assert result.method == "reconstructed" and result.is_pruned
    for node in result.model.graph:
        if node.op_type in ("Gemm", "MatMul"):
            w = node.inputs[1].const_value.numpy()
            rows = w if node.op_type == "Gemm" else w.T  # [N, K]: runs of 4 along K
            assert (np.count_nonzero(rows.reshape(rows.shape[0], -1, 4), axis=-1) <= 2).all()


def test_hessian_accumulation_memory_does_not_grow_with_the_calibration_set(tmp_path):
    model = to_ir(correlated_mlp())
    options = SparsityOptions(0.5, keep_first_last=False)

    def peak(count: int) -> int:
        batches = [{"x": b} for b in correlated_inputs(2, count)]
        tracemalloc.start()
        try:
            refit.reconstructed(model, options, batches, lambda _: None)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(4), peak(40)  # the 40 batches themselves are 10x the 4 (0.3 MB more)
    assert large < small + 600_000, (small, large)


def test_optimize_sparsity_cli_writes_the_report_and_a_sparse_model(mlp_files, tmp_path,
                                                                    capsys, monkeypatch):
    path, calib = mlp_files
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    plot = tmp_path / "r.png"
    code, stdout, err = invoke_cli(["optimize", path, "-o", out, "--sparsity", "0.5", "--calib",
                                    calib, "--no-sparsity-keep-ends", "--max-error", "none",
                                    "--bench", "none", "--report", report_path, "--plot", plot],
                                   capsys, monkeypatch)
    assert code == 0, err + stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(report_path.read_text())["sparsity"]
    assert summary["verdict"] == "smaller only" and summary["method"] == "reconstructed"
    assert abs(summary["sparsity"] - 0.5) < 1e-3 and summary["layers_pruned"] == 3
    raw, packed = summary["weights_raw_bytes"], summary["weights_zip_bytes"]
    assert raw[0] == raw[1] and packed[1] < 0.8 * packed[0]
    assert summary["macs_removed"] == pytest.approx(0.5, abs=0.01)
    assert "sparsity per layer" in stdout and "smaller only" in stdout
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    weights = [onnx.numpy_helper.to_array(t) for t in written.graph.initializer
               if t.name.startswith("w")]
    assert all(abs(np.mean(w == 0) - 0.5) < 1e-3 for w in weights)


def test_a_tight_budget_sends_the_most_sensitive_layers_back_to_dense(mlp_files):
    path, calib = mlp_files
    model = ir.load(path)
    loose = _sparsify(model, sparsity=0.7, calib=str(calib), keep_first_last=False,
                      reconstruct=False, budget=Budget(None, None))
    worst = min(o.cosine for o in loose.verification.outputs)
    budget = Budget(min_cosine=min(0.9999, (1 + worst) / 2))  # between all-pruned and dense
    notes: list[str] = []
    result = prune.sparsify(model, SparsityOptions(0.7, calib=str(calib), keep_first_last=False,
                                                   reconstruct=False, budget=budget),
                            notes, feeds=None, progress=lambda _: None)
    assert result.is_pruned and result.counts["kept dense"] >= 1
    assert min(o.cosine for o in result.verification.outputs) >= budget.min_cosine
    assert any("kept dense to hold the accuracy budget" in n for n in notes), notes
    assert 0 < result.summary["sparsity"] < 0.7


def test_when_no_layer_holds_the_budget_the_dense_model_is_kept(mlp_files):
    path, calib = mlp_files
    model = ir.load(path)
    result = _sparsify(model, sparsity=0.9, calib=str(calib), keep_first_last=False,
                       reconstruct=False, budget=Budget(min_cosine=0.999999999))
    assert not result.is_pruned and result.model is model
    assert result.verification.status == "skipped"
    assert "dense model kept" in result.verification.reason


@pytest.mark.parametrize(("argv", "message"), [
    (["--sparsity", "1.5"], "--sparsity 1.5: expected a share 0 < s < 1"),
    (["--sparsity-pattern", "3:2"], "--sparsity-pattern '3:2'"),
    (["--sparsity", "0.3", "--sparsity-pattern", "2:4"], "that pattern is 50% sparse"),
    (["--sparsity-pattern", "channels"], "needs --sparsity S, the share of MACs"),
    (["--sparsity", "0.5", "--sparsity-scope", "network"], "--sparsity-scope 'network'"),
    (["--sparsity", "0.5", "--reconstruct"], "--reconstruct needs --calib"),
])
def test_bad_sparsity_options_are_one_line_errors(tmp_path, capsys, monkeypatch, argv, message):
    out = tmp_path / "o.onnx"
    code, _, err = invoke_cli(["optimize", DEFAULT, "-o", out, *argv], capsys, monkeypatch)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_model_without_prunable_layers_is_refused(tmp_path, capsys, monkeypatch):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [1, 4])],
                       [value_info("y", [1, 4])])
    path, out = tmp_path / "relu.onnx", tmp_path / "o.onnx"
    onnx.save(proto, path)
    code, _, err = invoke_cli(["optimize", path, "-o", out, "--sparsity", "0.5"], capsys,
                              monkeypatch)
    assert code == 2 and "--sparsity: nothing to prune" in err and not out.exists(), err


def test_calibration_data_that_does_not_match_is_refused(mlp_files, tmp_path, capsys,
                                                         monkeypatch):
    path, _ = mlp_files
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((2, 1, 3), np.float32))
    out = tmp_path / "o.onnx"
    code, _, err = invoke_cli(["optimize", path, "-o", out, "--sparsity", "0.5", "--calib",
                               wrong], capsys, monkeypatch)
    assert code == 2 and "wrong.npz" in err and not out.exists(), err


def test_prune_then_int8_quantizes_the_pruned_model(mlp_files, tmp_path, capsys, monkeypatch):
    path, calib = mlp_files
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = invoke_cli(["optimize", path, "-o", out, "--sparsity", "0.5", "--calib",
                                    calib, "--int8", "--quant-mode", "dynamic",
                                    "--no-sparsity-keep-ends", "--max-error", "none",
                                    "--bench", "none", "--allow-slower", "--report",
                                    report_path], capsys, monkeypatch)
    assert code == 0, err + stdout
    data = json.loads(report_path.read_text())
    assert data["sparsity"]["layers_pruned"] == 3 and data["int8"]["quantized"]
    model = onnx.load(out)
    quantized = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.INT8 and t.dims and len(t.dims) == 2]
    assert quantized and all(np.mean(q == 0) >= 0.5 for q in quantized)


def test_sensitivity_cli_prints_every_layer_and_writes_json(mlp_files, tmp_path, capsys,
                                                            monkeypatch):
    path, calib = mlp_files
    out = tmp_path / "s.json"
    code, stdout, err = invoke_cli(["sensitivity", path, "--calib", calib, "--levels",
                                    "0.2,0.5,0.9", "--json", out, "-q"], capsys, monkeypatch)
    assert code == 0, err
    layers = json.loads(out.read_text())["layers"]
    assert [row["node"] for row in layers] == ["fc1", "fc2", "fc3"]
    for row in layers:
        sqnr = {float(k): v for k, v in row["sqnr_db"].items()}
        assert sqnr[0.2] > sqnr[0.5] > sqnr[0.9], row
    assert "fc2" in stdout and "90%" in stdout


def correlated_cnn(seed: int = 0, channels: int = 16):
    """x [N, 16, 8, 8] -> Conv 3x3 (24) -> Relu -> Conv 3x3 (24) -> Relu -> Conv 1x1 (8)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3")]
    inits = [tensor("w1", rng.standard_normal((24, channels, 3, 3)) / 12),
             tensor("b1", 0.1 * rng.standard_normal(24)),
             tensor("w2", rng.standard_normal((24, 24, 3, 3)) / 15),
             tensor("w3", rng.standard_normal((8, 24, 1, 1)) / 5),
             tensor("b3", 0.1 * rng.standard_normal(8))]
    return make_model(nodes, [value_info("x", ["N", channels, 8, 8])],
                      [value_info("y", ["N", 8, 8, 8])], inits)


def cnn_batches(seed: int, count: int, channels: int = 16) -> list[dict]:
    """Images whose 16 channels mix 4 latent maps (one fixed mixing, whatever the seed): input
    channels strongly correlated."""
    mixing = np.random.default_rng(0).standard_normal((4, channels))
    rng = np.random.default_rng(seed)
    return [{"x": (np.einsum("nfhw,fc->nchw", rng.standard_normal((4, 4, 8, 8)), mixing)
                   + 0.05 * rng.standard_normal((4, channels, 8, 8))).astype(np.float32)}
            for _ in range(count)]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_of_a_cnn_beats_magnitude_on_held_out_images(pattern):
    model = to_ir(correlated_cnn())
    options = SparsityOptions(None if pattern == "2:4" else 0.5, pattern=pattern,
                              keep_first_last=False)
    calib, held = cnn_batches(1, 12), cnn_batches(2, 3)  # same distribution, other images

    def error(candidate) -> float:
        return sum(float(np.sum((run(candidate, b)[0] - run(model, b)[0]) ** 2)) for b in held)

    rebuilt = refit.reconstructed(model, options, calib, lambda _: None)
    plain = prune._magnitude(model, options)
    assert error(rebuilt.model) < 0.5 * error(plain.model)
    assert set(rebuilt.reconstructed) == {"conv1", "conv2", "conv3"}


def default_after_the_pipeline() -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """The embedded default after onnxopt's exact passes, its bundled images and labels."""
    from onnxopt import pipeline

    with np.load(api.default_samples_path()) as data:
        images, labels = data["image"].astype(np.float32), data["label"]
    model = ir.load(api.default_model_path())
    model, _, _ = pipeline.run_pipeline(model, api._build_passes(api.OptimizeOptions()),
                                        checker=None)
    return model, images, labels


def test_channel_pruning_the_default_keeps_top1_within_a_point_at_a_quarter_of_the_macs():
    """The issue's target on the embedded default: >= 25% of the MACs removed, top-1 on the
    192 digits not used for calibration within 1 point of dense, no training."""
    model, images, labels = default_after_the_pipeline()
    calib = [{"image": images[i:i + 8]} for i in range(0, 64, 8)]
    options = SparsityOptions(0.25, pattern="channels", budget=Budget(None, None))
    result = channels.prune_channels(model, options, [], calib, calib[-2:], lambda _: None)
    assert result.is_pruned and result.summary["macs_removed"] >= 0.25

    def top1(m) -> float:
        return float(np.mean(run(m, {"image": images[64:]})[0].argmax(1) == labels[64:]))

    assert top1(result.model) >= top1(model) - 0.01, (top1(result.model), top1(model))
    assert result.summary["verdict"] in ("faster", "smaller only")
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)


def test_demo_sparsity_prunes_channels_and_reports_the_task_metric(tmp_path, capsys,
                                                                   monkeypatch):
    report_path = tmp_path / "r.json"
    code, stdout, err = invoke_cli(["demo", "--sparsity", "--bench", "none", "-q", "--report",
                                    report_path], capsys, monkeypatch)
    assert code == 0, err + stdout
    data = json.loads(report_path.read_text())
    summary = data["sparsity"]
    assert summary["pattern"] == "channels" and summary["method"] == "reconstructed"
    assert summary["macs_removed"] >= 0.2 and summary["verdict"] == "not timed"  # --bench none
    before, after = data["metrics"]["digits top-1 (256 samples)"]
    assert after >= before - 0.01
    assert data["optimized"]["parameters"] < 0.8 * data["original"]["parameters"]


def test_channels_where_every_group_touches_the_outputs_is_refused(tmp_path, capsys,
                                                                   monkeypatch):
    rng = np.random.default_rng(5)
    proto = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="only")],
                       [value_info("x", [1, 3, 8, 8])], [value_info("y", [1, 4, 6, 6])],
                       [tensor("w", rng.standard_normal((4, 3, 3, 3)))])
    path, out = tmp_path / "conv.onnx", tmp_path / "o.onnx"
    onnx.save(proto, path)
    code, _, err = invoke_cli(["optimize", path, "-o", out, "--sparsity", "0.3",
                               "--sparsity-pattern", "channels"], capsys, monkeypatch)
    assert code == 2 and "no channel group can be pruned" in err and "'y'" in err, err
    assert not out.exists() and len(err.strip().splitlines()) == 1


def test_sensitivity_of_channel_groups_grows_with_the_share_cut(mlp_files, tmp_path, capsys,
                                                                 monkeypatch):
    path, calib = mlp_files
    out = tmp_path / "s.json"
    code, stdout, err = invoke_cli(["sensitivity", path, "--calib", calib, "--pattern",
                                    "channels", "--levels", "0.25,0.75", "--json", out, "-q"],
                                   capsys, monkeypatch)
    assert code == 0, err
    groups = json.loads(out.read_text())["layers"]
    assert [g["node"] for g in groups] == ["fc1", "fc2"]  # fc3's group is the model's output
    for group in groups:
        assert group["weights"] == 96 and group["sqnr_db"]["0.25"] > group["sqnr_db"]["0.75"]
    assert "channel group alone cut" in stdout


def test_a_layer_too_wide_to_refit_is_pruned_by_magnitude_and_says_why(monkeypatch):
    """Re-fitting holds K x K sums per layer and solves in K^3: past hessian.MAX_WIDTH (here
    150, so conv2's 24 x 3 x 3 = 216 inputs are too wide) the layer is pruned by magnitude,
    the log says why, and no statistics of it are gathered."""
    from onnxopt.sparsity import hessian

    monkeypatch.setattr(hessian, "MAX_WIDTH", 150)
    model = to_ir(correlated_cnn())
    options = SparsityOptions(0.5, keep_first_last=False)
    rebuilt = refit.reconstructed(model, options, cnn_batches(1, 4), lambda _: None)
    assert set(rebuilt.reconstructed) == {"conv1", "conv3"}
    [line] = [entry for entry in rebuilt.log if "'conv2'" in entry]
    assert "by magnitude: 50.0% zero" in line and "216 wide (> 150)" in line
    w2 = next(n for n in rebuilt.model.graph if n.name == "conv2").inputs[1].const_value.numpy()
    assert np.mean(w2 == 0) == pytest.approx(0.5, abs=1e-3)


def test_channel_refit_skips_a_layer_too_wide_and_says_why(monkeypatch):
    from onnxopt.sparsity import hessian

    monkeypatch.setattr(hessian, "MAX_WIDTH", 200)
    model, images, _ = default_after_the_pipeline()
    calib = [{"image": images[i:i + 8]} for i in range(0, 32, 8)]
    options = SparsityOptions(0.25, pattern="channels", budget=Budget(None, None))
    result = channels.prune_channels(model, options, [], calib, calib[-1:], lambda _: None)
    skipped = [entry for entry in result.log if "not re-fitted: its input is" in entry]
    assert skipped and all("> 200" in entry for entry in skipped)
    refitted = [entry for entry in result.log if entry.startswith("re-fitted ")]
    assert refitted  # the narrow ones still are
