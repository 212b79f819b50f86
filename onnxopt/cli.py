"""The `onnxopt` command line (typer + rich). The only module that writes to the terminal,
together with report.py. Exit codes: 0 ok; 1 a check failed; 2 bad input or usage; 3 internal."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import traceback
import warnings
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxopt import api, demo, report, tables
from onnxopt.errors import BadInputError, OnnxoptError
from onnxopt.inputs import parse_shape
from onnxopt.measure import bench_models, verify
from onnxopt.measure import validation as validate_mod
from onnxopt.passes import DEFAULT_PIPELINE, describe_passes
from onnxopt.precision import half
from onnxopt.quant import int8
from onnxopt.sparsity.options import SparsityOptions
from onnxopt.sparsity.sensitivity import LEVELS as sensitivity_levels

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="onnxopt: verified ONNX model rewriting, validation and benchmarking.")
stdout = Console()
if not stdout.is_terminal:  # rich assumes 80 columns when piped; the report needs more
    stdout = Console(width=120)
stderr = Console(stderr=True)
_state = {"debug": False, "quiet": False}

ShapeOpt = Annotated[list[str] | None, typer.Option(
    "--shape", help="Size of dynamic dims, e.g. --shape image:1,1,64,64 (repeatable).")]
InputsOpt = Annotated[str | None, typer.Option(
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
    if not debug:  # the libraries' own warnings are for their developers, not our users
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)


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
    bench: Annotated[str | None, typer.Option(
        help="Providers to time both models on, or 'none' (default: cpu; cuda with --fp16/--bf16).")
    ] = None,
    bench_seconds: Annotated[float, typer.Option(help="Timing budget per provider.")] = 2.0,
    allow_slower: Annotated[bool, typer.Option(help="Keep a rewrite even if it runs slower.")] = False,
    report_path: Annotated[str | None, typer.Option("--report", help="Write the report as JSON.")] = None,
    plot: Annotated[str | None, typer.Option(help="Draw latency and op changes to a PNG.")] = None,
    all_ops: Annotated[bool, typer.Option(help="List every op type, not only changed ones.")] = False,
    int8_flag: Annotated[bool, typer.Option(
        "--int8", help="int8: static QDQ with --calib, dynamic MatMul/Gemm without.")] = False,
    calib: Annotated[str | None, typer.Option(
        help="Calibration data: .npz, folder of .npy/.npz/images, or 'random'.")] = None,
    calib_method: Annotated[str, typer.Option(help="minmax, percentile, entropy or mse.")] = "minmax",
    calib_samples: Annotated[int | None, typer.Option(help="Use at most N samples.")] = None,
    preprocess: Annotated[str | None, typer.Option(
        help="For image folders: size=224,mean=0.485/0.456/0.406,std=...,layout=NCHW")] = None,
    max_error: Annotated[str | None, typer.Option(
        help="Lossy budget per output: cosine>=0.99, sqnr>=30, or none (default: cosine>=0.99; "
             "cosine>=0.999 for --fp16/--bf16).")
    ] = None,
    quant_mode: Annotated[str, typer.Option(
        help="auto (static with --calib, else dynamic), static or dynamic.")] = "auto",
    target: Annotated[str | None, typer.Option(
        help="Where the model runs: ort-cpu, ort-cuda or tensorrt (default: ort-cpu for --int8, "
             "ort-cuda for --fp16/--bf16).")] = None,
    clip_weights: Annotated[str, typer.Option(
        help="int8 weight range per channel: max, mse or percentile.")] = "max",
    bias_correction: Annotated[bool | None, typer.Option(
        "--bias-correction/--no-bias-correction",
        help="Correct int8 mean output shifts (default: kept where it helps).")] = None,
    equalize: Annotated[bool, typer.Option(
        help="Cross-layer equalization of Conv -> Relu -> Conv before int8.")] = True,
    smooth: Annotated[bool | None, typer.Option(
        "--smooth/--no-smooth",
        help="SmoothQuant before dynamic int8 (default: kept where it helps).")] = None,
    split_outliers: Annotated[bool | None, typer.Option(
        "--split-outliers/--no-split-outliers",
        help="Dynamic int8: a MatMul's few outlier input channels in float "
             "(default: kept where it helps).")] = None,
    keep_float: Annotated[str | None, typer.Option(
        help="int8/half: node names to keep float, comma-separated regular expressions.")] = None,
    fp16: Annotated[bool, typer.Option(
        "--fp16", help="Half precision (float16) where data, provider and budget allow.")] = False,
    bf16: Annotated[bool, typer.Option(
        "--bf16", help="bfloat16 instead: float32's range, fewer mantissa bits.")] = False,
    keep_io_types: Annotated[bool, typer.Option(
        help="--fp16/--bf16: model inputs and outputs stay float32.")] = True,
    transfer_from: Annotated[str | None, typer.Option(
        help="First copy the trained weights of this model in (see `onnxopt transfer`).")] = None,
    sparsity: Annotated[float | None, typer.Option(
        help="Prune: share of weights zero (unstructured), or of MACs removed (channels).")
    ] = None,
    sparsity_pattern: Annotated[str | None, typer.Option(
        help="unstructured (default), N:M such as 2:4, or channels (physically removed).")
    ] = None,
    sparsity_scope: Annotated[str, typer.Option(
        help="Unstructured: the same share per layer, or one global threshold.")] = "layer",
    sparsity_skip: Annotated[str | None, typer.Option(
        help="Node names to keep dense, comma-separated regular expressions.")] = None,
    sparsity_keep_ends: Annotated[bool, typer.Option(
        help="Keep the first and last layers dense.")] = True,
    reconstruct: Annotated[bool | None, typer.Option(
        "--reconstruct/--no-reconstruct",
        help="Re-fit pruned layers from --calib (default: on with --calib).")] = None,
    importance: Annotated[str, typer.Option(
        help="Channels: rank by weight norm (l2, l1) or calibrated activations "
             "(auto: activation with --calib).")] = "auto",
    quiet: QuietOpt = False,
):
    """Rewrite MODEL with the pipeline, verify it against the original, time both, save it."""
    if fp16 and bf16:
        raise BadInputError("--fp16 and --bf16 together: choose one")
    half_options = None
    if fp16 or bf16:
        half_target = target or "ort-cuda"
        if half_target not in half.TARGETS:
            raise BadInputError(f"--target {half_target!r}: expected one of "
                                f"{', '.join(half.TARGETS)}")
        half_options = half.HalfOptions(
            "float16" if fp16 else "bfloat16", half_target, keep_io_types,
            int8.parse_budget(max_error or "cosine>=0.999"), keep_float,
            check_speed=not allow_slower)
        bench = bench if bench is not None else ("cpu" if half_target == "ort-cpu" else "cuda")
    int8_options = None
    if int8_flag:
        int8_options = int8.Int8Options(calib, calib_method, calib_samples, preprocess,
                                        int8.parse_budget(max_error or "cosine>=0.99"),
                                        _shapes(shape),
                                        check_speed=not allow_slower, mode=quant_mode,
                                        target=target or "ort-cpu", clip_weights=clip_weights,
                                        bias_correction=bias_correction, equalize=equalize,
                                        keep_float=keep_float, smooth=smooth,
                                        split_outliers=split_outliers)
    sparsity_options = None
    if sparsity is not None or sparsity_pattern is not None:
        sparsity_options = SparsityOptions(
            sparsity, sparsity_pattern or "unstructured", sparsity_scope,
            _split(sparsity_skip), sparsity_keep_ends, calib, calib_samples, preprocess,
            _shapes(shape), int8.parse_budget(max_error or "cosine>=0.99"), reconstruct,
            importance)
        sparsity_options.check()
    options = api.OptimizeOptions(
        passes=_split(passes), skip=_split(skip), verify=not no_verify, verify_each=verify_each,
        inputs=inputs, shapes=_shapes(shape), batches=batches, seed=seed,
        tolerance=verify.Tolerance(rtol, atol), bench=_split(bench or "cpu"),
        bench_seconds=bench_seconds, allow_slower=allow_slower, int8=int8_options,
        transfer_from=transfer_from, sparsity=sparsity_options, half=half_options,
    )
    with _progress(quiet) as progress:
        _, result = api.optimize(model, output, options, progress=progress)
    _finish(result, report_path, plot, all_ops)


@app.command("demo")
def demo_command(
    output: Annotated[str | None, typer.Option("--output", "-o", help="Keep the result here.")] = None,
    bench: Annotated[str | None, typer.Option(
        help="Providers to time both models on, or 'none' (default: cpu; cuda with --fp16/--bf16).")
    ] = None,
    report_path: Annotated[str | None, typer.Option("--report", help="Write the report as JSON.")] = None,
    plot: Annotated[str | None, typer.Option(help="Draw latency and op changes to a PNG.")] = None,
    int8_flag: Annotated[bool, typer.Option(
        "--int8", help="Also quantize to int8, calibrated on the bundled digits.")] = False,
    sparsity_flag: Annotated[bool, typer.Option(
        "--sparsity", help="Also prune 25% of the MACs as whole channels, re-fitted on the "
                           "bundled digits.")] = False,
    quiet: QuietOpt = False,
):
    """The main job on the embedded default model: optimize, validate, benchmark, report."""
    options = api.OptimizeOptions(bench=_split(bench))
    with _progress(quiet) as progress:
        _, result = demo.run_demo(output, options, progress=progress, int8=int8_flag,
                                  sparsity=sparsity_flag)
    _finish(result, report_path, plot, all_ops=False)


def _finish(result: report.Report, report_path: str | None, plot: str | None,
            all_ops: bool) -> None:
    report.render(result, stdout, all_ops=all_ops)
    if report_path:
        report.write_json(result, report_path)
    if plot:
        from onnxopt import plot as plot_mod  # matplotlib only when asked

        plot_mod.plot_report(result, plot)
    # An int8 budget that was missed keeps the float model on purpose (status "skipped"):
    # that is the best model found, not a failed check.
    if result.verification is not None and result.verification.status == "failed":
        raise typer.Exit(1)


@app.command("sensitivity")
def sensitivity_command(
    model: Annotated[str, typer.Argument(help="The .onnx model (the exact pipeline runs first).")],
    calib: Annotated[str, typer.Option(
        help="Calibration data: .npz, folder of .npy/.npz/images, or 'random'.")],
    pattern: Annotated[str, typer.Option(help="unstructured or N:M (e.g. 2:4).")] = "unstructured",
    levels: Annotated[str, typer.Option(help="Sparsity levels, comma-separated.")] = ",".join(
        f"{level:g}" for level in sensitivity_levels),
    skip: Annotated[str | None, typer.Option(
        help="Node names to leave out, comma-separated regular expressions.")] = None,
    batches: Annotated[int, typer.Option(help="Calibration batches per trial.")] = 4,
    calib_samples: Annotated[int | None, typer.Option(help="Use at most N samples.")] = None,
    preprocess: Annotated[str | None, typer.Option(help="For image folders (see optimize).")] = None,
    shape: ShapeOpt = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Write results as JSON.")] = None,
    quiet: QuietOpt = False,
):
    """Per layer: the model's output error with that layer alone pruned at each sparsity."""
    try:
        chosen = tuple(float(v) for v in _split(levels))
    except ValueError:
        raise BadInputError(f"--levels {levels!r}: expected numbers such as 0.1,0.5,0.9") from None
    if not chosen or any(not 0.0 < v < 1.0 for v in chosen):
        raise BadInputError(f"--levels {levels!r}: expected shares between 0 and 1")
    with _progress(quiet) as progress:
        def tick(done: int, total: int) -> None:
            if progress is not None:
                progress(f"layer {done} of {total}")

        rows = api.sensitivity(model, calib, pattern=pattern, levels=chosen, skip=_split(skip),
                               batches=batches, calib_samples=calib_samples,
                               preprocess=preprocess, shapes=_shapes(shape), progress=tick)
    report.render_sensitivity(rows, model, pattern, stdout)
    if json_path:
        report.write_dict_json({"schema": "onnxopt.sensitivity/1", "model": model,
                                "pattern": pattern,
                                "layers": [dataclasses.asdict(r) for r in rows]}, json_path)


