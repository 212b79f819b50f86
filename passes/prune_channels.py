"""prune-channels: structured pruning that removes whole channels, so MACs and latency fall.

The dependency graph (_channel_groups) ties every tensor dimension that must shrink together
into a group: producers' output rows, BN and per-channel constants, residual Adds, Concat and
Split offsets, Flatten blocks, consumers' input columns. Over the group's weight tensors t
(producer rows, consumer input columns, depthwise weights, BN scale) channel c scores
    I_c = sqrt(sum_t ||W_t[c]||^2 / mean_c' ||W_t[c']||^2)       (l1: sum_t |W_t[c]|_1 / mean)
so that every tensor counts alike whatever its scale, and S_c = I_c / sum_c' I_c so that
groups compare (calibration `scores` replace I where given). Groups lose channels in steps (one
channel, one per block for grouped Convs, or down to the next multiple of `channel_multiple`),
least important first; across groups the greedy takes the step with the least
    sum(S_step) / (dMACs / MACs_before) ** mac_exponent
until MACs <= (1 - sparsity) * MACs_before, each group keeping at least `min_keep` of its
channels. Weights are cut by indexing only, in their own dtype: kept values are bit-exact.

Refused (logged, group unchanged; details in _channel_groups): 1. a group reaching a graph
output; 2. one tied to channels no group owns (a graph input, an unknown op's output); 3. one
read by an op that cannot follow channels (Transpose, Softmax, LayerNormalization, attention,
custom ops, subgraphs); 4. a weight or per-channel constant that is not a constant, or a weight
shared outside the group; 5. layouts that cannot be followed (misaligned Add, a Reshape that
regroups channels, computed Slice bounds); 6. grouped-Conv blocks that do not divide the
channels; 7. groups with a node matching `skip`. Run it after cleanup (which folds exporters'
shape arithmetic and dynamo's run-time zero biases) and fold-batchnorm (a BN between Conv and
ReLU rescales channels, so weight norms rank them less well; unfolded BNs still shrink).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnxopt.passes._channel_groups import ChannelGraph, ChannelGroup, channel_groups
from onnxopt.passes._graph import describe
from onnxopt.passes._report import PassReport

from onnxopt.errors import BadInputError

__all__ = ["PruneChannelsOptions", "PruneChannelsPass", "PruneChannelsReport", "channel_groups",
           "channel_importance"]


@dataclasses.dataclass(frozen=True)
class PruneChannelsOptions:
    sparsity: float = 0.3  # share of Conv/Gemm/MatMul MACs to remove (--sparsity)
    importance: str = "l2"  # or "l1"; l2 is the classic filter-norm criterion
    # Group key -> importance per channel from activation statistics (calibration data);
    # replaces the weight norm for that group.
    scores: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # Group key -> exactly these channels go (tests, the accuracy budget's search); `sparsity`
    # then leaves that group alone.
    remove: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    skip: tuple[str, ...] = ()  # node-name regexes whose groups stay whole (--sparsity-skip)
    # Input name -> concrete shape for counting MACs (a symbolic batch counts as 1); other
    # value names too, sizes seen at run time where shape inference cannot follow.
    shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    # Every group keeps at least this share: a layer cut to a few channels loses most of the
    # accuracy, and plain magnitude pruning without fine-tuning cannot buy it back.
    min_keep: float = 0.25
    # Weight of the MACs a step saves in the ranking (formula above): 1 is importance per MAC,
    # 0 ranks by importance share and lets MACs decide only when to stop. Default model (its
    # samples shifted 9 ways), top-1 averaged over -3..-15% MACs: 0.78 with 0, 0.74 with 0.1,
    # 0.71 with 0.5; at -10%: 0.90 with 0, 0.61 with 1. Its MAC-heavy groups (stem, residual
    # streams) are its most sensitive ones, which MACs per channel cannot see.
    # The cost of 0: a group whose channels save almost no MACs (a small MLP head) is pruned
    # as readily as any other; raise it (0.1 is enough) for such models.
    mac_exponent: float = 0.0
    # Kept channel counts are multiples of this: ORT's CPU convolutions work on blocks of 8
    # (AVX2) or 16 (AVX-512) channels and pad the rest. Default model, 1 thread, batch 1:
    # -10% MACs gave latency x0.98 with 1, x0.92 with 8, x0.91 with 16; -5%: x1.07 (slower
    # than dense), x0.97, x0.94. 16 is a multiple of both blocks.
    channel_multiple: int = 16


@dataclasses.dataclass
class PruneChannelsReport(PassReport):
    removed: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # key -> channels
    consumers: list[str] = dataclasses.field(default_factory=list)  # input channels shrank
    macs_before: int = 0
    macs_after: int = 0


class PruneChannelsPass(ir.passes.InPlacePass):
    """Remove the least important channels of Conv/Gemm/MatMul layers and everything coupled."""

    name = "prune-channels"
    lossy = True

    def __init__(self, options: PruneChannelsOptions | None = None):
        super().__init__()
        self.options = options or PruneChannelsOptions()

    def call(self, model: ir.Model) -> PruneChannelsReport:
        options = self.options
        _check(options)
        graph = ChannelGraph(model, options.shapes)
        before = max(graph.macs(), 1.0)  # a model without Conv / Gemm / MatMul counts 1
        report = PruneChannelsReport(model, modified=False, macs_before=round(before),
                                     macs_after=round(before))
        report.log += graph.notes
        keys = {g.key: g for g in graph.groups}
        if unknown := sorted(set(options.remove) - set(keys)):
            raise BadInputError(f"prune-channels: remove= names unknown group(s) {unknown}; "
                                f"groups are {sorted(keys)}")
        removed, free = {}, []
        for group in graph.groups:
            why = group.refused or _skipped(group, options.skip)
            if why:
                report.refuse(f"refused group {group.key!r}: {why}")
            elif group.key in options.remove:
                removed[group.root] = _explicit(group, options.remove[group.key])
            else:
                free.append(group)
        for group in free:
            removed[group.root] = np.zeros(group.channels, dtype=bool)
        importance = {g.key: channel_importance(graph, g, options) for g in free}
        target = (1.0 - options.sparsity) * before
        reached = _greedy(graph, free, importance, options, removed, target)
        removed = {root: mask for root, mask in removed.items() if mask.any()}
        for group in graph.groups:
            if group.root in removed:
                self._log(report, graph, group, removed[group.root], before)
        if removed:
            report.consumers = [n.name or describe(n) for n in graph.apply(removed)]
            report.macs_after = round(graph.macs(removed))
        if not reached:
            report.log.append(f"MAC target not reached: no group may lose more channels "
                              f"(min_keep={options.min_keep}, "
                              f"channel_multiple={options.channel_multiple})")
        if removed:
            report.log.append(f"MACs {_count(before)} -> {_count(report.macs_after)} "
                              f"({report.macs_after / before - 1:+.1%}), target "
                              f"{-options.sparsity:+.1%}")
        return report

    @staticmethod
    def _log(report, graph: ChannelGraph, group: ChannelGroup, mask, before: float) -> None:
        channels = np.flatnonzero(mask)
        report.removed[group.key] = [int(c) for c in channels]
        saved = before - graph.macs({group.root: mask})
        report.change("pruned", f"pruned {len(channels)} of {group.channels} channels of group "
                      f"{group.key!r} ({group.chain}): MACs {-saved / before:+.1%}",
                      count=len(channels))


def _count(macs: float) -> str:
    return f"{macs / 1e6:.2f} M" if macs >= 1e5 else f"{macs:,.0f}"


def _check(options: PruneChannelsOptions) -> None:
    if not 0.0 <= options.sparsity < 1.0:
        raise BadInputError(f"--sparsity {options.sparsity}: expected 0 <= s < 1")
    if options.importance not in ("l2", "l1"):
        raise BadInputError(f"prune-channels: importance {options.importance!r}: expected "
                            "l2 or l1")
    if not 0.0 < options.min_keep <= 1.0 or options.channel_multiple < 1 or \
            options.mac_exponent < 0:
        raise BadInputError("prune-channels: expected 0 < min_keep <= 1, channel_multiple >= 1 "
                            "and mac_exponent >= 0")


def _skipped(group: ChannelGroup, patterns: tuple[str, ...]) -> str | None:
    nodes = [*group.producers, *(site.node for site in group.consumers)]
    for pattern in patterns:
        for node in nodes:
            if re.search(pattern, node.name or ""):
                return f"{describe(node)} matches skip {pattern!r}"
    return None


def _explicit(group: ChannelGroup, channels: Sequence[int]) -> np.ndarray:
    mask = np.zeros(group.channels, dtype=bool)
    index = np.asarray(list(channels), dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= group.channels):
        raise BadInputError(f"prune-channels: remove[{group.key!r}] has channels outside "
                            f"0..{group.channels - 1}")
    mask[index] = True
    per_block = mask.reshape(group.blocks, -1).sum(axis=1)
    if mask.all() or len(set(per_block.tolist())) > 1:
        raise BadInputError(f"prune-channels: remove[{group.key!r}] must keep some channels "
                            f"and take as many from each of its {group.blocks} grouped-Conv "
                            f"blocks (got {per_block.tolist()})")
    return mask


def channel_importance(graph: ChannelGraph, group: ChannelGroup, options) -> np.ndarray:
    """Per-channel importance of a group as shares of its total (they sum to 1)."""
    if group.key in options.scores:
        score = np.asarray(options.scores[group.key], dtype=np.float64).ravel()
        if score.size != group.channels:
            raise BadInputError(f"prune-channels: scores[{group.key!r}] has {score.size} "
                                f"values for {group.channels} channels")
    else:
        total = np.zeros(group.channels)
        for array, axis, index in graph.coupled_slices(group):
            rows = np.moveaxis(array.astype(np.float64), axis, 0).reshape(array.shape[axis], -1)
            norm = (rows**2).sum(axis=1) if options.importance == "l2" else np.abs(rows).sum(1)
            norm = norm / norm.mean() if norm.mean() > 0 else norm  # each tensor counts alike
            np.add.at(total, index[index >= 0], norm[index >= 0])
        score = np.sqrt(total) if options.importance == "l2" else total
    total = score.sum()
    return score / total if total > 0 else np.full(score.shape, 1.0 / score.size)


class _Steps:
    """The next channels a group gives up: kept counts step down through multiples of
    lcm(blocks, channel_multiple), least important first within each block."""

    def __init__(self, group: ChannelGroup, importance: np.ndarray, options):
        self.group, self.kept = group, group.channels
        unit = math.lcm(group.blocks, options.channel_multiple)
        floor = max(group.blocks, math.ceil(group.channels * options.min_keep))
        self.allowed = [k for k in range(unit, group.channels, unit) if k >= floor]
        blocks = np.arange(group.channels).reshape(group.blocks, -1)
        self.order = [block[np.argsort(importance[block], kind="stable")] for block in blocks]

    def next(self) -> np.ndarray | None:
        lower = [k for k in self.allowed if k < self.kept]
        if not lower:
            return None
        blocks = self.group.blocks
        done, take = (self.group.channels - self.kept) // blocks, (self.kept - lower[-1]) // blocks
        return np.concatenate([order[done:done + take] for order in self.order])


def _greedy(graph: ChannelGraph, groups: list[ChannelGroup], importance, options,
            removed: dict[int, np.ndarray], target: float) -> bool:
    """Take the step of least importance per MAC saved until MACs <= target; False when every
    group hit its floor first."""
    total = macs = graph.macs(removed)
    steps = {g.root: _Steps(g, importance[g.key], options) for g in groups}
    touching: dict[int, list] = defaultdict(list)
    for mac in graph.mac_nodes.values():
        for root in {s.group for layout in mac.sides for s in layout if s.group in steps}:
            touching[root].append(mac)
    neighbours = {root: {s.group for mac in touching[root] for layout in mac.sides
                         for s in layout if s.group in steps} for root in steps}

    def cost(root: int):
        step = steps[root].next()
        if step is None:
            return None
        trial = dict(removed)
        trial[root] = removed[root].copy()
        trial[root][step] = True
        saved = sum(graph.node_macs(m, removed) - graph.node_macs(m, trial)
                    for m in touching[root])
        score = importance[steps[root].group.key][step].sum()
        return (score / (saved / total) ** options.mac_exponent, step, saved) if saved else None

    costs = {root: cost(root) for root in steps}
    while macs > target:
        live = {root: c for root, c in costs.items() if c is not None}
        if not live:
            return False
        root = min(live, key=lambda r: live[r][0])
        _, step, saved = live[root]
        removed[root][step] = True
        steps[root].kept -= len(step)
        macs -= saved
        for other in neighbours[root] | {root}:
            costs[other] = cost(other)
    return True
