"""Every output is a valid model: a pass or stage that breaks what the input met (the checker,
ONNX Runtime loading it) is undone and named, verified or not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import bn_node, bn_params, invoke_cli, make_model, op_count, tensor, to_ir, value_info
from onnx import helper
from onnxopt.passes import PassReport

import onnxopt
from onnxopt import api
from onnxopt.quant import int8
from onnxopt.measure import validity
from onnxopt.measure.verify import Verification

BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


class BreakCheckerPass(ir.passes.InPlacePass):
    """Gives a Relu a second input: the checker rejects it and ONNX Runtime cannot load it."""

    name = "break-checker"
    lossy = True  # even a lossy pass, which may miss the tolerance, may not break validity

    def call(self, model):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        relu.resize_inputs(2)
        relu.replace_input_with(1, model.graph.inputs[0])
        report = PassReport(model, modified=True)
        report.change("broken", "a second input on the Relu")
        return report


def conv_bn_relu():
    rng = np.random.default_rng(0)
    inits = [tensor("W", rng.standard_normal((4, 3, 3, 3))), *bn_params("bn", 4, rng)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "b"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    return make_model(nodes, [value_info("x", [1, 3, 6, 6])], [value_info("y", [1, 4, 4, 4])],
                      inits)


def assert_valid(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_levels_of_a_valid_and_an_unloadable_model():
    assert validity.required_of(to_ir(conv_bn_relu())) == validity.Validity(True, True, True)
    custom = make_model([helper.make_node("Foo", ["x"], ["y"], domain="com.example")],
                        [value_info("x", [2])], [value_info("y", [2])],
                        extra_opsets={"com.example": 1})
    levels = validity.required_of(to_ir(custom))
    assert levels.check and not levels.loads  # ORT has no Foo: the output need not load either
    assert "ONNX Runtime" not in levels.describe()


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("verify", [True, False])
def test_a_pass_that_breaks_the_checker_is_undone_and_named(tmp_path, monkeypatch, verify,
                                                             external):
    """With external data too: sessions read it through hard links, which the checker (onnx
    1.17+) refuses as an attack, so it must see the model another way or never check it."""
    monkeypatch.setitem(api.REGISTRY, BreakCheckerPass.name, BreakCheckerPass)
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn_relu(), src, save_as_external_data=external, location="in.onnx.data",
              size_threshold=0)
    options = api.OptimizeOptions(passes=("cleanup", "break-checker", "fold-batchnorm"),
                                  verify=verify, bench=())
    model, report = onnxopt.optimize(src, tmp_path / "out.onnx", options)
    rows = {run.name: run for run in report.passes}
    assert rows["break-checker"].reverted
    assert "ONNX checker" in rows["break-checker"].reason
    assert not rows["fold-batchnorm"].reverted  # the passes after it still ran
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert op_count(out, "BatchNormalization") == 0
    assert_valid(tmp_path / "out.onnx")
    assert (report.verification is not None) == verify
    assert report.validity == "onnx.checker full check, loads in ONNX Runtime"


def test_a_stage_that_writes_an_invalid_model_is_undone(tmp_path, monkeypatch):
    """A lossy stage (int8 here) is held to validity after its own budget: its row says why."""
    def broken_int8(model, options, notes, **_):
        broken = model.clone()
        BreakCheckerPass()(broken)
        return int8.Int8Result(broken, True, Verification("passed"), {}, 0, [], {})

    monkeypatch.setattr(int8, "quantize", broken_int8)
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn_relu(), src)
    options = api.OptimizeOptions(int8=api.Int8Options(), bench=())
    _, report = onnxopt.optimize(src, tmp_path / "out.onnx", options)
    row = report.passes[-1]
    assert row.name == "quantize-int8" and row.reverted and "invalid model" in row.reason
    assert report.int8["quantized"] is False
    assert report.verification.passed  # the exact rewrite's verification stands
    assert_valid(tmp_path / "out.onnx")


def test_backend_sequence_model_comes_out_valid(tmp_path, capsys, monkeypatch):
    """onnx's test_sequence_model8 (opset 12): onnxscript's folding of SplitToSequence writes
    the opset-13 Split with two inputs. The original cannot run on generated inputs (its
    split sizes are random), so only the validity guard stands between the user and a model
    ONNX Runtime cannot load: cleanup is undone and named, and the run says it is unverified."""
    src = BACKEND_DATA / "simple" / "test_sequence_model8" / "model.onnx"
    before = src.read_bytes()
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = invoke_cli(["optimize", str(src), "-o", str(out), "--report",
                                    str(report_path), "--bench", "none"], capsys, monkeypatch)
    assert code == 0, err
    assert_valid(out)
    report = json.loads(report_path.read_text())
    cleanup = next(run for run in report["passes"] if run["name"] == "cleanup")
    assert cleanup["reverted"] and "Split" in cleanup["reason"]
    assert report["verification"]["status"] == "skipped"
    assert "not verified" in stdout and "onnx.checker full check" in stdout
    assert src.read_bytes() == before


def test_the_checker_sees_external_and_string_weights_as_written(tmp_path):
    """The checker reads a stand-in copy of a model with external data: a float weight becomes
    a stand-in file, a string initializer (never external) stays inline. (That the data files
    exist and are long enough is io.load's check, not the checker's.)"""
    from onnxopt import io

    words = helper.make_tensor("words", onnx.TensorProto.STRING, [300],
                               [f"word{i}".encode() for i in range(300)])  # > 1 KB of strings
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                        helper.make_node("Identity", ["words"], ["s"], name="id")],
                       [value_info("x", [1, 64])],
                       [value_info("y", [1, 64]),
                        helper.make_tensor_value_info("s", onnx.TensorProto.STRING, [300])],
                       [tensor("w", np.ones((64, 64))), words])
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=1024)
    model = io.load(path)
    assert validity.checker_problem(model, full=True) == ""
    assert validity.required_of(model) == validity.Validity(True, True, True)