@app.command("bench")
def bench_command(
    models: Annotated[list[str], typer.Argument(help="Models to time; ratios are vs the first.")],
    ep: Annotated[str, typer.Option(help="Providers, comma-separated: cpu,cuda,tensorrt.")] = "cpu",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    threads: Annotated[int, typer.Option(help="Intra-op threads (0: ORT's default).")] = 0,
    warmup: Annotated[str, typer.Option(help="'auto' (until steady) or a run count.")] = "auto",
    runs: Annotated[int | None, typer.Option(help="Timed rounds (instead of --time).")] = None,
    seconds: Annotated[float, typer.Option("--time", help="Seconds per provider and batch.")] = 5.0,
    inputs: InputsOpt = None,
    shape: ShapeOpt = None,
    cuda_graph: Annotated[bool, typer.Option(help="CUDA: replay a CUDA graph.")] = False,
    tf32: Annotated[bool | None, typer.Option(
        "--tf32/--no-tf32", help="CUDA: fp32 Conv/MatMul in TF32 (ORT's default: on) or exact.",
        show_default=False)] = None,
    placement: Annotated[bool, typer.Option(help="Profile which provider ran each node.")] = True,
    json_path: Annotated[str | None, typer.Option("--json", help="Write results as JSON.")] = None,
    plot: Annotated[str | None, typer.Option(help="Draw latency distributions to a PNG.")] = None,
    quiet: QuietOpt = False,
):
    """Time models side by side (interleaved) on each provider and batch size."""
    if warmup != "auto" and not warmup.isdigit():
        raise BadInputError(f"--warmup {warmup!r}: expected 'auto' or a run count")
    options = bench_models.BenchOptions(
        eps=_split(ep), batches=tuple(_positive_ints("--batch", batch)), threads=threads,
        warmup=warmup if warmup == "auto" else int(warmup), runs=runs, seconds=seconds,
        inputs=inputs, shapes=_shapes(shape), cuda_graph=cuda_graph, placement=placement,
        tf32=tf32,
    )
    with _progress(quiet) as progress:
        result = bench_models.bench_models(models, options, progress=progress)
    if all(row.error is not None for row in result.rows):
        raise BadInputError(result.rows[0].error)
    report.render_bench(result, stdout)
    if json_path:
        report.write_dict_json(result.as_dict(), json_path)
    if plot:
        from onnxopt import plot as plot_mod

        plot_mod.plot_bench(result, plot)


