"""Bad inputs: one line on stderr, exit 2, the file or tensor named, nothing written."""

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
from helpers import bn_node, bn_params, invoke_cli, make_model, op_count, tensor, value_info
from onnx import helper

# ---------------------------------------------------------------------------------------------
# Builders and runners


def conv_bn_model(seed: int = 0, *, channels: int = 3, out_channels: int = 8, size: int = 8):
    rng = np.random.default_rng(seed)
    inits = [tensor("W", rng.standard_normal((out_channels, channels, 3, 3))),
             tensor("b", rng.standard_normal(out_channels)), *bn_params("bn", out_channels, rng)]
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             bn_node("bn", "c", "y")]
    return make_model(nodes, [value_info("x", [1, channels, size, size])],
                      [value_info("y", [1, out_channels, size, size])], inits)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def onnxopt_exe() -> str:
    return shutil.which("onnxopt") or str(Path(sys.executable).parent / "onnxopt")


def run_exe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([onnxopt_exe(), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)


def run_cli(argv: list[str], capsys, monkeypatch, cwd: Path | None = None) -> tuple[int, str, str]:
    """`onnxopt ARGV` in this process, through the real entry point (`cli.main`)."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    return invoke_cli(argv, capsys, monkeypatch)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_bad_input(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    assert lines[0].startswith("error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def optimize_args(model: Path | str, out: Path | str, report: Path | str, *extra: str) -> list[str]:
    return ["optimize", str(model), "-o", str(out), "--report", str(report), "--bench", "none",
            "-q", *extra]


def check_refused(tmp_path, capsys, monkeypatch, model: Path, *needles: str, extra=()) -> str:
    """optimize MODEL fails as bad input and leaves the folder exactly as it was."""
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    before = listing(tmp_path)
    code, _, err = run_cli(optimize_args(model, out, report, *extra), capsys, monkeypatch)
    assert_bad_input(code, err, *needles)
    assert not out.exists() and not report.exists()
    assert listing(tmp_path) == before  # no stray temporary files either
    return err


# ---------------------------------------------------------------------------------------------
# Files that are not models


def test_missing_file_end_to_end(tmp_path):
    """A true subprocess: exit code, one line, no traceback, nothing written."""
    result = run_exe(*optimize_args("nope.onnx", "out.onnx", "r.json"), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope.onnx" in lines[0] and "no such file" in lines[0]
    assert listing(tmp_path) == set()


def test_directory_is_refused(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    check_refused(tmp_path, capsys, monkeypatch, folder, "model.onnx", "directory")


def test_random_bytes_end_to_end(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    before = listing(tmp_path)
    result = run_exe(*optimize_args(path.name, "out.onnx", "r.json"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "garbage.onnx" in lines[0], lines
    assert listing(tmp_path) == before


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_bytes_in_process(tmp_path, capsys, monkeypatch, seed):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(1000))
    check_refused(tmp_path, capsys, monkeypatch, path, "garbage.onnx")


def test_text_file_is_refused(tmp_path, capsys, monkeypatch):
    path = tmp_path / "hello.onnx"
    path.write_bytes(b"hello world")
    check_refused(tmp_path, capsys, monkeypatch, path, "hello.onnx")


def test_truncated_protobuf_is_refused(tmp_path, capsys, monkeypatch):
    data = conv_bn_model(0).SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    check_refused(tmp_path, capsys, monkeypatch, path, "truncated.onnx")


def test_model_with_no_nodes_is_refused(tmp_path, capsys, monkeypatch):
    model = make_model([], [value_info("x", [1, 3])], [value_info("x", [1, 3])])
    path = save(model, tmp_path / "empty.onnx")
    check_refused(tmp_path, capsys, monkeypatch, path, "empty.onnx", "no nodes")


# ---------------------------------------------------------------------------------------------
# Models that fail the ONNX checker


def test_undefined_node_input_fails_checker(tmp_path, capsys, monkeypatch):
    model = conv_bn_model(0)
    model.graph.node[0].input[0] = "ghost"
    path = save(model, tmp_path / "undefined.onnx")
    check_refused(tmp_path, capsys, monkeypatch, path, "undefined.onnx", "ONNX checker", "ghost")


def test_opset_zero_fails_checker(tmp_path, capsys, monkeypatch):
    model = conv_bn_model(0)
    model.opset_import[0].version = 0
    path = save(model, tmp_path / "opset0.onnx")
    check_refused(tmp_path, capsys, monkeypatch, path, "opset0.onnx", "ONNX checker")


def test_unreleased_opset_is_refused(tmp_path, capsys, monkeypatch):
    """Opset 999 does not exist: the checker lets it through (it checks against the newest
    schemas), but no pass knows what its ops mean and ORT refuses it, so it is bad input."""
    assert onnx.defs.onnx_opset_version() < 999
    model = conv_bn_model(0)
    model.opset_import[0].version = 999
    path = save(model, tmp_path / "opset999.onnx")
    check_refused(tmp_path, capsys, monkeypatch, path, "opset999.onnx", "999")


# ---------------------------------------------------------------------------------------------
# External data


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    """Every weight in `<name>.data` beside the model; returns the data file."""
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{path.name}.data", size_threshold=0)
    return path.parent / f"{path.name}.data"


def set_locations(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))


def test_external_data_round_trip_works(tmp_path, capsys, monkeypatch):
    """Control for the tests below: the same model with its data file present optimizes."""
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    path = model_dir / "ext.onnx"
    save_external(conv_bn_model(1), path)
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(optimize_args(path, out, tmp_path / "r.json"), capsys, monkeypatch)
    assert code == 0, err
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0


def test_missing_external_data_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ext.onnx"
    data = save_external(conv_bn_model(1), path)
    data.unlink()
    err = check_refused(tmp_path, capsys, monkeypatch, path, "ext.onnx", "ext.onnx.data")
    assert "missing" in err


def test_absolute_external_data_location_is_refused(tmp_path, capsys, monkeypatch):
    model_dir, elsewhere = tmp_path / "m", tmp_path / "elsewhere"
    model_dir.mkdir()
    elsewhere.mkdir()
    path = model_dir / "abs.onnx"
    data = save_external(conv_bn_model(2), path)
    target = elsewhere / "weights.data"
    shutil.move(data, target)  # the file exists: refused for being absolute, not for missing
    set_locations(path, str(target.resolve()))
    out = tmp_path / "out.onnx"
    before = listing(tmp_path)
    code, _, err = run_cli(optimize_args(path, out, tmp_path / "r.json"), capsys, monkeypatch)
    assert_bad_input(code, err, "abs.onnx")
    assert "absolute" in err or "refused" in err
    assert not out.exists() and listing(tmp_path) == before


def test_external_data_path_traversal_is_refused(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    path = model_dir / "escape.onnx"
    data = save_external(conv_bn_model(3), path)
    shutil.move(data, tmp_path / "secret.data")  # exists one folder up
    set_locations(path, "../secret.data")
    out = tmp_path / "out.onnx"
    before = listing(tmp_path)
    code, _, err = run_cli(optimize_args(path, out, tmp_path / "r.json"), capsys, monkeypatch)
    assert_bad_input(code, err, "escape.onnx", "../secret.data")
    assert not out.exists() and listing(tmp_path) == before


def test_truncated_external_data_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "short.onnx"
    data = save_external(conv_bn_model(1), path)
    data.write_bytes(data.read_bytes()[:100])
    err = check_refused(tmp_path, capsys, monkeypatch, path, "short.onnx", "short.onnx.data")
    assert "shorter" in err


def test_output_that_would_overwrite_the_inputs_external_data(tmp_path, capsys, monkeypatch):
    """The input reads its weights from out.onnx.data; writing out.onnx with external data
    there would destroy them while they are being read."""
    model = conv_bn_model(1)
    del model.graph.node[1]  # Conv only: nothing folds, so the weights stay external
    model.graph.output[0].name = "c"
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location="out.onnx.data", size_threshold=0)
    data = (tmp_path / "out.onnx.data").read_bytes()
    check_refused(tmp_path, capsys, monkeypatch, path, "out.onnx.data")
    assert (tmp_path / "out.onnx.data").read_bytes() == data


# ---------------------------------------------------------------------------------------------
# Output path


@pytest.mark.parametrize("spelling", ["same.onnx", "./same.onnx", "sub/../same.onnx", "ABSOLUTE"])
def test_output_equal_to_input_is_refused(tmp_path, capsys, monkeypatch, spelling):
    (tmp_path / "sub").mkdir()
    path = save(conv_bn_model(4), tmp_path / "same.onnx")
    data, mtime = path.read_bytes(), path.stat().st_mtime_ns
    out = str(path.resolve()) if spelling == "ABSOLUTE" else spelling
    before = listing(tmp_path)
    code, _, err = run_cli(optimize_args("same.onnx", out, "r.json"), capsys, monkeypatch,
                           cwd=tmp_path)
    assert_bad_input(code, err, "same.onnx")
    assert "input" in err
    assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    assert listing(tmp_path) == before


def test_output_hard_link_to_input_is_refused(tmp_path, capsys, monkeypatch):
    path = save(conv_bn_model(4), tmp_path / "orig.onnx")
    link = tmp_path / "link.onnx"
    os.link(path, link)
    data = path.read_bytes()
    code, _, err = run_cli(optimize_args(path, link, tmp_path / "r.json"), capsys, monkeypatch)
    assert_bad_input(code, err, "link.onnx")
    assert path.read_bytes() == data


def test_output_folder_that_does_not_exist(tmp_path, capsys, monkeypatch):
    path = save(conv_bn_model(4), tmp_path / "m.onnx")
    before = listing(tmp_path)
    code, _, err = run_cli(optimize_args(path, tmp_path / "nowhere" / "out.onnx",
                                         tmp_path / "r.json"), capsys, monkeypatch)
    assert_bad_input(code, err, "nowhere")
    assert listing(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Ops ONNX Runtime cannot run


def custom_op_model(seed: int = 5) -> onnx.ModelProto:
    model = conv_bn_model(seed)
    model.graph.node.append(helper.make_node("Foo", ["y"], ["z"], name="foo", domain="com.example"))
    model.graph.output[0].CopyFrom(value_info("z", [1, 8, 8, 8]))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def test_custom_op_end_to_end_skips_verification(tmp_path):
    """ORT lacks com.example::Foo: the rewrite is still saved; the report says why unverified."""
    path = save(custom_op_model(), tmp_path / "custom.onnx")
    result = run_exe("optimize", "custom.onnx", "-o", "out.onnx", "--report", "r.json",
                     "--bench-seconds", "0.2", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert op_count(out, "BatchNormalization") == 0
    assert [n.op_type for n in out.graph.node if n.domain == "com.example"] == ["Foo"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["status"] == "skipped"
    assert "Foo" in report["verification"]["reason"]
    assert "not verified" in result.stdout
    assert path.exists()


def test_custom_op_report_in_process(tmp_path, capsys, monkeypatch):
    path = save(custom_op_model(6), tmp_path / "custom.onnx")
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = run_cli(optimize_args(path, out, report_path), capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["verification"]["status"] == "skipped"
    reason = report["verification"]["reason"]
    assert "ONNX Runtime" in reason and "Foo" in reason
    assert "not verified" in stdout
    onnx.checker.check_model(onnx.load(str(out)))


# ---------------------------------------------------------------------------------------------
# --inputs and --shape


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def check_bad_npz(tmp_path, capsys, monkeypatch, *needles, **arrays):
    model = save(conv_bn_model(7), tmp_path / "m.onnx")
    inputs = npz(tmp_path / "in.npz", **arrays)
    check_refused(tmp_path, capsys, monkeypatch, model, "in.npz", *needles,
                  extra=("--inputs", str(inputs)))


def test_npz_with_wrong_names(tmp_path, capsys, monkeypatch):
    check_bad_npz(tmp_path, capsys, monkeypatch, "image", "'x'",
                  image=np.zeros((1, 3, 8, 8), np.float32))


def test_npz_with_wrong_shape(tmp_path, capsys, monkeypatch):
    check_bad_npz(tmp_path, capsys, monkeypatch, "'x'", "[1, 3, 9, 9]",
                  x=np.zeros((1, 3, 9, 9), np.float32))


def test_npz_with_wrong_rank(tmp_path, capsys, monkeypatch):
    check_bad_npz(tmp_path, capsys, monkeypatch, "'x'", x=np.zeros((3, 8, 8), np.float32))


def test_npz_with_wrong_dtype(tmp_path, capsys, monkeypatch):
    check_bad_npz(tmp_path, capsys, monkeypatch, "'x'", "float64",
                  x=np.zeros((1, 3, 8, 8), np.float64))


def test_npz_that_is_not_an_npz(tmp_path, capsys, monkeypatch):
    model = save(conv_bn_model(7), tmp_path / "m.onnx")
    bad = tmp_path / "in.npz"
    bad.write_bytes(b"not a zip file at all")
    check_refused(tmp_path, capsys, monkeypatch, model, "in.npz", extra=("--inputs", str(bad)))


def test_good_npz_is_used(tmp_path, capsys, monkeypatch):
    """Control: a matching .npz (two stacked batches) optimizes and verifies on 2 batches."""
    model = save(conv_bn_model(7), tmp_path / "m.onnx")
    inputs = npz(tmp_path / "in.npz",
                 x=np.random.default_rng(0).standard_normal((2, 1, 3, 8, 8)).astype(np.float32))
    code, _, err = run_cli(optimize_args(model, tmp_path / "o.onnx", tmp_path / "r.json",
                                         "--inputs", str(inputs)), capsys, monkeypatch)
    assert code == 0, err
    verification = json.loads((tmp_path / "r.json").read_text())["verification"]
    assert verification["status"] == "passed" and verification["batches"] == 2


@pytest.mark.parametrize("text", ["x", "x:", "x:1,3,a,8", ":1,3,8,8", "x:1,-3,8,8", "x:1;3"])
def test_malformed_shape(tmp_path, capsys, monkeypatch, text):
    model = save(conv_bn_model(8), tmp_path / "m.onnx")
    check_refused(tmp_path, capsys, monkeypatch, model, "--shape", extra=("--shape", text))


def test_shape_for_unknown_input(tmp_path, capsys, monkeypatch):
    model = save(conv_bn_model(8), tmp_path / "m.onnx")
    check_refused(tmp_path, capsys, monkeypatch, model, "image",
                  extra=("--shape", "image:1,3,8,8"))


def test_shape_that_contradicts_declared_dims(tmp_path, capsys, monkeypatch):
    model = save(conv_bn_model(8), tmp_path / "m.onnx")
    check_refused(tmp_path, capsys, monkeypatch, model, "x:1,3,9,9",
                  extra=("--shape", "x:1,3,9,9"))


# ---------------------------------------------------------------------------------------------
# The input is never modified


def test_input_bytes_and_mtime_unchanged_after_optimize(tmp_path, capsys, monkeypatch):
    path = save(conv_bn_model(9), tmp_path / "m.onnx")
    old = os.stat(path).st_mtime_ns - 10**9  # an mtime in the past, so a rewrite would show
    os.utime(path, ns=(old, old))
    data = path.read_bytes()
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(optimize_args(path, out, tmp_path / "r.json"), capsys, monkeypatch)
    assert code == 0, err
    assert path.read_bytes() == data
    assert path.stat().st_mtime_ns == old
    assert op_count(onnx.load(str(out)), "BatchNormalization") == 0
    assert listing(tmp_path) == {"m.onnx", "out.onnx", "r.json"}


# ---------------------------------------------------------------------------------------------
# --int8 with nothing to quantize


@pytest.mark.parametrize("with_calib", [False, True], ids=["dynamic", "calib"])
def test_int8_on_a_model_with_nothing_to_quantize(tmp_path, capsys, monkeypatch, with_calib):
    """Elementwise ops and a ConvTranspose only: one line naming the file and why, exit 2,
    nothing written (not a float copy passed off as an int8 result)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("ConvTranspose", ["r", "w"], ["y"], name="up", strides=[2, 2])]
    proto = make_model(nodes, [value_info("x", [1, 4, 8, 8])], [value_info("y", [1, 2, 16, 16])],
                       [tensor("w", rng.standard_normal((4, 2, 2, 2)))])
    model = save(proto, tmp_path / "up.onnx")
    extra = ["--int8"]
    if with_calib:
        np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 1, 4, 8, 8)).astype(np.float32))
        extra += ["--calib", str(tmp_path / "calib.npz")]
    check_refused(tmp_path, capsys, monkeypatch, model, "up.onnx", "nothing to quantize",
                  "ConvTranspose", extra=tuple(extra))


