"""ONNX Runtime sessions: one place that imports onnxruntime, picks providers and runs models."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import io
from onnxopt.errors import BadInputError, OnnxoptError, first_line

__all__ = ["onnxruntime", "make_session", "provider_options", "ran_on", "fallback_note",
           "fp32_math", "run", "runner", "model_file", "model_session", "PROVIDERS",
           "RuntimeFailure"]

logger = logging.getLogger(__name__)

# CLI short names -> ORT provider names, and the pip package that brings each one.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxopt[cpu] (onnxruntime)"),
    "cuda": ("CUDAExecutionProvider", "onnxopt[gpu] (onnxruntime-gpu) and a CUDA GPU"),
    "tensorrt": ("TensorrtExecutionProvider", "onnxruntime-gpu built with TensorRT, and TensorRT"),
}
# Models whose serialized size passes this go to ORT through a temporary file, not bytes.
_BYTES_LIMIT = 1 << 30
_TRIM_BYTES = 1 << 26  # sessions of models over this hand their freed memory back


class RuntimeFailure(OnnxoptError):
    """ONNX Runtime could not load or run a model (an op it lacks, a shape error...)."""

    exit_code = 2


def onnxruntime():
    """The onnxruntime module, or a one-line error naming the extra that installs it."""
    installed = _runtime_distributions()
    if len(installed) > 1:
        raise BadInputError(
            f"both {' and '.join(installed)} are installed; they share one module and break each "
            "other: pip uninstall -y onnxruntime onnxruntime-gpu, then install one extra"
        )
    try:
        import onnxruntime as ort
    except ImportError:
        raise BadInputError(
            "onnxruntime is not installed: pip install 'onnxopt[cpu]' "
            "(or 'onnxopt[gpu]' for CUDA; never both)"
        ) from None
    # ORT's default logger prints multi-line errors (a session that fails to initialise, an EP
    # that fails to register) on stderr; we report each as one line from the exception instead.
    ort.set_default_logger_severity(4)
    return ort


def make_session(
    model: str | os.PathLike | bytes,
    *,
    ep: str = "cpu",
    optimize: bool = True,
    threads: int = 0,
    cuda_graph: bool = False,
    profile_prefix: str | None = None,
    prepack: bool = True,
    tf32: bool | None = None,
    save_optimized: str | None = None,
):
    """An InferenceSession with intra-op spinning off (spinning threads distort shared machines).

    `prepack=False` for a session that runs a few batches (verification): ORT otherwise repacks
    every MatMul/Conv weight into its kernels' layout when the session is made, which on a 2.4 GB
    MLP takes 6 s against 0.3 s of unpacked runs per batch, and memory for the packed copies.

    `tf32`: see provider_options; sessions whose outputs are compared pass False.

    `save_optimized`: a path where ORT writes the graph it runs, after its optimizations, with
    the weights in a side file beside it (reading the graph back then costs no copy of them).

    A GPU provider gets CPU as its fallback, as ORT itself would; which nodes fell back is for
    `placement.node_placement` to find out, not to guess. A provider that did not register
    (ORT goes on without it) is not taken for the one that ran: see ran_on."""
    ort = onnxruntime()
    providers = provider_options(ep, cuda_graph=cuda_graph, tf32=tf32)
    name, package = PROVIDERS[ep]
    if name not in ort.get_available_providers():
        raise BadInputError(f"execution provider {ep!r} is not available: install {package}")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: failures reach the user as one line (below)
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
        # A few runs to compare outputs: every tensor is freed when done instead of growing an
        # arena (which kept 2.4 GB more per run of a 2.4 GB MLP's emulated half model, ORT
        # 1.32), and nodes run in priority order rather than all weight-only nodes first (that
        # run's peak: 3.6 GB -> 1.4 GB, the half weights plus one widened weight).
        options.enable_cpu_mem_arena = False
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if save_optimized:
        options.optimized_model_filepath = save_optimized
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name",
            Path(save_optimized).name + ".data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if isinstance(model, os.PathLike):
        model = str(model)
    if ep == "cpu":
        return _labelled(_inference_session(ort, model, options, providers), ep, "")
    return _gpu_session(ort, model, options, providers, ep)


def provider_options(ep: str, *, cuda_graph: bool = False, tf32: bool | None = None) -> list:
    """ORT's `providers` argument for `ep`: the provider, then its fallbacks as ORT chains them
    (TensorRT -> CUDA -> CPU), each a name or (name, options).

    `tf32` sets CUDA's `use_tf32` (also on TensorRT's CUDA fallback). ORT turns it on by default:
    fp32 Conv/MatMul then round their inputs to TF32's 10-bit mantissa, which on an H200 put CUDA
    at 33-80 dB SQNR from CPU on correct fp32 models, against 119-132 dB with it off. None keeps
    ORT's default (timing); False for sessions whose numbers are compared."""
    if ep not in PROVIDERS:
        raise BadInputError(f"unknown execution provider {ep!r}; choose from "
                            f"{', '.join(PROVIDERS)}")
    cpu, cuda = PROVIDERS["cpu"][0], PROVIDERS["cuda"][0]
    if ep == "cpu":
        return [cpu]
    settings = {"enable_cuda_graph": "1"} if ep == "cuda" and cuda_graph else {}
    if tf32 is not None:
        settings["use_tf32"] = "1" if tf32 else "0"
    cuda_entry = (cuda, settings) if settings else cuda
    if ep == "tensorrt":
        return [PROVIDERS["tensorrt"][0], cuda_entry, cpu]
    return [cuda_entry, cpu]


