"""In-memory datasets: numpy arrays plus the little metadata the rest of the code needs."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images and labels held in memory.

    Attributes:
      images: ``(N, H, W, C)``; uint8 in 0..255, or float32 in [0, 1] (or already
        standardised, for a dataset whose ``name`` has no normalisation statistics,
        such as a mix).
      labels: ``(N,)`` int32 class ids in ``0..num_classes-1`` (``(N, H, W)`` masks
        for segmentation).
      num_classes: number of classes (after any class subset).
      name: the dataset it came from (``"fashion_mnist"``…); `normalize` looks up
        the dataset's mean/std by this name.
      class_names: the original name of each class id, or ``None``.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        images, labels = np.asarray(self.images), np.asarray(self.labels, dtype=np.int32)
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
        if images.dtype not in (np.uint8, np.float32):
            raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        object.__setattr__(self, "images", images)  # frozen: set the converted arrays once
        object.__setattr__(self, "labels", labels)
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> "ArrayDataset":
        """The examples at ``indices`` (a copy), same classes and metadata."""
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])

    def __repr__(self) -> str:  # the default would print the arrays
        return (f"ArrayDataset(name={self.name!r}, n={len(self)}, image_shape="
                f"{self.images.shape[1:]}, dtype={self.images.dtype}, "
                f"num_classes={self.num_classes})")


@dataclasses.dataclass(frozen=True)
class Splits:
    """Train / validation / test sets of one task (same classes in all three)."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.train.class_names
