"""int8 of a SiLU network (issue 18): the YOLO-style detector in models/, exported by both
PyTorch exporters, goes int8 with its SiLU (Sigmoid then Mul) in ONNX Runtime's integer kernels
(QLinearSigmoid, QLinearMul in ORT's own fused graph), and its outputs stay within the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run

from onnxopt import api
from onnxopt.passes._qdq import ort_kernel_counts
from onnxopt.quant import int8

MODELS = Path(__file__).resolve().parent.parent / "models"
SHAPE = (1, 3, 64, 64)


def images(seed: int, count: int) -> np.ndarray:
    """Smooth random 'images' (fixed seed): blurred noise in [0, 1], as a detector's inputs."""
    rng = np.random.default_rng(seed)
    noise = rng.random((count, 3, 16, 16)).astype(np.float32)
    return np.repeat(np.repeat(noise, 4, axis=2), 4, axis=3)  # 16x16 blocks -> 64x64


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_silu_runs_in_integer_kernels(tmp_path, exporter):
    source = MODELS / f"silu_detector_{exporter}.onnx"
    calib, held = tmp_path / "calib.npz", tmp_path / "held.npz"
    np.savez(calib, input=images(0, 16)[:, None])
    np.savez(held, input=images(1, 3)[:, None])
    out = tmp_path / "int8.onnx"
    options = api.OptimizeOptions(
        inputs=str(held), shapes={"input": SHAPE}, bench=(),
        int8=int8.Int8Options(calib=str(calib), shapes={"input": SHAPE},
                              check_speed=False))  # a 64x64 toy: its speed is not the point
    _, report = api.optimize(source, out, options)
    assert report.int8["quantized"], report.int8["budget"]
    kernels = ort_kernel_counts(out)
    sigmoids = sum(1 for n in onnx.load(str(source)).graph.node if n.op_type == "Sigmoid")
    # Every SiLU of the network: no float Sigmoid or Mul left between the int8 Convs.
    assert kernels.get("QLinearSigmoid", 0) == sigmoids == 25
    assert kernels.get("QLinearMul", 0) >= sigmoids  # (the dynamo export's other Muls are
    assert kernels.get("Sigmoid", 0) == 0           # int64 shape arithmetic for the Upsample)
    assert kernels.get("QLinearConv", 0) == 27
    # Q/DQ only at the borders of integer regions, not around each activation
    assert kernels.get("DequantizeLinear", 0) <= 12, kernels
    # Within the budget on inputs it was not calibrated on.
    feeds = {"input": images(2, 2)}
    expected = run(onnx.load(str(source)), feeds)[0]
    got = run(onnx.load(str(out)), feeds)[0]
    cosine = float(np.dot(expected.ravel(), got.ravel())
                   / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine >= 0.99


def test_leaky_relu_runs_in_an_integer_kernel(tmp_path):
    """Darknet-style Conv -> LeakyRelu -> Conv (YOLOv3/v4): QLinearLeakyRelu in ORT's graph."""
    from helpers import make_model, tensor, value_info
    from onnx import helper

    rng = np.random.default_rng(0)  # fixed seed: the weights
    nodes, x = [], "input"
    for i, (c_in, c_out) in enumerate(((3, 16), (16, 16), (16, 8))):
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("LeakyRelu", [f"c{i}"], [f"a{i}"], alpha=0.1)]
        x = f"a{i}"
    inits = [tensor(f"w{i}", rng.standard_normal((o, c, 3, 3)) * 0.3)
             for i, (c, o) in enumerate(((3, 16), (16, 16), (16, 8)))]
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["output"]))
    path = tmp_path / "leaky.onnx"
    onnx.save(make_model(nodes, [value_info("input", [1, 3, 32, 32])],
                         [value_info("output", [1, 8, 1, 1])], inits), str(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(1).random((16, 1, 3, 32, 32), np.float32))
    out = tmp_path / "int8.onnx"
    _, report = api.optimize(path, out, api.OptimizeOptions(bench=(), int8=int8.Int8Options(
        calib=str(calib), check_speed=False)))
    assert report.int8["quantized"], report.int8["budget"]
    kernels = ort_kernel_counts(out)
    assert kernels.get("QLinearLeakyRelu", 0) == 3 and kernels.get("LeakyRelu", 0) == 0, kernels