def fp32_math(ep: str, tf32: bool | None) -> str | None:
    """How a session on `ep` made with `tf32` computes fp32 Conv/MatMul; None on the CPU."""
    if ep == "cuda":
        return "exact fp32" if tf32 is False else "TF32" if tf32 else "TF32 (ORT default)"
    if ep == "tensorrt":  # ORT has no option for TensorRT's own TF32 builder flag, on by default
        fallback = "exact fp32" if tf32 is False else "TF32"
        return f"TF32 (TensorRT default); CUDA fallback: {fallback}"
    return None


def ran_on(session, ep: str) -> tuple[str, str]:
    """(the provider that runs `session`, a one-line note when it is not `ep`, else "").
    A session not made by make_session is taken at its word."""
    return getattr(session, "onnxopt_ep", ep), getattr(session, "onnxopt_note", "")


_CANNOT_LOAD = "ONNX Runtime cannot load the model: "


def _inference_session(ort, model, options, providers):
    try:
        # enable_fallback=0: on an EP error ORT's Python wrapper would print a multi-line banner
        # to stdout and retry without our provider options (use_tf32 lost); _gpu_session retries.
        return ort.InferenceSession(model, options, providers=providers, enable_fallback=0)
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise RuntimeFailure(_CANNOT_LOAD + first_line(error)) from None


def _gpu_session(ort, model, options, providers: list, ep: str):
    """A session on a GPU provider with ORT's own text about it kept off the terminal, labelled
    with the provider that really runs it (see ran_on). ORT goes on silently without a provider
    that does not register (TensorRT without libnvinfer, CUDA without cuDNN), so the session's
    own provider list is the evidence; a TensorRT session that fails outright is retried on
    CUDA, as ORT's wrapper would."""
    captured: list[str] = []
    failure = ""
    with _stderr_fd_captured(ort, captured):
        try:
            session = _inference_session(ort, model, options, providers)
        except RuntimeFailure as error:
            if ep != "tensorrt":
                raise
            failure = str(error).removeprefix(_CANNOT_LOAD)
            session = _inference_session(ort, model, options, providers[1:])
    text = "\n".join([*captured, failure]).strip()
    if text:
        logger.debug("ONNX Runtime while creating a %s session:\n%s", ep, text)
    registered = session.get_providers()
    if PROVIDERS[ep][0] in registered:
        return _labelled(session, ep, "")
    ran = _SHORT_NAMES.get(registered[0], registered[0]) if registered else "cpu"
    what = "failed" if failure else "did not register"
    return _labelled(session, ran, f"{ep} {what} ({fallback_note(text)}); ran on {ran}")


