"""Natural-image transforms: decode, random-resized crop + flip, resize + centre crop.

Everything here runs on the host (in grain worker processes when there are workers),
on one example at a time, with PIL. The output is a uint8 array of the model's input
size and channels; normalisation (``InputSpec.mean`` / ``std``) is applied when the
batch is assembled, so the worker processes ship 4× fewer bytes.

* training: :func:`random_resized_crop_box` (area 8–100 %, aspect ratio 3/4–4/3, ten
  tries then a centre crop) resized to ``size × size``, and a horizontal flip with
  probability ½;
* evaluation: the shorter side resized to ``size / 0.875`` (256 for 224), then the
  centre ``size × size`` (one resize with a crop box, no intermediate image);
* channels: grey images become RGB by repeating the channel and RGB becomes grey by
  PIL's luminance (``L = 0.299 R + 0.587 G + 0.114 B``); palette, RGBA, CMYK, 16-bit
  images are converted the same way. Any other channel count is an error.

JPEGs are decoded at a reduced scale (PIL's ``draft``) when the crop is still at least
the target size after it, which makes decoding large photos several times faster.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from bayes_transfer.errors import BayesTransferError

#: ImageNet statistics of pixel values in [0, 1] (RGB), the default for RGB inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The grey equivalent (the channel averages), the default for one-channel inputs.
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)

_MODES = {1: "L", 3: "RGB"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model takes: ``size × size`` images with ``channels`` channels, normalised
    by ``(x / 255 − mean) / std`` per channel.

    ``mean``/``std`` default to ImageNet's statistics (their channel averages for grey
    images). ``crop_scale`` is the random-resized crop's range of areas (training) and
    ``eval_ratio`` the share of the resized image the evaluation centre crop keeps.

    >>> InputSpec(224).mean
    (0.485, 0.456, 0.406)
    """

    size: int
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    eval_ratio: float = 0.875

    def __post_init__(self):
        if int(self.size) < 1:
            raise BayesTransferError(f"image size must be >= 1, got {self.size}")
        if self.channels not in _MODES:
            raise BayesTransferError(
                f"models here take 1 (grey) or 3 (RGB) channels; {self.channels} channels "
                f"cannot be made from an image")
        grey = self.channels == 1
        mean = self.mean or (IMAGENET_GREY_MEAN if grey else IMAGENET_MEAN)
        std = self.std or (IMAGENET_GREY_STD if grey else IMAGENET_STD)
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) == 1 and self.channels == 3:
            mean, std = mean * 3, std * 3
        if len(mean) != self.channels or len(std) != self.channels or min(std) <= 0:
            raise BayesTransferError(f"normalisation mean {mean} / std {std} do not fit "
                                     f"{self.channels} channels (std must be > 0)")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise BayesTransferError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got "
                                     f"{self.crop_scale}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_scale", (float(lo), float(hi)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    def as_dict(self) -> dict:
        """JSON form (stored with a prior or a model: fine-tuning uses the same input)."""
        return {"size": self.size, "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(int(d["size"]), int(d.get("channels", 3)), tuple(d["mean"]),
                   tuple(d["std"]))


def to_pil(record) -> Image.Image:
    """A PIL image (not yet decoded, for encoded bytes) from a source's record: encoded
    bytes (JPEG, PNG, …), or a uint8 array ``(H, W)`` / ``(H, W, C)``."""
    if isinstance(record, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(record))
    array = np.asarray(record)
    if array.dtype != np.uint8:
        raise ValueError(f"array images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """``(left, top, right, bottom)`` of a random crop covering ``scale`` of the area
    with aspect ratio in ``ratio`` (log-uniform); after ten misses, the centre crop
    with the aspect ratio clamped to ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, ratio: float):
    """The centre square of side ``ratio · min(width, height)``."""
    side = max(1.0, ratio * min(width, height))
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def _draft(image: Image.Image, box, size: int, mode: str):
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale when the crop keeps ``size`` pixels."""
    if image.format != "JPEG":
        return box
    width, height = image.size
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    want = (math.ceil(width * size / box_w), math.ceil(height * size / box_h))
    image.draft(mode if image.mode in ("L", "RGB") else None, want)
    fx, fy = image.size[0] / width, image.size[1] / height
    return box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy


def transform(record, spec: InputSpec, rng: np.random.Generator | None,
              flip: bool = True) -> np.ndarray:
    """One example, ``spec.shape`` uint8: training crop (+ flip if ``flip``) when ``rng``
    is given, evaluation resize + centre crop when it is ``None``. Raises whatever PIL raises on a
    corrupt or truncated image (the caller names the file)."""
    image = to_pil(record)
    width, height = image.size
    if rng is None:
        box = center_crop_box(width, height, spec.eval_ratio)
    else:
        box = random_resized_crop_box(width, height, rng, spec.crop_scale)
    mode = _MODES[spec.channels]
    box = _draft(image, box, spec.size, mode)
    image.load()                      # decodes now: a truncated file raises here
    if image.mode != mode:
        image = image.convert(mode)
    image = image.resize((spec.size, spec.size), Image.BILINEAR, box=box)
    out = np.asarray(image, dtype=np.uint8).reshape(spec.shape)
    if rng is not None and flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def normalize_batch(images: np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """float32 ``(x / 255 − mean) / std`` per channel of uint8 NHWC ``images``."""
    x = images.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
