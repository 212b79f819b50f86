"""The Report: one dataclass for everything a run found, rendered as one rich table or as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxopt.measure.bench import Latency
from onnxopt.measure.stats import ModelStats
from onnxopt.measure.verify import Verification
from onnxopt.pipeline import PassRun

__all__ = ["Report", "LatencyComparison", "render", "write_json", "write_dict_json", "render_stats",
           "render_bench", "render_sensitivity"]


@dataclasses.dataclass
class LatencyComparison:
    ep: str
    original: Latency
    optimized: Latency
    ratio: float  # optimized p50 / original p50: below 1 is faster
    ratio_low: float
    ratio_high: float

    @property
    def is_slower(self) -> bool:
        """Slower beyond noise: the whole 95% interval of the ratio is above 1.02 (2% is below
        what a shared machine lets us resolve, and below what a user would notice)."""
        return self.ratio_low > 1.02


@dataclasses.dataclass
class Report:
    source: str
    destination: str | None
    original: ModelStats
    optimized: ModelStats
    passes: list[PassRun] = dataclasses.field(default_factory=list)
    verification: Verification | None = None
    latency: list[LatencyComparison] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # upgrades, guesses, warnings
    # Task metrics, original then optimized: {"digits top-1 (256 samples)": [0.98, 0.98]}.
    metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    int8: dict | None = None  # calibration, budget and ORT kernel counts when --int8 ran
    sparsity: dict | None = None  # per-layer zeros, MACs, sizes and verdict when --sparsity ran
    half: dict | None = None  # dtype, nodes kept float32 and why, how it was judged (--fp16/--bf16)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    # What every output was held to (measure.validity), verified or not.
    validity: str = ""

    def as_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for row in data["latency"]:  # raw timings make the JSON huge and say little
            row["original"].pop("times_ms", None)
            row["optimized"].pop("times_ms", None)
        return _finite(data)


def _finite(data):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    return data


def write_json(report: Report, path: str | os.PathLike) -> None:
    write_dict_json(report.as_dict(), path)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _change(before: float | None, after: float | None, *, fmt=_size, lower_is_better=True) -> str:
    if before is None or after is None or before == after:
        return "" if before == after else "-"
    delta = after - before
    pct = f" ({delta / before:+.1%})" if before else ""
    text = ("+" if delta > 0 else "-") + fmt(abs(delta)) + pct
    is_better = (delta < 0) == lower_is_better
    return f"[green]{text}[/green]" if is_better else f"[red]{text}[/red]"


def _macs(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return str(n)


def _count(n) -> str:
    return f"{n:,}"


def render(report: Report, console: Console, *, all_ops: bool = False) -> None:
    a, b = report.original, report.optimized
    table = Table(title=escape(f"onnxopt: {report.source} -> {report.destination or '(not saved)'}"))
    for column in ("", "original", "optimized", "change"):
        table.add_column(column, justify="left" if not column else "right")
    table.add_row("[bold]model", "", "", "")
    table.add_row("opset / IR", f"{a.opset} / {a.ir_version}", f"{b.opset} / {b.ir_version}", "")
    table.add_row("nodes", _count(a.nodes), _count(b.nodes), _change(a.nodes, b.nodes, fmt=_count))
    table.add_row("parameters", _count(a.parameters), _count(b.parameters),
                  _change(a.parameters, b.parameters, fmt=_count))
    table.add_row("weight bytes", _size(a.weight_bytes), _size(b.weight_bytes),
                  _change(a.weight_bytes, b.weight_bytes))
    table.add_row("file size", _size(a.file_bytes), _size(b.file_bytes),
                  _change(a.file_bytes, b.file_bytes))
    for label, xs, ys in (("inputs", a.inputs, b.inputs), ("outputs", a.outputs, b.outputs)):
        table.add_row(label, escape("\n".join(map(str, xs))), escape("\n".join(map(str, ys))), "")
    _ops_rows(table, a, b, all_ops)
    _accuracy_rows(table, report.verification)
    for name, (before, after) in report.metrics.items():
        table.add_row(name, f"{before:.2%}", f"{after:.2%}",
                      _change(before, after, fmt=lambda v: f"{v:.2%}", lower_is_better=False))
    if report.int8 is not None:
        table.add_row("[bold]int8", "", "", "")
        table.add_row("calibration", "", escape(report.int8["calibration"]), "")
        budget = report.int8["budget"]
        colour = "green" if report.int8["quantized"] else "red"
        table.add_row("accuracy budget", "", f"[{colour}]{escape(budget)}[/{colour}]", "")
        table.add_row("ORT CPU kernels", "", escape(report.int8["ort_cpu_kernels"]), "")
        layers = report.int8.get("layer_sqnr_db") or {}
        for name, sqnr in sorted(layers.items(), key=lambda kv: kv[1])[:5]:
            table.add_row(f"SQNR {escape(name)}", "", f"{sqnr:.1f} dB",
                          "worst layers; all in --report")
    if report.sparsity is not None:
        _sparsity_rows(table, report.sparsity)
    if report.half is not None:
        _half_rows(table, report.half)
    _latency_rows(table, report.latency)
    table.add_row("[bold]time", "", "", "")
    for step, seconds in report.seconds.items():
        table.add_row(step, "", f"{seconds:.2f} s", "")
    console.print(table)
    if report.sparsity and report.sparsity.get("layers"):
        console.print(_sparsity_layers(report.sparsity["layers"]))
    for run in report.passes:
        console.print(_pass_line(run))
    for note in dict.fromkeys(report.notes):  # the same guess made twice is said once
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if report.verification is None or report.verification.status == "skipped":
        reason = report.verification.reason if report.verification else "--no-verify"
        console.print(f"[bold yellow]not verified:[/bold yellow] {escape(reason)}; the output is "
                      f"only held to what the input met: {escape(report.validity or 'nothing')}")


def _half_rows(table: Table, summary: dict) -> None:
    table.add_row(f"[bold]{summary['dtype']}", "", "", "")
    colour = "green" if summary["converted"] else "red"
    judged = ("not judged (--no-verify)" if summary["judged_on"] == "none"
              else f"judged on {summary['judged_on']}")
    table.add_row("accuracy budget", "", f"[{colour}]{escape(summary['budget'])}[/{colour}]",
                  judged)
    if summary["converted"]:
        table.add_row("nodes in half", "", str(summary["nodes_half"]),
                      f"{summary['casts']} Casts at float32 borders")
    if summary["speed"]:
        table.add_row(f"speed ({summary['target']})", "", escape(summary["speed"]), "")
    kept = summary["kept_float32"]
    table.add_row("kept float32", "", str(len(kept)), "each below" if kept else "")
    for name, why in list(kept.items())[:_KEPT_SHOWN]:
        table.add_row(f"  {escape(name)}", "", escape(why), "")
    if len(kept) > _KEPT_SHOWN:
        table.add_row(f"  ... {len(kept) - _KEPT_SHOWN} more", "", "all in --report", "")


_KEPT_SHOWN = 12


def _sparsity_rows(table: Table, summary: dict) -> None:
    table.add_row("[bold]sparsity", "", "", "")
    target = summary.get("target")
    what = "of MACs removed" if summary.get("pattern") == "channels" else "of weights zero"
    table.add_row("pattern / target", "", escape(f"{summary.get('pattern')}, {target:.0%} {what}"
                                                if target is not None else "-"), "")
    if "sparsity" not in summary:  # nothing was kept: the budget line says why
        table.add_row("accuracy budget", "", f"[red]{escape(summary.get('budget', ''))}[/red]", "")
        return
    table.add_row("method", "", escape(summary["method"]), "")
    colour = "green" if summary["budget"] == "held" else "red"
    table.add_row("accuracy budget", "", f"[{colour}]{escape(summary['budget'])}[/{colour}]", "")
    table.add_row("pruned layers", "", f"{summary['layers_pruned']} of {len(summary['layers'])}",
                  f"{summary['sparsity']:.1%} of their weights zero")
    raw, packed = summary["weights_raw_bytes"], summary["weights_zip_bytes"]
    table.add_row("weights, raw", _size(raw[0]), _size(raw[1]), _change(raw[0], raw[1]))
    table.add_row("weights, zip", _size(packed[0]), _size(packed[1]), _change(packed[0], packed[1]))
    if summary.get("macs_dense"):
        dense, removed = summary["macs_dense"], summary["macs_removed"]
        table.add_row("MACs (effective)", _macs(dense), _macs(int(dense * (1 - removed))),
                      _change(dense, dense * (1 - removed), fmt=lambda v: _macs(int(v))))
    verdict = summary.get("verdict") or "-"
    colour = "green" if verdict == "faster" else "yellow"
    table.add_row("verdict", "", f"[{colour}]{escape(verdict)}[/{colour}]",
                  escape(summary.get("note", "")))


def _sparsity_layers(layers: list[dict], limit: int = 20) -> Table:
    """Per layer: weights, nonzero, sparsity, MACs dense and effective (most pruned first)."""
    table = Table(title="sparsity per layer" + (f" (the {limit} most pruned of {len(layers)}; "
                                                "all in --report)" if len(layers) > limit else ""))
    for column in ("layer", "op", "weights", "nonzero", "sparsity", "MACs", "effective",
                   "re-fitted"):
        table.add_column(column, justify="left" if column in ("layer", "op") else "right")
    for row in sorted(layers, key=lambda r: -r["sparsity"])[:limit]:
        table.add_row(escape(row["node"]), row["op_type"], _count(row["weights"]),
                      _count(row["nonzero"]), f"{row['sparsity']:.1%}",
                      _macs(row["macs"]) if row["macs"] is not None else "-",
                      _macs(row["effective_macs"]) if row["effective_macs"] is not None else "-",
                      "yes" if row["reconstructed"] else "")
    return table


def _ops_rows(table: Table, a: ModelStats, b: ModelStats, all_ops: bool) -> None:
    names = sorted(set(a.ops) | set(b.ops))
    shown = [n for n in names if all_ops or a.ops.get(n, 0) != b.ops.get(n, 0)]
    table.add_row("[bold]ops" + ("" if all_ops else " (changed)"), "", "", "")
    for name in shown:
        x, y = a.ops.get(name, 0), b.ops.get(name, 0)
        table.add_row(escape(name), str(x), str(y), _change(x, y, fmt=_count))


def _accuracy_rows(table: Table, verification: Verification | None) -> None:
    table.add_row("[bold]accuracy vs original", "", "", "")
    if verification is None or verification.status == "skipped":
        reason = verification.reason if verification else "verification off (--no-verify)"
        table.add_row("verification", "", f"[yellow]not verified[/yellow]: {escape(reason)}", "")
        return
    colour = "green" if verification.passed else "red"
    table.add_row("verification", f"{verification.batches} batches",
                  f"[{colour}]{verification.status}[/{colour}]", escape(verification.reason))
    for out in verification.outputs:
        name = escape(out.name)
        table.add_row(f"{name}: max abs", "", f"{out.max_abs:.3g}", "")
        table.add_row(f"{name}: cosine", "", f"{out.cosine:.6f}", "")
        sqnr = "exact" if math.isinf(out.sqnr_db) and out.sqnr_db > 0 else f"{out.sqnr_db:.1f} dB"
        table.add_row(f"{name}: SQNR", "", sqnr, escape(out.reason))
        if out.name in verification.floor:
            table.add_row(f"{name}: ORT noise floor", "", f"{verification.floor[out.name]:.3g}",
                          "max abs of ORT's own fusions")


def _latency_rows(table: Table, latency: list[LatencyComparison]) -> None:
    if not latency:
        return
    table.add_row("[bold]latency", "", "", "")
    for row in latency:
        o, n = row.original, row.optimized
        table.add_row(f"{row.ep} p50", f"{o.p50_ms:.3f} ms", f"{n.p50_ms:.3f} ms",
                      _change(o.p50_ms, n.p50_ms, fmt=lambda v: f"{v:.3f} ms"))
        table.add_row(f"{row.ep} p90", f"{o.p90_ms:.3f} ms", f"{n.p90_ms:.3f} ms",
                      _change(o.p90_ms, n.p90_ms, fmt=lambda v: f"{v:.3f} ms"))
        speedup = 1.0 / row.ratio
        colour = "red" if row.is_slower else "green" if row.ratio_high < 1.0 else "default"
        table.add_row(f"{row.ep} speedup", "", f"[{colour}]{speedup:.2f}x[/{colour}]",
                      f"95% CI {1 / row.ratio_high:.2f}-{1 / row.ratio_low:.2f}x, "
                      f"{o.runs} runs each")


def _pass_line(run: PassRun) -> str:
    if run.reverted:
        return f"[red]{run.name:16}[/red] reverted: {escape(run.reason)}"
    counts = ", ".join(f"{v} {k}" for k, v in sorted(run.counts.items()) if k != "refused")
    text = f"[green]{run.name:16}[/green] {counts}" if run.modified else f"{run.name:16} no change"
    refused = [line for line in run.log if line.startswith("kept ")]
    if refused:
        more = f" and {len(refused) - 1} more in the JSON report" if len(refused) > 1 else ""
        text += f"; {len(refused)} refused ({escape(refused[0])}{more})"
    return text


def render_sensitivity(rows: list, path: str, pattern: str, console: Console) -> None:
    """`onnxopt sensitivity`: one row per layer, the worst output's SQNR per sparsity level."""
    levels = sorted({level for row in rows for level in row.sqnr_db})
    what = ("that channel group alone cut" if pattern == "channels" else
            "that layer alone pruned")
    table = Table(title=escape(f"onnxopt sensitivity: {path} ({pattern}; worst output SQNR in "
                               f"dB vs dense, {what})"))
    size = "channels" if pattern == "channels" else "weights"
    for column in ("layer", "op", size, *(f"{level:.0%}" for level in levels)):
        table.add_column(column, justify="left" if column in ("layer", "op") else "right")
    for row in rows:
        cells = []
        for level in levels:
            sqnr, cosine = row.sqnr_db.get(level), row.cosine.get(level)
            if sqnr is None:
                cells.append("-")
                continue
            colour = "green" if cosine >= 0.999 else "yellow" if cosine >= 0.99 else "red"
            text = "exact" if math.isinf(sqnr) else f"{sqnr:.1f}"
            cells.append(f"[{colour}]{text}[/{colour}]")
        table.add_row(escape(row.node), row.op_type, _count(row.weights), *cells)
    console.print(table)
    console.print("green: cosine >= 0.999, yellow: >= 0.99, red: below (the default budget)")
    for row in rows:
        if row.note and not row.note.startswith("channel group"):
            console.print(f"[yellow]note:[/yellow] {escape(row.node)}: {escape(row.note)}")