_SHORT_NAMES = {name: short for short, (name, _) in PROVIDERS.items()}
# "Failed to load library libonnxruntime_providers_tensorrt.so with error: libnvinfer.so.10:
# cannot open shared object file: No such file or directory": the library that is missing.
_MISSING_LIBRARY = re.compile(r"([\w.+-]+\.(?:so|dll|dylib)[\w.]*): cannot open shared object file")
# ORT's log line prefix: "2025-01-01 12:00:00.1 [E:onnxruntime:Default, file.cc:12 Function] ".
_LOG_PREFIX = re.compile(r"^.*?\[[VIWEF]:onnxruntime[^\]]*\]\s*")


def fallback_note(text: str) -> str:
    """ORT's multi-line EP error text as one short reason: the missing shared library when
    there is one, else the first line that says what failed."""
    missing = _MISSING_LIBRARY.search(text)
    if missing:
        return f"{missing.group(1)}: cannot open shared object file"
    for line in text.splitlines():
        line = _LOG_PREFIX.sub("", line).strip()
        if "FAIL : " in line:
            line = line.split("FAIL : ", 1)[1]
        if line and re.search(r"fail|error|cannot|not found", line, re.IGNORECASE):
            return line if len(line) <= 160 else line[:157] + "..."
    return "ONNX Runtime gave no reason"


def _labelled(session, ep: str, note: str):
    session.onnxopt_ep, session.onnxopt_note = ep, note
    return session


@contextlib.contextmanager
def _stderr_fd_captured(ort, sink: list[str]) -> Iterator[None]:
    """File descriptor 2 into a temporary file for the block, its text appended to `sink`.

    ORT's C++ logger writes a provider's registration failure there, several lines per
    provider, past Python's sys.stderr. Its default logger is let down to warnings meanwhile
    (onnxruntime() silences it) so that the failure is written, and read here, not lost."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all (a daemon): nothing can spill either
        yield
        return
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        ort.set_default_logger_severity(2)
        try:
            yield
        finally:
            ort.set_default_logger_severity(4)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            file.seek(0)
            sink.append(file.read().decode(errors="replace"))


def runner(session, feeds: Mapping[str, np.ndarray], ep: str = "cpu"):
    """A no-argument callable that runs the session once, for timing.

    On a GPU provider inputs and outputs are bound on the device (IO binding), so the timing
    measures the model, not host-device copies; output buffers are allocated once from a first
    run's shapes, which a CUDA graph also requires (fixed addresses)."""
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    ep = ran_on(session, ep)[0]  # a GPU provider that did not register leaves a CPU session
    if ep == "cpu":
        feeds = ort_feeds(feeds)

        def run_plain():
            try:
                return session.run(None, feeds)
            except Exception as error:  # ORT's Fail / RuntimeException: a shape it cannot take
                raise RuntimeFailure(f"ONNX Runtime failed to run the model: "
                                     f"{first_line(error)}") from None

        return run_plain
    ort = onnxruntime()
    first = run(session, feeds).values()
    binding = session.io_binding()
    kept = []  # OrtValues must outlive the binding
    for name, array in feeds.items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)
        binding.bind_ortvalue_input(name, value)
        kept.append(value)
    for output, array in zip(session.get_outputs(), first):
        value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, "cuda", 0)
        binding.bind_ortvalue_output(output.name, value)
        kept.append(value)

    def run_bound():
        session.run_with_iobinding(binding)
        return kept

    return run_bound


