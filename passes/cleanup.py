"""cleanup: the exact housekeeping every exported graph needs, mostly onnx-ir's own passes.

Steps, in order (each counted and logged by the nodes and initializers it removed):
  1. Constant nodes holding tensors become initializers (Paddle and TF exports keep every weight
     in a Constant node; later passes and ORT's pre-packing look at initializers).
  2. Inference Dropout becomes Identity: always for opset < 12, and for opset >= 12 when
     `training_mode` is absent or constant false. One whose `mask` output is used is left to
     step 4 (opset >= 12: the mask becomes an all-true constant) or refused (opset < 12).
  3. Identity nodes are removed, by onnx-ir's rules, plus one more refusal: an Identity between
     two graph outputs stays (onnx-ir 1.1's IdentityEliminationPass would give both outputs one
     name, dropping one from the model's interface).
  4. Constant folding (onnxscript's folder) with a size limit, so that ConstantOfShape, Tile or
     Expand never materialise a huge tensor in the file.
  5. Dead nodes, unused and duplicate initializers are removed; nodes are sorted topologically.
  6. Node metadata and doc strings (exporter debris) are dropped; model metadata is kept.
Nothing here changes a value: the graph computes the same function bit for bit, except that
folded constants are computed by the reference evaluator instead of ORT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxopt.passes._graph import all_graphs, constant, describe, opset_version, tensor_chunks
from onnxopt.passes._report import PassReport

__all__ = ["CleanupOptions", "CleanupPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CleanupOptions:
    fold_constants: bool = True  # shape subgraphs of exports are constant; ORT re-folds them per load
    # Largest tensor (elements) constant folding may write into the file: 1 Mi floats = 4 MB.
    # ConstantOfShape/Tile/Expand outputs over this stay as ops so the file does not balloon.
    fold_output_limit: int = 1 << 20
    # Largest input (elements) the folder evaluates; weights are larger and need no folding.
    fold_input_limit: int = 1 << 16
    deduplicate_limit: int = 1 << 30  # hashed comparison keeps memory flat, so no need to be shy
    # Per-node metadata and doc strings are exporter debris (the dynamo exporter writes a stack
    # trace per node: 0.5 MB on MiniLM). Model- and graph-level metadata stay: they can carry
    # what the application needs (PP-OCR keeps its character set there).
    strip_node_metadata: bool = True


class CleanupPass(ir.passes.InPlacePass):
    """Lift Constant weights, drop inference Dropout/Identity, fold constants, remove dead code."""

    name = "cleanup"
    lossy = False

    def __init__(self, options: CleanupOptions | None = None):
        super().__init__()
        self.options = options or CleanupOptions()

    def call(self, model: ir.Model) -> PassReport:
        report = PassReport(model, modified=False)
        _counted(report, model, "lifted",
                 common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1))
        _replace_inference_dropout(model, report)
        _remove_identities(model, report)
        if self.options.fold_constants:
            # Imported here: onnxscript takes most of a second to import, and `onnxopt --help`
            # or `inspect` should not pay for it.
            from onnxscript.optimizer import constant_folding

            unshaped = _unshaped_values(model)
            _counted(report, model, "folded", constant_folding.FoldConstantsPass(
                # Shapes of intermediates let Shape/Size of an un-annotated value fold.
            shape_inference=True,
                input_size_limit=self.options.fold_input_limit,
                output_size_limit=self.options.fold_output_limit,
            ))
            _forget_inferred_shapes(unshaped)
        # Folding leaves Constant nodes behind (e.g. a Dropout's all-true mask): lift them too.
        _counted(report, model, "lifted",
                 common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1))
        _counted(report, model, "removed", common.RemoveUnusedNodesPass())
        _counted(report, model, "removed", common.RemoveUnusedFunctionsPass())
        _make_contiguous(model)
        _counted(report, model, "merged", _DeduplicateInitializers(self.options.deduplicate_limit))
        _counted(report, model, "removed", common.RemoveUnusedNodesPass())
        if self.options.strip_node_metadata:
            _strip_node_metadata(model, report)
        common.TopologicalSortPass()(model)  # order only; not a change worth reporting
        return report


class _DeduplicateInitializers(ir.passes.InPlacePass):
    """onnx-ir's DeduplicateHashedInitializersPass, reading tensors in chunks (an external one
    from its file, not mapped), so a multi-GB model's weights never sit in memory. Only tensors
    whose dtype and shape another tensor shares are read, first their leading MiB (trained
    weights differ there), and in full only where those match too."""

    def __init__(self, size_limit: int):
        super().__init__()
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            groups: dict[tuple, list[ir.Value]] = {}
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is None or value.is_graph_input() or tensor.nbytes > self.size_limit:
                    continue
                groups.setdefault((tensor.dtype, tuple(tensor.shape.numpy())), []).append(value)
            for hasher in (_head_digest, _digest):  # narrow the groups, cheap reads first
                groups = _regrouped(groups, hasher)
            for first, *same in groups.values():
                for value in same:
                    if _same_bytes(first.const_value, value.const_value):
                        value.replace_all_uses_with(first)
                        graph.initializers.pop(value.name)
                        modified = True
        return ir.passes.PassResult(model=model, modified=modified)


def _regrouped(groups: dict[tuple, list[ir.Value]], hasher) -> dict[tuple, list[ir.Value]]:
    """Each group of two or more split by `hasher`; groups of one are dropped."""
    split: dict[tuple, list[ir.Value]] = {}
    for key, values in groups.items():
        for value in values if len(values) > 1 else ():
            split.setdefault((*key, hasher(value.const_value)), []).append(value)
    return {key: values for key, values in split.items() if len(values) > 1}


def _head_digest(tensor: ir.TensorProtocol) -> str:
    head = next(iter(tensor_chunks(tensor, 1 << 20)), b"")
    return hashlib.sha512(head).hexdigest()


def _digest(tensor: ir.TensorProtocol) -> str:
    digest = hashlib.sha512()
    for chunk in tensor_chunks(tensor):
        digest.update(chunk)
    return digest.hexdigest()


def _same_bytes(a: ir.TensorProtocol, b: ir.TensorProtocol) -> bool:
    return all(x == y for x, y in zip(tensor_chunks(a), tensor_chunks(b), strict=True))


def _make_contiguous(model: ir.Model) -> None:
    """Folding a Transpose of a weight (dynamo's Linear) leaves a transposed numpy view; the
    deduplication hash, like the serializer, needs C-ordered data."""
    for graph in all_graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray) \
                    and not tensor.raw.flags.c_contiguous:
                value.const_value = ir.tensor(np.ascontiguousarray(tensor.raw), name=value.name)


def _counted(report: PassReport, model: ir.Model, verb: str, step: ir.passes.PassBase) -> None:
    """Run a library pass and log, by name, every node and initializer it removed."""
    nodes_before = _nodes(model)
    inits_before = _initializers(model)
    step(model)
    for node in nodes_before - _nodes(model):
        if verb == "lifted" and node.op_type != "Constant":
            continue
        report.change(f"{node.op_type} {verb}", f"{verb} {describe(node)}")
    for value in inits_before - _initializers(model):
        report.change(f"initializer {verb}", f"{verb} initializer {value.name!r}")


def _remove_identities(model: ir.Model, report: PassReport) -> None:
    for graph in list(all_graphs(model)):
        for node in list(graph):
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
                continue
            x, y = node.inputs[0], node.outputs[0]
            if x is None:
                continue
            is_output = y.is_graph_output()
            if is_output and (x.is_graph_input() or x.is_initializer() or x.is_graph_output()
                              or x.producer() is None or x.graph is not graph):
                # Both names are part of an interface, or x lives in an outer scope, which a
                # subgraph may not return directly: the Identity stays.
                continue
            if x.type is None:
                x.type = y.type
            if is_output and x.shape is None:
                x.shape = y.shape  # a graph output must declare its shape (checker)
            ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
            if is_output:
                x.name = y.name  # the output keeps its name; x was internal
            graph.remove(node, safe=True)
            report.change("Identity removed", f"removed {describe(node)}")


def _strip_node_metadata(model: ir.Model, report: PassReport) -> None:
    entries = 0
    for graph in all_graphs(model):
        for node in graph:
            entries += len(node.metadata_props) + bool(node.doc_string)
            node.metadata_props.clear()
            node.doc_string = None
    if entries:
        report.change("node metadata entries dropped",
                      f"dropped {entries} node metadata entries and doc strings", entries)


def _unshaped_values(model: ir.Model) -> list[tuple[ir.Value, ir.TypeProtocol | None]]:
    return [(v, v.type) for g in all_graphs(model) for n in g for v in n.outputs
            if v.shape is None]


def _forget_inferred_shapes(values: list[tuple[ir.Value, ir.TypeProtocol | None]]) -> None:
    """The folder infers shapes to fold Shape/Size; keep them out of the saved file, which
    would otherwise grow by a value_info per tensor even when nothing was folded."""
    for value, type_ in values:
        if not value.is_graph_output() and not value.is_initializer():
            value.shape, value.type = None, type_


def _nodes(model: ir.Model) -> set[ir.Node]:
    return {node for graph in all_graphs(model) for node in graph}


def _initializers(model: ir.Model) -> set[ir.Value]:
    return {v for graph in model.graphs() for v in graph.initializers.values()}


def _replace_inference_dropout(model: ir.Model, report: PassReport) -> None:
    """Dropout at inference is the identity; turn it into Identity for step 3 to remove."""
    for graph in list(all_graphs(model)):
        for node in list(graph):
            if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
                if opset_version(graph) < 12:  # opset >= 12: step 4 turns the mask into a constant
                    report.refuse(f"kept {describe(node)}: its mask output is used")
                continue
            if opset_version(graph) >= 12 and len(node.inputs) > 2 and node.inputs[2] is not None:
                training = constant(node.inputs[2])
                if training is None or bool(training):
                    report.refuse(f"kept {describe(node)}: training_mode is not constant false")
                    continue
            identity = ir.node("Identity", inputs=[node.inputs[0]], name=node.name)
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [identity], [node.outputs[0]], [identity.outputs[0]]
            )
            report.change("Dropout removed", f"removed inference {describe(node)}")
