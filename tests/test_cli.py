"""The `onnxopt` command line and the Python API, on tiny Conv+BN models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import (
    assert_same_outputs,
    bn_node,
    bn_params,
    invoke_cli,
    make_model,
    op_count,
    tensor,
    value_info,
)
from onnx import helper, numpy_helper
from rich.console import Console

import onnxopt
from onnxopt import api, cli


def conv_bn_model(seed: int = 0, *, channels: int = 16, out_channels: int = 32, size: int = 32):
    """Conv(pads 1) -> BN -> Relu, all shapes static."""
    rng = np.random.default_rng(seed)
    inits = [tensor("W", rng.standard_normal((out_channels, channels, 3, 3)) * 0.2),
             tensor("b", rng.standard_normal(out_channels)), *bn_params("bn", out_channels, rng)]
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("bn", "c", "n"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    return make_model(nodes, [value_info("x", [1, channels, size, size])],
                      [value_info("y", [1, out_channels, size, size])], inits)


# Conv MACs of the default model: output elements * C_in * 3 * 3.
CONV_MACS = 32 * 32 * 32 * 16 * 9


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(0), str(path))
    return path


@pytest.fixture
def cli_run(capsys, monkeypatch):
    """`onnxopt ARGS` through the real entry point, in this process; returns (code, out, err)."""
    monkeypatch.setattr(cli, "stdout", Console(width=200))  # no wrapped table cells

    def invoke(*args: str) -> tuple[int, str, str]:
        return invoke_cli(args, capsys, monkeypatch)

    return invoke


def feeds(seed: int = 1, shape=(1, 16, 32, 32)) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def optimize(cli_run, model_path: Path, *extra: str) -> tuple[int, str, str, dict, onnx.ModelProto]:
    out, report = model_path.parent / "out.onnx", model_path.parent / "r.json"
    code, stdout, err = cli_run("optimize", model_path, "-o", out, "--report", report,
                                "--bench", "none", "-q", *extra)
    data = json.loads(report.read_text()) if report.exists() else {}
    model = onnx.load(str(out)) if out.exists() else None
    return code, stdout, err, data, model


# ---------------------------------------------------------------------------------------------
# passes


def test_passes_lists_both_passes(cli_run):
    code, out, err = cli_run("passes")
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line
            for line in out.splitlines() if line.count("│") > 3}
    assert "cleanup" in rows and "fold-batchnorm" in rows
    assert "exact" in rows["cleanup"] and "yes" in rows["cleanup"]
    assert "exact" in rows["fold-batchnorm"] and "yes" in rows["fold-batchnorm"]


# ---------------------------------------------------------------------------------------------
# optimize


def test_optimize_folds_bn_and_writes_the_report(cli_run, model_path):
    code, stdout, err, report, out = optimize(cli_run, model_path)
    assert code == 0, err
    assert err == ""
    assert op_count(out, "BatchNormalization") == 0
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(onnx.load(str(model_path)), out, feeds(), rtol=1e-4, atol=1e-5)

    assert report["verification"]["status"] == "passed"
    assert report["verification"]["batches"] == 3
    [output] = report["verification"]["outputs"]
    assert output["name"] == "y" and output["is_close"] and output["max_abs"] < 1e-4
    assert report["original"]["nodes"] == 3 and report["optimized"]["nodes"] == 2
    assert report["original"]["ops"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in report["optimized"]["ops"]
    assert report["original"]["macs"]["Conv"] == CONV_MACS
    passes = {p["name"]: p for p in report["passes"]}
    assert list(passes) == ["cleanup", "fuse-activations", "fold-batchnorm"]
    fold = passes["fold-batchnorm"]
    assert fold["modified"] and not fold["reverted"]
    assert fold["counts"] == {"folded": 1}
    assert fold["log"] == ["folded 'bn' (BatchNormalization) into 'conv' (Conv)"]
    assert report["destination"].endswith("out.onnx")
    assert report["latency"] == []  # --bench none
    # The table on stdout says the same.
    assert "passed" in stdout and "fold-batchnorm" in stdout and "1 folded" in stdout


def test_optimize_end_to_end_subprocess(tmp_path, model_path):
    exe = shutil.which("onnxopt") or str(Path(sys.executable).parent / "onnxopt")
    result = subprocess.run([exe, "optimize", "m.onnx", "-o", "out.onnx", "--bench", "none",
                             "--report", "r.json"], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, COLUMNS="200"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert op_count(onnx.load(str(tmp_path / "out.onnx")), "BatchNormalization") == 0
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["status"] == "passed"


def test_no_verify(cli_run, model_path):
    code, stdout, err, report, out = optimize(cli_run, model_path, "--no-verify")
    assert code == 0, err
    assert report["verification"] is None
    assert op_count(out, "BatchNormalization") == 0
    assert "not verified" in stdout
    assert_same_outputs(onnx.load(str(model_path)), out, feeds(), rtol=1e-4, atol=1e-5)


def test_verify_each(cli_run, model_path):
    code, _, err, report, out = optimize(cli_run, model_path, "--verify-each", "--batches", "2")
    assert code == 0, err
    assert report["verification"]["status"] == "passed"
    assert report["verification"]["batches"] == 2
    assert all(not p["reverted"] for p in report["passes"])
    assert op_count(out, "BatchNormalization") == 0


def test_skip_fold_batchnorm_keeps_bn(cli_run, model_path):
    code, _, err, report, out = optimize(cli_run, model_path, "--skip", "fold-batchnorm")
    assert code == 0, err
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fuse-activations"]
    assert op_count(out, "BatchNormalization") == 1
    assert report["verification"]["status"] == "passed"


def test_passes_cleanup_only(cli_run, model_path):
    code, _, err, report, out = optimize(cli_run, model_path, "--passes", "cleanup")
    assert code == 0, err
    assert [p["name"] for p in report["passes"]] == ["cleanup"]
    assert op_count(out, "BatchNormalization") == 1


def test_passes_in_the_given_order(cli_run, model_path):
    code, _, err, report, out = optimize(cli_run, model_path,
                                         "--passes", "fold-batchnorm,cleanup")
    assert code == 0, err
    assert [p["name"] for p in report["passes"]] == ["fold-batchnorm", "cleanup"]
    assert op_count(out, "BatchNormalization") == 0


@pytest.mark.parametrize("flag", ["--passes", "--skip"])
def test_unknown_pass_name(cli_run, model_path, flag):
    code, _, err, report, out = optimize(cli_run, model_path, flag, "cleanup,fold-everything")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "fold-everything" in lines[0] and "Traceback" not in err
    assert out is None and report == {}


def test_usage_error_exits_2(cli_run, model_path):
    code, _, err = cli_run("optimize", model_path)  # -o is required
    assert code == 2
    assert "Traceback" not in err and "output" in err


def test_unknown_option_exits_2(cli_run, model_path, tmp_path):
    code, _, err = cli_run("optimize", model_path, "-o", tmp_path / "o.onnx", "--bogus")
    assert code == 2
    assert "Traceback" not in err and "--bogus" in err
    assert not (tmp_path / "o.onnx").exists()


def test_no_arguments_shows_help(cli_run):
    code, out, err = cli_run()
    assert code in (0, 2), err
    assert "Traceback" not in err
    assert "optimize" in out + err and "validate" in out + err


def test_broken_rewrite_is_reverted(cli_run, model_path, monkeypatch):
    """A rewrite that breaks the outputs is caught: with a sabotaged fold, verification replays
    pass by pass, reverts the culprit, and the saved model still matches the original."""
    from onnxopt.passes import fold_batchnorm

    real = fold_batchnorm._batchnorm_affine

    def wrong(bn, opset):
        result = real(bn, opset)
        return result if isinstance(result, str) else (result[0] * 1.5, result[1])

    monkeypatch.setattr(fold_batchnorm, "_batchnorm_affine", wrong)
    code, _, err, report, out = optimize(cli_run, model_path)
    passes = {p["name"]: p for p in report["passes"]}
    assert passes["fold-batchnorm"]["reverted"]
    assert op_count(out, "BatchNormalization") == 1
    assert report["verification"]["status"] == "passed"
    assert code == 0, err
    assert_same_outputs(onnx.load(str(model_path)), out, feeds(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_prints_op_counts_and_macs(cli_run, model_path, tmp_path):
    code, out, err = cli_run("inspect", model_path, "--json", tmp_path / "s.json")
    assert code == 0, err
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 3:
            rows[cells[0]] = cells[1:]
    assert rows["Conv"] == ["1", f"{CONV_MACS / 1e6:,.2f} M"]
    assert rows["BatchNormalization"][0] == "1" and rows["Relu"][0] == "1"
    assert rows["nodes"][0] == "3"
    assert rows["parameters"][0] == f"{32 * 16 * 9 + 32 * 5:,}"
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["macs"] == {"Conv": CONV_MACS}
    assert stats["ops"] == {"BatchNormalization": 1, "Conv": 1, "Relu": 1}
    assert stats["parameters"] == 32 * 16 * 9 + 32 * 5


def test_inspect_dynamic_shape_uses_shape_flag(cli_run, tmp_path):
    model = conv_bn_model(0)
    model.graph.input[0].CopyFrom(value_info("x", ["N", 16, "H", "W"]))
    model.graph.output[0].CopyFrom(value_info("y", ["N", 32, "H", "W"]))
    path = tmp_path / "dyn.onnx"
    onnx.save(model, str(path))
    code, _, err = cli_run("inspect", path, "--shape", "x:2,16,8,8", "--json", tmp_path / "s.json")
    assert code == 0, err
    macs = json.loads((tmp_path / "s.json").read_text())["macs"]
    assert macs == {"Conv": 2 * 32 * 8 * 8 * 16 * 9}


# ---------------------------------------------------------------------------------------------
# validate


def test_validate_model_against_its_optimized_version(cli_run, model_path, tmp_path):
    code, _, err, _, _ = optimize(cli_run, model_path)
    assert code == 0, err
    code, out, err = cli_run("validate", model_path, tmp_path / "out.onnx")
    assert code == 0, err
    assert "passed on 3 batches" in out


def perturbed(path: Path, dst: Path, delta: float = 0.1) -> Path:
    model = onnx.load(str(path))
    weight = next(i for i in model.graph.initializer if i.name == "W")
    array = numpy_helper.to_array(weight).copy()
    array[0, 0, 1, 1] += delta
    weight.CopyFrom(numpy_helper.from_array(array, "W"))
    onnx.save(model, str(dst))
    return dst


def test_validate_detects_a_perturbed_weight(cli_run, model_path, tmp_path):
    other = perturbed(model_path, tmp_path / "bad.onnx")
    code, out, err = cli_run("validate", model_path, other)
    assert code == 1, out + err
    assert "failed" in out and "no" in out
    assert "Traceback" not in err


def test_validate_with_loose_tolerance_accepts_the_perturbation(cli_run, model_path, tmp_path):
    other = perturbed(model_path, tmp_path / "bad.onnx")
    code, out, err = cli_run("validate", model_path, other, "--atol", "1.0", "--rtol", "0")
    assert code == 0, out + err


def test_validate_models_with_different_inputs(cli_run, model_path, tmp_path):
    model = onnx.load(str(model_path))
    model.graph.input[0].name = "image"
    model.graph.node[0].input[0] = "image"
    other = tmp_path / "renamed.onnx"
    onnx.save(model, str(other))
    code, _, err = cli_run("validate", model_path, other)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "image" in err


# ---------------------------------------------------------------------------------------------
# demo


def test_demo(cli_run):
    if not api.default_model_path().is_file():
        pytest.skip("embedded default model not built yet")
    code, out, err = cli_run("demo", "--bench", "none", "-q")
    assert code == 0, err
    [line] = [line for line in out.splitlines() if "digits top-1" in line]
    cells = [c.strip() for c in line.split("│")[1:-1]]
    before, after = (float(c.rstrip("%")) / 100 for c in cells[1:3])
    assert before > 0.9 and abs(after - before) < 0.01
    assert "passed" in out
    assert op_row(out, "BatchNormalization")[1] == "0"


def op_row(out: str, name: str) -> list[str]:
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r} in\n{out}")


# ---------------------------------------------------------------------------------------------
# Python API


def test_python_api_optimize(model_path, tmp_path):
    out = tmp_path / "api.onnx"
    model, report = onnxopt.optimize(model_path, out,
                                     onnxopt.OptimizeOptions(bench=()))
    assert report.verification is not None and report.verification.passed
    assert out.is_file()
    assert op_count(model, "BatchNormalization") == 0
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0
    assert report.original.nodes == 3 and report.optimized.nodes == 2
    assert [r.name for r in report.passes] == ["cleanup", "fuse-activations", "fold-batchnorm"]
    assert_same_outputs(onnx.load(str(model_path)), onnx.load(str(out)), feeds(),
                        rtol=1e-4, atol=1e-5)


def test_python_api_defaults_and_in_memory(model_path):
    """Default options (with timing on the CPU) on a ModelProto, nothing saved. allow_slower:
    timing noise on a shared machine must not decide which model this test sees."""
    proto = onnx.load(str(model_path))
    options = onnxopt.OptimizeOptions(bench_seconds=0.2, allow_slower=True)
    model, report = onnxopt.optimize(proto, options=options)
    assert report.verification.passed
    assert report.destination is None
    assert [row.ep for row in report.latency] == ["cpu"]
    assert report.latency[0].original.runs > 0 and report.latency[0].optimized.runs > 0
    assert op_count(model, "BatchNormalization") == 0
    assert op_count(proto, "BatchNormalization") == 1  # the caller's proto is untouched


def test_python_api_validate_and_inspect(model_path, tmp_path):
    other = perturbed(model_path, tmp_path / "bad.onnx")
    same = onnxopt.validate(model_path, model_path)
    assert same.passed and all(o.max_abs == 0 for o in same.outputs)
    different = onnxopt.validate(model_path, other)
    assert different.status == "failed"
    [output] = different.outputs
    assert not output.is_close and 1e-3 < output.max_abs < 10
    stats = onnxopt.inspect(model_path)
    assert stats.macs == {"Conv": CONV_MACS} and stats.nodes == 3


def test_python_api_bad_input_raises(tmp_path):
    with pytest.raises(onnxopt.BadInputError, match="no such file"):
        onnxopt.optimize(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------------------------------------
# Exit codes 1 and 3


def test_failed_final_verification_exits_1(cli_run, model_path, monkeypatch):
    """When even the reverted pipeline cannot be verified, optimize says so and exits 1."""
    from onnxopt.measure import verify

    def always_fails(model, reference, feeds, tolerance=verify.Tolerance(), floor=None):
        return verify.Verification("failed", reason="sabotaged for the test", batches=len(feeds))

    monkeypatch.setattr(verify, "verify", always_fails)
    code, stdout, err, report, _ = optimize(cli_run, model_path)
    assert report["verification"]["status"] == "failed"
    assert "failed" in stdout
    assert code == 1, err


def crashing_pass(monkeypatch):
    from onnxopt.passes import FoldBatchNormPass

    def boom(self, model):
        raise RuntimeError("boom in the pass")

    monkeypatch.setattr(FoldBatchNormPass, "call", boom)


@pytest.mark.parametrize("flag", ["--verify-each", None, "--no-verify"])
def test_crashing_pass_is_reverted(cli_run, model_path, monkeypatch, flag):
    """With a check per pass, one at the end, or none: the crash costs only that pass."""
    crashing_pass(monkeypatch)
    code, _, err, report, out = optimize(cli_run, model_path, *([flag] if flag else []))
    assert code == 0, err
    fold = {p["name"]: p for p in report["passes"]}["fold-batchnorm"]
    assert fold["reverted"] and "boom in the pass" in fold["reason"]
    assert op_count(out, "BatchNormalization") == 1
    if flag == "--no-verify":
        assert report["verification"] is None
    else:
        assert report["verification"]["status"] == "passed"


def test_internal_error_with_debug_prints_the_traceback_and_still_exits_3(cli_run, model_path,
                                                                          monkeypatch):
    from onnxopt import api

    def boom(*args, **kwargs):
        raise RuntimeError("boom in save")

    monkeypatch.setattr(api.io, "save", boom)
    monkeypatch.setitem(cli._state, "debug", False)  # restored after: --debug sets it
    out = model_path.parent / "out.onnx"
    code, _, err = cli_run("--debug", "optimize", model_path, "-o", out, "--bench", "none", "-q")
    assert code == 3  # not 1, which says "a check failed"
    assert "Traceback" in err and "boom in save" in err
    assert not out.exists()


def test_internal_error_is_one_line(cli_run, model_path, monkeypatch, tmp_path):
    from onnxopt import api

    def boom(*args, **kwargs):
        raise RuntimeError("boom in save")

    monkeypatch.setattr(api.io, "save", boom)
    code, _, err, report, out = optimize(cli_run, model_path)
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "internal error" in lines[0] and "boom in save" in lines[0]
    assert "--debug" in lines[0]
    assert out is None and report == {}
    assert not any(p.name.startswith(".onnxopt-") for p in tmp_path.iterdir())
