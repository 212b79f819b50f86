"""onnxopt bench and cross-provider validate: statistics, interleaving, placement, providers
that are missing, JSON schema, plots. CUDA tests run only where the CUDA provider is."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import invoke_cli, make_model, tensor, value_info
from onnx import TensorProto, helper

from onnxopt import api
from onnxopt.measure import bench, bench_models, placement, runtime, validation
from onnxopt.measure.verify import Tolerance

DEFAULT = str(api.default_model_path())
HAS_CUDA = "CUDAExecutionProvider" in runtime.onnxruntime().get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA execution provider not available "
                                "(onnxopt[gpu] on a machine with an NVIDIA GPU)")


def matmul_model(path, *, batch="N", dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [value_info("x", [batch, 16], elem)], [value_info("y", [batch, 8], elem)],
                       [tensor("W", rng.standard_normal((16, 8)), dtype)])
    onnx.save(model, str(path))
    return path


def test_summary_percentiles_and_throughput():
    times = list(np.random.default_rng(0).gamma(4.0, 1.0, 1000))
    latency = bench.summarize("cpu", times, batch=8)
    assert latency.p50_ms == pytest.approx(np.percentile(times, 50))
    assert latency.p99_ms == pytest.approx(np.percentile(times, 99))
    assert latency.p50_ms < latency.p90_ms < latency.p99_ms
    assert latency.std_ms == pytest.approx(np.std(times))
    assert latency.throughput == pytest.approx(8 * 1000 / latency.p50_ms)


def test_runs_are_interleaved_and_warmup_is_counted():
    calls = []
    runners = [lambda: calls.append("A"), lambda: calls.append("B")]
    a, b = bench.measure_runners(runners, warmup=3, runs=5)
    assert calls == ["A"] * 3 + ["B"] * 3 + ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B"]
    assert a.runs == b.runs == 5 and a.warmup_runs == 3


def test_auto_warmup_stops_once_steady():
    latency, = bench.measure_runners([lambda: None], warmup="auto", runs=3)
    assert 10 <= latency.warmup_runs < 50  # a no-op settles at once: two windows of five


def test_same_model_twice_ratio_brackets_one(tmp_path):
    result = bench_models.bench_models([DEFAULT, DEFAULT], bench_models.BenchOptions(
        seconds=1.5, placement=False))
    ratio, low, high = result.rows[1].ratio
    # Whether the CI contains 1.0 is measured in the benchmark suite (a quiet machine); a test
    # on a shared CI machine can only check that the ratio is sane and the interval ordered.
    assert low <= ratio <= high
    assert 0.7 < ratio < 1.4


def test_batches_and_placement_and_memory(tmp_path):
    path = matmul_model(tmp_path / "m.onnx")
    result = bench_models.bench_models([path], bench_models.BenchOptions(
        batches=(1, 4), runs=5, warmup=1))
    assert [r.batch for r in result.rows] == [1, 4]
    for row in result.rows:
        assert row.error is None and row.latency.runs == 5 and row.latency.batch == row.batch
        assert row.placement.nodes == {"cpu": 1} and row.placement.fallback == {}
        assert row.memory_mb is not None and row.memory_mb >= 0


def test_fixed_batch_model_cannot_take_another_batch(tmp_path):
    path = matmul_model(tmp_path / "m.onnx", batch=2)
    result = bench_models.bench_models([path], bench_models.BenchOptions(
        batches=(2, 4), runs=3, warmup=1, placement=False))
    assert result.rows[0].error is None
    assert "fixed batch of 2; --batch 4" in result.rows[1].error


def test_placement_counts_fallback_and_copies_from_profile_events():
    events = [
        {"cat": "Session", "name": "model_run"},
        {"cat": "Node", "name": "conv1_kernel_time",
         "args": {"op_name": "Conv", "provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "conv1_fence_before", "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "nms_kernel_time",
         "args": {"op_name": "NonMaxSuppression", "provider": "CPUExecutionProvider"}},
        {"cat": "Node", "name": "copy_kernel_time",
         "args": {"op_name": "MemcpyToHost", "provider": "CUDAExecutionProvider"}},
    ]
    where = placement.placement_from_profile(events, "cuda")
    assert where.nodes == {"cuda": 2, "cpu": 1}
    assert where.fallback == {"NonMaxSuppression": 1} and where.copies == 1
    assert "fell back to cpu: NonMaxSuppression 1" in where.summary()


def test_bench_json_schema_and_plot(tmp_path, capsys, monkeypatch):
    path = matmul_model(tmp_path / "m.onnx")
    other = matmul_model(tmp_path / "n.onnx", seed=1)
    code, out, err = invoke_cli(["bench", path, other, "--runs", "5", "--warmup", "2",
                                 "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png",
                                 "--batch", "1,2"], capsys, monkeypatch)
    assert code == 0, err
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["schema"] == "onnxopt.measure.bench/1"
    assert data["models"] == [str(path), str(other)]
    assert {"platform", "cpus", "onnxruntime", "providers"} <= set(data["machine"])
    assert len(data["rows"]) == 4
    row = data["rows"][1]
    assert {"model", "ep", "batch", "latency", "ratio", "memory_mb", "placement", "error"} <= set(row)
    assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "runs", "throughput",
            "times_ms"} <= set(row["latency"])
    assert len(row["ratio"]) == 3 and data["rows"][0]["ratio"] is None
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "n.onnx" in out and "samples/s" in out


def test_cuda_requested_without_it_is_a_clear_message(tmp_path, capsys, monkeypatch):
    if HAS_CUDA:
        pytest.skip("this machine has the CUDA provider")
    path = matmul_model(tmp_path / "m.onnx")
    code, out, err = invoke_cli(["bench", path, "--ep", "cuda", "--runs", "3"], capsys, monkeypatch)
    assert code == 2
    assert err.strip() == ("error: execution provider 'cuda' is not available: install "
                           "onnxopt[gpu] (onnxruntime-gpu) and a CUDA GPU")
    code, out, err = invoke_cli(["bench", path, "--ep", "cpu,cuda", "--runs", "3"], capsys,
                                monkeypatch)
    assert code == 0 and "note: cuda: execution provider 'cuda' is not available" in out
    code, out, err = invoke_cli(["validate", path, path, "--ep", "cpu,cuda"], capsys, monkeypatch)
    assert code == 2 and "m.onnx on cuda: skipped" in out and "m.onnx on cpu: passed" in out


def test_validate_raw_against_ort_optimized_session(capsys, monkeypatch):
    code, out, err = invoke_cli(["validate", DEFAULT, "--ort-optimize"], capsys, monkeypatch)
    assert code == 0, out + err
    assert "digits_resnet.onnx on cpu: passed on 3 batches (fp32 tolerance" in out
    [comparison] = validation.validate_providers(DEFAULT, ort_optimize=True, batches=2)
    [logits] = comparison.verification.outputs
    assert logits.top1 == 1.0 and logits.top5 == 1.0 and logits.cosine > 0.999999


def test_tolerance_follows_precision(tmp_path):
    fp16 = api.io.load(matmul_model(tmp_path / "h.onnx", dtype=np.float16))
    fp32 = api.io.load(matmul_model(tmp_path / "f.onnx"))
    assert validation.precision_of(fp16) == "fp16"
    assert validation.precision_of(fp32) == "fp32"
    assert validation.tolerance_for(fp32, same_provider=True)[1] == Tolerance()
    qdq = make_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                      helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
                     [value_info("x", [4])], [value_info("y", [4])],
                     [tensor("s", np.float32(0.1)), tensor("z", np.uint8(128), np.uint8)],
                     opset=13)
    onnx.save(qdq, str(tmp_path / "q.onnx"))
    precision, tolerance = validation.tolerance_for(api.io.load(tmp_path / "q.onnx"),
                                                    same_provider=True)
    assert precision == "int8" and not tolerance.elementwise and tolerance.min_cosine == 0.99


def test_memprobe_measures_a_session_alone(tmp_path):
    from onnxopt.measure import memprobe

    rng = np.random.default_rng(0)
    big = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [value_info("x", [1, 2048])],
                     [value_info("y", [1, 2048])], [tensor("W", rng.standard_normal((2048, 2048)))])
    onnx.save(big, str(tmp_path / "big.onnx"))
    feeds = {"x": np.ones((1, 2048), np.float32)}
    peak = memprobe.session_peak_mb(str(tmp_path / "big.onnx"), feeds, "cpu", 1, str(tmp_path))
    assert peak is not None and peak >= 16  # the 16 MB weight is resident at least once


@needs_cuda
def test_cuda_bench_with_io_binding_and_cuda_graph(tmp_path):
    path = matmul_model(tmp_path / "m.onnx", batch=4)
    for graph in (False, True):
        result = bench_models.bench_models([path], bench_models.BenchOptions(
            eps=("cuda",), batches=(4,), runs=20, cuda_graph=graph))
        [row] = result.rows
        assert row.error is None and row.latency.p50_ms > 0
        assert row.placement.nodes.get("cuda", 0) >= 1


@needs_cuda
def test_validate_cpu_against_cuda(tmp_path):
    [comparison] = validation.validate_providers(DEFAULT, eps=("cpu", "cuda"))
    assert comparison.verification.passed, comparison.verification.worst()
