"""CUDA and TensorRT sessions without a GPU: which sessions run fp32 exactly (use_tf32=0) and
which keep ORT's TF32 default, and a provider that does not register (ORT goes on without it)
labelled by the provider that really ran, with ORT's multi-line error turned into one note.

ORT is simulated: `get_available_providers` claims the GPU providers, and `InferenceSession`
records the providers it is given, writes what ORT's C++ logger would to fd 2, reports the
providers that "registered", and computes on a real CPU session."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import invoke_cli, make_model, tensor, value_info
from onnx import helper

from onnxopt import io
from onnxopt.measure import bench_models, runtime, validation, verify

TRT, CUDA, CPU = (runtime.PROVIDERS[ep][0] for ep in ("tensorrt", "cuda", "cpu"))
RealSession = ort.InferenceSession
# What ORT 1.31 writes on fd 2 when TensorRT's libraries are missing (its logger, two records).
TRT_MISSING = (
    "2026-01-01 10:00:00.000 [E:onnxruntime:Default, provider_bridge_ort.cc:2251 "
    "TryGetProviderInfo_TensorRT] provider_bridge_ort.cc:1848 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10: cannot open shared "
    "object file: No such file or directory\n"
    "2026-01-01 10:00:00.000 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1015 "
    "CreateExecutionProviderInstance] Failed to create TensorrtExecutionProvider. Require "
    "cuDNN 9.* and CUDA 12.*, and TensorRT 10.*. Please install all dependencies.\n"
)


def matmul_model(path, seed=0):
    rng = np.random.default_rng(seed)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [value_info("x", ["N", 16])], [value_info("y", ["N", 8])],
                       [tensor("W", rng.standard_normal((16, 8)))])
    onnx.save(model, str(path))
    return path


class FakeOrt:
    """Settings of the simulated GPU ORT; `calls` holds the `providers` of every session."""

    def __init__(self):
        self.missing: set[str] = set()  # providers that do not register
        self.stderr = ""  # written to fd 2 while a session is created
        self.raise_with = ""  # a session asking for TensorRT raises this (an EP that fails)
        self.calls: list[list] = []

    def session_class(self):
        fake = self

        class Session:
            def __init__(self, model, options=None, providers=None, **kwargs):
                fake.calls.append(list(providers))
                names = [p[0] if isinstance(p, tuple) else p for p in providers]
                if fake.stderr and fake.missing & set(names):  # ORT's logger, as it registers EPs
                    os.write(2, fake.stderr.encode())
                if fake.raise_with and TRT in names:
                    raise RuntimeError(fake.raise_with)
                self._registered = [n for n in names if n not in fake.missing]
                self._real = RealSession(model, options, providers=[CPU])

            def get_providers(self):
                return self._registered

            def __getattr__(self, name):
                return getattr(self._real, name)

        return Session

    def cuda_options(self) -> list[dict]:
        """The CUDA provider options of every session made, in order ({} = ORT's defaults)."""
        found = []
        for providers in self.calls:
            for entry in providers:
                if entry == CUDA:
                    found.append({})
                elif isinstance(entry, tuple) and entry[0] == CUDA:
                    found.append(entry[1])
        return found


@pytest.fixture
def fake_gpu(monkeypatch) -> FakeOrt:
    fake = FakeOrt()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", fake.session_class())
    return fake


@pytest.fixture
def host_runner(monkeypatch):
    """Time a "cuda" session with plain runs: IO binding needs a real device."""
    monkeypatch.setattr(runtime, "runner", lambda session, feeds, ep="cpu":
                        lambda: runtime.run(session, feeds))


def test_provider_options_carry_tf32_to_cuda_and_tensorrt_fallback():
    assert runtime.provider_options("cpu", tf32=False) == [CPU]
    assert runtime.provider_options("cuda") == [CUDA, CPU]  # ORT's default: TF32 on
    assert runtime.provider_options("cuda", tf32=False) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert runtime.provider_options("cuda", cuda_graph=True, tf32=True) == [
        (CUDA, {"enable_cuda_graph": "1", "use_tf32": "1"}), CPU]
    assert runtime.provider_options("tensorrt", tf32=False) == [
        TRT, (CUDA, {"use_tf32": "0"}), CPU]
    with pytest.raises(runtime.BadInputError, match="unknown execution provider 'rocm'"):
        runtime.provider_options("rocm")


def test_fp32_math_says_whether_tf32_was_on():
    assert runtime.fp32_math("cpu", None) is None
    assert runtime.fp32_math("cuda", None) == "TF32 (ORT default)"
    assert runtime.fp32_math("cuda", False) == "exact fp32"
    assert runtime.fp32_math("tensorrt", False).endswith("CUDA fallback: exact fp32")


def test_verification_and_validation_sessions_run_exact_fp32(fake_gpu, tmp_path):
    path = matmul_model(tmp_path / "m.onnx")
    model = io.load(path)
    feeds = [{"x": np.ones((2, 16), np.float32)}]
    verify.reference_outputs(model, feeds, ep="cuda")
    [comparison] = validation.validate_providers(path, eps=("cpu", "cuda"), batches=2)
    assert comparison.verification.passed and comparison.ep == "cuda"
    assert comparison.notes == []
    options = fake_gpu.cuda_options()
    assert len(options) == 2 and all(o.get("use_tf32") == "0" for o in options)


@pytest.mark.parametrize(("flag", "use_tf32", "math"), [
    ([], None, "TF32 (ORT default)"),
    (["--no-tf32"], "0", "exact fp32"),
    (["--tf32"], "1", "TF32"),
])
def test_bench_keeps_ort_tf32_default_unless_told(fake_gpu, host_runner, tmp_path, capsys,
                                                  monkeypatch, flag, use_tf32, math):
    path = matmul_model(tmp_path / "m.onnx")
    code, out, err = invoke_cli(["bench", path, "--ep", "cuda", "--runs", "3", "--warmup", "1",
                                 "--no-placement", "--json", tmp_path / "b.json", *flag],
                                capsys, monkeypatch)
    assert code == 0, err
    [options] = fake_gpu.cuda_options()
    assert options.get("use_tf32") == use_tf32
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["options"]["tf32"] == {None: None, "0": False, "1": True}[use_tf32]
    [row] = data["rows"]
    assert row["ep"] == "cuda" and row["fp32_math"] == math and row["note"] is None
    assert f"cuda: fp32 math: {math}" in out


def test_tensorrt_that_does_not_register_is_one_note_and_the_real_provider(fake_gpu, capfd):
    fake_gpu.missing, fake_gpu.stderr = {TRT}, TRT_MISSING
    capfd.readouterr()
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [2])],
                       [value_info("y", [2])])
    session = runtime.make_session(model.SerializeToString(), ep="tensorrt", tf32=False)
    ran, note = runtime.ran_on(session, "tensorrt")
    assert ran == "cuda"
    assert note == ("tensorrt did not register (libnvinfer.so.10: cannot open shared object "
                    "file); ran on cuda")
    out, err = capfd.readouterr()
    assert "onnxruntime" not in err and "libnvinfer" not in err and out == ""
    assert fake_gpu.calls == [[TRT, (CUDA, {"use_tf32": "0"}), CPU]]


