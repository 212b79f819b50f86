"""Generated inputs: fixed seed, guesses reported, integer ids in range; .npz batching rule."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, tensor, to_ir, value_info
from onnx import TensorProto, helper

from onnxopt import inputs
from onnxopt.errors import BadInputError


def embedding_model(vocab: int = 50):
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "ids64"], ["emb"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["y"]),
    ]
    inits = [tensor("table", rng.standard_normal((vocab, 8))),
             tensor("axes", np.array([-1]), np.int64)]
    model = make_model(
        nodes,
        [value_info("ids", ["batch", "seq"], TensorProto.INT32),
         value_info("attention_mask", ["batch", "seq"], TensorProto.INT64)],
        [value_info("y", ["batch", "seq", 8])], inits)
    return to_ir(model)


def test_token_ids_stay_below_the_vocabulary_and_masks_are_ones():
    notes = []
    [feeds] = inputs.generate(embedding_model(50), shapes={"ids": (2, 300)}, warnings=notes)
    assert feeds["ids"].dtype == np.int32 and feeds["ids"].shape == (2, 300)
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 50
    assert feeds["ids"].max() > 40  # the range is used, not just zeros
    assert np.all(feeds["attention_mask"] == 1)
    assert any("attention_mask" in n and "dim 1 (seq) guessed as 32" in n for n in notes)
    assert not any("'ids'" in n for n in notes)  # declared with --shape: no guess


def test_same_seed_same_inputs_and_batches_differ():
    a = inputs.generate(embedding_model(), batches=2, seed=3)
    b = inputs.generate(embedding_model(), batches=2, seed=3)
    assert all(np.array_equal(x["ids"], y["ids"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["ids"], a[1]["ids"])


def test_npz_one_batch_or_a_stack(tmp_path):
    model = embedding_model()
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    mask = np.ones((2, 6), np.int64)
    np.savez(tmp_path / "one.npz", ids=ids, attention_mask=mask)
    assert len(inputs.load_npz(tmp_path / "one.npz", model)) == 1
    np.savez(tmp_path / "stack.npz", ids=np.stack([ids] * 3), attention_mask=np.stack([mask] * 3))
    batches = inputs.load_npz(tmp_path / "stack.npz", model)
    assert len(batches) == 3 and batches[2]["ids"].shape == (2, 6)


@pytest.mark.parametrize("text", ["x", "x:", ":1,2", "x:1,a", "x:-1"])
def test_bad_shape_flags(text):
    with pytest.raises(BadInputError, match="--shape"):
        inputs.parse_shape(text)


def test_shape_flag_that_contradicts_a_fixed_dim():
    model = to_ir(make_model([helper.make_node("Relu", ["x"], ["y"])],
                             [value_info("x", ["N", 3])], [value_info("y", ["N", 3])]))
    with pytest.raises(BadInputError, match=r"does not fit the declared shape \[N,3\]"):
        inputs.generate(model, shapes={"x": (2, 4)})


def test_npz_axis0_is_split_into_the_models_fixed_batch(tmp_path):
    model = to_ir(make_model([helper.make_node("Relu", ["x"], ["y"])],
                             [value_info("x", [2, 3])], [value_info("y", [2, 3])]))
    np.savez(tmp_path / "rows.npz", x=np.arange(18, dtype=np.float32).reshape(6, 3))
    batches = inputs.load_npz(tmp_path / "rows.npz", model)
    assert [b["x"].shape for b in batches] == [(2, 3)] * 3
    assert batches[2]["x"][1, 2] == 17


# ---------------------------------------------------------------------------------------------
# Every tensor type is generated, so verification runs wherever ORT runs the original

def cast_to_float_model(dtype: int, dims=(2, 3)):
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, [value_info("x", list(dims), dtype)], [value_info("y", list(dims))],
                      opset=21, ir_version=10)


@pytest.mark.parametrize("dtype", [TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.UINT16,
                                   TensorProto.INT8, TensorProto.UINT64, TensorProto.BOOL,
                                   TensorProto.FLOAT8E4M3FN, TensorProto.DOUBLE])
def test_every_numeric_type_is_generated_and_verified(tmp_path, dtype):
    import onnx

    import onnxopt
    from onnxopt import api

    src = tmp_path / "cast.onnx"
    onnx.save(cast_to_float_model(dtype), src)
    [feeds] = inputs.generate(to_ir(onnx.load(src)), seed=3)
    assert feeds["x"].shape == (2, 3)
    assert feeds["x"].dtype == onnx.helper.tensor_dtype_to_np_dtype(dtype) or dtype in (
        TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN)
    _, report = onnxopt.optimize(src, tmp_path / "out.onnx", api.OptimizeOptions(bench=()))
    assert report.verification.passed, report.verification.reason
    assert report.verification.batches == 3


def test_strings_and_empty_dims_are_generated():
    model = to_ir(make_model([helper.make_node("Identity", ["s"], ["t"])],
                             [value_info("s", [3, 0], TensorProto.STRING)],
                             [value_info("t", [3, 0], TensorProto.STRING)]))
    [feeds] = inputs.generate(model)
    assert feeds["s"].shape == (3, 0) and feeds["s"].dtype == object
    model = to_ir(make_model([helper.make_node("Identity", ["s"], ["t"])],
                             [value_info("s", [64], TensorProto.STRING)],
                             [value_info("t", [64], TensorProto.STRING)]))
    words = inputs.generate(model, seed=1)[0]["s"]
    assert len(set(words)) > 4 and any(w != w.lower() for w in words)  # cases differ


def test_string_model_from_onnx_tests_optimizes_verified(tmp_path, capsys, monkeypatch):
    """onnx's test_strnorm_model_* (StringNormalizer on a string tensor) used to exit 2 with
    "cannot generate object"."""
    import json
    from pathlib import Path

    import onnx
    from helpers import invoke_cli

    src = (Path(onnx.__file__).parent / "backend" / "test" / "data" / "simple" /
           "test_strnorm_model_nostopwords_nochangecase" / "model.onnx")
    code, _, err = invoke_cli(["optimize", src, "-o", tmp_path / "out.onnx", "--report",
                               tmp_path / "r.json", "--bench-seconds", "0.2"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["status"] == "passed"
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_a_sequence_input_goes_on_unverified(tmp_path, capsys, monkeypatch):
    """No sequence can be generated: the rewrite still runs, held to validity, and says why it
    is unverified (exit 0), instead of stopping at the inputs."""
    import onnx
    from helpers import invoke_cli

    seq = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("SequenceLength", ["xs"], ["n"]),
                               helper.make_node("Identity", ["n"], ["y"])], "g", [seq],
                              [value_info("y", [], TensorProto.INT64)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "seq.onnx")
    code, stdout, err = invoke_cli(["optimize", tmp_path / "seq.onnx", "-o", tmp_path / "out.onnx",
                                    "--bench-seconds", "0.2"], capsys, monkeypatch)
    assert code == 0, err
    assert "not verified" in stdout and "xs" in stdout
    assert [n.op_type for n in onnx.load(str(tmp_path / "out.onnx")).graph.node] == [
        "SequenceLength"]
