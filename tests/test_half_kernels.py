"""precision.kernels.half_kernel: ONNX Runtime's kernel registry (docs/OperatorKernels.md, as
onnxopt/data/ort_half_kernels.json) answers which ops have float16 / bfloat16 kernels."""

from __future__ import annotations

import fnmatch
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from onnxopt.errors import BadInputError
from onnxopt.precision.kernels import half_kernel, table_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("op_type", ["Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Softmax",
                                     "BatchNormalization", "LayerNormalization", "Resize"])
def test_cuda_has_float16_for_the_common_ops(op_type):
    assert half_kernel("cuda", "", op_type, 17, "float16") is True


def test_cpu_has_no_half_conv_or_matmul():
    for op_type in ("Conv", "MatMul"):
        assert half_kernel("cpu", "", op_type, 17, "float16") is False
        assert half_kernel("cpu", "", op_type, 17, "bfloat16") is False
        assert half_kernel("cpu", "", op_type, 17, "float") is True


def test_float_only_cuda_kernels():
    # RoiAlign "10+", Range "11+", GridSample "16+": T = tensor(double), tensor(float) only.
    assert half_kernel("cuda", "", "RoiAlign", 16, "float16") is False
    assert half_kernel("cuda", "", "Range", 17, "float16") is False
    assert half_kernel("cuda", "", "GridSample", 16, "float16") is False


def test_nonmaxsuppression_is_float_only_by_its_schema():
    """The md has no row for it (its kernels have no type constraints): the schema answers."""
    for provider in ("cpu", "cuda"):
        assert half_kernel(provider, "", "NonMaxSuppression", 17, "float16") is False
        assert half_kernel(provider, "", "NonMaxSuppression", 17, "bfloat16") is False


def test_unknown_ops_are_none():
    assert half_kernel("cuda", "com.example", "MyFancyOp", 1, "float16") is None
    assert half_kernel("cuda", "", "NoSuchOnnxOp", 17, "float16") is None


def test_an_op_only_the_cpu_has_is_false_on_cuda():
    assert half_kernel("cpu", "", "Celu", 17, "float") is True
    assert half_kernel("cuda", "", "Celu", 17, "float16") is False


def test_domain_aliases_and_provider_names():
    assert half_kernel("cuda", "ai.onnx", "Conv", 17, "float16") is True
    assert half_kernel("CUDAExecutionProvider", "", "Conv", 17, "float16") is True
    assert half_kernel("cuda", "com.microsoft", "Gelu", 1, "bfloat16") is True


def test_opset_ranges():
    # CUDA Conv: [1, 21] float16 only; 22+ adds bfloat16.
    assert half_kernel("cuda", "", "Conv", 17, "bfloat16") is False
    assert half_kernel("cuda", "", "Conv", 22, "bfloat16") is True
    # CUDA CumSum: [11, 13] without float16, 14+ with it; an opset in between maps to the
    # op's version (opset 15 -> CumSum-14).
    assert half_kernel("cuda", "", "CumSum", 13, "float16") is False
    assert half_kernel("cuda", "", "CumSum", 15, "float16") is True
    # An open "18+" kernel serves Resize-18 only: Resize-19 runs on the CPU.
    assert half_kernel("cuda", "", "Resize", 18, "float16") is True
    assert half_kernel("cuda", "", "Resize", 19, "float16") is False
    # Below every registration: HardSwish exists from opset 14.
    assert half_kernel("cuda", "", "HardSwish", 13, "float16") is None
    assert half_kernel("cuda", "", "HardSwish", 14, "float16") is True
    # ONNX Runtime's own LayerNormalization-1 in the ONNX domain (ONNX's is 17).
    assert half_kernel("cuda", "", "LayerNormalization", 13, "float16") is True


def test_main_constraint_when_output_0_is_not_float():
    # ArgMax and Shape: indices / a shape out, the float data in.
    assert half_kernel("cuda", "", "ArgMax", 13, "float16") is True
    assert half_kernel("cuda", "", "Shape", 17, "bfloat16") is True
    assert half_kernel("cpu", "", "ArgMax", 13, "float16") is False


def test_cast_and_castlike_take_every_float():
    for provider in ("cpu", "cuda"):
        for dtype in ("float16", "bfloat16"):
            assert half_kernel(provider, "", "Cast", 19, dtype) is True
            assert half_kernel(provider, "", "CastLike", 19, dtype) is True


def test_bad_provider_or_dtype():
    with pytest.raises(BadInputError, match="provider 'rocm'"):
        half_kernel("rocm", "", "Conv", 17, "float16")
    with pytest.raises(BadInputError, match="dtype 'int8'"):
        half_kernel("cuda", "", "Conv", 17, "int8")


def test_table_ships_in_the_package():
    """Loaded through importlib.resources (what the installed package uses), and matched by
    the package-data globs in pyproject.toml that put it in the wheel."""
    data = resources.files("onnxopt") / "data" / "ort_half_kernels.json"
    table = json.loads(data.read_text("utf-8"))
    assert set(table) == {"header", "cpu", "cuda"}
    assert len(table["header"]["commit"]) == 40 and table["header"]["version"]
    assert table["header"]["version"] in table_source()
    for domains in (table["cpu"], table["cuda"]):
        for ops in domains.values():
            for rows in ops.values():
                for since, until, support, main in rows:
                    assert until is None or since <= until
                    assert set(support) <= {"float16", "bfloat16", "float"}
                    assert main is None or isinstance(main, str)
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    assert '"onnxopt.precision"' in pyproject
    globs = re.search(r"^onnxopt = \[(.*)\]$", pyproject, re.MULTILINE).group(1)
    assert any(fnmatch.fnmatch("data/ort_half_kernels.json", glob.strip(' "'))
               for glob in globs.split(","))
