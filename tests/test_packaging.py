"""passes/ ships as onnxopt.passes: in the editable install pytest runs on, and in a built wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import onnxopt.passes
from onnxopt.passes import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_passes_folder():
    assert Path(onnxopt.passes.__file__).resolve() == ROOT / "passes" / "__init__.py"
    assert {"cleanup", "fold-batchnorm"} <= set(REGISTRY)


def test_wheel_contains_passes_and_the_default_model(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = tmp_path.glob("onnxopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "onnxopt/passes/fold_batchnorm.py" in names
    assert "onnxopt/passes/cleanup.py" in names
    assert "onnxopt/data/digits_resnet.onnx" in names
    assert "onnxopt/data/digits_samples.npz" in names
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    # The unpacked wheel first on the path, in a fresh interpreter: it, not the checkout, is used.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import onnxopt.passes.fold_batchnorm as m, onnxopt.api as a; print(m.__file__); "
         "print(a.default_model_path().is_file())"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
    )
    assert probe.returncode == 0, probe.stderr
    module_file, has_model = probe.stdout.split()
    assert Path(module_file).is_relative_to(unpacked)
    assert has_model == "True"
