"""fuse-activations: spelled-out hard-swish / hard-sigmoid become one op, with the same outputs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_outputs, make_model, op_count, run, tensor, to_ir, value_info
from onnx import TensorProto, helper
from onnxopt.passes import FuseActivationsPass

SHAPE = [2, 8, 5, 5]


def _feeds():
    # Spans every piece of the activation: below -3 (zero), the ramp, above 3 (identity).
    return {"x": np.random.default_rng(0).uniform(-6, 6, SHAPE).astype(np.float32)}


def _hardswish_model(*, opset: int, scale_by_mul: bool = False, clip_max: float = 6.0,
                     extra_output: bool = False):
    """Conv -> x * Clip(x + 3, 0, clip_max) / 6 (or * 1/6) -> Conv, as Paddle exports it."""
    rng = np.random.default_rng(1)
    last = (helper.make_node("Mul", ["m", "sixth"], ["h"]) if scale_by_mul
            else helper.make_node("Div", ["m", "six"], ["h"]))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["x1"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["x1", "three"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "clip_max"], ["c"]),
             helper.make_node("Mul", ["x1", "c"], ["m"]),
             last,
             helper.make_node("Conv", ["h", "w2"], ["y"])]
    outputs = [value_info("y", [2, 4, 5, 5])] + ([value_info("c", SHAPE)] if extra_output else [])
    inits = [tensor("w1", rng.standard_normal((8, 8, 3, 3)) * 0.5),
             tensor("w2", rng.standard_normal((4, 8, 1, 1))),
             tensor("three", 3.0), tensor("zero", 0.0), tensor("clip_max", clip_max),
             tensor("six", 6.0), tensor("sixth", 1 / 6)]
    return make_model(nodes, [value_info("x", SHAPE)], outputs, inits, opset=opset)


def _fused(model):
    ir_model = to_ir(model)
    report = FuseActivationsPass()(ir_model)
    return ir_model, report


@pytest.mark.parametrize("scale_by_mul", [False, True])
def test_hardswish_becomes_one_op_from_opset_14(scale_by_mul):
    model = _hardswish_model(opset=14, scale_by_mul=scale_by_mul)
    fused, report = _fused(model)
    assert report.modified and report.counts["HardSwish fused"] == 1
    assert op_count(fused, "HardSwish") == 1
    for op in ("Add", "Clip", "Div", "Mul"):
        assert op_count(fused, op) == 0, op
    assert_same_outputs(model, fused, _feeds(), rtol=1e-5, atol=1e-5)


def test_hardswish_before_opset_14_is_x_times_hardsigmoid():
    model = _hardswish_model(opset=13)
    fused, report = _fused(model)
    assert report.counts["HardSigmoid fused"] == 1
    assert op_count(fused, "HardSwish") == 0  # does not exist before opset 14
    assert op_count(fused, "HardSigmoid") == 1 and op_count(fused, "Mul") == 1
    assert op_count(fused, "Clip") == 0 and op_count(fused, "Div") == 0
    assert_same_outputs(model, fused, _feeds(), rtol=1e-5, atol=1e-5)


def test_hardsigmoid_alone():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["x1"]),
             helper.make_node("Add", ["three", "x1"], ["a"]),  # operands either way round
             helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["c", "sixth"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["y"])]  # SE-style gate on another tensor
    model = make_model(nodes, [value_info("x", SHAPE)], [value_info("y", None)],
                       [tensor("w", rng.standard_normal((8, 8, 1, 1))), tensor("three", 3.0),
                        tensor("zero", 0.0), tensor("six", 6.0), tensor("sixth", 1 / 6)])
    fused, report = _fused(model)
    assert report.counts["HardSigmoid fused"] == 1
    assert op_count(fused, "HardSigmoid") == 1 and op_count(fused, "Clip") == 0
    assert_same_outputs(model, fused, _feeds(), rtol=1e-5, atol=1e-5)


def test_other_constants_are_not_fused():
    model = _hardswish_model(opset=17, clip_max=5.0)  # not a hard-swish
    fused, report = _fused(model)
    assert not report.modified
    assert op_count(fused, "Clip") == 1 and op_count(fused, "HardSwish") == 0


def test_intermediate_used_elsewhere_is_not_fused():
    model = _hardswish_model(opset=17, extra_output=True)  # the Clip output leaves the graph
    fused, report = _fused(model)
    assert not report.modified
    assert op_count(fused, "Clip") == 1 and op_count(fused, "HardSwish") == 0
    expected, got = run(model, _feeds()), run(fused, _feeds())
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_old_clip_with_attributes_is_left_alone():
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]),
             helper.make_node("Clip", ["a"], ["c"], min=0.0, max=6.0),
             helper.make_node("Mul", ["x", "c"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["y"])]
    model = make_model(nodes, [value_info("x", SHAPE)], [value_info("y", None)],
                       [tensor("three", 3.0), tensor("six", 6.0)], opset=10)
    fused, report = _fused(model)
    assert not report.modified and op_count(fused, "Clip") == 1


def test_leaves_no_unused_constants_behind():
    fused, _ = _fused(_hardswish_model(opset=14))
    used = {v.name for n in fused.graph for v in n.inputs if v is not None}
    assert set(fused.graph.initializers) <= used, set(fused.graph.initializers) - used


def test_float64_is_left_alone():
    """ORT's CPU provider has no float64 HardSigmoid/HardSwish: fusing would break the model."""
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["m"]),
             helper.make_node("Div", ["m", "six"], ["y"])]
    model = make_model(nodes, [value_info("x", SHAPE, TensorProto.DOUBLE)],
                       [value_info("y", None, TensorProto.DOUBLE)],
                       [tensor(n, v, np.float64) for n, v in (("three", 3.0), ("zero", 0.0),
                                                              ("six", 6.0))])
    fused, report = _fused(model)
    assert not report.modified and op_count(fused, "Clip") == 1
    feeds = {"x": _feeds()["x"].astype(np.float64)}
    np.testing.assert_array_equal(run(model, feeds)[0], run(fused, feeds)[0])


