"""Export small nets for structured channel pruning (prune-channels) with both PyTorch exporters.

Run with the export venv (see models/make_all.sh):

    /work/venv-export/bin/python models/export_prune.py

Cases, each exported twice with the settings of export_torch.py:
  * TorchScript exporter (dynamo=False, opset 17, training=TrainingMode.PRESERVE so that BN
    stays a node) -> models/prune_<case>_ts.onnx
  * dynamo exporter (dynamo=True, opset 18, optimize=False) -> models/prune_<case>_dynamo.onnx

  cnn: Conv-BN-ReLU stem; a residual block with a strided 1x1 Conv-BN shortcut; a
       depthwise-separable block (depthwise 3x3 + pointwise 1x1); a grouped Conv (groups=4);
       torch.chunk on channels into two branches joined by torch.cat; global average pool,
       flatten, and an MLP head (Linear-ReLU-Linear).
  mlp: Linear(bias) - ReLU - Linear(no bias: a MatMul in the TorchScript file) - ReLU - Linear.

Every file is checked: onnx.checker (full), onnxruntime CPU vs torch eval output at two batch
sizes (max abs diff < 1e-4), size under 200 kB. Seeded: two runs write identical files.
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
TS_OPSET = 17
DYNAMO_OPSET = 18

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class PruneCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3)
        self.conv1 = conv_bn(16, 24, 3, stride=2)
        self.conv2 = conv_bn(24, 24, 3, relu=False)
        self.shortcut = conv_bn(16, 24, 1, stride=2, relu=False)
        self.depthwise = conv_bn(24, 24, 3, groups=24)
        self.pointwise = conv_bn(24, 32, 1)
        self.grouped = conv_bn(32, 32, 3, groups=4)
        self.branch_a = conv_bn(16, 16, 1)
        self.branch_b = conv_bn(16, 8, 3)
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))
        x = self.pointwise(self.depthwise(x))
        x = self.grouped(x)
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.cat([self.branch_a(a), self.branch_b(b)], dim=1)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class PruneMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 48)
        self.fc2 = nn.Linear(48, 32, bias=False)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


# case name -> (module factory, input shape with batch first)
CASES = {
    "cnn": (PruneCNN, (2, 3, 32, 32)),
    "mlp": (PruneMLP, (4, 20)),
}


def build(case: str, seed: int):
    factory, shape = CASES[case]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    model = factory()
    for m in model.modules():  # non-trivial BN affine params and running stats
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    model.train()
    with torch.no_grad():  # running stats from data, as export_torch.py does
        for i in range(3):
            model(torch.randn(8, *shape[1:], generator=gen) * 1.3 + 0.1 * i)
    model.eval()
    return model, torch.randn(*shape, generator=gen)


def export_ts(model, x, path):
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=TS_OPSET,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)


def export_dynamo(model, x, path):
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=DYNAMO_OPSET,
                                input_names=["input"], output_names=["output"],
                                dynamic_shapes=({0: batch},), optimize=False,
                                external_data=False, verbose=False, report=False)
    program.save(path, external_data=False)


def verify(model, x, path) -> dict:
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(7)
    diffs = []
    for batch in (x.shape[0], 3):
        xi = torch.randn(batch, *x.shape[1:], generator=gen)
        with torch.no_grad():
            expected = model(xi).numpy()
        got = session.run(None, {name: xi.numpy()})[0]
        assert got.shape == expected.shape, (path, got.shape, expected.shape)
        diffs.append(float(np.abs(got - expected).max()))
    assert max(diffs) < TOL, f"{path}: max abs diff {max(diffs)}"
    size = os.path.getsize(path)
    assert size < 200_000, f"{path}: {size} bytes"
    ops = sorted({n.op_type for n in m.graph.node})
    return {"file": os.path.basename(path), "nodes": len(m.graph.node), "size": size,
            "diff": max(diffs), "ops": " ".join(ops)}


def main() -> int:
    print(f"torch {torch.__version__}  onnx {onnx.__version__}  onnxruntime {ort.__version__}")
    rows = []
    for seed, case in enumerate(CASES):
        for exporter, export in (("ts", export_ts), ("dynamo", export_dynamo)):
            model, x = build(case, seed)
            path = os.path.join(HERE, f"prune_{case}_{exporter}.onnx")
            export(model, x, path)
            rows.append(verify(model, x, path))
    print("| file | nodes | bytes | max abs diff | ops |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['nodes']} | {r['size']} | {r['diff']:.1e} | {r['ops']} |")
    print(f"OK: {len(rows)} files verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
