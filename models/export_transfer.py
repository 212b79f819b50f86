"""Export the test models for `onnxopt transfer` (initializer transfer between exports).

Run with the export venv (see models/make_all.sh):

    /work/venv-export/bin/python models/export_transfer.py

One small network, `TransferNet`: Conv+BN+ReLU twice, the feature map as 64 tokens, a Linear on
the tokens (3-D: MatMul + Add), LayerNorm, GELU, mean over tokens, a bias-less square Linear
(`features`), then a Linear head (`logits`). Two outputs, so a transfer that moves only the
backbone can still be checked on `features`. Every file gets its own seed, so no two files hold
the same weights: a transfer that did nothing cannot pass a test.

    transfer_net_ts.onnx          TorchScript, opset 17, BN kept (TrainingMode.PRESERVE), seed 0
    transfer_net_dynamo.onnx      dynamo, opset 18, optimize=False, seed 1
    transfer_net_folded_ts.onnx   TorchScript, opset 17, TrainingMode.EVAL: the exporter folds
                                  Conv+BN, so the Conv weights get new names, seed 2
    transfer_net_opset14_ts.onnx  TorchScript, opset 14: LayerNorm decomposed into
                                  ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add, seed 3
    transfer_newhead_dynamo.onnx  the same backbone with a 5-class head (transfer learning), seed 4
    transfer_ambiguous_src_ts.onnx  Linear, Mul(scale.0), ReLU, Linear, Mul(scale.1)  (ParameterList)
    transfer_ambiguous_dst_ts.onnx  Linear, Mul(scale), ReLU: which SRC layer goes where is not
                                  decidable from names (scale.0 and scale.1 both normalize to
                                  `scale`) nor from structure (one layer of two was dropped)

Every file is checked: onnx.checker (full), onnxruntime CPU vs torch eval (max abs < 1e-4 at
two batch sizes), size < 100 kB.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-4
MAX_BYTES = 100_000

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(16)
        self.tok = nn.Linear(16, 16)  # on [N, 64, 16]: MatMul + Add in both exporters
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16, bias=False)  # square: MatMul [in, out] vs Gemm transB
        self.relu = nn.ReLU()
        self.gelu = nn.GELU()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = self.gelu(self.norm(self.tok(tokens)))
        return self.proj(tokens.mean(1))


class TransferNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        features = self.backbone(x)
        return features, self.head(torch.relu(features))


class AmbiguousSrc(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.b = nn.Linear(16, 16, bias=False)
        self.scale = nn.ParameterList([nn.Parameter(torch.rand(16) + 0.5) for _ in range(2)])

    def forward(self, x):
        x = torch.relu(self.a(x) * self.scale[0])
        return self.b(x) * self.scale[1]


class AmbiguousDst(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x):
        return torch.relu(self.a(x) * self.scale)


def randomize(module: nn.Module, seed: int) -> None:
    """Seeded non-trivial BN and LayerNorm parameters, then running stats from data."""
    gen = torch.Generator().manual_seed(seed + 1000)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 2.0 + 0.1)
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
    if any(isinstance(m, nn.BatchNorm2d) for m in module.modules()):
        module.train()
        with torch.no_grad():
            for i in range(3):
                module(torch.randn(8, 3, 16, 16, generator=gen) * 1.3 + 0.1 * i)
    module.eval()


def build(factory, seed: int, *args):
    torch.manual_seed(seed)
    model = factory(*args)
    randomize(model, seed)
    return model


def export_ts(model, x, path, *, opset=17, fold_bn=False):
    names = ["features", "logits"] if isinstance(model, TransferNet) else ["output"]
    torch.onnx.export(
        model, (x,), path, dynamo=False, opset_version=opset, input_names=["input"],
        output_names=names, dynamic_axes={n: {0: "batch"} for n in ["input", *names]},
        training=torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
    )


def export_dynamo(model, x, path, *, opset=18):
    names = ["features", "logits"] if isinstance(model, TransferNet) else ["output"]
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
        output_names=names, dynamic_shapes=({0: batch},), optimize=False,
        external_data=False, verbose=False, report=False,
    )
    program.save(path, external_data=False)


def check(model, x, path) -> str:
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for batch in (x.shape[0], 3):
        xi = torch.randn(batch, *x.shape[1:], generator=gen)
        with torch.no_grad():
            expected = model(xi)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {"input": xi.numpy()})
        for e, g in zip(expected, got, strict=True):
            worst = max(worst, float(np.abs(e.numpy() - g).max()))
    assert worst < TOL, f"{path}: max abs diff {worst}"
    size = os.path.getsize(path)
    assert size < MAX_BYTES, f"{path}: {size} bytes"
    ops = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return (f"| {os.path.basename(path)} | {len(proto.graph.node)} | {ops.get('BatchNormalization', 0)} "
            f"| {ops.get('LayerNormalization', 0)} | {len(proto.graph.initializer)} | {size} "
            f"| {worst:.1e} |")


def main() -> int:
    print(f"torch {torch.__version__}  onnx {onnx.__version__}  onnxruntime {ort.__version__}")
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    vector = torch.randn(2, 16, generator=torch.Generator().manual_seed(6))
    jobs = [
        ("transfer_net_ts.onnx", build(TransferNet, 0), image, export_ts, {}),
        ("transfer_net_dynamo.onnx", build(TransferNet, 1), image, export_dynamo, {}),
        ("transfer_net_folded_ts.onnx", build(TransferNet, 2), image, export_ts, {"fold_bn": True}),
        ("transfer_net_opset14_ts.onnx", build(TransferNet, 3), image, export_ts, {"opset": 14}),
        ("transfer_newhead_dynamo.onnx", build(TransferNet, 4, 5), image, export_dynamo, {}),
        ("transfer_ambiguous_src_ts.onnx", build(AmbiguousSrc, 5), vector, export_ts, {}),
        ("transfer_ambiguous_dst_ts.onnx", build(AmbiguousDst, 6), vector, export_ts, {}),
    ]
    print("| file | nodes | BN | LayerNormalization | initializers | bytes | max abs diff |")
    print("|" + "---|" * 7)
    for name, model, x, export, kwargs in jobs:
        path = os.path.join(HERE, name)
        export(model, x, path, **kwargs)
        print(check(model, x, path))
    print(f"OK: {len(jobs)} files verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
