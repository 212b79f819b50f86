"""Weights computed from constants (the model zoo's ConstantOfShape, exporters' Cast / Reshape /
Transpose of an initializer) are folded where a pass needs them, bounded by the weight's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import (
    assert_same_outputs,
    bn_node,
    bn_params,
    make_model,
    op_count,
    tensor,
    to_ir,
    value_info,
)
from onnx import TensorProto, helper
from onnxopt.passes import FoldBatchNormPass, FoldWeightsPass

import onnxopt
from onnxopt import api, inputs

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def conv_bn(weight_nodes, inits, weight="W"):
    rng = np.random.default_rng(0)
    nodes = [*weight_nodes, helper.make_node("Conv", ["x", weight], ["c"], name="conv"),
             bn_node("bn", "c", "y")]
    return make_model(nodes, [value_info("x", [1, 3, 6, 6])], [value_info("y", [1, 4, 4, 4])],
                      [*inits, *bn_params("bn", 4, rng)])


def constant_of_shape_weight():
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.02])
    return conv_bn([helper.make_node("ConstantOfShape", ["shape"], ["W"], value=value)],
                   [tensor("shape", np.array([4, 3, 3, 3]), np.int64)])


def cast_transpose_weight():
    rng = np.random.default_rng(1)
    half = rng.standard_normal((3, 3, 3, 4)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["W16"], ["W32"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["W32"], ["W"], perm=[3, 0, 1, 2])]
    return conv_bn(nodes, [tensor("W16", half, np.float16)])


@pytest.mark.parametrize("build", [constant_of_shape_weight, cast_transpose_weight])
def test_batchnorm_folds_through_a_computed_weight(build):
    proto = build()
    model = to_ir(proto)
    result = FoldBatchNormPass()(model)
    assert result.counts["folded"] == 1
    assert result.counts["weight computed from constants"] >= 1
    out = ir.serde.serialize_model(result.model)
    assert op_count(out, "BatchNormalization") == 0
    assert op_count(out, "ConstantOfShape") + op_count(out, "Cast") == 0
    feeds = inputs.generate(to_ir(proto), seed=2)[0]
    assert_same_outputs(proto, out, feeds, rtol=1e-4, atol=1e-5)


def test_a_weight_past_its_own_size_or_from_an_input_stays_computed():
    """A Tile that is then sliced makes an intermediate larger than the weight; a weight that
    reads a graph input is not a constant. Both stay as they are."""
    rng = np.random.default_rng(0)
    tiled = [helper.make_node("Tile", ["w_small", "reps"], ["big"]),
             helper.make_node("Slice", ["big", "starts", "ends"], ["W"])]
    inits = [tensor("w_small", rng.standard_normal((4, 3, 3, 3))),
             tensor("reps", np.array([8, 1, 1, 1]), np.int64),
             tensor("starts", np.array([0]), np.int64), tensor("ends", np.array([4]), np.int64)]
    result = FoldWeightsPass()(to_ir(conv_bn(tiled, inits)))
    assert not result.modified
    from_input = [helper.make_node("Mul", ["w_small", "s"], ["W"])]
    proto = conv_bn(from_input, inits[:1])
    proto.graph.input.append(value_info("s", [1]))
    assert not FoldWeightsPass()(to_ir(proto)).modified


def test_model_zoo_inception_v2_folds_every_batchnorm(tmp_path):
    """onnx's light_inception_v2: every Conv weight is a ConstantOfShape, so fold-batchnorm
    used to keep all 69 BatchNormalization nodes."""
    _, report = onnxopt.optimize(LIGHT / "light_inception_v2.onnx", tmp_path / "out.onnx",
                                 api.OptimizeOptions(bench=()))
    assert report.verification.passed
    assert report.original.ops["BatchNormalization"] == 69
    assert report.optimized.ops.get("BatchNormalization", 0) == 0


def test_model_zoo_squeezenet_goes_int8(tmp_path):
    """light_squeezenet used to be "nothing to quantize": its weights are all computed."""
    options = api.OptimizeOptions(bench=(), int8=api.Int8Options(calib="random"))
    _, report = onnxopt.optimize(LIGHT / "light_squeezenet.onnx", tmp_path / "out.onnx", options)
    assert report.int8["quantized"], report.int8["budget"]
    assert report.optimized.ops["QuantizeLinear"] >= 26  # every Conv's input
    assert report.optimized.ops.get("ConstantOfShape", 0) == 0