def render_stats(stats: ModelStats, path: str, console: Console) -> None:
    """`onnxopt inspect`: one model's table."""
    table = Table(title=escape(f"onnxopt inspect: {path}"))
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_column("MACs", justify="right")
    table.add_row("opset / IR", f"{stats.opset} / {stats.ir_version}", "")
    for domain, version in stats.opsets.items():
        if domain not in ("", "ai.onnx"):
            table.add_row(f"opset {domain}", str(version), "")
    table.add_row("nodes", _count(stats.nodes), "")
    table.add_row("parameters", _count(stats.parameters), "")
    table.add_row("weight bytes", _size(stats.weight_bytes), "")
    table.add_row("file size", _size(stats.file_bytes), "")
    table.add_row("inputs", escape("\n".join(map(str, stats.inputs))), "")
    table.add_row("outputs", escape("\n".join(map(str, stats.outputs))), "")
    total = _macs(sum(stats.macs.values())) + (" (partial)" if stats.macs_partial else "")
    table.add_row("[bold]ops", "", total)
    for op, count in sorted(stats.ops.items(), key=lambda kv: -kv[1]):
        macs = stats.macs.get(op)
        table.add_row(escape(op), str(count), _macs(macs) if macs else "")
    console.print(table)


def render_bench(result, console: Console) -> None:
    """`onnxopt bench`: one row per model, provider and batch; errors and fallbacks below."""
    table = Table(title="onnxopt bench: interleaved runs; ratio = p50 / p50 of model #1")
    for column in ("#", "model", "ep", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s",
                   "vs #1 [95% CI]", "peak MB", "nodes by EP"):
        table.add_column(column, justify="left" if column in ("model", "ep") else "right",
                         no_wrap=column in ("vs #1 [95% CI]", "nodes by EP"),
                         min_width=12 if column == "model" else None, overflow="fold")
    notes: list[str] = []
    for number, row in enumerate(result.rows):
        position = number % len(result.models)  # rows come in groups of every model, in order
        label = escape(Path(row.model).name)
        if row.error is not None:
            notes.append(f"{row.ep}: {row.error}")
            continue
        lat = row.latency
        ratio = "-"
        if row.ratio is not None:
            value, low, high = row.ratio
            colour = "green" if high < 1 else "red" if low > 1 else "default"
            ratio = f"[{colour}]{value:.3f}[/{colour}] [{low:.3f}-{high:.3f}]"
        where = row.placement
        table.add_row(
            str(position + 1), label, row.ep, str(row.batch), f"{lat.p50_ms:.3f}",
            f"{lat.p90_ms:.3f}", f"{lat.p99_ms:.3f}", f"{lat.throughput:,.0f}", ratio, "-" if row.memory_mb is None else f"{row.memory_mb:.1f}",
            " + ".join(f"{ep} {n}" for ep, n in sorted(where.nodes.items())) if where else "-",
        )
        if where and where.fallback:
            notes.append(f"#{position + 1} on {row.ep}, batch {row.batch}: {where.summary()}")
        if row.note:  # the provider asked for did not register; the row says what ran
            notes.append(row.note)
        if row.fp32_math:
            notes.append(f"{row.ep}: fp32 math: {row.fp32_math}")
    console.print(table)
    runs = sorted({r.latency.runs for r in result.rows if r.latency})
    if runs:
        console.print(f"{runs[0]}-{runs[-1]} timed runs per model after warm-up "
                      f"({result.options.warmup}); {result.machine.get('processor', '')}, "
                      f"onnxruntime {result.machine.get('onnxruntime', '')}")
    for note in dict.fromkeys(notes):  # one line per distinct message, in order
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


def write_dict_json(data: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2))
    os.replace(tmp, path)
