"""Test helper (not a test module): ImageNet-layout folders of real Fashion-MNIST images."""
import functools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bayes_transfer.data import local_sources

CLASSES = ("bag", "boot", "coat")     # sorted folder names: ids 0, 1, 2
FASHION_IDS = {"bag": 8, "boot": 9, "coat": 4}


@functools.lru_cache(maxsize=1)
def _read():
    directory = local_sources.locate_fashion_mnist()
    images, labels = local_sources.read_fashion_mnist(directory, "test")
    return images[..., 0], labels


def fashion_test_images():
    """Fashion-MNIST's test images (28×28 uint8) and labels; skips where not installed."""
    try:
        return _read()
    except local_sources.SourceMissing as e:
        pytest.skip(f"Fashion-MNIST not installed here: {e.reason}")


def write_folder(root: Path, fashion_images, per_class=(12, 4), *, size=(20, 24),
                 fmt="PNG", rgb=True, splits=("train", "val")) -> Path:
    """An ImageNet-layout folder of real Fashion-MNIST images (upscaled, RGB or grey)."""
    images, labels = fashion_images
    for split, count in zip(splits, per_class):
        offset = 0 if split == "train" else 100
        for name in CLASSES:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == FASHION_IDS[name])[offset:offset + count]:
                im = Image.fromarray(images[i]).resize(size)
                (im.convert("RGB") if rgb else im).save(d / f"{i}.{fmt.lower()}", format=fmt)
    return root
