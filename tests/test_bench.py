"""Latency statistics: percentiles, the bootstrap ratio interval, interleaved timing."""

from __future__ import annotations

import numpy as np
from helpers import make_model, to_bytes, value_info
from onnx import helper

from onnxopt.measure import bench, runtime


def test_ratio_ci_brackets_the_true_ratio_on_synthetic_timings():
    rng = np.random.default_rng(0)
    base = rng.normal(10.0, 0.5, 400)
    slower = rng.normal(12.0, 0.5, 400)
    ratio, low, high = bench.ratio_ci(base, slower)
    assert low < 1.2 < high and high - low < 0.05
    assert abs(ratio - 1.2) < 0.02
    same_ratio, same_low, same_high = bench.ratio_ci(base, rng.normal(10.0, 0.5, 400))
    assert same_low < 1.0 < same_high


def test_measure_interleaves_and_summarises():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [64, 64])],
                       [value_info("y", [64, 64])])
    sessions = [runtime.make_session(to_bytes(model)) for _ in range(2)]
    feeds = {"x": np.ones((64, 64), np.float32)}
    a, b = bench.measure(sessions, feeds, seconds=0.2, min_runs=20)
    assert a.runs == b.runs >= 20  # interleaved: equal counts
    assert 0 < a.p50_ms <= a.p90_ms
    assert a.p50_ms == np.percentile(a.times_ms, 50)


def test_missing_onnxruntime_is_one_clear_line(monkeypatch, tmp_path, capsys):
    import sys

    from helpers import invoke_cli

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    path = tmp_path / "m.onnx"
    import onnx

    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"])], [value_info("x", [2])],
                         [value_info("y", [2])]), str(path))
    code, out, err = invoke_cli(["optimize", str(path), "-o", str(tmp_path / "o.onnx")],
                                capsys, monkeypatch)
    assert code == 2
    assert err.strip().splitlines() == [
        "error: onnxruntime is not installed: pip install 'onnxopt[cpu]' "
        "(or 'onnxopt[gpu]' for CUDA; never both)"]
    assert not (tmp_path / "o.onnx").exists()


def test_both_runtimes_installed_is_refused(monkeypatch):
    import pytest

    from onnxopt.errors import BadInputError

    monkeypatch.setattr(runtime, "_runtime_distributions",
                        lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(BadInputError, match="both onnxruntime and onnxruntime-gpu are installed"):
        runtime.onnxruntime()
