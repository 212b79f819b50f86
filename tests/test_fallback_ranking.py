"""The accuracy budget's fallback ranks layers from one switched model in one session
(int8: quantize_int8.with_switches; sparsity: prune._with_switches): each layer's score with it
alone back in float (dense) must be what a trial with that layer excluded gives, bit for bit, so
the layers the fallback picks are the same as with a rewrite and a session per layer."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import make_model, tensor, to_ir, value_info
from onnx import helper
from onnxopt.passes import quantize_int8
from test_int8_refine import embedding_model
from test_quantize_int8 import calibrate
from test_sparsity import correlated_inputs, correlated_mlp

from onnxopt.measure import budget, verify
from onnxopt.quant import int8
from onnxopt.quant.budget import quantized_layers
from onnxopt.sparsity import prune
from onnxopt.sparsity.options import SparsityOptions


def mixed_cnn(seed: int = 0):
    """Conv+Relu -> MaxPool (shares its input's scale) -> Conv -> SiLU (Sigmoid, Mul), a Conv
    sharing its weight with the one before, Add, Concat, GlobalAveragePool, Flatten, and a Gemm
    and a MatMul head; the Add's output is also a graph output."""
    rng = np.random.default_rng(seed)
    inits = [tensor("W1", rng.standard_normal((8, 3, 3, 3)) * 0.3), tensor("B1", rng.normal(0, .1, 8)),
             tensor("W2", rng.standard_normal((8, 8, 3, 3)) * 0.15), tensor("B2", rng.normal(0, .1, 8)),
             tensor("B3", rng.normal(0, .1, 8)),
             tensor("W4", rng.standard_normal((10, 16)) * 0.5), tensor("B4", rng.normal(0, .1, 10)),
             tensor("W5", rng.standard_normal((16, 4)) * 0.5)]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="maxpool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Conv", ["p1", "W2", "B2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Sigmoid", ["c2"], ["s2"], name="sigmoid"),
             helper.make_node("Mul", ["c2", "s2"], ["m2"], name="silu"),
             helper.make_node("Conv", ["m2", "W2", "B3"], ["c3"], name="conv3", pads=[1] * 4),
             helper.make_node("Add", ["c3", "m2"], ["a3"], name="add"),
             helper.make_node("Concat", ["m2", "a3"], ["cat"], name="concat", axis=1),
             helper.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "W4", "B4"], ["y"], name="fc", transB=1),
             helper.make_node("MatMul", ["flat", "W5"], ["z"], name="head")]
    model = make_model(nodes, [value_info("x", ["N", 3, 12, 12])],
                       [value_info("y", ["N", 10]), value_info("z", ["N", 4]),
                        value_info("a3", ["N", 8, 6, 6])], inits)
    batches = [{"x": rng.standard_normal((4, 3, 12, 12)).astype(np.float32)} for _ in range(6)]
    return to_ir(model), batches


def embedding():
    proto, _, feeds = embedding_model()
    rng = np.random.default_rng(1)
    batches = [*feeds, *({"ids": rng.integers(0, 1000, (4, 12)).astype(np.int64)}
                         for _ in range(4))]
    return to_ir(proto), batches


def with_if():
    """A Conv, then an If whose branches hold MatMuls (calibration cannot see into them)."""
    rng = np.random.default_rng(0)
    branches = [helper.make_graph(
        [helper.make_node("MatMul", ["flat", f"w_{name}"], [name[0]], name=f"{name}_mm")], name,
        [], [value_info(name[0], ["N", 64])]) for name in ("then", "else")]
    proto = make_model(
        [helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", pads=[1] * 4),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["flat"], name="flatten"),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branches[0],
                          else_branch=branches[1])],
        [value_info("x", ["N", 4, 4, 4]), value_info("cond", [], onnx.TensorProto.BOOL)],
        [value_info("y", ["N", 64])],
        [tensor("wc", rng.standard_normal((8, 4, 3, 3))), tensor("bc", rng.standard_normal(8)),
         tensor("w_then", rng.standard_normal((128, 64))),
         tensor("w_else", rng.standard_normal((128, 64)))])
    return to_ir(proto), [{"x": rng.standard_normal((8, 4, 4, 4)).astype(np.float32),
                           "cond": np.array(True)} for _ in range(6)]


def trial_of(model: ir.Model, batches: list, target: str = "ort-cpu") -> int8._Trial:
    feeds = batches[4:]
    return int8._Trial(model, calibrate(model, batches[:4]), False, feeds,
                       verify.reference_outputs(model, feeds), budget.Budget(), target=target)


@pytest.mark.parametrize("case,target", [
    ("cnn", "ort-cpu"), ("cnn", "tensorrt"), ("embedding", "ort-cpu"), ("if", "ort-cpu")])
