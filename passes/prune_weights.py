"""prune-weights: magnitude pruning of Conv / ConvTranspose / Gemm / MatMul weights.

Unstructured: the round(s · size) weights of smallest |w| become zero, per layer (scope
`layer`) or under one threshold on |w| / rms(W) across layers (scope `global`, see _sparsity).
N:M: in every run of M consecutive input channels at one kernel position (K of a Gemm/MatMul),
the M - N weights of smallest |w| become zero: sparsity 1 - N/M in every layer.
Zeros change no shape and no op, so ONNX Runtime runs the model as fast as before; they pay in
a compressed file (zip, gzip), or on kernels that skip them (2:4 on sparse tensor cores).

Refused (logged, weight unchanged): 1. a weight that is not a float constant read by this node
alone (_sparsity.prunable_layers); 2. the first and last layers, unless `keep_first_last` is off;
3. nodes matching `skip`; 4. N:M on a layer whose input channels per group do not divide by M
(depthwise Conv, odd widths): never padded silently.
`sparsities` (node name -> fraction) overrides the target per layer: the accuracy budget's
search and reconstruction give each layer its own. A second run at the same target changes
nothing (the zeros are already the smallest weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnxopt.passes import _sparsity
from onnxopt.passes._graph import describe
from onnxopt.passes._report import PassReport

from onnxopt.errors import BadInputError

__all__ = ["LayerSparsity", "PruneReport", "PruneWeightsOptions", "PruneWeightsPass"]


@dataclasses.dataclass(frozen=True)
class PruneWeightsOptions:
    sparsity: float = 0.5  # share of each layer's weights set to zero (N:M sets its own)
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4": the layout sparse tensor cores take
    scope: str = "layer"  # "global": one normalized threshold, layers end at different shares
    skip: tuple[str, ...] = ()  # node-name regexes kept dense (--sparsity-skip)
    keep_first_last: bool = True  # the input and output layers cost the most accuracy
    # Per-layer targets (node name -> fraction) overriding `sparsity`; layers not named keep
    # the common target. Set by the accuracy budget's search.
    sparsities: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LayerSparsity:
    """One layer after the pass: what the report's per-layer table shows."""

    node: str
    op_type: str
    size: int  # weights in the layer
    zeros: int  # zero weights now (including any that were zero before)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size if self.size else 0.0


@dataclasses.dataclass
class PruneReport(PassReport):
    layers: list[LayerSparsity] = dataclasses.field(default_factory=list)


class PruneWeightsPass(ir.passes.InPlacePass):
    """Magnitude pruning of Conv/ConvTranspose/Gemm/MatMul weights (unstructured or N:M)."""

    name = "prune-weights"
    lossy = True

    def __init__(self, options: PruneWeightsOptions | None = None):
        super().__init__()
        self.options = options or PruneWeightsOptions()

    def call(self, model: ir.Model) -> PruneReport:
        options = self.options
        report = PruneReport(model, modified=False)
        n_m = _sparsity.parse_pattern(options.pattern)
        layers, refused = _sparsity.prunable_layers(model, options.skip,
                                                    keep_first_last=options.keep_first_last)
        for line in refused:
            report.refuse(line)
        targets = self._targets(layers, n_m)
        for layer in layers:
            weight = layer.weight.const_value.numpy()
            if n_m is not None and layer.input_channels % n_m[1]:
                report.refuse(f"kept {describe(layer.node)} dense: {options.pattern} needs input "
                              f"channels per group divisible by {n_m[1]} "
                              f"({layer.input_channels})")
                continue
            target = targets[layer.name]
            if target == 0.0:
                continue
            rows = _sparsity.to_rows(layer, weight)
            if n_m is not None:
                keep = _sparsity.n_m_mask(rows, *n_m)
            else:
                keep = _sparsity.magnitude_mask(np.abs(rows), int(round(target * rows.size)))
            zeros = int(rows.size - np.count_nonzero(rows * keep))
            newly = int(np.count_nonzero(rows * ~keep))
            report.layers.append(LayerSparsity(layer.name, layer.node.op_type, rows.size, zeros))
            if newly:
                _sparsity.write_weight(layer, _sparsity.from_rows(layer, rows * keep))
                report.change("pruned", f"pruned {describe(layer.node)}: {zeros / rows.size:.1%}"
                              f" of {rows.size} weights zero ({options.pattern})")
        report.counts["zeros"] = sum(s.zeros for s in report.layers)
        report.counts["weights"] = sum(s.size for s in report.layers)
        return report

    def _targets(self, layers: list[_sparsity.Layer], n_m) -> dict[str, float]:
        """Node name -> its share of zeros (for N:M: 1 - N/M, or 0 where kept dense)."""
        options, names = self.options, {layer.name for layer in layers}
        overrides = {k: v for k, v in options.sparsities.items() if k in names}
        if any(not 0.0 <= v < 1.0 for v in (options.sparsity, *overrides.values())):
            raise BadInputError(f"--sparsity {options.sparsity}: expected 0 <= s < 1")
        if n_m is not None:  # a layer is N:M or dense; the budget's search may keep it dense
            targets = dict.fromkeys(names, 1 - n_m[0] / n_m[1])
            return targets | {k: 0.0 for k, v in overrides.items() if v == 0.0}
        if options.scope == "global":
            free = [(layer.name, layer.weight.const_value.numpy()) for layer in layers
                    if layer.name not in overrides]
            targets = _sparsity.global_sparsities(free, options.sparsity)
        elif options.scope == "layer":
            targets = dict.fromkeys(names, options.sparsity)
        else:
            raise BadInputError(f"--sparsity-scope {options.scope!r}: expected layer or global")
        return targets | overrides
