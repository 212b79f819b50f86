"""The pass registry: CLI id -> pass class, one line per pass (CLI choices come from here)."""

from __future__ import annotations

from onnxopt.passes._report import PassReport
from onnxopt.passes.cleanup import CleanupOptions, CleanupPass
from onnxopt.passes.equalize import EqualizeCrossLayerPass
from onnxopt.passes.fold_batchnorm import FoldBatchNormOptions, FoldBatchNormPass
from onnxopt.passes.fold_weights import FoldWeightsPass
from onnxopt.passes.fuse_activations import FuseActivationsPass
from onnxopt.passes.prune_channels import PruneChannelsOptions, PruneChannelsPass
from onnxopt.passes.prune_weights import PruneWeightsOptions, PruneWeightsPass
from onnxopt.passes.quantize_dynamic import QuantizeDynamicOptions, QuantizeDynamicPass
from onnxopt.passes.quantize_int8 import QuantizeInt8Options, QuantizeInt8Pass
from onnxopt.passes.smooth_activations import SmoothActivationsOptions, SmoothActivationsPass
from onnxopt.passes.split_outliers import SplitOutliersOptions, SplitOutliersPass
from onnxopt.passes.to_half import ToHalfOptions, ToHalfPass

__all__ = ["REGISTRY", "DEFAULT_PIPELINE", "PassReport", "describe_passes"]
__all__ += ["CleanupPass", "CleanupOptions", "FoldBatchNormPass", "FoldBatchNormOptions",
            "QuantizeInt8Pass", "QuantizeInt8Options", "QuantizeDynamicPass",
            "QuantizeDynamicOptions", "EqualizeCrossLayerPass", "FuseActivationsPass",
            "SmoothActivationsPass", "SmoothActivationsOptions", "SplitOutliersPass",
            "SplitOutliersOptions", "PruneWeightsPass", "PruneWeightsOptions",
            "PruneChannelsPass", "PruneChannelsOptions", "FoldWeightsPass", "ToHalfPass",
            "ToHalfOptions"]

REGISTRY = {
    CleanupPass.name: CleanupPass,
    FoldBatchNormPass.name: FoldBatchNormPass,
    FuseActivationsPass.name: FuseActivationsPass,
    FoldWeightsPass.name: FoldWeightsPass,  # `--int8` and `--sparsity` add it (their weights)
    EqualizeCrossLayerPass.name: EqualizeCrossLayerPass,
    QuantizeInt8Pass.name: QuantizeInt8Pass,
    QuantizeDynamicPass.name: QuantizeDynamicPass,
    PruneWeightsPass.name: PruneWeightsPass,  # `--sparsity` runs it with a budget and a target
    PruneChannelsPass.name: PruneChannelsPass,  # `--sparsity-pattern channels` runs it
    ToHalfPass.name: ToHalfPass,  # `--fp16`/`--bf16` run it with decisions and a budget
}
# Not here: TransferPass (onnxopt.transfer; the API's registry adds it, see onnxopt.api), and
# SmoothActivationsPass and SplitOutliersPass need per-channel ranges from
# calibration data (`--int8 --calib` runs them, see onnxopt.quant.smoothing).

# What `onnxopt optimize` runs with no pass flags: exact rewrites only.
DEFAULT_PIPELINE = ("cleanup", "fuse-activations", "fold-batchnorm")


def describe_passes(registry: dict | None = None) -> list[tuple[str, bool, str]]:
    """(name, lossy, one-line description) for every pass of `registry` (default: REGISTRY)."""
    return [(name, cls.lossy, (cls.__doc__ or "").strip().splitlines()[0])
            for name, cls in (REGISTRY if registry is None else registry).items()]
