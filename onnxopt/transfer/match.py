"""Which SRC weight goes into which DST weight: names first, then the graphs' structure.

A weight is a floating-point constant of the main graph (an initializer that is not a graph
input, or a Constant node) read by some node as data: at least 2 elements, or any size in a
parameter slot (Conv/Gemm/MatMul B, normalization scale and bias, ...). Each weight gets a role
from the node that reads it, seen through Identity and a 2-D Transpose:

    linear  Gemm B / MatMul B (2-D), compared as [K, N]: Gemm transB=1 and Transpose -> MatMul
            store [N, K], and such a pair is copied transposed (square matrices too)
    conv, conv_transpose, table (Gather data), bn_scale/bn_bias/bn_mean/bn_var
    scale   LayerNormalization/InstanceNormalization/GroupNormalization scale, Mul by a constant
    bias    their bias, Conv/ConvTranspose/Gemm bias, Add of a constant
    Op.slot anything else
scale and bias compare squeezed shapes ([C] vs [1, C, 1, 1] is a reshape), so a fused
LayerNormalization and its decomposition (..., Div, Mul(gamma), Add(beta)) pair up.

Rules per DST weight, in order (each pair must have compatible shape, layout, dtype):
  1. map: --map {dst: src};
  2. name: the same name; exporter-generated names (onnx::MatMul_735, val_88) never count;
  3. normalized: the same key after lowercasing, dropping `onnx::`, leading `/`, separators
     (/ . _ : -), trailing numeric uniquifiers, weight/bias synonyms (kernel, gamma, beta,
     running_mean, ...); else a unique SRC key ending with the DST key (a wrapper's prefix);
  4. structure: both graphs' weights in topological order, as (role, shape, feeds a
     BatchNormalization) signatures, split at the pairs rules 1-3 found (kept where they agree
     with both orders), each stretch aligned by longest common subsequence. A pair is taken only
     when it is in every optimal alignment; otherwise the DST weight is refused as ambiguous.
Never guessed: ambiguous names, different shapes and different dtypes are refused per tensor.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re

import onnx_ir as ir

__all__ = ["Match", "Refusal", "Weight", "compatible", "is_generated", "match", "normalize",
           "weights"]

_NORMS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization",
          "SimplifiedLayerNormalization", "SkipLayerNormalization", "RMSNormalization")
_BN_ROLES = {1: "bn_scale", 2: "bn_bias", 3: "bn_mean", 4: "bn_var"}
_VECTOR_ROLES = ("scale", "bias")
# Names exporters invent for anonymous tensors: TorchScript `onnx::MatMul_735`, onnxscript
# `val_88`, tf2onnx `const_fold_opt__12`, TorchScript Constant outputs. Equal by accident only.
_GENERATED = re.compile(r"onnx::.*|val_\d+|\d+|const_fold_opt__\d+|.*constant(_\d+)?_output_\d+",
                        re.IGNORECASE)
_PHRASES = ((r"running[_.]?mean|moving[_.]?mean", "mean"),
            (r"running[_.]?var|moving[_.]?variance", "var"))
_SYNONYMS = {"kernel": "weight", "weights": "weight", "w": "weight", "gamma": "weight",
             "biases": "bias", "b": "bias", "beta": "bias", "variance": "var"}


@dataclasses.dataclass
class Weight:
    name: str
    value: ir.Value  # the initializer, or the Constant node's output
    node: ir.Node | None  # the Constant node holding it, or None for an initializer
    dtype: ir.DataType
    shape: tuple[int, ...]
    role: str
    key: tuple[int, ...]  # the shape as compared: [K, N] for linear, squeezed for scale/bias
    is_transposed: bool  # a linear weight stored [N, K]
    feeds_bn: bool  # its node's output goes into a BatchNormalization (only a fold matches it)
    position: int  # order of its first use in the graph

    @property
    def size(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def signature(self) -> tuple:
        return self.role, self.key, self.feeds_bn


@dataclasses.dataclass
class Match:
    src: str
    rule: str  # map, name, normalized, structure (transfer.py adds folded)


@dataclasses.dataclass
class Refusal:
    reason: str
    is_final: bool = True  # False: names were ambiguous or unusable, structure may still decide
    candidates: list[str] = dataclasses.field(default_factory=list)


def weights(model: ir.Model) -> dict[str, Weight]:
    """The weights of the main graph, by name, in order of first use."""
    graph = model.graph
    order = {node: index for index, node in enumerate(graph)}  # ONNX graphs are sorted
    found: list[Weight] = []
    for value in graph.initializers.values():
        if value.const_value is not None and not value.is_graph_input():
            found += _weight(value, None, value.const_value, order)
    for node in graph:
        attribute = node.attributes.get("value")
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and attribute is not None
                and attribute.type == ir.AttributeType.TENSOR and node.outputs[0].name):
            found += _weight(node.outputs[0], node, attribute.as_tensor(), order)
    found.sort(key=lambda w: w.position)
    return {w.name: w for w in found}


def _weight(value: ir.Value, node, tensor, order) -> list[Weight]:
    if not tensor.dtype.is_floating_point():
        return []
    uses = sorted(_uses(value, False), key=lambda use: (order.get(use[0], -1), use[1]))
    if not uses:
        return []
    reader, slot, is_transposed = uses[0]
    shape = tuple(int(d) for d in tensor.shape)
    role, key, is_transposed = _role(reader, slot, shape, is_transposed)
    size = 1
    for dim in shape:
        size *= dim
    if size < 2 and ("." in role or reader.op_type in ("Mul", "Add")):
        return []  # a scalar the exporter wrote (epsilon, 0.5 of GELU), not a trained weight
    feeds_bn = role in ("linear", "conv", "conv_transpose", "bias") and _feeds_bn(reader)
    position = order.get(reader, len(order)) * 16 + slot
    return [Weight(value.name, value, node, tensor.dtype, shape, role, key, is_transposed,
                   feeds_bn, position)]


def _uses(value: ir.Value, is_transposed: bool) -> list[tuple[ir.Node, int, bool]]:
    """(node, input slot, seen through a transpose) for every node that reads the data."""
    found = []
    for use in value.uses():
        node, slot = use.node, use.idx
        if node.op_type in ("Shape", "Size"):
            continue  # reads the shape only (dynamo's zero bias for a bias-less Conv)
        if node.op_type == "Identity":
            found += _uses(node.outputs[0], is_transposed)
        elif node.op_type == "Transpose" and tuple(node.attributes.get_ints("perm", ())) == (1, 0):
            found += _uses(node.outputs[0], not is_transposed)
        else:
            found.append((node, slot, is_transposed))
    return found


def _role(node: ir.Node, slot: int, shape: tuple, is_transposed: bool) -> tuple[str, tuple, bool]:
    op = node.op_type
    if op in ("Gemm", "MatMul") and slot == 1 and len(shape) == 2:
        if op == "Gemm" and node.attributes.get_int("transB", 0):
            is_transposed = not is_transposed
        return "linear", (shape[::-1] if is_transposed else shape), is_transposed
    if is_transposed:  # a transpose feeding anything else: compare as stored
        return f"{op}.{slot}", shape, False
    squeezed = tuple(d for d in shape if d != 1) or (1,)
    if op in ("Conv", "ConvTranspose") and slot == 1:
        return ("conv" if op == "Conv" else "conv_transpose"), shape, False
    if op == "BatchNormalization" and slot in _BN_ROLES:
        return _BN_ROLES[slot], squeezed, False
    if (op in _NORMS and slot == 1) or op == "Mul":
        return "scale", squeezed, False
    if (op in _NORMS and slot == 2) or (op in ("Conv", "ConvTranspose", "Gemm") and slot == 2):
        return "bias", squeezed, False
    if op == "Add":
        return "bias", squeezed, False
    if op == "Gather" and slot == 0:
        return "table", shape, False
    return f"{op}.{slot}", shape, False


def _feeds_bn(node: ir.Node) -> bool:
    """The node's output (through a MatMul's bias Add) goes only into a BatchNormalization."""
    for _ in range(2):
        output = node.outputs[0]
        uses = output.uses()
        if len(uses) != 1 or output.is_graph_output():
            return False
        consumer = uses[0].node
        if consumer.op_type == "BatchNormalization" and uses[0].idx == 0:
            return True
        if consumer.op_type != "Add" or node.op_type != "MatMul":
            return False
        node = consumer
    return False


def is_generated(name: str) -> bool:
    return bool(_GENERATED.fullmatch(name))


def normalize(name: str) -> tuple[str, ...]:
    """`/encoder/Layer_1/dense/kernel:0` -> ('encoder', 'layer', '1', 'dense', 'weight')."""
    text = name.lower().removeprefix("onnx::").strip("/")
    for pattern, word in _PHRASES:
        text = re.sub(pattern, word, text)
    parts = [p for p in re.split(r"[/.:_\-\s]+", text) if p]
    while len(parts) > 1 and parts[-1].isdigit():
        parts.pop()  # exporter uniquifiers: `.1`, `_123`, tf's `:0`
    return tuple(_SYNONYMS.get(p, p) for p in parts)


def compatible(dst: Weight, src: Weight, *, check_bn: bool = True) -> str:
    """Why `src` cannot fill `dst` ("" when it can)."""
    if dst.dtype != src.dtype:
        return f"dtype {dst.dtype.name.lower()} in DST, {src.dtype.name.lower()} in SRC {src.name!r}"
    if check_bn and dst.feeds_bn != src.feeds_bn:
        where, other = ("SRC", "DST") if src.feeds_bn else ("DST", "SRC")
        return f"in {where} it feeds a BatchNormalization that {other} does not have"
    is_vector = dst.role in _VECTOR_ROLES and src.role in _VECTOR_ROLES
    if dst.role == src.role == "linear":
        if dst.key == src.key:
            return ""
    elif dst.shape == src.shape or (is_vector and dst.key == src.key):
        return ""
    return f"shape {list(dst.shape)} in DST, {list(src.shape)} in SRC {src.name!r}"


def match(src: dict[str, Weight], dst: dict[str, Weight], *, rules: tuple[str, ...],
          fixed: dict[str, Match]) -> tuple[dict[str, Match], dict[str, Refusal]]:
    """Match DST weights to SRC weights by `rules` (name, normalized, structure), on top of the
    `fixed` pairs (--map, or an earlier round's): (matches, refusals) by DST name."""
    matches = dict(fixed)
    refusals: dict[str, Refusal] = {}
    if "name" in rules:
        _match_names(src, dst, matches, refusals, "normalized" in rules)
    if "structure" in rules:
        _match_structure(src, dst, matches, refusals)
    return matches, refusals


def _match_names(src, dst, matches, refusals, use_normalized: bool) -> None:
    keys: dict[tuple, list[Weight]] = {}
    for weight in src.values():
        if not is_generated(weight.name):
            keys.setdefault(normalize(weight.name), []).append(weight)
    for name, weight in dst.items():
        if name in matches or is_generated(name):
            continue
        if name in src:
            why = compatible(weight, src[name])
            if not why:
                matches[name] = Match(name, "name")
            else:  # a different shape under the same name is a changed layer: not moved
                refusals[name] = Refusal(why, is_final="BatchNormalization" not in why,
                                         candidates=[name])
            continue
        if use_normalized:
            _match_normalized(weight, keys, matches, refusals)


def _match_normalized(weight: Weight, keys, matches, refusals) -> None:
    key = normalize(weight.name)
    candidates = keys.get(key) or _suffix_candidates(key, keys)
    fitting = [c for c in candidates if not compatible(weight, c)]
    if len(fitting) == 1:
        matches[weight.name] = Match(fitting[0].name, "normalized")
    elif len(fitting) > 1:
        names = [c.name for c in fitting]
        refusals[weight.name] = Refusal(
            f"ambiguous: normalized name {'.'.join(key)!r} fits {len(names)} SRC tensors "
            f"({', '.join(repr(n) for n in names[:4])})", is_final=False, candidates=names)
    elif candidates:
        refusals[weight.name] = Refusal(compatible(weight, candidates[0]), is_final=False,
                                        candidates=[c.name for c in candidates])


def _suffix_candidates(key: tuple, keys: dict) -> list[Weight]:
    """SRC keys that end with the DST key, or that the DST key ends with (a wrapper module's
    prefix such as `model.`); at least two parts, so `weight` alone never matches."""
    if len(key) < 2:
        return []
    found = []
    for other, group in keys.items():
        shorter, longer = sorted((key, other), key=len)
        if len(shorter) >= 2 and longer[len(longer) - len(shorter):] == shorter:
            found += group
    return found


def _match_structure(src, dst, matches, refusals) -> None:
    src_list, dst_list = list(src.values()), list(dst.values())
    src_index = {w.name: i for i, w in enumerate(src_list)}
    used = {m.src for m in matches.values()}
    anchors = [(src_index[m.src], j) for j, w in enumerate(dst_list)
               if (m := matches.get(w.name)) is not None and m.src in src_index]
    chain = _increasing_chain(anchors)
    bounds = [(-1, -1), *chain, (len(src_list), len(dst_list))]
    for (i0, j0), (i1, j1) in itertools.pairwise(bounds):
        sources = [w for w in src_list[i0 + 1:i1] if w.name not in used]
        targets = [w for w in dst_list[j0 + 1:j1] if w.name not in matches
                   and (w.name not in refusals or not refusals[w.name].is_final)]
        for target, (candidates, is_certain) in zip(targets, _align(sources, targets)):
            _decide(target, candidates, is_certain, matches, refusals)


def _decide(target: Weight, candidates: list[Weight], is_certain: bool, matches,
            refusals) -> None:
    if not candidates:
        return
    if is_certain:
        why = compatible(target, candidates[0])
        if not why:
            matches[target.name] = Match(candidates[0].name, "structure")
            refusals.pop(target.name, None)
        else:
            refusals[target.name] = Refusal(why, candidates=[candidates[0].name])
        return
    names = [c.name for c in candidates]
    earlier = refusals.get(target.name)
    prefix = f"{earlier.reason}; " if earlier else ""
    what = (f"{len(names)} SRC tensors fit ({', '.join(repr(n) for n in names[:4])})"
            if len(names) > 1 else
            f"SRC {names[0]!r} fits this or another DST tensor equally well")
    refusals[target.name] = Refusal(f"{prefix}ambiguous by structure: {what}", candidates=names)


def _increasing_chain(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest chain of (src, dst) pairs increasing in both; pairs come sorted by dst.
    Patience sorting, O(n log n): a model has thousands of name-matched weights."""
    tails: list[int] = []  # tails[k]: smallest src ending a chain of length k + 1
    tail_index: list[int] = []
    parent = [-1] * len(pairs)
    for index, (i, _) in enumerate(pairs):
        k = bisect.bisect_left(tails, i)
        if k == len(tails):
            tails.append(i)
            tail_index.append(index)
        else:
            tails[k], tail_index[k] = i, index
        parent[index] = tail_index[k - 1] if k else -1
    chain, index = [], tail_index[-1] if tail_index else -1
    while index >= 0:
        chain.append(pairs[index])
        index = parent[index]
    return chain[::-1]


def _align(sources: list[Weight], targets: list[Weight]) -> list[tuple[list[Weight], bool]]:
    """Per target: the sources it pairs with in some longest common subsequence of signatures,
    and whether that pairing is certain (one source, and no longest alignment leaves it out)."""
    n, m = len(sources), len(targets)
    if not n:
        return [([], False)] * m
    same = [[s.signature == t.signature for t in targets] for s in sources]
    forward = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n):
        for j in range(m):
            forward[i + 1][j + 1] = max(forward[i][j + 1], forward[i + 1][j],
                                        forward[i][j] + 1 if same[i][j] else 0)
    backward = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            backward[i][j] = max(backward[i + 1][j], backward[i][j + 1],
                                 backward[i + 1][j + 1] + 1 if same[i][j] else 0)
    best = forward[n][m]
    result = []
    for j in range(m):
        pairs = [sources[i] for i in range(n)
                 if same[i][j] and forward[i][j] + 1 + backward[i + 1][j + 1] == best]
        can_skip = any(forward[i][j] + backward[i][j + 1] == best for i in range(n + 1))
        result.append((pairs, len(pairs) == 1 and not can_skip))
    return result
