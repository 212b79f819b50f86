"""The layering of onnxopt stays true: imports point down the stack only, and never in a circle.

Every `import` and `from ... import` in onnxopt/ and passes/ is read from the source (those
inside functions too: a late import is still a dependency). A module belongs to a unit: its
subpackage (measure, calib, quant, transfer, sparsity, passes) or, at the top of onnxopt, its
own name. A unit may import units of lower layers and itself, nothing of its own layer or above.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. Units on one line are peers: they never import each other.
LAYERS = [
    ("errors",),
    ("io", "inputs"),
    ("measure",),  # ORT sessions, verify, validate, bench, stats
    ("calib",),  # calibration data and activation statistics
    ("passes",),  # one rewrite per module
    ("pipeline",),  # runs passes in order, verifies, reverts what breaks
    ("quant", "transfer", "sparsity", "precision"),  # the stages
    ("report", "plot", "tables"),
    ("stages",),  # optimize's stages around the pipeline, as the API runs them
    ("api",),
    ("demo",),
    ("cli",),
    ("__main__",),  # python -m onnxopt
    ("__init__",),  # onnxopt/__init__.py re-exports the API
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, as installed (passes/ ships as onnxopt.passes)."""
    files = {}
    for path in (ROOT / "onnxopt").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "passes").glob("*.py"):
        stem = "" if path.stem == "__init__" else f".{path.stem}"
        files[f"onnxopt.passes{stem}"] = path
    return files


MODULES = _module_files()


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _imports(module: str, path: Path) -> set[str]:
    """The onnxopt modules `module` imports; `from package import name` counts as importing
    package.name when that is a module, else the package."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "onnxopt")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "onnxopt":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    found.discard(module)
    return {name for name in found if name in MODULES}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert {_unit(m) for m in MODULES} - set(RANK) == set()
    assert {"onnxopt.quant.int8", "onnxopt.measure.verify", "onnxopt.calib.sources",
            "onnxopt.transfer.apply", "onnxopt.passes.fold_batchnorm"} <= set(MODULES)


def test_imports_point_down_the_stack():
    upward = []
    for module, targets in GRAPH.items():
        for target in targets:
            source_unit, target_unit = _unit(module), _unit(target)
            if source_unit != target_unit and RANK[target_unit] >= RANK[source_unit]:
                upward.append(f"{module} ({source_unit}) imports {target} ({target_unit})")
    assert upward == []


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_late_imports():
    """A late import inside a function is read too (so a cycle cannot hide in one)."""
    assert "onnxopt.plot" in GRAPH["onnxopt.cli"]  # imported inside the --plot branch
