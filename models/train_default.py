"""Train and export onnxopt's embedded default model: a small ResNet on sklearn's digits.

Run with the export venv (see models/make_all.sh):

    /work/venv-export/bin/python models/train_default.py

Writes
  onnxopt/data/digits_resnet.onnx  TorchScript exporter, opset 17, BN kept unfolded
                                   (TrainingMode.PRESERVE with the module in eval()),
                                   input  `image`  float32 [batch, 1, 64, 64]
                                   output `logits` float32 [batch, 10]
  onnxopt/data/digits_samples.npz  `image` [256, 1, 64, 64] (float32, or float16 if
                                   float32 does not compress below 1.5 MB), `label`
                                   int64 [256]: the first 256 test-split samples,
                                   preprocessed exactly as the model expects.

Preprocessing (done here, NOT in the model): pixel / 16 -> [0, 1], then bilinear
upsampling 8x8 -> 64x64 (torch.nn.functional.interpolate, align_corners=False).
Data: sklearn.datasets.load_digits (ships with scikit-learn, no download), split
with train_test_split(test_size=0.25, random_state=0, stratify=y).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.path.join(ROOT, "onnxopt", "data")
ONNX_PATH = os.path.join(DATA, "digits_resnet.onnx")
NPZ_PATH = os.path.join(DATA, "digits_samples.npz")

SEED = 0
SIZE = 64
STEM = 24
WIDTHS = (32, 64, 128)  # one stage each, 2 basic blocks, first block stride 2
EPOCHS = 12
BATCH = 64
N_SAMPLES = 256
NPZ_LIMIT = 1_500_000


# ---------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class DigitsResNet(nn.Module):
    def __init__(self, stem: int = STEM, widths=WIDTHS, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()
        )
        blocks = []
        cin = stem
        for w in widths:
            blocks += [BasicBlock(cin, w, stride=2), BasicBlock(w, w, stride=1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, image):
        x = self.blocks(self.stem(image))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def count_macs(model: nn.Module, size: int = SIZE) -> int:
    """Analytic multiply-accumulate count for one 1x1xSIZExSIZE image.

    Conv: H_out*W_out*C_out*(C_in/groups)*kH*kW; Linear: in*out. BN/ReLU/Add/pool
    are not counted (BN folds into the convs).
    """
    macs = 0

    def conv_hook(m, inp, out):
        nonlocal macs
        _, co, ho, wo = out.shape
        kh, kw = m.kernel_size
        macs += ho * wo * co * (m.in_channels // m.groups) * kh * kw

    def lin_hook(m, inp, out):
        nonlocal macs
        macs += m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    with torch.no_grad():
        model(torch.zeros(1, 1, size, size))
    for h in hooks:
        h.remove()
    return macs


# ---------------------------------------------------------------- data
def preprocess(x8: np.ndarray) -> torch.Tensor:
    """[N, 64] digits pixels (0..16) -> float32 [N, 1, 64, 64] in [0, 1]."""
    t = torch.from_numpy(x8.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return F.interpolate(t, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random integer shifts of up to +-4 pixels (zero padded), per batch."""
    dx, dy = torch.randint(-4, 5, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if dy > 0:
        x[:, :, :dy] = 0
    elif dy < 0:
        x[:, :, dy:] = 0
    if dx > 0:
        x[:, :, :, :dx] = 0
    elif dx < 0:
        x[:, :, :, dx:] = 0
    return x


def evaluate(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def main() -> int:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print(f"torch {torch.__version__}  onnx {onnx.__version__}  onnxruntime {ort.__version__}")

    digits = load_digits()
    x_tr8, x_te8, y_tr, y_te = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    x_tr, x_te = preprocess(x_tr8), preprocess(x_te8)
    y_tr = torch.from_numpy(y_tr.astype(np.int64))
    y_te = torch.from_numpy(y_te.astype(np.int64))
    print(f"train {tuple(x_tr.shape)}  test {tuple(x_te.shape)}")

    model = DigitsResNet()
    macs = count_macs(model)
    params = sum(p.numel() for p in model.parameters())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    print(f"MACs/image: {macs:,} ({macs / 1e9:.3f} GMAC)  params: {params:,}  BN layers: {n_bn}")

    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = EPOCHS * ((len(x_tr) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.time()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        tot = 0.0
        for i in range(0, len(x_tr), BATCH):
            idx = perm[i : i + BATCH]
            xb = augment(x_tr[idx].clone(), gen)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss) * len(idx)
        acc = evaluate(model, x_te, y_te)
        print(
            f"epoch {epoch + 1:2d}/{EPOCHS}  loss {tot / len(x_tr):.4f}  "
            f"test acc {acc:.4f}  ({time.time() - t0:.0f}s)"
        )
    model.eval()
    torch_acc = evaluate(model, x_te, y_te)
    print(f"torch test accuracy (full test split, {len(x_te)}): {torch_acc:.4f}")

    # ------------------------------------------------------------ export
    os.makedirs(DATA, exist_ok=True)
    torch.onnx.export(
        model,
        (x_te[:1],),
        ONNX_PATH,
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
    )
    m = onnx.load(ONNX_PATH)
    onnx.checker.check_model(m, full_check=True)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    n_bn_onnx = ops.get("BatchNormalization", 0)
    assert n_bn_onnx == n_bn, f"expected {n_bn} BN nodes in ONNX, got {n_bn_onnx}"
    size = os.path.getsize(ONNX_PATH)
    assert size < 5_000_000, size
    print(
        f"ONNX: {os.path.relpath(ONNX_PATH, ROOT)}  opset 17  IR {m.ir_version}  "
        f"nodes {len(m.graph.node)}  {ops}  {size:,} bytes"
    )

    # ------------------------------------------------------------ samples
    xs = x_te[:N_SAMPLES].numpy().astype(np.float32)
    ys = y_te[:N_SAMPLES].numpy().astype(np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, image=xs, label=ys)
    if buf.tell() < NPZ_LIMIT:
        img_dtype = "float32"
        store = xs
    else:
        print(f"float32 samples compress to {buf.tell():,} bytes (> {NPZ_LIMIT:,}): storing float16")
        img_dtype = "float16"
        store = xs.astype(np.float16)
    np.savez_compressed(NPZ_PATH, image=store, label=ys)
    npz_size = os.path.getsize(NPZ_PATH)
    assert npz_size < NPZ_LIMIT, npz_size
    print(f"samples: {os.path.relpath(NPZ_PATH, ROOT)}  image {img_dtype} {store.shape}  "
          f"label int64 {ys.shape}  {npz_size:,} bytes")

    # ------------------------------------------------------------ verify
    loaded = np.load(NPZ_PATH)
    xin = loaded["image"].astype(np.float32)
    lab = loaded["label"]
    sess = ort.InferenceSession(ONNX_PATH, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(None, {"image": xin})[0]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(xin)).numpy()
    diff = float(np.abs(ort_logits - torch_logits).max())
    ort_acc = float((ort_logits.argmax(1) == lab).mean())
    t_acc = float((torch_logits.argmax(1) == lab).mean())
    print(f"accuracy on the {N_SAMPLES} bundled samples: torch {t_acc:.4f}  onnxruntime {ort_acc:.4f}"
          f"  (max |logit diff| {diff:.2e})")
    assert ort_acc == t_acc and diff < 1e-3
    assert torch_acc > 0.95, torch_acc

    # batch-1 latency in onnxruntime (default session options, CPU EP)
    x1 = xin[:1]
    for _ in range(20):
        sess.run(None, {"image": x1})
    times = []
    for _ in range(200):
        t = time.perf_counter()
        sess.run(None, {"image": x1})
        times.append(time.perf_counter() - t)
    ms = 1000 * float(np.median(times))
    print(f"onnxruntime batch-1 latency: median {ms:.2f} ms over 200 runs "
          f"({os.cpu_count()} CPUs, default session options)")

    print("\nSUMMARY")
    print(f"| torch test accuracy (full test split, {len(x_te)} images) | {torch_acc:.4f} |")
    print(f"| accuracy on bundled {N_SAMPLES} samples (torch / onnxruntime) | {t_acc:.4f} / {ort_acc:.4f} |")
    print(f"| MACs per image | {macs:,} ({macs / 1e9:.3f} GMAC) |")
    print(f"| parameters | {params:,} |")
    print(f"| BatchNormalization nodes | {n_bn_onnx} |")
    print(f"| ONNX nodes | {len(m.graph.node)} |")
    print(f"| digits_resnet.onnx size | {size:,} bytes |")
    print(f"| digits_samples.npz size | {npz_size:,} bytes (image {img_dtype}) |")
    print(f"| onnxruntime batch-1 latency (median) | {ms:.2f} ms |")
    print(f"| training + export time | {time.time() - t0:.0f} s ({EPOCHS} epochs, {torch.get_num_threads()} threads) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