def test_each_layers_switch_gives_the_trial_that_excludes_it_bit_for_bit(case, target):
    model, batches = {"cnn": mixed_cnn, "embedding": embedding, "if": with_if}[case]()
    trial = trial_of(model, batches, target)
    full = trial.run(())
    layers = quantized_layers(full.report.log)
    assert len(layers) >= {"cnn": 3, "embedding": 2, "if": 1}[case]
    alone = trial.scores_alone(layers)
    if case == "if":  # If/Loop/Scan bodies are quantized apart: no switches, a trial per layer
        assert alone == {}
        return
    assert set(alone) == set(layers)  # the MaxPool's and Flatten's switch the next layer too
    all_int8 = trial.run((), batches=1).score
    for layer in layers:
        exact = trial.run((layer,), batches=1).score
        assert math.isfinite(exact)
        if layer in alone:
            assert alone[layer] == exact, layer
    # the switches do something (a score is the worst output's: not every layer moves it)
    assert sum(alone[layer] != all_int8 for layer in alone) >= 2


def test_switched_model_is_valid_and_all_switches_on_is_the_quantized_model():
    model, batches = mixed_cnn()
    trial = trial_of(model, batches)
    full = trial.run(())
    layers = quantized_layers(full.report.log)
    switched, switches = quantize_int8.with_switches(trial.base, trial.options(()), layers)
    onnx.checker.check_model(ir.to_proto(switched), full_check=True)
    assert set(switches) == set(layers)
    on = {name: np.array(True) for name in switches.values()}
    cases = [((), on), *(((layer,), {**on, name: np.array(False)})
                         for layer, name in switches.items())]
    for exclude, flags in cases:  # every output, not only the score
        want = verify.reference_outputs(trial.run(exclude).model, [batches[4]])[0]
        got = verify.reference_outputs(switched, [{**batches[4], **flags}])[0]
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert [v.name for v in trial.base.graph.inputs] == ["x"]  # the trial's model untouched


def test_fallback_ranks_with_the_switches_and_runs_no_trial_per_layer(monkeypatch):
    model, batches = mixed_cnn()
    trial = trial_of(model, batches)
    full = trial.run(())
    layers = quantized_layers(full.report.log)
    single_runs = []
    run = trial.run

    def counted(exclude, *, batches=None):
        if batches == 1:
            single_runs.append(exclude)
        return run(exclude, batches=batches)

    monkeypatch.setattr(trial, "run", counted)
    gains = budget._gains_alone(trial, full, layers)
    assert set(gains) == set(layers)
    assert single_runs == []
    monkeypatch.setattr(trial, "scores_alone", lambda names: {})  # none: a trial per layer
    assert budget._gains_alone(trial, full, layers) == gains
    assert sorted(single_runs) == sorted((layer,) for layer in layers)


# ---------------------------------------------------------------- sparsity's fallback


def mlp_with_a_shared_weight() -> onnx.ModelProto:
    """test_sparsity's MLP with a second layer reading fc2's weight."""
    proto = correlated_mlp()
    nodes = list(proto.graph.node)
    nodes[-1:-1] = [helper.make_node("MatMul", ["r2", "w2"], ["h2b"], name="fc2b"),
                    helper.make_node("Relu", ["h2b"], ["r2b"])]
    nodes[-1].input[0] = "r2b"
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("kind", ["plain", "shared"])
def test_sparsity_switches_give_each_layers_dense_trial_bit_for_bit(kind, tmp_path, monkeypatch):
    np.savez(tmp_path / "calib.npz", x=correlated_inputs(1, 20))
    seen = []
    gains_alone = budget._gains_alone

    def capture(trial, full, names):
        seen.append((trial, names))
        return gains_alone(trial, full, names)

    monkeypatch.setattr(budget, "_gains_alone", capture)
    options = SparsityOptions(0.8, calib=str(tmp_path / "calib.npz"), keep_first_last=False,
                              reconstruct=False, budget=budget.Budget(min_cosine=0.99999))
    model = correlated_mlp() if kind == "plain" else mlp_with_a_shared_weight()
    prune.sparsify(to_ir(model), options, [], feeds=None, progress=lambda _: None)
    [(trial, names)] = seen[:1]
    alone = trial.scores_alone(names)
    shared = {"fc2", "fc2b"} if kind == "shared" else set()
    assert set(alone) == set(names) - shared and len(alone) >= 2
    for name in names:
        exact = trial.run((name,), batches=1).score
        if name in alone:
            assert alone[name] == exact, name
    dense = trial.run(tuple(names), batches=1).score
    assert all(alone[name] < dense for name in alone)  # each switch gives back one layer only
