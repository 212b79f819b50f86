"""A half model's numbers on a provider that cannot run it: the same graph in float32, with
every half tensor rounded to half where the half model would store it.

    weights:       half, read through a Cast to float32 (exact: every half value is a float32 value)
    activations:   each half output x of a node becomes float32(half(x)): Cast to half, Cast back
    Casts to half: stay, followed by a Cast back to float32

What it leaves out is the arithmetic inside a node: a provider's half kernel may accumulate in
half where this accumulates in float32 (ONNX Runtime's CUDA GEMMs and convolutions accumulate
half products in float32, so there the two agree up to the order of the sums). ONNX Runtime's
CPU provider has no bfloat16 kernels for most ops, so bfloat16 is always judged this way.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.passes._graph import NameSource

__all__ = ["HALF", "emulated"]

HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def emulated(model: ir.Model, rounded: dict[str, str] | None = None) -> ir.Model:
    """A float32 copy of the half `model` that rounds where it rounds; values keep their names,
    so intermediate tensors can be compared with the float32 model's. `rounded`, when given,
    is filled with value name -> the name of its rounded copy (what the half model stores)."""
    copy = model.clone()  # shares tensors: none is edited below
    graph = copy.graph
    names = NameSource(graph)
    # Half weights stay half and are read through a Cast to float32 (exact): a float32 copy
    # of every weight would double a big model's memory for the check.
    position = _position(graph)
    for value in list(graph.initializers.values()):
        uses = list(value.uses())  # before the Cast below becomes one of them
        if value.dtype in HALF and value.const_value is not None and uses:
            widen = ir.node("Cast", [value], {"to": ir.DataType.FLOAT},
                            name=names(f"{value.name}_to_float"))
            widen.outputs[0].name = names(f"{value.name}_float")
            widen.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            widen.outputs[0].shape = value.shape
            first = min((use.node for use in uses), key=position)
            for use in uses:
                use.node.replace_input_with(use.idx, widen.outputs[0])
            # Right before its first reader: ORT runs nodes in this order, so one float32
            # weight at a time exists, not all of them from the first node on.
            graph.insert_before(first, [widen])
    for value in list(graph.inputs):
        if value.dtype in HALF and not value.is_initializer():
            half = value.dtype
            value.type = ir.TensorType(ir.DataType.FLOAT)
            _round_after(graph, value, half, names, rounded, first=True)
    for node in list(graph):
        if node.op_type in ("Constant", "ConstantOfShape") and node.outputs[0].dtype in HALF:
            _float_value_attribute(node)  # half values, exactly, in float32: nothing to round
            continue
        if node.op_type == "Cast" and _to(node) in HALF:
            # The Cast to half stays; its output is read back as float32 by everyone.
            _round_after(graph, node.outputs[0], _to(node), names, rounded, keep_cast=node)
            continue
        for output in node.outputs:
            if output.dtype in HALF:
                half = output.dtype
                output.type = ir.TensorType(ir.DataType.FLOAT)
                _round_after(graph, output, half, names, rounded)
    return copy


def _position(graph: ir.Graph):
    """A key ordering the nodes of `graph` as they stand (readers in subgraphs come last)."""
    order = {node: index for index, node in enumerate(graph)}
    return lambda node: order.get(node, len(order))


def _float_value_attribute(node: ir.Node) -> None:
    value = node.attributes.get("value")
    if value is not None:
        data = value.as_tensor().numpy().astype("float32")
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(data))
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)


def _to(node: ir.Node) -> int | None:
    attr = node.attributes.get("to")
    return None if attr is None else ir.DataType(attr.value)


def _round_after(graph: ir.Graph, value: ir.Value, half: ir.DataType, names: NameSource,
                 rounded: dict[str, str] | None, *, first: bool = False,
                 keep_cast: ir.Node | None = None) -> None:
    """Every reader of `value` (and the graph output it may be) gets float32(half(value))."""
    uses = list(value.uses())
    nodes = []
    source = value
    if keep_cast is None:
        down = ir.node("Cast", [value], {"to": half}, name=names(f"{value.name}_to_half"))
        down.outputs[0].name = names(f"{value.name}_half")
        down.outputs[0].type = ir.TensorType(half)
        nodes.append(down)
        source = down.outputs[0]
    up = ir.node("Cast", [source], {"to": ir.DataType.FLOAT},
                 name=names(f"{value.name}_to_float"))
    up.outputs[0].name = names(f"{value.name}_rounded")
    up.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    up.outputs[0].shape = value.shape
    nodes.append(up)
    if rounded is not None:
        rounded[value.name] = up.outputs[0].name
    for use in uses:
        use.node.replace_input_with(use.idx, up.outputs[0])
    for position, output in enumerate(graph.outputs):
        if output is value:  # the model output keeps its name, rounded
            name = value.name
            value.name = names(f"{name}_unrounded")
            up.outputs[0].name = name
            graph.outputs[position] = up.outputs[0]
    producer = value.producer()
    if keep_cast is not None:
        graph.insert_after(keep_cast, nodes)
    elif producer is not None:
        graph.insert_after(producer, nodes)
    elif first and len(graph):
        graph.insert_before(next(iter(graph)), nodes)
    else:
        graph.extend(nodes)
