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