def test_a_missing_output_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """The output folder is checked when the run starts, not after minutes of work."""
    from helpers import invoke_cli

    from onnxopt import api
    from onnxopt.measure import verify as verify_mod

    monkeypatch.setattr(verify_mod, "provider_outputs",
                        lambda *a, **k: pytest.fail("the model was run before the check"))
    out = tmp_path / "missing" / "o.onnx"
    code, _, err = invoke_cli(["optimize", api.default_model_path(), "-o", out, "-q"],
                              capsys, monkeypatch)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# A model that is already int8


def int8_qdq_model(tmp_path) -> Path:
    """A Conv -> Relu -> Gemm net whose every layer is already static int8 (QDQ)."""
    import onnx_ir as ir
    from test_quantize_int8 import calibrate, small_cnn

    from onnxopt.passes import QuantizeInt8Options, QuantizeInt8Pass

    model, batches = small_cnn(0)
    report = QuantizeInt8Pass(QuantizeInt8Options(ranges=calibrate(model, batches)))(model)
    assert report.counts["quantized"] == 6
    return save(ir.to_proto(model), tmp_path / "int8.onnx")


@pytest.mark.parametrize("extra, needles", [
    (("--int8",), ("int8.onnx", "nothing to quantize", "3 Conv/Gemm/MatMul layers",
                    "already int8")),
    (("--int8", "--calib", "random"), ("int8.onnx", "nothing to quantize", "already int8")),
    (("--sparsity", "0.5"), ("nothing to prune", "'conv1'", "already int8",
                             "prune the float model")),
])
def test_int8_or_sparsity_on_an_int8_model_says_it_is_int8_already(tmp_path, capsys,
                                                                  monkeypatch, extra, needles):
    """Its weights stay int8: folding their DequantizeLinear to pick them up as float weights
    would store them as float32 (4x the bytes) and stop ORT's integer kernels."""
    model = int8_qdq_model(tmp_path)
    check_refused(tmp_path, capsys, monkeypatch, model, *needles, extra=extra)


def test_fold_weights_leaves_int8_weights_int8(tmp_path):
    import onnx_ir as ir

    from onnxopt.passes import FoldWeightsPass

    model = ir.load(int8_qdq_model(tmp_path))
    before = onnx.load(tmp_path / "int8.onnx").graph.initializer
    assert not FoldWeightsPass()(model).modified
    assert sorted(v.name for v in model.graph.initializers.values()) == sorted(
        t.name for t in before)
