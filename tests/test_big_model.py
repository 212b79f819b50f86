"""A model past protobuf's 2 GiB goes through `onnxopt optimize` in bounded memory.

The weights are a sparse file (zeros that take no disk until written), so the test builds a
2.4 GB model in no time; onnxopt still reads, hashes and writes every byte of it."""

from __future__ import annotations

import subprocess
import sys

import onnx
from onnx import TensorProto, helper

HIDDEN, FFN = 16384, 12000
WEIGHT_BYTES = HIDDEN * FFN * 4  # 786 MB each, three of them


def sparse_mlp(folder):
    data = folder / "big.onnx.data"
    with open(data, "wb") as sink:
        sink.truncate(3 * WEIGHT_BYTES)
    inits = []
    for i, shape in enumerate([(HIDDEN, FFN), (FFN, HIDDEN), (HIDDEN, FFN)]):
        tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", data.name), ("offset", str(i * WEIGHT_BYTES)),
                           ("length", str(WEIGHT_BYTES))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        inits.append(tensor)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]),
             helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"]),
             helper.make_node("Identity", ["h1"], ["i1"]),
             helper.make_node("MatMul", ["i1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", 1, [1, 4, HIDDEN])],
                              [helper.make_tensor_value_info("y", 1, [1, 4, FFN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "big.onnx")
    return folder / "big.onnx"


CHILD = """
import sys
from onnxopt import cli
sys.argv = ["onnxopt", "optimize", sys.argv[1], "-o", sys.argv[2], "--no-verify", "--bench", "none",
            "-q", *sys.argv[3:]]
try:
    cli.main()
    code = 0
except SystemExit as done:
    code = done.code
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("RESULT", code, int(peak) // 1024)
"""


def optimized_in_a_child(tmp_path, *flags: str):
    """`onnxopt optimize --no-verify FLAGS` on the sparse MLP in a fresh process: the output
    path, once the run exited 0 with a peak RSS under half the model's weights."""
    src = sparse_mlp(tmp_path)
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    child = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), *flags],
                           capture_output=True, text=True, timeout=600)
    line = [x for x in child.stdout.splitlines() if x.startswith("RESULT")]
    assert line, child.stderr[-2000:]
    _, code, peak_mb = line[0].split()
    assert code == "0", child.stderr[-2000:]
    model_mb = 3 * WEIGHT_BYTES / 2**20
    assert int(peak_mb) < 0.5 * model_mb, f"peak RSS {peak_mb} MB for a {model_mb:.0f} MB model"
    return out


def test_a_model_over_2gb_in_bounded_memory(tmp_path):
    out = optimized_in_a_child(tmp_path)
    written = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in written.graph.node] == ["MatMul", "Relu", "MatMul", "MatMul"]
    onnx.checker.check_model(str(out))  # by path: the external data is read beside it
    data = out.parent / "big.onnx.data"
    # w0 and w2 are equal (all zeros): cleanup keeps one of them
    assert data.stat().st_size == 2 * WEIGHT_BYTES


def test_a_model_over_2gb_to_float16_in_bounded_memory(tmp_path):
    """--fp16 converts each weight when it is written (never all half weights in memory)."""
    out = optimized_in_a_child(tmp_path, "--fp16")
    written = onnx.load(str(out), load_external_data=False)
    assert {t.data_type for t in written.graph.initializer} == {TensorProto.FLOAT16}
    assert [n.op_type for n in written.graph.node] == ["Cast", "MatMul", "Relu", "MatMul",
                                                       "MatMul", "Cast"]
    onnx.checker.check_model(str(out))
    assert (out.parent / "big.onnx.data").stat().st_size == WEIGHT_BYTES  # 2 of 3, in half


def test_a_model_over_2gb_to_int8_in_bounded_memory(tmp_path):
    """--int8 --no-verify (dynamic, unjudged) rounds each weight when it is written, from its
    file a block of rows at a time: the int8 weights are never all in memory either."""
    out = optimized_in_a_child(tmp_path, "--int8")
    written = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in written.graph.node] == ["DynamicQuantizeMatMul", "Relu",
                                                       "DynamicQuantizeMatMul",
                                                       "DynamicQuantizeMatMul"]
    onnx.checker.check_model(str(out))
    int8 = [t for t in written.graph.initializer if t.data_type == TensorProto.INT8]
    assert sum(t.dims[0] * t.dims[1] for t in int8 if len(t.dims) == 2) == 2 * WEIGHT_BYTES // 4
