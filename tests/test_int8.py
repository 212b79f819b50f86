"""`--int8` end to end: calibration, the accuracy budget, ORT's integer kernels, the demo."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import invoke_cli, op_count

from onnxopt import api
from onnxopt.errors import BadInputError
from onnxopt.quant import int8

DEFAULT = str(api.default_model_path())


@pytest.fixture
def calib_file(tmp_path):
    with np.load(api.default_samples_path()) as data:
        images = data["image"][:64].astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, image=images.reshape(8, 8, 1, 64, 64))  # a stack of 8 batches of 8
    return path


def test_budget_parsing():
    assert int8.parse_budget("cosine>=0.995") == int8.Budget(0.995, None)
    assert int8.parse_budget("sqnr>=30, cosine>=0.9") == int8.Budget(0.9, 30.0)
    assert int8.parse_budget("none") == int8.Budget(None, None)
    with pytest.raises(BadInputError, match="--max-error"):
        int8.parse_budget("cosine>0.9")


def test_optimize_int8_quantizes_the_default_and_ort_runs_integer_kernels(tmp_path, calib_file,
                                                                         capsys, monkeypatch):
    out = tmp_path / "int8.onnx"
    code, stdout, err = invoke_cli(["optimize", DEFAULT, "-o", out, "--int8", "--calib", calib_file,
                                    "--bench", "none", "--report", tmp_path / "r.json", "-q"],
                                   capsys, monkeypatch)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["int8"]["quantized"] is True
    assert report["int8"]["kernels"].get("QLinearConv") == 16
    assert report["int8"]["kernels"].get("Conv", 0) == 0
    assert report["verification"]["status"] == "passed"
    assert report["verification"]["outputs"][0]["cosine"] >= 0.99
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert op_count(model, "QuantizeLinear") > 0 and op_count(model, "BatchNormalization") == 0
    assert out.stat().st_size < api.default_model_path().stat().st_size / 3


def test_a_missed_budget_keeps_the_float_model(tmp_path, calib_file, capsys, monkeypatch):
    out = tmp_path / "out.onnx"
    code, stdout, err = invoke_cli(["optimize", DEFAULT, "-o", out, "--int8", "--calib", calib_file,
                                    "--max-error", "cosine>=0.9999999", "--bench", "none", "-q"],
                                   capsys, monkeypatch)
    assert code == 0, err  # the float model is the best one found: written, not a failure
    assert "int8 missed the accuracy budget" in stdout
    assert op_count(onnx.load(str(out)), "QuantizeLinear") == 0
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0  # the exact passes stay


def test_int8_without_calibration_on_a_cnn_says_what_to_do(tmp_path, capsys, monkeypatch):
    """No --calib: dynamic int8 covers MatMul/Gemm only; this CNN has nothing for it."""
    out = tmp_path / "o.onnx"
    code, stdout, err = invoke_cli(["optimize", DEFAULT, "-o", out, "--int8", "--bench", "none",
                                    "-q"], capsys, monkeypatch)
    assert code == 0, err
    assert "pass --calib for static int8 of the 16 Conv layers" in " ".join(stdout.split())
    assert op_count(onnx.load(str(out)), "DynamicQuantizeMatMul") == 0


def test_static_mode_needs_calibration_data_and_a_known_method(tmp_path, calib_file, capsys,
                                                               monkeypatch):
    code, _, err = invoke_cli(["optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--int8",
                               "--quant-mode", "static"], capsys, monkeypatch)
    assert code == 2 and "--quant-mode static needs calibration data" in err
    code, _, err = invoke_cli(["optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--int8",
                               "--calib", calib_file, "--calib-method", "magic"],
                              capsys, monkeypatch)
    assert code == 2 and "--calib-method 'magic'" in err
    assert not (tmp_path / "o.onnx").exists()


def mlp(seed=3):
    from helpers import make_model, tensor, value_info
    from onnx import helper

    rng = np.random.default_rng(seed)
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
         helper.make_node("Relu", ["hb"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        [value_info("x", ["batch", "seq", 128])], [value_info("y", ["batch", "seq", 64])],
        [tensor("w1", rng.standard_normal((128, 256)) * 0.1), tensor("b1", rng.standard_normal(256)),
         tensor("w2", rng.standard_normal((256, 64)) * 0.1)], opset=17)


def test_dynamic_int8_quantizes_matmuls_without_calibration(tmp_path, capsys, monkeypatch):
    onnx.save(mlp(), str(tmp_path / "mlp.onnx"))
    out = tmp_path / "o.onnx"
    code, stdout, err = invoke_cli(["optimize", tmp_path / "mlp.onnx", "-o", out, "--int8",
                                    "--shape", "x:2,16,128", "--allow-slower", "--bench", "none",
                                    "-q", "--report", tmp_path / "r.json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["int8"]["quantized"] is True
    assert report["int8"]["calibration"] == "none: dynamic int8"
    assert report["verification"]["outputs"][0]["cosine"] >= 0.99
    model = onnx.load(str(out))
    assert op_count(model, "DynamicQuantizeMatMul") == 2 and op_count(model, "MatMul") == 0


def test_dynamic_int8_counts_its_kernels_from_the_timing_session(monkeypatch):
    """The speed check's int8 session saves the graph ORT runs, and the kernels reported are
    counted from it: no session made for counting alone."""
    from helpers import to_ir

    from onnxopt.measure import runtime
    from onnxopt.quant import dynamic

    saved, real = [], runtime.make_session

    def spying(model, **kwargs):
        saved.append(kwargs.get("save_optimized"))
        return real(model, **kwargs)

    def no_counting_session(model):
        raise AssertionError("a session made only to count kernels")

    monkeypatch.setattr(runtime, "make_session", spying)
    monkeypatch.setattr(dynamic.quantize_int8, "ort_kernel_counts", no_counting_session)
    model = to_ir(mlp())
    feeds = [{"x": np.random.default_rng(0).standard_normal((2, 16, 128)).astype(np.float32)}]
    notes = []
    result = dynamic.quantize_dynamic(model, int8.Int8Options(mode="dynamic", reduce_range=False),
                                      feeds, notes, progress=lambda _: None)
    # kept or not (a model this small may time slower), the int8 graph's kernels are reported
    assert result.kernels.get("DynamicQuantizeMatMul") == 2 and "MatMul" not in result.kernels
    assert len([path for path in saved if path]) == 1  # the int8 timing session only


def test_random_calibration_is_announced(tmp_path, capsys, monkeypatch):
    code, stdout, err = invoke_cli(["optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--int8",
                                    "--calib", "random", "--calib-samples", "16", "--bench",
                                    "none", "-q"], capsys, monkeypatch)
    assert code in (0, 1), err
    assert "random" in stdout.lower()


def test_demo_int8_keeps_digit_accuracy(tmp_path, capsys, monkeypatch):
    code, stdout, err = invoke_cli(["demo", "--int8", "--bench", "none", "-q", "--report",
                                    tmp_path / "r.json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    [before, after] = next(v for k, v in report["metrics"].items() if k.startswith("digits top-1"))
    assert before - after <= 0.01 and before > 0.95
    assert report["int8"]["kernels"]["QLinearConv"] == 16
    assert "digits top-1" in stdout


def test_sensitive_layer_falls_back_to_float_to_hold_the_budget(tmp_path):
    """x has one huge channel that the first MatMul ignores (its weight row is 0): per-tensor
    uint8 on x wipes out the small channels, so that MatMul must stay float; the second one
    can still be int8."""
    from helpers import ignored_outlier_mlp, to_ir

    rng = np.random.default_rng(0)
    proto = ignored_outlier_mlp(rng, 8, 16, 4)
    x = rng.standard_normal((10, 16, 8)).astype(np.float32)
    x[:, :, 0] = 1000.0 * rng.random((10, 16))
    np.savez(tmp_path / "calib.npz", x=x)
    notes = []
    options = int8.Int8Options(calib=str(tmp_path / "calib.npz"), check_speed=False)  # tiny model
    result = int8.quantize(to_ir(proto), options, notes)
    assert result.is_quantized, notes
    assert any("kept float to hold the accuracy budget" in n and "'first'" in n for n in notes)
    assert result.verification.outputs[0].cosine >= 0.99
    quantized = {n.name for n in result.model.graph if n.op_type == "MatMul"
                 and n.inputs[1].producer() is not None
                 and n.inputs[1].producer().op_type == "DequantizeLinear"}
    assert quantized == {"second"}


def test_old_opset_model_is_upgraded_before_calibration(tmp_path):
    """Opset 11 (PP-OCR cls is): the tensors to calibrate are chosen on the opset-13 model."""
    from helpers import make_model, tensor, to_ir, value_info
    from onnx import helper

    rng = np.random.default_rng(1)
    proto = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [value_info("x", [1, 8, 16, 16])], [value_info("y", [1, 16, 16, 16])],
        [tensor("w", rng.standard_normal((16, 8, 3, 3)) * 0.2)], opset=11, ir_version=7)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((6, 1, 8, 16, 16)).astype(np.float32))
    notes = []
    result = int8.quantize(to_ir(proto), int8.Int8Options(
        calib=str(tmp_path / "calib.npz"), budget=int8.Budget(0.98), check_speed=False), notes)
    assert any("upgraded opset 11 -> 13" in n for n in notes)
    assert result.counts.get("quantized") == 1
    assert result.kernels.get("QLinearConv") == 1 or not result.is_quantized


def test_int8_that_runs_slower_is_not_kept(tmp_path, monkeypatch):
    """The speed check: a measured slowdown keeps the float model (issue: never slower)."""
    from helpers import make_model, tensor, to_ir, value_info
    from onnx import helper

    monkeypatch.setattr(int8, "slower", lambda *args: "2.00x the float latency, 95% CI 1.9-2.1")
    rng = np.random.default_rng(2)
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [value_info("x", ["N", 8])], [value_info("y", ["N", 4])],
                       [tensor("w", rng.standard_normal((8, 4)))], opset=17)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((5, 4, 8)).astype(np.float32))
    notes = []
    result = int8.quantize(to_ir(proto), int8.Int8Options(calib=str(tmp_path / "calib.npz")), notes)
    assert not result.is_quantized
    assert any("int8 ran slower than float" in n for n in notes)
    assert all(n.op_type == "MatMul" for n in result.model.graph)


def test_layer_sqnr_table(tmp_path, calib_file, capsys, monkeypatch):
    code, stdout, err = invoke_cli(["optimize", DEFAULT, "-o", tmp_path / "o.onnx", "--int8",
                                    "--calib", calib_file, "--bench", "none", "-q",
                                    "--report", tmp_path / "r.json"], capsys, monkeypatch)
    assert code == 0, err
    layers = json.loads((tmp_path / "r.json").read_text())["int8"]["layer_sqnr_db"]
    import onnx_ir as ir

    node_names = {n.name for n in ir.load(DEFAULT).graph}
    assert len(layers) >= 16 and set(layers) <= node_names
    assert sum(name.endswith("Conv") for name in layers) == 16
    assert all(15 < v < 80 for v in layers.values())  # int8: tens of dB, not exact, not noise


def test_int8_of_a_model_with_external_data_run_from_another_folder(tmp_path, calib_file,
                                                                    capsys, monkeypatch):
    """Weights in a .data file next to the model (torch's dynamo export writes that): a layer
    kept float keeps its external weight, and ORT's kernel count must still find it."""
    source = tmp_path / "exported"
    source.mkdir()
    onnx.save(onnx.load(DEFAULT), source / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = invoke_cli(["optimize", str(source / "model.onnx"), "-o", "out.onnx",
                               "--int8", "--calib", calib_file, "--allow-slower", "--bench",
                               "none", "-q", "--keep-float", "/stem/stem.0/Conv"],
                              capsys, monkeypatch)
    assert code == 0, err
    import onnxruntime as ort

    session = ort.InferenceSession(str(elsewhere / "out.onnx"), providers=["CPUExecutionProvider"])
    image = np.load(api.default_samples_path())["image"][:1].astype(np.float32)
    assert np.isfinite(session.run(None, {"image": image})[0]).all()
    out = onnx.load(elsewhere / "out.onnx")
    produced_by = {o: n.op_type for n in out.graph.node for o in n.output}
    weights = {n.name: produced_by.get(n.input[1], "initializer") for n in out.graph.node
               if n.op_type == "Conv"}
    assert weights.pop("/stem/stem.0/Conv") == "initializer"  # kept float, as asked
    assert set(weights.values()) == {"DequantizeLinear"}  # the other 15: int8 weights


def test_without_inputs_verification_and_timing_run_on_the_calibration_data(tmp_path):
    """A model with symbolic spatial dims: generated inputs would guess 32x32; with --calib the
    exact passes are verified, and both models timed, on the last calibration batches (48x40)."""
    from helpers import make_model, tensor, to_ir, value_info
    from onnx import helper

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    proto = make_model(nodes, [value_info("x", [1, 3, "h", "w"])], [value_info("y", None)],
                       [tensor("w", rng.standard_normal((8, 3, 3, 3)))])
    x = rng.standard_normal((6, 1, 3, 48, 40)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    options = api.OptimizeOptions(int8=int8.Int8Options(calib=str(tmp_path / "calib.npz"),
                                                        check_speed=False),
                                  bench=("cpu",), bench_seconds=0.2)
    _, report = api.optimize(to_ir(proto), tmp_path / "out.onnx", options)
    said = " ".join(report.notes)
    assert "the last 3 batches of --calib" in said and "guessed" not in said, report.notes
    assert report.verification.status == "passed"
    for batch, expected in zip(api.load_feeds(to_ir(proto), options, []), x[-3:]):
        assert np.array_equal(batch["x"], expected)  # the real shapes and values