def _positive_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in _split(text)]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise BadInputError(f"{flag} {text!r}: expected positive integers, comma-separated")
    return values


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="The .onnx model.")],
    shape: ShapeOpt = None,
    json_path: Annotated[str | None, typer.Option("--json", help="Also write JSON here.")] = None,
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
    candidate: Annotated[str | None, typer.Argument(
        help="The model to check against A; omit it to compare A across --ep providers.")] = None,
    ep: Annotated[str, typer.Option(help="Providers: A runs on the first, candidates on all.")] = "cpu",
    inputs: InputsOpt = None,
    shape: ShapeOpt = None,
    batches: BatchesOpt = 3,
    rtol: Annotated[float | None, typer.Option(help="Relative tolerance (default: by dtype).")] = None,
    atol: Annotated[float | None, typer.Option(help="Absolute tolerance (default: by dtype).")] = None,
    ort_optimize: Annotated[bool, typer.Option(
        help="Run candidates with ORT's graph optimizations on (the reference never).")] = False,
):
    """Compare every output of B (or of A on other providers) with A; exit 1 over tolerance."""
    tolerance = None
    if rtol is not None or atol is not None:
        tolerance = verify.Tolerance(rtol if rtol is not None else 1e-4,
                                     atol if atol is not None else 1e-5)
    comparisons = validate_mod.validate_providers(
        reference, candidate, eps=_split(ep), inputs_file=inputs, shapes=_shapes(shape),
        batches=batches, tolerance=tolerance, ort_optimize=ort_optimize)
    tables.render_validation(comparisons, reference, stdout)
    statuses = {item.verification.status for item in comparisons}
    if "failed" in statuses:
        raise typer.Exit(1)
    if "skipped" in statuses:  # a provider asked for is not installed: bad input, said above
        raise typer.Exit(2)


