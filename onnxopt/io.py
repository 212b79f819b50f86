"""Load and save models: lazy external data on the way in, atomic writes on the way out.

Loading never modifies the input and keeps external weights memory-mapped (onnx-ir's
`ExternalTensor`). Saving writes into a temporary folder beside the destination and renames into
place, so a crash never leaves a half-written model; it switches to external data by itself when
the weights would not fit under protobuf's 2 GiB limit.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxopt.errors import BadInputError, root_cause

__all__ = ["load", "save", "check_destination", "weight_bytes", "external_files", "iter_tensors", "release_external",
           "release_tensor", "spill", "PROTOBUF_LIMIT"]

logger = logging.getLogger(__name__)

# protobuf refuses messages over 2 GiB; keep room for the graph itself beside the weights.
PROTOBUF_LIMIT = 2**31
EXTERNAL_DATA_THRESHOLD = int(PROTOBUF_LIMIT * 0.9)
# Tensors smaller than this stay inline even in external-data mode (scalars, shapes).
EXTERNAL_TENSOR_MIN_BYTES = 1024


def load(path: str | os.PathLike) -> ir.Model:
    """Read a model, checking everything a user can get wrong before any pass sees it."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, expected an .onnx model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, or onnx's own format errors
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadInputError(
            f"{path}: not a readable ONNX model ({reason}); is the file truncated or not ONNX?"
        ) from None
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise BadInputError(f"{path}: not an ONNX model (no ir_version or no graph in the file)")
    if len(proto.graph.node) == 0:
        raise BadInputError(f"{path}: the graph has no nodes; there is nothing to optimize or run")
    _check_text(proto, path)
    _check_tensor_sizes(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # onnx-ir's SerdeError: a type it cannot represent
        raise BadInputError(f"{path}: {_unsupported(proto) or 'onnxopt cannot read this graph: ' + root_cause(error)}") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    _check_external_data(model, path)
    for tensor in iter_tensors(model):
        if type(tensor) is ir.ExternalTensor:
            tensor.__class__ = CheckedExternalTensor
    try:
        # By path, so the checker resolves external data beside the model, not beside the cwd,
        # and models over 2 GB work.
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        # The checker's messages span lines ("input 'x' of node:\nname: relu OpType: Relu\n...");
        # fold them into the one line we print.
        text = " ".join(str(error).split())
        raise BadInputError(f"{path}: fails the ONNX checker: {text[:400]}") from None
    _check_opsets(proto, path)
    return model


# Repeated numbers: never text, and large; not walked.
_NUMBER_FIELDS = {"float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "raw_data", "floats", "ints"}


def _check_text(proto: onnx.ModelProto, path: Path) -> None:
    """Names, op types and metadata must be UTF-8 text. Protobuf hands back bytes where a
    damaged byte broke that, and every later step (the checker, onnx-ir, saving) would trip over
    them, so the file is refused here, naming the field."""
    stack: list = [proto]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            if field.name in _NUMBER_FIELDS:
                continue
            values = list(value) if _is_repeated(field) else [value]
            if field.type == field.TYPE_STRING:
                if any(not isinstance(v, str) for v in values):
                    raise BadInputError(f"{path}: a {message.DESCRIPTOR.name}'s {field.name} is not "
                                        "UTF-8 text; the file is damaged")
            elif field.type == field.TYPE_MESSAGE:
                stack.extend(values)


_TYPED_FIELDS = {onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
                 onnx.TensorProto.INT32: "int32_data", onnx.TensorProto.INT64: "int64_data"}


def _check_tensor_sizes(proto: onnx.ModelProto, path: Path) -> None:
    """An initializer's data must hold as many elements as its dims say (the checker does not
    look): raw bytes, typed fields and external lengths alike. Sub-byte types are left alone."""
    for tensor in proto.graph.initializer:
        count = math.prod(tensor.dims)
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError):  # UNDEFINED, or a type numpy does not have
            continue
        if tensor.data_type == onnx.TensorProto.STRING or tensor.data_type in _SUB_BYTE:
            continue
        external = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            held = int(external["length"]) if external.get("length", "").isdigit() else None
            need = count * itemsize
        elif tensor.HasField("raw_data"):
            held, need = len(tensor.raw_data), count * itemsize
        elif tensor.data_type in _TYPED_FIELDS:
            held, need = len(getattr(tensor, _TYPED_FIELDS[tensor.data_type])), count
        else:
            continue
        if held is not None and held != need:
            unit = "values" if tensor.data_type in _TYPED_FIELDS and not external and \
                not tensor.HasField("raw_data") else "bytes"
            raise BadInputError(f"{path}: initializer {tensor.name!r} has dims "
                                f"{list(tensor.dims)} ({need} {unit}) but holds {held}; "
                                "the file is damaged")


_SUB_BYTE = {getattr(onnx.TensorProto, name) for name in
             ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, name)}


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; `label` is deprecated
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


def _unsupported(proto: onnx.ModelProto) -> str:
    """Name the first map-typed value: onnx-ir (our graph library) cannot hold maps yet."""
    infos = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for info in infos:
        if info.type.HasField("map_type") or (
            info.type.HasField("sequence_type")
            and info.type.sequence_type.elem_type.HasField("map_type")
        ):
            return (f"value {info.name!r} has a map type, which onnxopt cannot rewrite yet; "
                    "for a skl2onnx classifier convert with options={id(model): {'zipmap': False}}")
    return ""


