"""Conv+BN(+Dropout)+Relu at every opset from 7 to 21 and IR versions 3, 4, 7 and 8.

BatchNormalization changed over the opsets (7-8: `spatial`; 9: `spatial` gone; 14: `training_mode`;
15: parameters may differ in type), and Dropout too (7-11: `ratio` attribute, inference only; 12+:
`ratio` and `training_mode` inputs). IR 3 lists every initializer as a graph input.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import bn_node, bn_params, make_model, op_count, run, tensor, value_info
from onnx import helper

import onnxopt

OPSETS = list(range(7, 22))
IR_VERSIONS = [3, 4, 7, 8]


def conv_bn_model(seed: int, opset: int, ir_version: int, *, dropout: bool = True):
    rng = np.random.default_rng(seed)
    has_bias = opset % 2 == 1
    inits = [tensor("W", rng.standard_normal((6, 3, 3, 3)) * 0.3), *bn_params("bn", 6, rng)]
    conv_inputs = ["x", "W"]
    if has_bias:
        inits.append(tensor("b", rng.standard_normal(6)))
        conv_inputs.append("b")
    bn_attrs = {"epsilon": 1e-3, "momentum": 0.8}
    if opset < 9:
        bn_attrs["spatial"] = 1
    if opset >= 14 and seed % 2 == 0:
        bn_attrs["training_mode"] = 0
    nodes = [helper.make_node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1],
                              strides=[2, 2] if opset % 3 == 0 else [1, 1]),
             bn_node("bn", "c", "n", **bn_attrs)]
    last = "n"
    if dropout:
        if opset < 12:
            nodes.append(helper.make_node("Dropout", ["n"], ["d"], name="dropout", ratio=0.3))
        else:
            inits.append(tensor("ratio", np.float32(0.3)))
            nodes.append(helper.make_node("Dropout", ["n", "ratio"], ["d"], name="dropout"))
        last = "d"
    nodes.append(helper.make_node("Relu", [last], ["y"], name="relu"))
    inputs = [value_info("x", ["N", 3, 10, 10])]
    if ir_version < 4:  # IR 3: initializers must also be graph inputs
        inputs += [value_info(i.name, list(i.dims)) for i in inits]
    size = 5 if opset % 3 == 0 else 10
    model = make_model(nodes, inputs, [value_info("y", ["N", 6, size, size])], inits,
                       opset=opset, ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("ir_version", IR_VERSIONS)
@pytest.mark.parametrize("opset", OPSETS)
def test_conv_bn_folds_at_every_opset_and_ir(tmp_path, opset, ir_version):
    model = conv_bn_model(opset * 10 + ir_version, opset, ir_version)
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))

    optimized, report = onnxopt.optimize(src, dst, onnxopt.OptimizeOptions(bench=()))

    assert report.verification is not None and report.verification.passed, report.verification
    assert not any(run.reverted for run in report.passes), report.passes
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    assert op_count(out, "BatchNormalization") == 0
    assert op_count(out, "Dropout") == 0
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    assert out.opset_import[0].version == opset  # no silent opset conversion

    feeds = {"x": np.random.default_rng(opset).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    [expected], [actual] = run(model, feeds), run(out, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert np.count_nonzero(expected) > expected.size // 10  # the Relu leaves real numbers

    upgrade_notes = [n for n in report.notes if "upgraded IR" in n]
    if ir_version < 4:
        assert out.ir_version == 4
        assert [i.name for i in out.graph.input] == ["x"]
        assert len(upgrade_notes) == 1 and "IR 3 -> 4" in upgrade_notes[0]
        assert report.original.ir_version == 3 and report.optimized.ir_version == 4
    else:
        assert out.ir_version == ir_version
        assert upgrade_notes == []
        assert [i.name for i in out.graph.input] == ["x"]


@pytest.mark.parametrize("opset", [7, 8, 10, 11])
def test_old_opset_dropout_removed_by_cleanup(opset):
    """Opset < 12 Dropout is inference-only (no training_mode): cleanup removes it, BN stays."""
    from onnxopt.passes import CleanupPass

    model = conv_bn_model(opset, opset, 8)
    result = CleanupPass()(onnx_ir_model(model))
    assert result.modified
    assert op_count(result.model, "Dropout") == 0
    assert op_count(result.model, "BatchNormalization") == 1
    assert "removed inference 'dropout' (Dropout)" in result.log
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 10, 10)).astype(np.float32)}
    [expected], [actual] = run(model, feeds), run(result.model, feeds)
    np.testing.assert_array_equal(actual, expected)


def onnx_ir_model(model):
    import onnx_ir as ir

    return ir.serde.deserialize_model(model)


@pytest.mark.parametrize("opset", [7, 8])
def test_old_opset_dropout_with_used_mask_is_kept(opset):
    model = conv_bn_model(1, opset, 8)
    dropout = next(n for n in model.graph.node if n.op_type == "Dropout")
    dropout.output.append("mask")
    model.graph.output.append(value_info("mask", ["N", 6, 10, 10], onnx.TensorProto.BOOL))
    from onnxopt.passes import CleanupPass

    result = CleanupPass()(onnx_ir_model(model))
    assert op_count(result.model, "Dropout") == 1
    assert any("mask output is used" in line for line in result.log)