@app.command("passes")
def list_passes():
    """List every pass with a one-line description."""
    table = Table(title="onnxopt passes")
    for column in ("pass", "kind", "default", "what it does"):
        table.add_column(column)
    for name, is_lossy, text in describe_passes(api.REGISTRY):
        table.add_row(name, "lossy" if is_lossy else "exact",
                      "yes" if name in DEFAULT_PIPELINE else "", text)
    stdout.print(table)


@app.command("transfer")
def transfer_command(
    source: Annotated[str, typer.Argument(help="SRC: the model with the trained weights.")],
    destination: Annotated[str, typer.Argument(help="DST: the graph to fill (never modified).")],
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Where to write DST with SRC's weights.")] = None,
    match: Annotated[str, typer.Option(
        help="auto (name, normalized name, structure), name, normalized or structure.")] = "auto",
    only: Annotated[str | None, typer.Option(
        help="Regex: only DST tensors whose name (or matched SRC name) matches.")] = None,
    map_path: Annotated[str | None, typer.Option(
        "--map", help="JSON {dst_tensor: src_tensor}: settles ambiguous or unmatched tensors.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the report, write nothing.")] = False,
    report_path: Annotated[str | None, typer.Option("--report", help="Write the report as JSON.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Do not run SRC and OUT.")] = False,
    inputs: InputsOpt = None,
    shape: ShapeOpt = None,
    batches: BatchesOpt = 2,
    rtol: RtolOpt = 1e-4,
    atol: AtolOpt = 1e-5,
):
    """Copy SRC's trained weights into DST (re-export, new exporter, new head, folded BN)."""
    from onnxopt import transfer

    if output is None and not dry_run:
        raise BadInputError("transfer: give -o OUT.onnx, or --dry-run to only see the matching")
    options = transfer.TransferOptions(
        match=match, only=only, mapping=transfer.load_map(map_path) if map_path else {},
        verify=not no_verify, inputs=inputs, shapes=_shapes(shape), batches=batches,
        tolerance=verify.Tolerance(rtol, atol))
    _, result = transfer.transfer(source, destination, None if dry_run else output, options)
    tables.render_transfer(result, stdout)
    if report_path:
        report.write_dict_json(result.as_dict(), report_path)
    checked = result.verification
    if result.expects_same_outputs and checked is not None and checked.status == "failed":
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: one line per error, never a traceback unless --debug."""
    # numpy's RuntimeWarnings (overflow, NaN from a damaged weight) would add unexplained lines
    # to the output; what matters of them reaches the report as numbers (NaN, SQNR, refusals).
    warnings.filterwarnings("ignore", category=RuntimeWarning)
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
        if _state["debug"]:  # the traceback, and still exit 3 (Python's own would be 1)
            traceback.print_exc()
            sys.exit(3)
        stderr.print(f"[red]internal error:[/red] {type(error).__name__}: {escape(str(error))}; "
                     "rerun with --debug for the traceback", highlight=False, soft_wrap=True)
        sys.exit(3)
    sys.exit(code if isinstance(code, int) else 0)
