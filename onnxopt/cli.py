"""The `onnxopt` command line (typer + rich). The only module that writes to the terminal,
together with report.py. Exit codes: 0 ok; 1 a check failed; 2 bad input or usage; 3 internal."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxopt import api, demo, report, verify
from onnxopt.errors import OnnxoptError
from onnxopt.inputs import parse_shape
from onnxopt.passes import DEFAULT_PIPELINE, describe_passes

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="onnxopt: verified ONNX model rewriting, validation and benchmarking.")
stdout = Console()
if not stdout.is_terminal:  # rich assumes 80 columns when piped; the report needs more
    stdout = Console(width=120)
stderr = Console(stderr=True)
_state = {"debug": False, "quiet": False}

ShapeOpt = Annotated[Optional[list[str]], typer.Option(
    "--shape", help="Size of dynamic dims, e.g. --shape image:1,1,64,64 (repeatable).")]
InputsOpt = Annotated[Optional[str], typer.Option(
    "--inputs", help=".npz with one array per input name (a stack of batches is fine).")]
BatchesOpt = Annotated[int, typer.Option(help="Generated input batches for verification.")]
RtolOpt = Annotated[float, typer.Option(help="Relative tolerance for exact rewrites.")]
AtolOpt = Annotated[float, typer.Option(help="Absolute tolerance for exact rewrites.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option(help="Show tracebacks of internal errors.")] = False):
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    return dict(parse_shape(v) for v in values or [])


def _split(text: str | None) -> tuple[str, ...]:
    if not text or text.lower() == "none":
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


@contextlib.contextmanager
def _progress(quiet: bool):
    """A spinner naming the current step, only on a terminal."""
    if quiet or not stdout.is_terminal:
        yield None
        return
    with stdout.status("starting") as status:
        yield lambda step: status.update(f"{step}...")


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help="The .onnx model to optimize (never modified).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Where to write the result.")],
    passes: Annotated[str, typer.Option(help="Comma-separated passes, in order.")] = ",".join(
        DEFAULT_PIPELINE),
    skip: Annotated[str, typer.Option(help="Comma-separated passes to leave out.")] = "",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip verification.")] = False,
    verify_each: Annotated[bool, typer.Option(help="Verify after every pass.")] = False,
    inputs: InputsOpt = None,
    shape: ShapeOpt = None,
    batches: BatchesOpt = 3,
    seed: Annotated[int, typer.Option(help="Seed of generated inputs.")] = 0,
    rtol: RtolOpt = 1e-4,
    atol: AtolOpt = 1e-5,
    bench: Annotated[str, typer.Option(help="Providers to time both models on, or 'none'.")] = "cpu",
    bench_seconds: Annotated[float, typer.Option(help="Timing budget per provider.")] = 2.0,
    allow_slower: Annotated[bool, typer.Option(help="Keep a rewrite even if it runs slower.")] = False,
    report_path: Annotated[Optional[str], typer.Option("--report", help="Write the report as JSON.")] = None,
    all_ops: Annotated[bool, typer.Option(help="List every op type, not only changed ones.")] = False,
    quiet: QuietOpt = False,
):
    """Rewrite MODEL with the pipeline, verify it against the original, time both, save it."""
    options = api.OptimizeOptions(
        passes=_split(passes), skip=_split(skip), verify=not no_verify, verify_each=verify_each,
        inputs=inputs, shapes=_shapes(shape), batches=batches, seed=seed,
        tolerance=verify.Tolerance(rtol, atol), bench=_split(bench), bench_seconds=bench_seconds,
        allow_slower=allow_slower,
    )
    with _progress(quiet) as progress:
        _, result = api.optimize(model, output, options, progress=progress)
    _finish(result, report_path, all_ops)


@app.command("demo")
def demo_command(
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Keep the result here.")] = None,
    bench: Annotated[str, typer.Option(help="Providers to time both models on, or 'none'.")] = "cpu",
    report_path: Annotated[Optional[str], typer.Option("--report", help="Write the report as JSON.")] = None,
    quiet: QuietOpt = False,
):
    """The main job on the embedded default model: optimize, validate, benchmark, report."""
    options = api.OptimizeOptions(bench=_split(bench))
    with _progress(quiet) as progress:
        _, result = demo.run_demo(output, options, progress=progress)
    _finish(result, report_path, all_ops=False)


def _finish(result: report.Report, report_path: str | None, all_ops: bool) -> None:
    report.render(result, stdout, all_ops=all_ops)
    if report_path:
        report.write_json(result, report_path)
    if result.verification is not None and result.verification.status == "failed":
        raise typer.Exit(1)


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="The .onnx model.")],
    shape: ShapeOpt = None,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Also write JSON here.")] = None,
):
    """Op histogram, parameters, size, opset, inputs/outputs and a MAC estimate per op type."""
    stats = api.inspect(model, shapes=_shapes(shape))
    report.render_stats(stats, model, stdout)
    if json_path:
        import dataclasses

        with open(json_path, "w") as handle:
            json.dump(dataclasses.asdict(stats), handle, indent=2)


@app.command()
def validate(
    reference: Annotated[str, typer.Argument(help="The reference model (A).")],
    candidate: Annotated[str, typer.Argument(help="The model to check against it (B).")],
    inputs: InputsOpt = None,
    shape: ShapeOpt = None,
    batches: BatchesOpt = 3,
    rtol: RtolOpt = 1e-4,
    atol: AtolOpt = 1e-5,
):
    """Run A and B on the same inputs and compare every output; exit 1 over tolerance."""
    result = api.validate(reference, candidate, inputs_file=inputs, shapes=_shapes(shape),
                          batches=batches, tolerance=verify.Tolerance(rtol, atol))
    table = Table(title=escape(f"onnxopt validate: {candidate} vs {reference}"))
    for column in ("output", "max abs", "max rel", "cosine", "SQNR dB", "within tolerance"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in result.outputs:
        mark = "[green]yes[/green]" if out.is_close else f"[red]no[/red] {escape(out.reason)}"
        table.add_row(escape(out.name), f"{out.max_abs:.3g}", f"{out.max_rel:.3g}", f"{out.cosine:.6f}",
                      f"{out.sqnr_db:.1f}", mark)
    stdout.print(table)
    stdout.print(f"{result.status} on {result.batches} batches (rtol {rtol}, atol {atol})"
                 + (f": {escape(result.reason)}" if result.reason else ""))
    if not result.passed:
        raise typer.Exit(1)


@app.command("passes")
def list_passes():
    """List every pass with a one-line description."""
    table = Table(title="onnxopt passes")
    for column in ("pass", "kind", "default", "what it does"):
        table.add_column(column)
    for name, is_lossy, text in describe_passes():
        table.add_row(name, "lossy" if is_lossy else "exact",
                      "yes" if name in DEFAULT_PIPELINE else "", text)
    stdout.print(table)


def main() -> None:
    """Console entry point: one line per error, never a traceback unless --debug."""
    try:
        # Outside standalone mode typer returns the exit code of typer.Exit instead of exiting.
        code = app(standalone_mode=False)
    except OnnxoptError as error:
        stderr.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        stderr.print("aborted")
        sys.exit(130)
    except typer.TyperException as error:  # usage errors (click's, bundled inside typer)
        if hasattr(error, "show"):
            error.show()
        sys.exit(getattr(error, "exit_code", 2))
    except Exception as error:  # our own bugs
        if _state["debug"]:
            raise
        stderr.print(f"[red]internal error:[/red] {type(error).__name__}: {escape(str(error))}; "
                     "rerun with --debug for the traceback", highlight=False, soft_wrap=True)
        sys.exit(3)
    sys.exit(code if isinstance(code, int) else 0)
