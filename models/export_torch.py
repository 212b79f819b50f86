"""Export small Conv/Linear + BatchNormalization test models with both PyTorch exporters.

Run with the export venv (see models/make_all.sh):

    /work/venv-export/bin/python models/export_torch.py

Every case is exported twice:
  * TorchScript exporter (dynamo=False, opset 17) -> models/<case>_ts.onnx
  * dynamo exporter      (dynamo=True,  opset 18) -> models/<case>_dynamo.onnx
plus one old-opset file: models/conv2d_bn_opset9_ts.onnx (TorchScript, opset 9).

The BatchNormalization nodes must survive export (they are what onnxopt's BN
folding is tested on):
  * TorchScript folds Conv+BN when exporting in eval mode (TrainingMode.EVAL), so
    we export with training=TrainingMode.PRESERVE while the module is in eval():
    BN stays as an inference-mode BatchNormalization node.
  * the dynamo exporter is run with optimize=False so the onnxscript optimizer
    cannot fold anything either; the script asserts BN nodes are present.

Every file is checked: onnx.checker, BN count > 0, onnxruntime CPU vs torch eval
output (max abs diff < 1e-4, also at a second batch size for the dynamic dim).
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


def randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Give every BN layer non-trivial affine params and running stats."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 2.0 + 0.1)


def warm_stats(module: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """Also run a few train-mode forwards so running stats come from real data."""
    module.train()
    with torch.no_grad():
        for i in range(steps):
            module(x + 0.1 * i)
    module.eval()


# ---------------------------------------------------------------- modules
class Conv2dBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True)
        self.b2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        return self.relu(self.b2(self.c2(x)))


class Conv2dGroupedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=True)
        self.b2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        return self.relu(self.b2(self.c2(x)))


class Conv2dDepthwiseBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=True)  # depth multiplier 2
        self.b2 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1, bias=False)
        self.b3 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.dw(x)))
        x = self.relu(self.b2(self.dw2(x)))
        return self.relu(self.b3(self.pw(x)))


class Conv1dBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, padding=2, bias=False)
        self.b1 = nn.BatchNorm1d(8)
        self.c2 = nn.Conv1d(8, 8, 3, padding=1, bias=True)
        self.b2 = nn.BatchNorm1d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        return self.relu(self.b2(self.c2(x)))


class Conv3dBN(nn.Module):
    # first_bias=False is used for the TorchScript export only: onnxscript 0.7.2's
    # torchlib aten_conv3d builds the implicit zero bias with shape [C_out, 2]
    # (Concat(weight_dim_0, [2])), so a bias-less Conv3d exported by dynamo with
    # optimize=False is rejected by onnxruntime ("bias must be a 1D tensor").
    # With optimize=True the Conv+BN fusion hides this, but it also removes the BN.
    def __init__(self, first_bias: bool = False):
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, padding=1, bias=first_bias)
        self.b1 = nn.BatchNorm3d(4)
        self.c2 = nn.Conv3d(4, 8, 3, padding=1, bias=True)
        self.b2 = nn.BatchNorm3d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        return self.relu(self.b2(self.c2(x)))


class ConvTransposeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.t1 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(8)
        # grouped transpose conv: weight [in=8, out/groups=3, k, k] -> out 6 channels
        self.t2 = nn.ConvTranspose2d(8, 6, 3, stride=1, padding=1, groups=2, bias=False)
        self.b2 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.t1(x)))
        return self.relu(self.b2(self.t2(x)))


class LinearBN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 32, bias=True)
        self.b1 = nn.BatchNorm1d(32)
        self.l2 = nn.Linear(32, 16, bias=False)
        self.b2 = nn.BatchNorm1d(16)
        self.l3 = nn.Linear(16, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.l1(x)))
        x = self.relu(self.b2(self.l2(x)))
        return self.l3(x)


# case name -> (module factory, input shape with batch first)
CASES = {
    "conv2d_bn": (Conv2dBN, (2, 3, 16, 16)),
    "conv2d_grouped_bn": (Conv2dGroupedBN, (2, 8, 12, 12)),
    "conv2d_depthwise_bn": (Conv2dDepthwiseBN, (2, 8, 12, 12)),
    "conv1d_bn": (Conv1dBN, (2, 4, 32)),
    "conv3d_bn": (Conv3dBN, (2, 2, 6, 8, 8)),
    "convtranspose_bn": (ConvTransposeBN, (2, 8, 8, 8)),
    "linear_bn1d": (LinearBN1d, (4, 16)),
}


def build(case: str, seed: int, exporter: str = "ts"):
    factory, shape = CASES[case]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    if factory is Conv3dBN:
        model = factory(first_bias=(exporter == "dynamo"))
    else:
        model = factory()
    randomize_bn(model, gen)
    x_warm = torch.randn(8, *shape[1:], generator=gen) * 1.3 + 0.2
    warm_stats(model, x_warm)
    # keep the randomized scale/shift but mix in data-driven running stats
    model.eval()
    x = torch.randn(*shape, generator=gen)
    return model, x


# ---------------------------------------------------------------- export
def export_ts(model, x, path, opset=TS_OPSET):
    torch.onnx.export(
        model,
        (x,),
        path,
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
    )


def export_dynamo(model, x, path, opset=DYNAMO_OPSET):
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=({0: batch},),
        optimize=False,
        external_data=False,
        verbose=False,
        report=False,
    )
    prog.save(path, external_data=False)


def bn_count(m: onnx.ModelProto) -> int:
    return sum(1 for n in m.graph.node if n.op_type == "BatchNormalization")


def verify(model, x, path) -> dict:
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    nbn = bn_count(m)
    assert nbn > 0, f"{path}: no BatchNormalization node left"
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            for a in n.attribute:
                if a.name == "training_mode":
                    assert a.i == 0, f"{path}: BN in training mode"
            assert len(n.output) == 1 or all(o == "" for o in n.output[1:]), (
                f"{path}: BN has training outputs {list(n.output)}"
            )
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    diffs = []
    gen = torch.Generator().manual_seed(7)
    for bs in (x.shape[0], 3):
        xi = torch.randn(bs, *x.shape[1:], generator=gen)
        with torch.no_grad():
            ref = model(xi).numpy()
        got = sess.run(None, {in_name: xi.numpy()})[0]
        assert got.shape == ref.shape, (path, got.shape, ref.shape)
        diffs.append(float(np.abs(got - ref).max()))
    d = max(diffs)
    assert d < TOL, f"{path}: max abs diff {d}"
    size = os.path.getsize(path)
    assert size < 200_000, f"{path}: {size} bytes"
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    dims = [
        (d_.dim_param or d_.dim_value) for d_ in m.graph.input[0].type.tensor_type.shape.dim
    ]
    return dict(
        file=os.path.basename(path),
        opset=opset,
        ir=m.ir_version,
        nodes=len(m.graph.node),
        bn=nbn,
        size=size,
        diff=d,
        input=f"{m.graph.input[0].name} {dims}",
        inits=len(m.graph.initializer),
        consts=sum(1 for n in m.graph.node if n.op_type == "Constant"),
    )


def main() -> int:
    print(f"torch {torch.__version__}  onnx {onnx.__version__}  onnxruntime {ort.__version__}")
    rows = []
    for i, case in enumerate(CASES):
        model, x = build(case, seed=i, exporter="ts")
        p_ts = os.path.join(HERE, f"{case}_ts.onnx")
        export_ts(model, x, p_ts)
        rows.append(verify(model, x, p_ts))
        model, x = build(case, seed=i, exporter="dynamo")
        p_dy = os.path.join(HERE, f"{case}_dynamo.onnx")
        export_dynamo(model, x, p_dy)
        rows.append(verify(model, x, p_dy))

    # old opset, TorchScript only
    model, x = build("conv2d_bn", seed=0)
    p9 = os.path.join(HERE, "conv2d_bn_opset9_ts.onnx")
    export_ts(model, x, p9, opset=9)
    rows.append(verify(model, x, p9))

    hdr = "| file | opset | IR | nodes | BN | initializers | Constant nodes | bytes | input | max abs diff |"
    print(hdr)
    print("|" + "---|" * 10)
    for r in rows:
        print(
            f"| {r['file']} | {r['opset']} | {r['ir']} | {r['nodes']} | {r['bn']} | {r['inits']} "
            f"| {r['consts']} | {r['size']} | {r['input']} | {r['diff']:.2e} |"
        )
    print(f"OK: {len(rows)} files verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
