"""Failures found by running onnxopt over a corpus of exports and edge cases (each once broke)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import invoke_cli, op_count, run
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

vi = h.make_tensor_value_info


def init(name, array):
    return nh.from_array(np.asarray(array), name)


def model(nodes, inputs, outputs, inits=(), opset=13, extra=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [h.make_opsetid("", opset), *(h.make_opsetid(d, v) for d, v in extra)]
    return h.make_model(graph, opset_imports=opsets)


def optimize(tmp_path, proto, capsys, monkeypatch, *extra, name="m.onnx", **save):
    path = tmp_path / name
    onnx.save(proto, str(path), **save)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = invoke_cli(["optimize", path, "-o", out, "--bench", "none", "-q",
                                    "--report", report, *extra], capsys, monkeypatch)
    data = json.loads(report.read_text()) if report.exists() else None
    return code, err, data, out


def test_external_data_model_verifies_from_another_working_directory(tmp_path, capsys,
                                                                     monkeypatch):
    rng = np.random.default_rng(0)
    proto = model([h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                   h.make_node("Relu", ["c"], ["y"], name="relu")],
                  [vi("x", T.FLOAT, [1, 3, 8, 8])], [vi("y", T.FLOAT, [1, 4, 6, 6])],
                  [init("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative external locations must resolve beside the model
    code, err, report, _ = optimize(tmp_path, proto, capsys, monkeypatch,
                                    save_as_external_data=True, location="m.onnx.data",
                                    size_threshold=0)
    assert code == 0, err
    assert report["verification"]["status"] == "passed"
    assert not any(p["reverted"] for p in report["passes"])


def test_identity_returning_an_outer_scope_value_in_a_branch_stays(tmp_path, capsys, monkeypatch):
    then_branch = h.make_graph([h.make_node("Neg", ["t"], ["then_out"])], "then", [],
                               [vi("then_out", T.FLOAT, [2])])
    else_branch = h.make_graph([h.make_node("Identity", ["t"], ["else_out"])], "else", [],
                               [vi("else_out", T.FLOAT, [2])])
    proto = model([h.make_node("Tanh", ["x"], ["t"]),
                   h.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
                   h.make_node("Greater", ["sx", "zero"], ["cond"]),
                   h.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                               else_branch=else_branch)],
                  [vi("x", T.FLOAT, [2])], [vi("y", T.FLOAT, [2])], [init("zero", np.float32(0))])
    code, err, report, out = optimize(tmp_path, proto, capsys, monkeypatch, "--no-verify")
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    for x in (np.array([1.0, 2.0], np.float32), np.array([-1.0, -2.0], np.float32)):
        np.testing.assert_array_equal(run(onnx.load(str(out)), {"x": x})[0], run(proto, {"x": x})[0])


def test_identity_after_an_unshaped_custom_op_keeps_the_output_shape(tmp_path, capsys,
                                                                     monkeypatch):
    proto = model([h.make_node("FastGelu", ["x"], ["g"], domain="com.microsoft"),
                   h.make_node("Identity", ["g"], ["y"])],
                  [vi("x", T.FLOAT, [2, 8])], [vi("y", T.FLOAT, [2, 8])], opset=17,
                  extra=[("com.microsoft", 1)])
    code, err, report, out = optimize(tmp_path, proto, capsys, monkeypatch)
    assert code == 0, err
    assert not any(p["reverted"] for p in report["passes"])
    onnx.checker.check_model(str(out))
    assert op_count(onnx.load(str(out)), "Identity") == 0


def test_scalar_bool_input_is_generated(tmp_path, capsys, monkeypatch):
    proto = model([h.make_node("Dropout", ["x", "ratio", "train"], ["y"])],
                  [vi("x", T.FLOAT, [2, 3]), vi("train", T.BOOL, [])], [vi("y", T.FLOAT, [2, 3])],
                  [init("ratio", np.float32(0.5))])
    code, err, report, _ = optimize(tmp_path, proto, capsys, monkeypatch)
    assert code == 0, err


def test_model_that_cannot_run_on_generated_inputs_still_optimizes(tmp_path, capsys, monkeypatch):
    proto = model([h.make_node("Reshape", ["x", "shape"], ["y"])],
                  [vi("x", T.FLOAT, [2, 6]), vi("shape", T.INT64, [2])],
                  [vi("y", T.FLOAT, ["a", "b"])])
    code, err, report, out = optimize(tmp_path, proto, capsys, monkeypatch, "--bench", "cpu")
    assert code == 0, err
    assert report["verification"]["status"] == "skipped"
    assert "failed to run" in report["verification"]["reason"]
    assert out.exists()


def test_map_typed_model_is_a_clear_refusal(tmp_path, capsys, monkeypatch):
    zipmap = h.make_value_info("z", h.make_sequence_type_proto(
        h.make_map_type_proto(T.INT64, h.make_tensor_type_proto(T.FLOAT, []))))
    proto = model([h.make_node("ZipMap", ["p"], ["z"], domain="ai.onnx.ml",
                               classlabels_int64s=[0, 1])],
                  [vi("p", T.FLOAT, [1, 2])], [zipmap], opset=15, extra=[("ai.onnx.ml", 3)])
    code, err, _, out = optimize(tmp_path, proto, capsys, monkeypatch)
    assert code == 2
    assert "value 'z' has a map type" in err and "zipmap" in err
    assert not out.exists()


def test_fp16_gemm_batchnorm_fold_is_kept(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    k, n = 64, 16
    proto = model([h.make_node("Gemm", ["x", "w", "bias"], ["c"], transB=1, name="fc"),
                   h.make_node("BatchNormalization", ["c", "s", "sh", "m", "v"], ["y"], name="bn")],
                  [vi("x", T.FLOAT16, [4, k])], [vi("y", T.FLOAT16, [4, n])],
                  [init("w", (rng.standard_normal((n, k)) * 0.2).astype(np.float16)),
                   init("bias", rng.standard_normal(n).astype(np.float16)),
                   init("s", rng.uniform(0.5, 1.5, n).astype(np.float16)),
                   init("sh", rng.standard_normal(n).astype(np.float16)),
                   init("m", rng.standard_normal(n).astype(np.float16)),
                   init("v", rng.uniform(0.5, 2, n).astype(np.float16))], opset=15)
    code, err, report, out = optimize(tmp_path, proto, capsys, monkeypatch)
    assert code == 0, err
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0
    assert report["verification"]["outputs"][0]["max_abs"] < 0.02  # a few fp16 ulps


@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_map_typed_model_other_commands(tmp_path, capsys, monkeypatch, command):
    zipmap = h.make_value_info("z", h.make_sequence_type_proto(
        h.make_map_type_proto(T.INT64, h.make_tensor_type_proto(T.FLOAT, []))))
    proto = model([h.make_node("ZipMap", ["p"], ["z"], domain="ai.onnx.ml",
                               classlabels_int64s=[0, 1])],
                  [vi("p", T.FLOAT, [1, 2])], [zipmap], opset=15, extra=[("ai.onnx.ml", 3)])
    onnx.save(proto, str(tmp_path / "z.onnx"))
    code, _, err = invoke_cli([command, tmp_path / "z.onnx"], capsys, monkeypatch)
    assert code == 2 and "map type" in err


def test_folded_weight_transpose_is_stored_c_ordered(tmp_path, capsys, monkeypatch):
    """dynamo writes Linear as MatMul(x, Transpose(W)); folding leaves a transposed numpy view,
    which crashed onnx-ir's initializer deduplication ("ndarray is not C-contiguous")."""
    rng = np.random.default_rng(0)
    proto = model([h.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                   h.make_node("MatMul", ["x", "Wt"], ["y"])],
                  [vi("x", T.FLOAT, [2, 6])], [vi("y", T.FLOAT, [2, 4])],
                  [init("W", rng.standard_normal((4, 6)).astype(np.float32))])
    code, err, data, out = optimize(tmp_path, proto, capsys, monkeypatch)
    assert code == 0, err
    assert data["verification"]["status"] == "passed"
    assert op_count(onnx.load(str(out)), "Transpose") == 0
