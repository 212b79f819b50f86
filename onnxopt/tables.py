"""The tables of `onnxopt validate` and `onnxopt transfer` (report.py renders optimize's)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["render_validation", "render_transfer"]


def render_validation(comparisons: list, reference: str, console: Console) -> None:
    """`onnxopt validate`: one row per output and provider, then one line per comparison."""
    table = Table(title=escape(f"onnxopt validate: against {reference} on {comparisons[0].reference_ep}"))
    for column in ("model", "ep", "output", "max abs", "max rel", "cosine", "SQNR dB", "top-1",
                   "top-5", "within tolerance"):
        table.add_column(column, justify="left" if column in ("model", "ep", "output") else "right")
    for item in comparisons:
        result, label = item.verification, escape(Path(item.candidate).name)
        if not result.outputs and result.status == "failed":
            table.add_row(label, item.ep, "-", "", "", "", "", "", "",
                          f"[red]no[/red] {escape(result.reason)}")
        for out in result.outputs:
            mark = "[green]yes[/green]" if out.is_close else f"[red]no[/red] {escape(out.reason)}"
            table.add_row(label, item.ep, escape(out.name), f"{out.max_abs:.3g}",
                          f"{out.max_rel:.3g}", f"{out.cosine:.6f}", f"{out.sqnr_db:.1f}",
                          _share(out.top1), _share(out.top5), mark)
    console.print(table)
    for item in comparisons:
        name, result, tol = escape(Path(item.candidate).name), item.verification, item.tolerance
        if result.status == "skipped":
            console.print(f"[yellow]{name} on {item.ep}: skipped[/yellow]: {escape(result.reason)}")
            continue
        bound = (f"rtol {tol.rtol:g}, atol {tol.atol:g}" if tol.elementwise else "no elementwise bound")
        bound += f", cosine >= {tol.min_cosine:g}" if tol.min_cosine else ""
        console.print(f"{name} on {item.ep}: {result.status} on {result.batches} batches "
                     f"({item.precision} tolerance: {bound})")
    for note in dict.fromkeys(n for item in comparisons for n in item.notes):  # once each
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_transfer(result, console: Console) -> None:
    """`onnxopt transfer`: every DST tensor and where its weights came from, then the summary."""
    table = Table(title=escape(f"onnxopt transfer: {result.source} -> {result.destination} -> "
                               f"{result.output or '(not saved)'}"))
    for column in ("DST tensor", "SRC tensor", "rule", "shape"):
        table.add_column(column, overflow="fold")
    for row in result.transferred:
        rule = row.rule + (f" ({row.transform})" if row.transform else "")
        table.add_row(escape(row.name), escape(row.src), rule, "x".join(map(str, row.shape)))
    for row in result.refused:
        table.add_row(escape(row.name), f"[red]refused[/red]: {escape(row.reason)}", "",
                      "x".join(map(str, row.shape)))
    for row in result.unmatched_dst:
        table.add_row(escape(row.name), "[yellow]unmatched[/yellow]", "",
                      "x".join(map(str, row.shape)))
    console.print(table)
    from onnxopt.transfer import summary_lines

    for line in summary_lines(result):
        console.print(escape(line))
    if result.unmatched_src:
        names = ", ".join(t.name for t in result.unmatched_src[:8])
        more = f" and {len(result.unmatched_src) - 8} more" if len(result.unmatched_src) > 8 else ""
        console.print(escape(f"unused in SRC: {names}{more}"))
    if result.outside_only:
        console.print(escape(f"{result.outside_only} DST tensors outside --only {result.only!r}"))
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
