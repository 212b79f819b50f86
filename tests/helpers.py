"""Test helpers: tiny models built in code, and the ORT oracle (graph optimizations off)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def tensor(name: str, array: np.ndarray, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array).astype(dtype), name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    ir_version: int = 8,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxopt-tests")
    model.ir_version = ir_version
    return model


def value_info(name: str, shape, dtype=FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def bn_params(prefix: str, channels: int, rng: np.random.Generator) -> list[onnx.TensorProto]:
    """scale, B, mean, var with non-trivial values (var well away from zero)."""
    return [
        tensor(f"{prefix}.scale", rng.uniform(0.5, 1.5, channels)),
        tensor(f"{prefix}.B", rng.standard_normal(channels)),
        tensor(f"{prefix}.mean", rng.standard_normal(channels)),
        tensor(f"{prefix}.var", rng.uniform(0.2, 2.0, channels)),
    ]


def bn_node(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    names = [f"{prefix}.{p}" for p in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=prefix, **attrs)


def to_bytes(model) -> bytes:
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    return model.SerializeToString()


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ORT CPU with graph optimizations disabled: ORT's own fusions cannot hide a broken rewrite."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(to_bytes(model), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def assert_same_outputs(original, rewritten, feeds, *, rtol=1e-5, atol=1e-6) -> None:
    for expected, actual in zip(run(original, feeds), run(rewritten, feeds), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def op_count(model, op_type: str) -> int:
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    graphs = list(model.graphs()) + list(model.functions.values())
    return sum(1 for g in graphs for n in g if n.op_type == op_type)


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)


def invoke_cli(argv, capsys, monkeypatch) -> tuple[int, str, str]:
    """`onnxopt ARGV` in this process, through the real entry point; (exit code, stdout, stderr)."""
    import sys

    from onnxopt import cli

    monkeypatch.setattr(sys, "argv", ["onnxopt", *map(str, argv)])
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as done:
        code = 0 if done.code is None else done.code
    out, err = capsys.readouterr()
    return code, out, err


def ignored_outlier_mlp(rng: np.random.Generator, width: int, hidden: int, out: int):
    """x -> MatMul 'first' (weight row 0 is zero) -> Relu -> MatMul 'second': feed x a huge
    channel 0 and one int8 range for x wipes out the other channels, so 'first' is the layer an
    accuracy budget must keep float, while 'second' can stay int8."""
    w1 = rng.standard_normal((width, hidden))
    w1[0] = 0.0
    return make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")],
        [value_info("x", ["N", width])], [value_info("y", ["N", out])],
        [tensor("w1", w1), tensor("w2", rng.standard_normal((hidden, out)))], opset=17)


def stub_variant(rewrite: str, worst: float, culprits: set[str], layers: int = 10):
    """A dynamic-int8 variant (onnxopt.quant.dynamic._Variant) whose trials quantize `layers`
    MatMuls 'layer0'... and hold the budget once every name in `culprits` is float: for the
    variant-choice logic without quantizing anything."""
    from types import SimpleNamespace

    from onnxopt.quant import budget, dynamic

    names = [f"layer{i}" for i in range(layers)]

    def outcome(exclude) -> budget.Outcome:
        missing = len(culprits - set(exclude))
        checked = SimpleNamespace(outputs=[SimpleNamespace(sqnr_db=40.0 - missing)])
        report = SimpleNamespace(log=[f"quantized {n!r} (MatMul): weight" for n in names],
                                 counts={"quantized": len(names)})
        return budget.Outcome(tuple(exclude), report, checked, missing == 0,
                              "" if missing == 0 else "y: cosine 0.9 < 0.99",
                              tuple(exclude))

    trial = SimpleNamespace(run=lambda exclude, batches=None: outcome(exclude))
    return dynamic._Variant(worst, False, trial, outcome(()), rewrite)