def test_tensorrt_that_fails_is_retried_on_cuda_with_its_options(fake_gpu, capfd):
    fake_gpu.raise_with = ("[ONNXRuntimeError] : 1 : FAIL : TensorRT EP failed to create engine "
                           "from network.\nsecond line")
    capfd.readouterr()
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [2])],
                       [value_info("y", [2])])
    session = runtime.make_session(model.SerializeToString(), ep="tensorrt", tf32=False)
    assert runtime.ran_on(session, "tensorrt") == (
        "cuda", "tensorrt failed (TensorRT EP failed to create engine from network.); ran on cuda")
    assert fake_gpu.calls[-1] == [(CUDA, {"use_tf32": "0"}), CPU]  # ORT's retry would drop them
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no "EP Error" banner from ORT's wrapper


# ORT 1.31.1 on an H200 without TensorRT (measured): the session raises this, after the logger
# wrote TRT_MISSING's first record; older ORTs only log and go on without TensorRT.
TRT_RAISES = ("/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void "
              "onnxruntime::python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const "
              "onnxruntime::ProviderOptions&) Please install TensorRT libraries as mentioned in the "
              "GPU requirements page, make sure they're in the PATH or LD_LIBRARY_PATH, and that "
              "your GPU is supported.")


@pytest.mark.parametrize(("raises", "what"), [(False, "did not register"), (True, "failed")])
def test_bench_cli_tensorrt_without_its_libraries(fake_gpu, host_runner, tmp_path, capfd,
                                                 monkeypatch, raises, what):
    fake_gpu.missing, fake_gpu.stderr = {TRT}, TRT_MISSING
    fake_gpu.raise_with = TRT_RAISES if raises else ""
    path = matmul_model(tmp_path / "m.onnx")
    code, out, err = invoke_cli(["bench", path, "--ep", "tensorrt", "--runs", "3", "--warmup", "1",
                                 "--no-placement", "--json", tmp_path / "b.json"], capfd,
                                monkeypatch)
    assert code == 0, err
    note = f"tensorrt {what} (libnvinfer.so.10: cannot open shared object file); ran on cuda"
    assert f"note: {note}" in out
    assert "libnvinfer" not in err and "[E:onnxruntime" not in out + err
    assert "EP Error" not in out + err  # ORT's own fallback banner
    [row] = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["ep"] == "cuda" and row["note"] == note and row["latency"]["ep"] == "cuda"
    assert row["error"] is None and row["fp32_math"] == "TF32 (ORT default)"
    table_rows = [line for line in out.splitlines() if "m.onnx" in line]
    assert table_rows and all("tensorrt" not in line and "cuda" in line for line in table_rows)