def ort_feeds(feeds: Mapping[str, np.ndarray]) -> dict[str, object]:
    """Feeds as ORT's Python API takes them: numpy arrays as they are, ml_dtypes' (bfloat16,
    float8, int4), which ORT cannot map from numpy, as OrtValues of their ONNX type."""
    if all(v.dtype.kind != "V" for v in feeds.values()):
        return dict(feeds)
    ort = onnxruntime()
    converted = {}
    for name, array in feeds.items():
        if array.dtype.kind == "V":
            onnx_type = ir.DataType.from_numpy(array.dtype).value
            raw = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")
            array = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx_type)
        converted[name] = array
    return converted


@functools.cache
def _runtime_distributions() -> list[str]:
    from importlib import metadata

    names = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.distribution(name)
            names.append(name)
        except metadata.PackageNotFoundError:
            pass
    return names


@contextlib.contextmanager
def model_file(model: ir.Model) -> Iterator[str | bytes]:
    """The model as ORT takes it: serialized bytes, or a temporary file when it is large or its
    weights are external (bytes cannot point at external data)."""
    if io.external_files(model) or io.weight_bytes(model) > _BYTES_LIMIT:
        with tempfile.TemporaryDirectory(prefix="onnxopt-run-", dir=_beside(model)) as tmp:
            path = Path(tmp) / "model.onnx"
            if not _linked(model, path):
                io.save(model, path)
            yield str(path)
    else:
        yield ir.to_proto(model).SerializeToString()


def _beside(model: ir.Model) -> str | None:
    """The folder of the model's first data file when it is writable (hard links cannot cross
    file systems), else None: the system's temporary folder."""
    files = sorted(io.external_files(model))
    return str(files[0].parent) if files and os.access(files[0].parent, os.W_OK) else None


def _linked(model: ir.Model, path: Path) -> bool:
    """Write `model` to `path` with its external tensors left where they are: each data file is
    hard-linked beside `path` under the location the tensor names (ORT and the checker refuse
    symbolic links that leave the model's folder), so a multi-GB model that a pass did not
    change costs no copy of its weights. False when that cannot be done (another file system,
    in-memory tensors past protobuf's limit, two files claiming one location): the caller
    then writes a full copy."""
    inline = sum(t.nbytes for t in io.iter_tensors(model) if not isinstance(t, ir.ExternalTensor))
    if inline > _BYTES_LIMIT:
        return False
    links: dict[str, Path] = {}
    for tensor in io.iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            target = Path(tensor.path).resolve()
            if links.setdefault(tensor.location, target) != target:
                return False
    try:
        for location, target in links.items():
            link = path.parent / location
            link.parent.mkdir(parents=True, exist_ok=True)
            os.link(target, link)
    except OSError:  # another device, or links not allowed there
        return False
    import onnx

    onnx.save(ir.to_proto(model), str(path))
    return True


@contextlib.contextmanager
def model_session(model: ir.Model, **kwargs) -> Iterator[object]:
    """A session for an in-memory model; `kwargs` go to make_session. Once a big model's
    session closes, the memory it freed goes back to the system (see release_memory; a small
    one's is not worth a garbage collection per session)."""
    try:
        with model_file(model) as source:
            session = make_session(source, **kwargs)
            del source  # serialized bytes of a small model: not kept alive by the session
            yield session
    finally:
        session = None
        if io.weight_bytes(model) > _TRIM_BYTES:
            release_memory()


def release_memory() -> None:
    """Hand freed heap memory back to the system: glibc keeps what a session or a serialized
    model freed for reuse, so the process's resident memory would stay at its peak and the
    next session would come on top of it. A no-op where glibc is absent."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (present in glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def run(session, feeds: Mapping[str, np.ndarray]) -> dict[str, object]:
    """Run once; outputs by name. Feeds for inputs the session does not take are dropped; an
    overridable initializer (one that is also a graph input) is taken like an input."""
    names = {i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())}
    try:
        values = session.run(None, ort_feeds({k: v for k, v in feeds.items() if k in names}))
    except Exception as error:
        raise RuntimeFailure(f"ONNX Runtime failed to run the model: {first_line(error)}") from None
    return {o.name: v for o, v in zip(session.get_outputs(), values)}
