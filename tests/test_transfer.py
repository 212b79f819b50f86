"""`onnxopt transfer` and `optimize --transfer-from`, on real PyTorch exports (models/transfer_*,
written by models/export_transfer.py; every file has its own random weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import invoke_cli, make_model, run, tensor, value_info
from onnx import TensorProto, helper

from onnxopt import io, transfer
from onnxopt.errors import BadInputError
from onnxopt.transfer import match as tm

MODELS = Path(__file__).resolve().parent.parent / "models"
TS, DYNAMO = MODELS / "transfer_net_ts.onnx", MODELS / "transfer_net_dynamo.onnx"
FOLDED, OPSET14 = MODELS / "transfer_net_folded_ts.onnx", MODELS / "transfer_net_opset14_ts.onnx"
NEW_HEAD = MODELS / "transfer_newhead_dynamo.onnx"
AMBIGUOUS_SRC = MODELS / "transfer_ambiguous_src_ts.onnx"
AMBIGUOUS_DST = MODELS / "transfer_ambiguous_dst_ts.onnx"


def image(batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}


def assert_reproduces(src, out, feeds, *, rtol=1e-5, atol=1e-6) -> None:
    for expected, actual in zip(run(load(src), feeds), run(load(out), feeds), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def differs(src, dst, feeds) -> bool:
    return any(not np.allclose(a, b, rtol=1e-3, atol=1e-3)
               for a, b in zip(run(load(src), feeds), run(load(dst), feeds)))


def load(model) -> onnx.ModelProto:
    return ir.to_proto(model) if isinstance(model, ir.Model) else onnx.load(str(model))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("src", "dst"), [(TS, DYNAMO), (DYNAMO, TS), (DYNAMO, OPSET14),
                                          (OPSET14, TS)])
def test_full_transfer_between_exporters_reproduces_src(src, dst, tmp_path):
    assert differs(src, dst, image())  # different weights before: the transfer must move them
    before = digest(dst)
    out = tmp_path / "out.onnx"
    _, report = transfer.transfer(src, dst, out)
    assert report.is_complete and report.expects_same_outputs
    assert not report.refused and not report.unmatched_dst and not report.unmatched_src
    assert report.verification.passed
    assert_reproduces(src, out, image())
    assert digest(dst) == before  # the input is never modified
    rules = {t.rule for t in report.transferred}
    assert {"name", "structure"} <= rules
    # TorchScript keeps bias-less Linear weights as MatMul [in, out] under generated names;
    # dynamo keeps them [out, in] (Gemm transB=1, Transpose -> MatMul): moved transposed.
    transposed = [t for t in report.transferred if t.transform == "transpose"]
    if {src, dst} & {DYNAMO} and {src, dst} & {TS, OPSET14}:
        assert len(transposed) == 2 and all(t.rule == "structure" for t in transposed)


def test_layernorm_against_its_decomposition_pairs_scale_and_bias():
    # opset 14: LayerNormalization decomposed; gamma and beta are read by Mul and Add.
    dst_weights = tm.weights(io.load(OPSET14))
    assert dst_weights["backbone.norm.weight"].role == "scale"
    assert dst_weights["backbone.norm.bias"].role == "bias"
    renamed = _renamed(io.load(OPSET14), seed=3)
    _, report = transfer.transfer(io.load(DYNAMO), renamed)
    assert report.is_complete and report.verification.passed


def test_bn_folded_destination_gets_folded_weights(tmp_path):
    out = tmp_path / "out.onnx"
    assert differs(TS, FOLDED, image())
    _, report = transfer.transfer(TS, FOLDED, out)
    folded = [t for t in report.transferred if t.rule == "folded"]
    assert len(folded) == 4  # two Conv weights and two biases (one from a bias-less Conv)
    assert all("folded with BatchNormalization" in t.src for t in folded)
    assert "a zero bias" in " ".join(t.src for t in folded)
    assert not report.unmatched_src  # BN parameters were used by the folds
    assert report.is_complete and report.verification.passed
    assert_reproduces(TS, out, image(), atol=1e-5)


def test_new_head_moves_the_backbone_and_reports_the_head(tmp_path):
    out = tmp_path / "out.onnx"
    _, report = transfer.transfer(TS, NEW_HEAD, out)
    dst_weights = tm.weights(io.load(NEW_HEAD))
    backbone = {n for n in dst_weights if not n.startswith("head.")}
    assert {t.name for t in report.transferred} == backbone
    assert {t.name for t in report.refused} == {"head.weight", "head.bias"}
    assert all("shape" in t.reason for t in report.refused)
    assert {t.name for t in report.unmatched_src} == {"head.weight", "head.bias"}
    assert report.dst_params == sum(w.size for w in dst_weights.values())
    assert report.transferred_params == sum(dst_weights[n].size for n in backbone)
    assert not report.expects_same_outputs  # a partial transfer: coverage, no failed check
    feeds = image()
    src_features, _ = run(load(TS), feeds)
    out_features, out_logits = run(load(out), feeds)
    np.testing.assert_allclose(out_features, src_features, rtol=1e-5, atol=1e-6)
    _, dst_logits = run(load(NEW_HEAD), feeds)
    np.testing.assert_array_equal(out_logits.shape, dst_logits.shape)


def test_ambiguity_is_refused_and_settled_by_map(tmp_path):
    with pytest.raises(BadInputError, match="ambiguous"):
        transfer.transfer(AMBIGUOUS_SRC, AMBIGUOUS_DST, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    options = transfer.TransferOptions(match="normalized")
    with pytest.raises(BadInputError, match="normalized name 'scale' fits 2 SRC tensors"):
        transfer.transfer(AMBIGUOUS_SRC, AMBIGUOUS_DST, None, options)
    src_weights = tm.weights(io.load(AMBIGUOUS_SRC))
    second_matmul = [n for n in src_weights if n.startswith("onnx::MatMul")][1]
    [dst_matmul] = [n for n in tm.weights(io.load(AMBIGUOUS_DST)) if n.startswith("onnx::")]
    mapping = {"scale": "scale.1", dst_matmul: second_matmul}
    model, report = transfer.transfer(AMBIGUOUS_SRC, AMBIGUOUS_DST, tmp_path / "out.onnx",
                                      transfer.TransferOptions(mapping=mapping))
    assert {t.rule for t in report.transferred} == {"map"}
    source = io.load(AMBIGUOUS_SRC).graph.initializers
    np.testing.assert_array_equal(model.graph.initializers["scale"].const_value.numpy(),
                                  source["scale.1"].const_value.numpy())


def test_structure_alone_after_renaming_every_dst_weight(tmp_path):
    renamed = _renamed(io.load(DYNAMO), seed=1)
    _, report = transfer.transfer(io.load(TS), renamed)
    assert report.is_complete and report.verification.passed
    assert {t.rule for t in report.transferred} == {"structure"}
    assert_reproduces(TS, renamed, image())


def test_constant_node_weights_are_written_in_place():
    dst = io.load(DYNAMO)
    for value in list(dst.graph.initializers.values()):  # as a Paddle/TF export keeps them
        constant = ir.node("Constant", [], attributes={"value": value.const_value})
        dst.graph.insert_before(dst.graph[0], constant)
        constant.outputs[0].name = f"{value.name}.const"
        value.replace_all_uses_with(constant.outputs[0])
        dst.graph.initializers.pop(value.name)
    _, report = transfer.transfer(io.load(TS), dst)
    assert report.is_complete and not dst.graph.initializers
    assert_reproduces(TS, dst, image())


def test_only_limits_the_transfer(tmp_path):
    options = transfer.TransferOptions(only=r"backbone\.(conv|bn)")
    model, report = transfer.transfer(TS, DYNAMO, tmp_path / "out.onnx", options)
    assert {t.name.split(".")[1][:2] for t in report.transferred} == {"co", "bn"}
    assert report.outside_only > 0 and not report.expects_same_outputs
    original = io.load(DYNAMO).graph.initializers
    np.testing.assert_array_equal(model.graph.initializers["head.weight"].const_value.numpy(),
                                  original["head.weight"].const_value.numpy())


def test_dtype_mismatch_is_refused_per_tensor(tmp_path):
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(_gemm_model(0, TensorProto.FLOAT), str(src))
    onnx.save(_gemm_model(1, TensorProto.FLOAT16), str(dst))
    _, report = transfer.transfer(src, dst)
    assert [t.name for t in report.transferred] == ["b"]
    [refused] = report.refused
    assert refused.name == "W" and "dtype float16 in DST, float in SRC 'W'" in refused.reason


def test_normalized_names():
    assert tm.normalize("/encoder/Layer_1/dense/kernel:0") == ("encoder", "layer", "1", "dense",
                                                               "weight")
    assert tm.normalize("bn1.running_mean") == tm.normalize("bn1/moving_mean")
    assert tm.normalize("fc_weight") == tm.normalize("fc.weight") == tm.normalize("FC.weight.1")
    assert tm.is_generated("onnx::MatMul_735") and tm.is_generated("val_88")
    assert not tm.is_generated("scale.0")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = invoke_cli(["transfer", TS, DYNAMO, "-o", out, "--report", report_path],
                                   capsys, monkeypatch)
    assert code == 0, err
    assert "structure" in stdout and "reproduces SRC" in stdout
    data = json.loads(report_path.read_text())
    assert data["schema"] == "onnxopt.transfer/1"
    assert data["coverage"]["tensors"][0] == data["coverage"]["tensors"][1] == 18
    assert data["verification"]["status"] == "passed" and data["expects_same_outputs"]
    assert_reproduces(TS, out, image())


def test_cli_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.onnx"
    code, stdout, err = invoke_cli(["transfer", TS, NEW_HEAD, "-o", out, "--dry-run"],
                                   capsys, monkeypatch)
    assert code == 0, err
    assert "refused" in stdout and "head.weight" in stdout
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_map_settles_and_bad_map_is_one_line(tmp_path, capsys, monkeypatch):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"scale": "scale.0", "nope": "scale.1"}))
    code, _, err = invoke_cli(["transfer", AMBIGUOUS_SRC, AMBIGUOUS_DST, "--dry-run", "--map",
                               mapping], capsys, monkeypatch)
    assert code == 2 and "'nope' is not a weight of DST" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("missing", ["src", "dst"])
def test_cli_missing_file_exits_2(tmp_path, capsys, monkeypatch, missing):
    args = [tmp_path / "nope.onnx", DYNAMO] if missing == "src" else [TS, tmp_path / "nope.onnx"]
    code, _, err = invoke_cli(["transfer", *args, "-o", tmp_path / "out.onnx"], capsys,
                              monkeypatch)
    assert code == 2 and "no such file" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_cli_nothing_matched_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    src = tmp_path / "conv.onnx"
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "K"], ["y"], name="conv")]
    onnx.save(make_model(nodes, [value_info("x", [1, 3, 8, 8])], [value_info("y", [1, 4, 6, 6])],
                         [tensor("K", rng.standard_normal((4, 3, 3, 3)))]), str(src))
    code, _, err = invoke_cli(["transfer", src, AMBIGUOUS_DST, "-o", tmp_path / "out.onnx"],
                              capsys, monkeypatch)
    assert code == 2 and "nothing to transfer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


def test_optimize_transfer_from(tmp_path, capsys, monkeypatch):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = invoke_cli(["optimize", DYNAMO, "-o", out, "--transfer-from", TS,
                               "--bench", "none", "-q", "--report", report_path],
                              capsys, monkeypatch)
    assert code == 0, err
    data = json.loads(report_path.read_text())
    names = [p["name"] for p in data["passes"]]
    assert names[0] == "transfer" and "fold-batchnorm" in names
    assert data["verification"]["status"] == "passed"  # the passes, against the transferred model
    assert any("reproduces SRC" in line for line in data["passes"][0]["log"])
    assert_reproduces(TS, out, image(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# builders


def _renamed(model: ir.Model, seed: int) -> ir.Model:
    """Every initializer under a random name: only the structure is left to match on."""
    rng = np.random.default_rng(seed)
    for value in list(model.graph.initializers.values()):
        model.graph.initializers.pop(value.name)
        value.name = f"w{rng.integers(1 << 40):x}"
        model.graph.register_initializer(value)
    return model


def _gemm_model(seed: int, weight_type: int) -> onnx.ModelProto:
    """Gemm(x, Cast(W), b): W stored as `weight_type`."""
    rng = np.random.default_rng(seed)
    dtype = np.float16 if weight_type == TensorProto.FLOAT16 else np.float32
    nodes = [helper.make_node("Cast", ["W"], ["W32"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["x", "W32", "b"], ["y"], name="fc", transB=1)]
    inits = [tensor("W", rng.standard_normal((4, 8)), dtype), tensor("b", rng.standard_normal(4))]
    return make_model(nodes, [value_info("x", [2, 8])], [value_info("y", [2, 4])], inits)
