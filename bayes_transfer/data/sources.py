"""Image sources: random access by index, labels readable without decoding any image.

Every source (an ImageNet-layout folder split, a tfds catalog split, arrays in memory)
has the same small interface, which `StreamedDataset`, the grain pipeline and few-shot
sampling need and nothing more:

* ``len(source)``; ``source.labels``: ``(N,)`` int32 class ids, known without decoding;
* ``source[i]``: the record of example ``i``, encoded image bytes or a uint8 array
  (`image_ops.transform` takes either);
* ``source.describe(i)``: what to name in an error (a file path, ``tfds:mnist[train][7]``);
* ``num_classes``, ``class_names``, ``name``, ``channels`` (1 or 3: the images' own),
  ``fingerprint`` (a short string that changes when the data does; checkpoints of a
  streamed run record it).

Sources are pickled to grain's worker processes, so they hold no open file handles
across pickling (a tfds source reopens its files in each worker).
"""
from __future__ import annotations

import hashlib

import numpy as np


class ArraySource:
    """uint8 images ``(N, H, W, C)`` held in memory (a built-in dataset, your arrays)."""

    def __init__(self, images, labels, num_classes: int, name: str = "arrays",
                 class_names=None):
        images, labels = np.asarray(images), np.asarray(labels, np.int32)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 NHWC, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.num_classes, self.name = int(num_classes), name
        self.class_names = None if class_names is None else tuple(class_names)
        self.channels = int(images.shape[-1])
        digest = hashlib.sha256(images[:: max(1, len(images) // 64)].tobytes())
        digest.update(labels.tobytes())
        self.fingerprint = f"arrays:{name}:{len(labels)}:{digest.hexdigest()[:16]}"

    @classmethod
    def from_dataset(cls, dataset) -> "ArraySource":
        """The source of an in-memory ``ArrayDataset`` (uint8 images)."""
        return cls(dataset.images, dataset.labels, dataset.num_classes, dataset.name,
                   dataset.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[int(i)]

    def describe(self, i: int) -> str:
        return f"{self.name}[{int(i)}]"

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, n={len(self)}, image_shape={self.images.shape[1:]})"