def _check_opsets(proto: onnx.ModelProto, path: Path) -> None:
    """The checker validates against the newest schemas, so it accepts an opset from the future;
    no runtime can run one, and the version converter cannot move it."""
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise BadInputError(
                f"{path}: imports ONNX opset {opset.version}; this onnx knows opsets 1 to {newest}"
            )


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse missing files and locations that escape the model's folder (path traversal)."""
    base = path.parent.resolve()
    for tensor in iter_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = tensor.location
        where = f"{path}: external data of tensor {tensor.name!r}"
        if os.path.isabs(location):
            raise BadInputError(f"{where} has an absolute location {location!r}; refused")
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise BadInputError(f"{where} escapes the model's folder ({location!r}); refused")
        if not target.is_file():
            raise BadInputError(f"{where} is missing: no file {location!r} beside the model")
        if target.stat().st_size < tensor.offset + tensor.length:
            raise BadInputError(f"{where}: file {location!r} is shorter than the tensor needs")


class CheckedExternalTensor(ir.ExternalTensor):
    """An external tensor whose file `load` checked: present, long enough, inside the model's
    folder with symbolic links resolved (onnx-ir's own path checks). onnx-ir also refuses a
    file with more than one hard link, which each ONNX Runtime session of a model with
    external data makes while it lives (runtime.model_file links the data beside the session's
    copy of the graph): that check would fail a later read of the same file (a weight rounded
    when written) as a "hard link attack"; the containment it guards is checked here."""

    __slots__ = ()

    def _check_path_containment(self) -> None:
        pass  # load checked it, and the only other links are runtime.model_file's


def iter_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every initializer and Constant-node tensor, in every graph and subgraph."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    yield attr.as_tensor()


def spill(model: ir.Model) -> None:
    """Move `model`'s in-memory weights out of memory, in place: each is written to a temporary
    external-data file (removed when the process ends) and becomes an ExternalTensor read back
    on demand, so a big rewritten model (int8 weights) does not sit in memory while ONNX Runtime
    sessions run beside it. Every reference to the model sees the change."""
    folder = Path(tempfile.mkdtemp(prefix="onnxopt-spill-"))
    atexit.register(shutil.rmtree, folder, True)
    offset = 0
    with open(folder / "weights.bin", "wb") as sink:
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if (tensor is None or isinstance(tensor, ir.ExternalTensor)
                        or tensor.nbytes < EXTERNAL_TENSOR_MIN_BYTES):
                    continue
                raw = tensor.tobytes()
                sink.write(raw)
                value.const_value = ir.ExternalTensor(
                    "weights.bin", offset, len(raw), tensor.dtype, shape=tensor.shape,
                    name=tensor.name or value.name, base_dir=str(folder))
                offset += len(raw)
                del raw, tensor


def release_external(model: ir.Model) -> None:
    """Unmap every external tensor's file (see release_tensor)."""
    for tensor in iter_tensors(model):
        release_tensor(tensor)


def release_tensor(tensor: ir.TensorProtocol | None) -> None:
    """Unmap an external tensor's file: pages a pass read stay resident (and count in the
    process's memory) until the mapping goes; the next read maps it again. Other tensors, and
    one whose data something still views (BufferError), are left as they are."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            pass


def weight_bytes(model: ir.Model) -> int:
    return sum(tensor.nbytes for tensor in iter_tensors(model))


def external_files(model: ir.Model) -> set[Path]:
    """The external-data files the model's tensors read from (resolved)."""
    return {
        Path(tensor.path).resolve()
        for tensor in iter_tensors(model)
        if isinstance(tensor, ir.ExternalTensor)
    }


def check_destination(model: ir.Model, path: str | os.PathLike,
                      source: str | os.PathLike | None = None) -> Path:
    """`path` as a Path when `model` may be written there, else a one-line error: callers check
    before the work, not after minutes of it (save checks again)."""
    path = Path(path)
    _refuse_overwriting_input(model, path, source)
    if not path.parent.is_dir():
        raise BadInputError(f"{path}: the output folder {str(path.parent)!r} does not exist")
    return path


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    is_external: bool = False,
    callback: Callable[[ir.TensorProtocol, ir.external_data.CallbackInfo], None] | None = None,
) -> Path:
    """Write `model` to `path` atomically; returns the external-data file or `path` itself.

    External data is used when asked (`is_external`: the input had it, so the user wants it),
    when tensors are still memory-mapped from another file (they must be copied out, not
    referenced), or when the weights pass ~90% of protobuf's 2 GiB limit.
    """
    path = check_destination(model, path, source)
    is_external = (is_external or bool(external_files(model))
                   or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD)
    data_name = f"{path.name}.data" if is_external else None
    if data_name and (path.parent / data_name).resolve() in external_files(model):
        raise BadInputError(
            f"{path}: would overwrite {data_name!r}, which the input model reads its weights "
            "from; choose another output name"
        )
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=path.parent))
    try:
        ir.save(
            _without_initializer_value_info(model),
            tmpdir / path.name,
            external_data=data_name,
            size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES,
            callback=callback,
        )
        if data_name:
            os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _without_initializer_value_info(model: ir.Model) -> ir.Model:
    """onnx-ir writes a value_info for every initializer; the tensor already says its type and
    shape, and exporters write none, so a model that did not change would grow. A clone (it
    shares tensors) keeps the caller's model as it is."""
    clone = model.clone()
    for graph in clone.graphs():
        for value in graph.initializers.values():
            if not value.is_graph_input() and not value.is_graph_output():
                value.type, value.shape = None, None
    return clone


def _refuse_overwriting_input(model: ir.Model, path: Path, source: str | os.PathLike | None):
    if source is None:
        return
    source = Path(source)
    if path.resolve() == source.resolve() or (
        path.exists() and source.exists() and os.path.samefile(path, source)
    ):
        raise BadInputError(
            f"{path}: output path is the input file; the input is never modified, "
            "choose another -o"
        )
