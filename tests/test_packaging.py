"""passes/ ships as onnxopt.passes, and every stage subpackage of onnxopt ships too: in the
editable install pytest runs on, and in a built wheel."""

from __future__ import annotations

import os
import shutil
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
    # Built from a copy of what ships: a stale build/ folder in the checkout (setuptools reuses
    # it) could otherwise add modules that no longer exist.
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for folder in ("onnxopt", "passes"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = tmp_path.glob("onnxopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "onnxopt/passes/fold_batchnorm.py" in names
    assert "onnxopt/passes/cleanup.py" in names
    assert "onnxopt/data/digits_resnet.onnx" in names
    assert "onnxopt/data/digits_samples.npz" in names
    # Every module of the checkout, so a new subpackage missing from pyproject.toml fails here.
    sources = {f"onnxopt/{p.relative_to(ROOT / 'onnxopt').as_posix()}"
               for p in (ROOT / "onnxopt").rglob("*.py")}
    sources |= {f"onnxopt/passes/{p.name}" for p in (ROOT / "passes").glob("*.py")}
    assert {"onnxopt/quant/int8.py", "onnxopt/measure/verify.py", "onnxopt/calib/sources.py",
            "onnxopt/transfer/apply.py"} <= sources
    assert {n for n in names if n.endswith(".py")} == sources
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    # The unpacked wheel first on the path, in a fresh interpreter: it, not the checkout, is used.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import importlib, pkgutil, onnxopt, onnxopt.passes.fold_batchnorm as m, onnxopt.api as a; "
         "mods = [importlib.import_module(i.name) for i in "
         "pkgutil.walk_packages(onnxopt.__path__, 'onnxopt.') if not i.name.endswith('__main__')]; "
         "print(m.__file__); print(a.default_model_path().is_file()); "
         "print(all(x.__file__.startswith(onnxopt.__path__[0]) for x in mods), len(mods))"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
    )
    assert probe.returncode == 0, probe.stderr
    module_file, has_model, all_from_wheel, count = probe.stdout.split()
    assert Path(module_file).is_relative_to(unpacked)
    assert has_model == "True"
    # Every module but onnxopt/__init__.py (the root) and __main__.py (it runs the CLI) imported.
    assert all_from_wheel == "True" and int(count) == len(sources) - 2, probe.stdout