def test_int8_of_a_hardswish_cnn_fuses_the_activation_and_quantizes_the_conv(
        tmp_path, capsys, monkeypatch):
    """The whole `optimize --int8 --calib` path on a Paddle-style Conv -> hard-swish -> Conv at
    opset 13: the exact passes write x * HardSigmoid(x); int8 takes the model to opset 14, where
    it becomes one HardSwish between the quantized Convs; the outputs stay close."""
    import json

    import onnx
    from helpers import invoke_cli

    model = _hardswish_model(opset=13)
    src, out, calib = tmp_path / "hs.onnx", tmp_path / "int8.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(src))
    rng = np.random.default_rng(4)
    np.savez(calib, x=rng.uniform(-6, 6, [10, *SHAPE]).astype(np.float32))
    code, _, err = invoke_cli(["optimize", src, "-o", out, "--int8", "--calib", calib,
                               "--allow-slower", "--bench", "none", "-q",
                               "--report", tmp_path / "r.json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["int8"]["quantized"] is True, report["notes"]
    # The first Conv runs in int8; the last one writes the graph output, which stays float by
    # design (a uint8 pair there would feed nothing), so ORT keeps it a float Conv.
    kernels = report["int8"]["kernels"]
    assert kernels.get("QLinearConv") == 1
    assert kernels.get("Conv", 0) + kernels.get("FusedConv", 0) == 1
    written = onnx.load(str(out))
    assert op_count(written, "HardSwish") == 1 and op_count(written, "HardSigmoid") == 0
    assert op_count(written, "Clip") == 0 and written.opset_import[0].version == 14
    assert any("upgraded opset 13 -> 14" in n for n in report["notes"]), report["notes"]
    feeds = {"x": rng.uniform(-6, 6, SHAPE).astype(np.float32)}
    want, got = run(model, feeds)[0].ravel(), run(written, feeds)[0].ravel()
    assert float(want @ got / np.linalg.norm(want) / np.linalg.norm(got)) >= 0.99


def test_default_pipeline_fuses_before_folding_the_scale_into_the_next_conv():
    """fold-batchnorm would fold the trailing Div(6) into the 1x1 Conv after it and leave
    Add/Clip/Mul spelled out; fuse-activations runs first, so the activation is one op."""
    from onnxopt.passes import DEFAULT_PIPELINE, REGISTRY

    model = _hardswish_model(opset=14)
    fused = to_ir(model)
    for name in DEFAULT_PIPELINE:
        REGISTRY[name]()(fused)
    assert [n.op_type for n in fused.graph] == ["Conv", "HardSwish", "Conv"]
    assert_same_outputs(model, fused, _feeds(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha,fuses", [(1 / 6, True), (0.2, False)], ids=["hardswish", "other"])
def test_x_times_hardsigmoid_becomes_hardswish_from_opset_14(alpha, fuses):
    """What the pass wrote before opset 14 (and what int8 upgrades to 14) is one HardSwish
    there; a HardSigmoid with other constants is not a hard-swish and stays."""
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=alpha, beta=0.5),
             helper.make_node("Mul", ["x", "h"], ["y"])]
    model = make_model(nodes, [value_info("x", SHAPE)], [value_info("y", SHAPE)], opset=14)
    fused, report = _fused(model)
    assert op_count(fused, "HardSwish") == (1 if fuses else 0), report.log
    assert_same_outputs(model, fused, _feeds(), rtol=1e-5, atol=1e-5)