def test_cuda_without_cudnn_runs_and_is_labelled_cpu(fake_gpu, tmp_path):
    fake_gpu.missing = {CUDA}
    fake_gpu.stderr = ("2026-01-01 10:00:00.000 [E:onnxruntime:Default, provider_bridge_ort.cc:1 "
                       "Get] Failed to load library libonnxruntime_providers_cuda.so with error: "
                       "libcudnn.so.9: cannot open shared object file: No such file or directory\n")
    path = matmul_model(tmp_path / "m.onnx")
    result = bench_models.bench_models([path], bench_models.BenchOptions(
        eps=("cuda",), runs=3, warmup=1, placement=False))
    [row] = result.rows
    assert row.error is None and row.ep == "cpu" and row.fp32_math is None
    assert row.note == ("cuda did not register (libcudnn.so.9: cannot open shared object file); "
                        "ran on cpu")


def test_validate_labels_the_provider_that_ran(fake_gpu, tmp_path, capfd, monkeypatch):
    fake_gpu.missing, fake_gpu.stderr = {TRT}, TRT_MISSING
    path = matmul_model(tmp_path / "m.onnx")
    code, out, err = invoke_cli(["validate", path, path, "--ep", "cpu,tensorrt"], capfd,
                                monkeypatch)
    assert code == 0, out + err
    assert "m.onnx on cuda: passed" in out and "m.onnx on tensorrt" not in out
    assert "note: tensorrt did not register (libnvinfer.so.10: cannot open shared object file)" \
        in out
    assert "libnvinfer" not in err


def test_fallback_note_without_a_missing_library_is_the_failing_line():
    text = ("\n2026-01-01 10:00:00.0 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1 "
            "CreateExecutionProviderInstance] Failed to create CUDAExecutionProvider. Require "
            "cuDNN 9.*\nanother line\n")
    assert runtime.fallback_note(text) == ("Failed to create CUDAExecutionProvider. "
                                           "Require cuDNN 9.*")
    assert runtime.fallback_note("") == "ONNX Runtime gave no reason"
