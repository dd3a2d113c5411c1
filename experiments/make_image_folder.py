"""Write an ImageNet-layout folder of real images: Fashion-MNIST upscaled to RGB JPEGs.

    python experiments/make_image_folder.py OUT --train 10000 --val 500 [--size 256]
        [--classes 0-9] [--offset 0]

``OUT/train/<class name>/<index>.jpg`` from Fashion-MNIST's training set and
``OUT/val/...`` from its test set, balanced over the classes, each 28×28 image resized
(bicubic) to ``--size``² and saved as an RGB JPEG (quality 90; a light per-class tint
so the three channels differ). ``--offset`` starts later in each class, so two folders
can hold different images (e.g. a source and a target task with ``--classes``).
This is the input of the data-pipeline benchmarks (``experiments/bench_data.py``) and
the ResNet-50 end-to-end run in ``docs/data.md``.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bayes_transfer.data.local_sources import locate_fashion_mnist, read_fashion_mnist
from bayes_transfer.data.mixing import parse_classes
from bayes_transfer.data.tfds_builders import FASHION_MNIST_CLASSES

TINTS = np.array([[1.0, 0.9, 0.8], [0.8, 1.0, 0.9], [0.9, 0.8, 1.0], [1.0, 1.0, 0.8],
                  [0.8, 0.9, 1.0], [1.0, 0.8, 0.9], [0.9, 1.0, 0.8], [0.8, 1.0, 1.0],
                  [1.0, 0.85, 1.0], [0.9, 0.9, 0.9]], np.float32)


def write(out: Path, split: str, images, labels, per_class: int, classes, size: int,
          offset: int) -> int:
    written = 0
    for c in classes:
        name = re.sub(r"[^a-z0-9]+", "_", FASHION_MNIST_CLASSES[c].lower()).strip("_")
        d = out / split / name
        d.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[offset:offset + per_class]:
            grey = Image.fromarray(images[i, :, :, 0]).resize((size, size), Image.BICUBIC)
            rgb = np.asarray(grey, np.float32)[..., None] * TINTS[c]
            Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg",
                                                                   quality=90)
            written += 1
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=10000, help="training images in all")
    p.add_argument("--val", type=int, default=500, help="val (test) images in all")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--classes", default="0-9", help="Fashion-MNIST classes, '0-4' or '5,7'")
    p.add_argument("--offset", type=int, default=0,
                   help="skip this many training images per class (a sixth as many test images)")
    args = p.parse_args(argv)
    classes = parse_classes(args.classes)
    directory = locate_fashion_mnist()
    out, t0 = Path(args.out), time.perf_counter()
    n = 0
    for split, source, total in (("train", "train", args.train), ("val", "test", args.val)):
        images, labels = read_fashion_mnist(directory, source)
        # the test set is 1/6 of the training set's size: the offset scales with it
        offset = args.offset if split == "train" else args.offset // 6
        n += write(out, split, images, labels, -(-total // len(classes)), classes, args.size,
                   offset)
    print(f"wrote {n} JPEGs ({args.size}x{args.size} RGB) to {out} in "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
