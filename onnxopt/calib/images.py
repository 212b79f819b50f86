"""Images as model inputs: the `--preprocess` spec and the pixels-to-tensor conversion.

    x = (pixel · scale - mean[c]) / std[c]     (pixel in 0…255 after a bilinear resize, channel c)
then laid out NCHW or NHWC. Pillow reads the files (`pip install pillow`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxopt.errors import BadInputError, first_line
from onnxopt.inputs import InputSpec, show_dims

__all__ = ["Preprocess", "parse_preprocess", "image_size", "load_image"]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How an image becomes an input tensor: resize, scale, normalise per channel, lay out."""

    size: tuple[int, int] | None = None  # (H, W); None: the model input's fixed H and W
    mean: tuple[float, ...] = (0.0,)  # one value, or one per channel; 0 keeps pixels as scaled
    std: tuple[float, ...] = (1.0,)  # one value, or one per channel
    scale: float = 1 / 255  # most vision models take pixels in [0, 1] before mean/std
    layout: str = "NCHW"  # NCHW (PyTorch exports) or NHWC (TensorFlow exports)
    channels: str = "RGB"  # RGB, BGR (OpenCV-trained models) or GRAY


def parse_preprocess(text: str) -> Preprocess:
    """`size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW,scale=1/255`."""
    fields: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        try:
            if not sep or key not in _PARSERS:
                raise ValueError
            fields[key] = _PARSERS[key](value.strip())
        except (ValueError, ZeroDivisionError):
            raise BadInputError(
                f"--preprocess {item!r}: expected one of size=H|HxW, mean=A/B/C, std=A/B/C, "
                "scale=X|1/255, layout=NCHW|NHWC, channels=RGB|BGR|GRAY"
            ) from None
    return Preprocess(**fields)


def _parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    size = (int(height), int(width or height))
    if min(size) <= 0:
        raise ValueError
    return size


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(_parse_number(v) for v in text.split("/"))


def _parse_number(text: str) -> float:
    numerator, sep, denominator = text.partition("/")
    return float(numerator) / float(denominator) if sep else float(numerator)


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.upper() not in choices:
            raise ValueError
        return text.upper()

    return parse


def _parse_std(text: str) -> tuple[float, ...]:
    values = _parse_floats(text)
    if min(values) <= 0:
        raise ValueError
    return values


_PARSERS: dict[str, Callable[[str], object]] = {
    "size": _parse_size,
    "mean": _parse_floats,
    "std": _parse_std,
    "scale": _parse_number,
    "layout": _parse_choice("NCHW", "NHWC"),
    "channels": _parse_choice("RGB", "BGR", "GRAY"),
}


def image_size(folder, spec: InputSpec, preprocess: Preprocess) -> tuple[int, int]:
    """(H, W) from --preprocess size= or the model's fixed dims; they must agree."""
    channel_axis, height_axis = (1, 2) if preprocess.layout == "NCHW" else (3, 1)
    channels = 1 if preprocess.channels == "GRAY" else 3
    model_channels = spec.dims[channel_axis]
    where = f"--calib {folder}: input {spec.name!r} {show_dims(spec.dims)}"
    if isinstance(model_channels, int) and model_channels != channels:
        raise BadInputError(
            f"{where} wants {model_channels} channels at axis {channel_axis}; "
            f"--preprocess gives {channels} (channels={preprocess.channels}, "
            f"layout={preprocess.layout})"
        )
    for name, values in (("mean", preprocess.mean), ("std", preprocess.std)):
        if len(values) not in (1, channels):
            raise BadInputError(
                f"--preprocess {name}: {len(values)} values for {channels} channels"
            )
    model_size = (spec.dims[height_axis], spec.dims[height_axis + 1])
    if preprocess.size is None:
        if not all(isinstance(d, int) for d in model_size):
            raise BadInputError(f"{where} has no fixed height/width; declare --preprocess size=HxW")
        return model_size
    if any(isinstance(d, int) and d != s for d, s in zip(model_size, preprocess.size)):
        raise BadInputError(
            f"{where}: --preprocess size={preprocess.size[0]}x{preprocess.size[1]} does not fit"
        )
    return preprocess.size


def load_image(path: Path, spec: InputSpec, preprocess: Preprocess, size) -> np.ndarray:
    """x = (pixel · scale - mean) / std in float32, resized bilinearly to `size` (H, W)."""
    from PIL import Image

    height, width = size
    try:
        with Image.open(path) as image:
            image = image.convert("L" if preprocess.channels == "GRAY" else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32)
    except Exception as error:
        raise BadInputError(f"{path}: unreadable image ({first_line(error)})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if preprocess.channels == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(preprocess.mean, np.float32)
    std = np.asarray(preprocess.std, np.float32)
    x = (pixels * np.float32(preprocess.scale) - mean) / std
    if preprocess.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=spec.dtype)
