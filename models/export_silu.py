"""Export a small YOLO-style SiLU detector (issue 18: int8 of SiLU/Swish networks) with both
PyTorch exporters.

Run with the export venv (see models/make_all.sh):

    /work/venv-export/bin/python models/export_silu.py

The net, as YOLOv5/v8 build theirs: every Conv is Conv-BN-SiLU (nn.SiLU, which the exporters
write as Sigmoid then Mul); a stem, two stride-2 stages each with a C2f-style block (a 1x1 Conv
split in two halves by torch.chunk, one half through two bottlenecks with a residual Add,
then Concat and a 1x1 Conv), an SPPF block (three chained MaxPool 5x5, Concat), an FPN step
(nearest Upsample x2, Concat with the stage-1 map), and a detect-style head per scale: a
Conv-SiLU then a 1x1 Conv to 4 box + 3 class channels, flattened and concatenated over both
scales into `output` [batch, 7, anchors].

Exported twice with the settings of export_torch.py:
  * TorchScript exporter (dynamo=False, opset 17, TrainingMode.PRESERVE: BN stays a node)
    -> models/silu_detector_ts.onnx
  * dynamo exporter (dynamo=True, opset 18, optimize=False) -> models/silu_detector_dynamo.onnx
    (the per-node stack traces it writes in metadata_props are dropped: 2/3 of the file)

Batch, height and width are dynamic (multiples of 8). Checked: onnx.checker (full), onnxruntime
CPU vs torch eval at two batch and image sizes (max abs diff <
1e-4), size under 250 kB. Seeded: two runs write identical files.
"""

from __future__ import annotations

import argparse
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
SHAPE = (2, 3, 64, 64)

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


class ConvSiLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvSiLU(c, c, 3), ConvSiLU(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.half = c_out // 2
        self.cv1 = ConvSiLU(c_in, c_out)
        self.m = nn.Sequential(Bottleneck(self.half), Bottleneck(self.half))
        self.cv2 = ConvSiLU(c_out + self.half, c_out)

    def forward(self, x):
        a, b = torch.chunk(self.cv1(x), 2, dim=1)
        return self.cv2(torch.cat([a, b, self.m(b)], dim=1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvSiLU(c, c // 2), ConvSiLU(c * 2, c)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], dim=1))


class Head(nn.Module):
    def __init__(self, c: int, outputs: int = 7):
        super().__init__()
        self.cv = ConvSiLU(c, c, 3)
        self.out = nn.Conv2d(c, outputs, 1)

    def forward(self, x):
        return torch.flatten(self.out(self.cv(x)), 2)


class SiLUDetector(nn.Module):
    def __init__(self, width: int = 1):
        super().__init__()
        a, b, c = 8 * width, 16 * width, 32 * width
        self.stem = ConvSiLU(3, a, 3, 2)
        self.stage1 = nn.Sequential(ConvSiLU(a, b, 3, 2), C2f(b, b))
        self.stage2 = nn.Sequential(ConvSiLU(b, c, 3, 2), C2f(c, c), SPPF(c))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = C2f(b + c, b)
        self.head1, self.head2 = Head(b), Head(c)

    def forward(self, x):
        p3 = self.stage1(self.stem(x))
        p4 = self.stage2(p3)
        p3 = self.fuse(torch.cat([self.up(p4), p3], dim=1))
        return torch.cat([self.head1(p3), self.head2(p4)], dim=2)


def build(seed: int = 0, width: int = 1):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    model = SiLUDetector(width)
    for m in model.modules():  # non-trivial BN affine params, running stats from data
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(torch.randn(8, *SHAPE[1:], generator=gen) * 1.3 + 0.1 * i)
    model.eval()
    return model, torch.randn(*SHAPE, generator=gen)


def export_ts(model, x, path):
    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=TS_OPSET,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                    "output": {0: "batch", 2: "anchors"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)


def export_dynamo(model, x, path):
    auto = torch.export.Dim.AUTO  # batch, height and width (multiples of 8) are left free
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=DYNAMO_OPSET,
                                input_names=["input"], output_names=["output"],
                                dynamic_shapes=({0: auto, 2: auto, 3: auto},), optimize=False,
                                external_data=False, verbose=False, report=False)
    program.save(path, external_data=False)
    # The dynamo exporter records each node's Python stack in metadata_props: 400 kB of a
    # 600 kB file. The graph is untouched; only that metadata is dropped.
    saved = onnx.load(path)
    for node in saved.graph.node:
        del node.metadata_props[:]
    onnx.save(saved, path)


def verify(model, x, path, max_bytes: int | None = 250_000) -> dict:
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(7)
    diffs = []
    for batch, size in ((x.shape[0], x.shape[2]), (3, 96)):  # another batch and image size
        xi = torch.randn(batch, x.shape[1], size, size, generator=gen)
        with torch.no_grad():
            expected = model(xi).numpy()
        got = session.run(None, {name: xi.numpy()})[0]
        assert got.shape == expected.shape, (path, got.shape, expected.shape)
        diffs.append(float(np.abs(got - expected).max()))
    assert max(diffs) < TOL, f"{path}: max abs diff {max(diffs)}"
    size = os.path.getsize(path)
    assert max_bytes is None or size < max_bytes, f"{path}: {size} bytes"
    ops = sorted({n.op_type for n in m.graph.node})
    return {"file": os.path.basename(path), "nodes": len(m.graph.node), "size": size,
            "diff": max(diffs), "ops": " ".join(ops)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1,
                        help="channel multiplier: 4 gives 32-128 channels, YOLOv8n's order "
                             "(benchmarks/int8.py's silu_detector_w4; not committed)")
    parser.add_argument("--out", default=HERE, help="folder (default: models/)")
    parser.add_argument("--exporters", default="ts,dynamo")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}  onnx {onnx.__version__}  onnxruntime {ort.__version__}")
    rows = []
    suffix = "" if args.width == 1 else f"_w{args.width}"
    for exporter, export in (("ts", export_ts), ("dynamo", export_dynamo)):
        if exporter not in args.exporters.split(","):
            continue
        model, x = build(width=args.width)
        path = os.path.join(args.out, f"silu_detector{suffix}_{exporter}.onnx")
        export(model, x, path)
        rows.append(verify(model, x, path, 250_000 if args.width == 1 else None))
    print("| file | nodes | bytes | max abs diff | ops |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['nodes']} | {r['size']} | {r['diff']:.1e} | {r['ops']} |")
    print(f"OK: {len(rows)} files verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
