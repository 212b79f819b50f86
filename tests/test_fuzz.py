"""The fast slice of benchmarks/fuzz.py: mutated models through every command end in a one-line
error (exit 2), a failed check (exit 1) or a valid model, and never touch their input. The
campaign (thousands of cases, crash-isolated workers) is `python benchmarks/fuzz.py`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz.py"


def load_fuzz():
    spec = importlib.util.spec_from_file_location("onnxopt_fuzz", FUZZ)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzz()
CASES = fuzz.plan(5 * len(fuzz.MUTATIONS), seed=11)


def test_every_mutation_and_command_is_in_the_slice():
    assert {c.mutation for c in CASES} == set(fuzz.MUTATIONS)
    assert {c.command for c in CASES} == set(fuzz.COMMANDS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.index}-{c.mutation}-{c.command}")
def test_mutated_model(case, tmp_path):
    result = fuzz.run_case(case, tmp_path)
    assert not result["problems"], (result["what"], result["error"])
    assert result["exit"] in (0, 1, 2)


def test_the_checks_catch_what_they_must(tmp_path):
    """The rules themselves: exit 3, a traceback, a multi-line exit-2 error, a touched input
    and an invalid output are each reported."""
    (tmp_path / "model.onnx").write_bytes(b"x")
    before = fuzz._digest(tmp_path)
    out = tmp_path / "out.onnx"
    problems = fuzz._problems(3, "", "Traceback (most recent call last):\n  boom", tmp_path /
                              "model.onnx", out, "optimize", before, tmp_path)
    assert "exit 3" in problems and "traceback" in problems
    assert fuzz._problems(2, "", "a\nb", tmp_path / "model.onnx", out, "optimize", before,
                          tmp_path) == ["exit 2 with an error that is not one line"]
    (tmp_path / "model.onnx").write_bytes(b"y")
    out.write_bytes(b"not onnx")
    problems = fuzz._problems(0, "", "", tmp_path / "model.onnx", out, "optimize", before, tmp_path)
    assert "input touched" in problems
    assert any(p.startswith("invalid output") for p in problems)
