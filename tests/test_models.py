"""Every committed export in models/ and the embedded default: no BatchNormalization left,
verification passes, the file is valid, and ORT gives the original's outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import op_count, run

import onnxopt
from onnxopt import api, inputs

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted((ROOT / "models").glob("*.onnx")) + [api.default_model_path()]


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_optimize_folds_every_batchnorm_and_verifies(path, tmp_path):
    out = tmp_path / "out.onnx"
    model, report = onnxopt.optimize(path, out, onnxopt.OptimizeOptions(bench=()))
    assert report.verification.passed, report.verification.worst()
    assert not any(run.reverted for run in report.passes), [r.reason for r in report.passes]
    optimized = onnx.load(str(out))
    onnx.checker.check_model(optimized, full_check=True)
    assert op_count(optimized, "BatchNormalization") == 0
    assert report.optimized.nodes <= report.original.nodes
    original = onnx.load(str(path))
    feeds = inputs.generate(api.io.load(path), batches=1, seed=1)[0]
    for expected, actual in zip(run(original, feeds), run(optimized, feeds), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
