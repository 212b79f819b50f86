"""`onnxopt demo`: the main job on the embedded default model, with its bundled digits.

The default is a small ResNet-style CNN trained on scikit-learn's 8x8 digits (upsampled to
64x64), exported with its BatchNormalization nodes unfolded. The demo optimizes it with the
default pipeline, verifies it on the bundled test samples, times both models, and adds the
task metric (top-1 accuracy against the labels) for original and optimized.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import api
from onnxopt.inputs import Feeds
from onnxopt.measure import runtime
from onnxopt.quant.int8 import Int8Options
from onnxopt.report import Report
from onnxopt.sparsity.options import CHANNELS, SparsityOptions

__all__ = ["SPARSITY_STORY", "run_demo", "demo_feeds"]

_BATCH = 8  # small batches: more timing runs in the same time, and many verified batches
# `demo --sparsity`: what pays on ORT CPU is removing channels (zeros alone are not faster);
# 25% of the MACs holds the default budget here (30% reaches cosine 0.985); on this small
# CNN the weight norms rank channels a little better than the activations.
SPARSITY_STORY = SparsityOptions(0.25, pattern=CHANNELS, importance="l2")


def demo_feeds() -> tuple[list[Feeds], np.ndarray]:
    """The bundled samples as batches of 32, and their labels."""
    with np.load(api.default_samples_path()) as data:
        images = data["image"].astype(np.float32)  # may be stored as float16 to stay small
        labels = data["label"].astype(np.int64)
    batches = [{"image": images[i:i + _BATCH]} for i in range(0, len(images), _BATCH)]
    return batches, labels


def _top1(model: ir.Model, feeds: list[Feeds]) -> np.ndarray:
    with runtime.model_session(model) as session:
        return np.concatenate([
            np.argmax(next(iter(runtime.run(session, batch).values())), axis=1)
            for batch in feeds
        ])


def run_demo(
    dst: str | os.PathLike | None = None,
    options: api.OptimizeOptions | None = None,
    *,
    progress: api.Progress | None = None,
    int8: bool = False,
    sparsity: bool = False,
) -> tuple[ir.Model, Report]:
    """Optimize the embedded default; without `dst` the result goes to a temporary folder.
    With `int8`, calibrate on the bundled digits (80% of the batches; the rest judge the budget).
    With `sparsity`, the channel-pruning story (SPARSITY_STORY): a quarter of the MACs removed
    as whole channels, the layers that read them re-fitted on the digits."""
    feeds, labels = demo_feeds()
    options = options or api.OptimizeOptions()
    with tempfile.TemporaryDirectory(prefix="onnxopt-demo-") as tmp:
        calib = Path(tmp) / "calib.npz"  # the model's input only: the labels are not an input
        if int8 or sparsity:
            np.savez(calib, image=np.stack([batch["image"] for batch in feeds]))
        if int8:
            options = dataclasses.replace(options, int8=Int8Options(calib=str(calib)))
        if sparsity:
            options = dataclasses.replace(options, sparsity=dataclasses.replace(
                SPARSITY_STORY, calib=str(calib)))
        target = Path(dst) if dst is not None else Path(tmp) / "digits_resnet.optimized.onnx"
        original = api.default_model_path()
        model, report = api.optimize(original, target, options, feeds=feeds, progress=progress)
        if dst is None:
            report.destination = None  # the temporary file is gone when we return
    before = _top1(ir.load(original), feeds)
    after = _top1(model, feeds)
    report.metrics[f"digits top-1 ({len(labels)} samples)"] = [
        float(np.mean(before == labels)), float(np.mean(after == labels))
    ]
    report.metrics["top-1 agreement with original"] = [1.0, float(np.mean(before == after))]
    return model, report
