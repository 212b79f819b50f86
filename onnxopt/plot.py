"""PNG plots of latency distributions and structure changes (matplotlib, the `plot` extra).

Box plots, not bars of a mean: on a shared machine the spread and the outliers are the story.
Files are written atomically like every other output.
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxopt.errors import BadInputError

__all__ = ["plot_bench", "plot_report"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInputError("--plot needs matplotlib: pip install 'onnxopt[plot]'") from None
    return plt


def _save(figure, path: str | os.PathLike) -> None:
    path = Path(path)
    if not path.parent.is_dir():
        raise BadInputError(f"{path}: the folder {str(path.parent)!r} does not exist")
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_bench(result, path: str | os.PathLike) -> None:
    """One panel per (provider, batch), its own scale; one box per model, p50 written above."""
    plt = _pyplot()
    groups: dict[tuple[str, int], list] = {}
    for number, row in enumerate(result.rows):
        if row.latency is not None:
            label = f"#{number % len(result.models) + 1} {Path(row.model).stem}"
            groups.setdefault((row.ep, row.batch), []).append((label, row.latency))
    if not groups:
        raise BadInputError("--plot: no model ran, nothing to draw")
    width = sum(max(2.5, 1.3 * len(rows)) for rows in groups.values())
    figure, axes = plt.subplots(1, len(groups), figsize=(max(5.0, width), 4.5), squeeze=False)
    for axis, ((ep, batch), rows) in zip(axes[0], groups.items()):
        axis.boxplot([lat.times_ms for _, lat in rows], showfliers=True)
        axis.set_xticks(range(1, len(rows) + 1), [label for label, _ in rows], fontsize=8,
                        rotation=15)
        for i, (_, lat) in enumerate(rows, start=1):
            axis.annotate(f"p50 {lat.p50_ms:.3g} ms", (i, lat.p90_ms), fontsize=7, ha="center",
                          xytext=(0, 4), textcoords="offset points")
        axis.set_title(f"{ep}, batch {batch}", fontsize=10)
        axis.set_ylabel("latency per run (ms)")
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("onnxopt bench: latency distributions (interleaved runs)")
    _save(figure, path)
    plt.close(figure)


def plot_report(report, path: str | os.PathLike) -> None:
    """Left: latency of original vs optimized per provider. Right: op counts that changed.
    With --sparsity, a third panel: each layer's share of zero (removed) weights."""
    plt = _pyplot()
    layers = (report.sparsity or {}).get("layers") or []
    panels = 3 if layers else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5))
    left, right = axes[0], axes[1]
    if layers:
        _sparsity_panel(axes[2], layers, report.sparsity)
    if report.latency:
        data, labels = [], []
        for row in report.latency:
            data += [row.original.times_ms, row.optimized.times_ms]
            labels += [f"original\n{row.ep}", f"optimized\n{row.ep}"]
        left.boxplot(data, showfliers=True)
        left.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
        left.set_ylabel("latency per run (ms)")
        left.grid(axis="y", alpha=0.3)
    else:
        left.text(0.5, 0.5, "not timed (--bench none)", ha="center", va="center")
        left.set_axis_off()
    left.set_title("latency")
    a, b = report.original.ops, report.optimized.ops
    changed = sorted(op for op in set(a) | set(b) if a.get(op, 0) != b.get(op, 0))
    if changed:
        positions = range(len(changed))
        right.barh([p - 0.2 for p in positions], [a.get(op, 0) for op in changed], 0.4,
                   label="original")
        right.barh([p + 0.2 for p in positions], [b.get(op, 0) for op in changed], 0.4,
                   label="optimized")
        right.set_yticks(list(positions), changed, fontsize=8)
        right.legend()
        right.set_xlabel("nodes")
    else:
        right.text(0.5, 0.5, "no op count changed", ha="center", va="center")
        right.set_axis_off()
    right.set_title(f"structure: {report.original.nodes} -> {report.optimized.nodes} nodes")
    _save(figure, path)
    plt.close(figure)


def _sparsity_panel(axis, layers: list[dict], summary: dict) -> None:
    """One bar per prunable layer (graph order): its share of zero or removed weights."""
    shares = [row["sparsity"] for row in layers]
    colours = ["tab:green" if row["reconstructed"] else "tab:blue" for row in layers]
    axis.bar(range(len(shares)), shares, color=colours)
    axis.set_ylim(0, 1)
    axis.set_xlabel("layer (graph order; green: re-fitted)")
    axis.set_ylabel("share of weights zero or removed")
    axis.set_title(f"sparsity: {summary['pattern']}, {summary['sparsity']:.1%} "
                   f"({summary.get('verdict') or '-'})")
    axis.grid(axis="y", alpha=0.3)
