"""Loading keeps external data lazy; saving is atomic and switches to external data by itself."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import bn_node, bn_params, make_model, op_count, run, tensor, value_info
from onnx import helper

import onnxopt
from onnxopt import io
from onnxopt.errors import BadInputError


def conv_bn(seed: int = 0, channels: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [tensor("W", rng.standard_normal((channels, 3, 3, 3))), *bn_params("bn", channels, rng)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("bn", "c", "y")]
    return make_model(nodes, [value_info("x", [1, 3, 8, 8])], [value_info("y", [1, channels, 8, 8])], inits)


def save_external(model: onnx.ModelProto, path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=0)


def test_external_data_is_loaded_lazily_and_written_to_a_new_file(tmp_path):
    src = tmp_path / "in.onnx"
    save_external(conv_bn(), src)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = io.load(src)
    weight = model.graph.initializers["W"].const_value
    assert isinstance(weight, ir.ExternalTensor)  # memory-mapped, not read into the proto
    out = tmp_path / "out.onnx"
    onnxopt.optimize(src, out, onnxopt.OptimizeOptions(bench=()))
    assert (tmp_path / "out.onnx.data").is_file()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    expected = run(onnx.load(str(src)), feeds)[0]
    actual = run(onnx.load(str(out)), feeds)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0


def test_switches_to_external_data_over_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)  # stand-in for protobuf's 2 GB
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn(), str(src))
    out = tmp_path / "out.onnx"
    onnxopt.optimize(src, out, onnxopt.OptimizeOptions(bench=()))
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert (tmp_path / "out.onnx.data").is_file()
    onnx.checker.check_model(str(out))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    model = ir.serde.deserialize_model(conv_bn())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError):
        io.save(model, out)
    assert out.read_bytes() == b"previous"  # the old file survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_refuses_to_overwrite_the_inputs_external_data(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn(), str(src), save_as_external_data=True, location="out.onnx.data",
              size_threshold=0)
    model = io.load(src)
    with pytest.raises(BadInputError, match="reads its weights"):
        io.save(model, tmp_path / "out.onnx", source=src)


def test_weight_bytes_counts_external_data(tmp_path):
    src = tmp_path / "in.onnx"
    save_external(conv_bn(channels=32), src)
    stats = onnxopt.inspect(src)
    assert stats.weight_bytes == (32 * 27 + 4 * 32) * 4
    assert stats.file_bytes == os.path.getsize(src) + os.path.getsize(tmp_path / "in.onnx.data")
    assert stats.macs["Conv"] == 32 * 8 * 8 * 27


def test_a_model_that_does_not_change_does_not_grow(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(conv_bn(), str(src))
    out = tmp_path / "out.onnx"
    onnxopt.optimize(src, out, onnxopt.OptimizeOptions(passes=("cleanup",), bench=()))
    assert os.path.getsize(out) <= os.path.getsize(src)
    assert len(onnx.load(str(out)).graph.value_info) == 0
