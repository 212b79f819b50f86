"""Initializer transfer on a real model: all-MiniLM-L6-v2 between its TorchScript and dynamo
exports (`onnxopt transfer`), both directions, plus a structure-only case.

    python benchmarks/transfer.py [--json benchmarks/results/transfer-<date>.json] [--seed 0]

The two exports differ in the ways the issue is about: 532 vs 249 nodes; the 36 MatMul weights
have exporter-generated names on both sides (`onnx::MatMul_735` vs `val_88`), so only the
graph's structure can pair them; biases are read by Add from the other input slot. Cases:

  ts -> dynamo, dynamo -> ts   every DST weight first re-drawn at random (seeded, same mean and
                               std per tensor; the copy is cached in benchmarks/work/), so a
                               transfer that moved nothing cannot reproduce SRC;
  ts -> dynamo (LN decomposed, renamed)  DST additionally has every LayerNormalization written
                               as ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul/Add and every
                               initializer renamed at random: structure alone must pair them.

Per case: coverage (tensors, parameters), the rule that matched each tensor, the error of every
output against SRC on real sentences (`minilm_b1_s64.npz`: 4 batches of 1 x 64 tokens) before
and after the transfer (ORT CPU, graph optimizations off), and the time `transfer` took.
Set-up: see benchmarks/README.md (the MiniLM exports come from real_models.py --prepare).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from onnxopt import inputs, io, transfer
from onnxopt.measure import verify as verify_mod
from onnxopt.transfer import match as tm

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"
INPUTS = WORK / "minilm_b1_s64.npz"


def reinitialized(name: str, seed: int, *, decompose: bool = False) -> Path:
    """benchmarks/work/<name>_reinit[_ln_renamed].onnx: every weight re-drawn (cached)."""
    suffix = "_reinit_ln_renamed" if decompose else "_reinit"
    path = WORK / f"{name}{suffix}_seed{seed}.onnx"
    if path.exists():
        return path
    model = io.load(WORK / f"{name}.onnx")
    rng = np.random.default_rng(seed)
    for weight in tm.weights(model).values():
        array = (weight.value.const_value if weight.node is None
                 else weight.node.attributes["value"].as_tensor()).numpy()
        fresh = rng.standard_normal(array.shape) * array.std() + array.mean()
        tensor = ir.tensor(fresh.astype(array.dtype), name=weight.name)
        if weight.node is None:
            weight.value.const_value = tensor
        else:
            weight.node.attributes["value"] = ir.AttrTensor("value", tensor)
    if decompose:
        _decompose_layernorm(model)
        _rename_initializers(model, rng)
    io.save(model, path)
    return path


def _decompose_layernorm(model: ir.Model) -> None:
    """LayerNormalization(X, scale, B) over the last axis, as opset 18 primitives."""
    graph = model.graph
    axes = ir.Value(name="ln_axes", const_value=ir.tensor(np.array([-1], dtype=np.int64)))
    graph.register_initializer(axes)
    for number, node in enumerate([n for n in graph if n.op_type == "LayerNormalization"]):
        x, scale, bias = node.inputs
        epsilon = node.attributes.get_float("epsilon", 1e-5)
        eps = ir.Value(name=f"ln{number}_epsilon",
                       const_value=ir.tensor(np.array(epsilon, dtype=np.float32)))
        graph.register_initializer(eps)
        mean = ir.node("ReduceMean", [x, axes])
        centered = ir.node("Sub", [x, mean.outputs[0]])
        square = ir.node("Mul", [centered.outputs[0], centered.outputs[0]])
        variance = ir.node("ReduceMean", [square.outputs[0], axes])
        shifted = ir.node("Add", [variance.outputs[0], eps])
        std = ir.node("Sqrt", [shifted.outputs[0]])
        normalized = ir.node("Div", [centered.outputs[0], std.outputs[0]])
        scaled = ir.node("Mul", [normalized.outputs[0], scale])
        out = ir.node("Add", [scaled.outputs[0], bias])
        nodes = [mean, centered, square, variance, shifted, std, normalized, scaled, out]
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [node.outputs[0]],
                                                [out.outputs[0]])
    ir.passes.common.NameFixPass()(model)


def _rename_initializers(model: ir.Model, rng: np.random.Generator) -> None:
    for value in list(model.graph.initializers.values()):
        model.graph.initializers.pop(value.name)
        value.name = f"w{rng.integers(1 << 40):010x}"
        model.graph.register_initializer(value)


def errors(reference: Path, candidate: Path, feeds) -> list[verify_mod.OutputError]:
    ref = verify_mod.reference_outputs(io.load(reference), feeds)
    return verify_mod.compare(ref, verify_mod.reference_outputs(io.load(candidate), feeds))


def run_case(label: str, src: Path, dst: Path, feeds) -> dict:
    out = WORK / f"transfer_{re.sub(r'[^a-z0-9]+', '_', label).strip('_')}.onnx"
    before = errors(src, dst, feeds)
    start = time.perf_counter()
    _, report = transfer.transfer(src, dst, out, transfer.TransferOptions(inputs=str(INPUTS)))
    seconds = time.perf_counter() - start
    after = errors(src, out, feeds)
    return {
        "case": label, "src": src.name, "dst": dst.name,
        "tensors": [len(report.transferred), report.dst_weights],
        "params": [report.transferred_params, report.dst_params],
        "rules": dict(Counter(t.rule for t in report.transferred)),
        "transposed": sum(t.transform == "transpose" for t in report.transferred),
        "refused": [(t.name, t.reason) for t in report.refused],
        "unmatched_dst": [t.name for t in report.unmatched_dst],
        "unmatched_src": [t.name for t in report.unmatched_src],
        "verification": report.verification.status if report.verification else "none",
        "before": {e.name: {"max_abs": e.max_abs, "cosine": e.cosine} for e in before},
        "after": {e.name: {"max_abs": e.max_abs, "cosine": e.cosine} for e in after},
        "seconds": round(seconds, 2),
    }


def render(rows: list[dict], console: Console) -> None:
    table = Table(title="onnxopt transfer: all-MiniLM-L6-v2, 4 real sentences x 64 tokens")
    for column in ("case", "tensors", "params", "rules", "output", "before: max abs / cos",
                   "after: max abs / cos", "check", "s"):
        table.add_column(column, justify="left" if column in ("case", "rules", "output") else "right")
    for row in rows:
        for k, (name, after) in enumerate(row["after"].items()):
            before = row["before"][name]
            first = k == 0
            table.add_row(
                row["case"] if first else "",
                f"{row['tensors'][0]}/{row['tensors'][1]}" if first else "",
                f"{row['params'][0]:,}/{row['params'][1]:,}" if first else "",
                ", ".join(f"{r} {n}" for r, n in sorted(row["rules"].items())) if first else "",
                name, f"{before['max_abs']:.3g} / {before['cosine']:.4f}",
                f"{after['max_abs']:.3g} / {after['cosine']:.8f}",
                row["verification"] if first else "", f"{row['seconds']:.1f}" if first else "")
    console.print(table)


def main(argv=None) -> int:
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=f"benchmarks/results/transfer-{today}.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-drawn DST weights")
    args = parser.parse_args(argv)
    missing = [p for p in (WORK / "minilm_ts.onnx", WORK / "minilm_dynamo.onnx", INPUTS)
               if not p.exists()]
    if missing:
        print(f"missing {', '.join(map(str, missing))}: run benchmarks/real_models.py --prepare")
        return 2
    feeds = inputs.load_npz(str(INPUTS), io.load(WORK / "minilm_ts.onnx"))
    ts, dynamo = WORK / "minilm_ts.onnx", WORK / "minilm_dynamo.onnx"
    cases = [
        ("ts -> dynamo", ts, reinitialized("minilm_dynamo", args.seed)),
        ("dynamo -> ts", dynamo, reinitialized("minilm_ts", args.seed)),
        ("ts -> dynamo (LN decomposed, renamed)", ts,
         reinitialized("minilm_dynamo", args.seed, decompose=True)),
    ]
    rows = [run_case(label, src, dst, feeds) for label, src, dst in cases]
    render(rows, Console(width=200))
    out = Path(args.json)
    out = out if out.is_absolute() else ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"schema": "onnxopt.measure.bench-transfer/1", "date": today,
                               "inputs": str(INPUTS.relative_to(ROOT)), "seed": args.seed,
                               "cases": rows}, indent=1))
    print(f"results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0 if all(r["verification"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
