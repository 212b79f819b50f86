"""ONNX Runtime sessions: one place that imports onnxruntime, picks providers and runs models."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import io
from onnxopt.errors import BadInputError, OnnxoptError, first_line

__all__ = ["onnxruntime", "make_session", "run", "runner", "model_file", "model_session", "PROVIDERS",
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
):
    """An InferenceSession with intra-op spinning off (spinning threads distort shared machines).

    A GPU provider gets CPU as its fallback, as ORT itself would; which nodes fell back is for
    `placement.node_placement` to find out, not to guess."""
    ort = onnxruntime()
    if ep not in PROVIDERS:
        raise BadInputError(f"unknown execution provider {ep!r}; choose from {', '.join(PROVIDERS)}")
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
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers: list = [name]
    if ep == "cuda" and cuda_graph:
        providers = [(name, {"enable_cuda_graph": "1"})]
    if ep == "tensorrt":
        providers.append(PROVIDERS["cuda"][0])
    if ep != "cpu":
        providers.append(PROVIDERS["cpu"][0])
    if isinstance(model, os.PathLike):
        model = str(model)
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise RuntimeFailure(f"ONNX Runtime cannot load the model: {first_line(error)}") from None


def runner(session, feeds: Mapping[str, np.ndarray], ep: str = "cpu"):
    """A no-argument callable that runs the session once, for timing.

    On a GPU provider inputs and outputs are bound on the device (IO binding), so the timing
    measures the model, not host-device copies; output buffers are allocated once from a first
    run's shapes, which a CUDA graph also requires (fixed addresses)."""
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
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
