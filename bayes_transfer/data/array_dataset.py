"""In-memory datasets: numpy arrays plus the little metadata the rest of the code needs."""

from __future__ import annotations

import dataclasses

import numpy as np

from bayes_transfer.data.errors import DatasetFormatError


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
      normalization: ``(mean, std)`` per channel of pixel values in [0, 1], used by
        `batches` instead of the statistics looked up by ``name`` (images decoded from
        a folder or a tfds dataset carry their model's normalisation), or ``None``.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...] | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

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

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(H, W, C)`` of one image."""
        return tuple(self.images.shape[1:])

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
    """Train / validation / test sets of one task (same classes in all three).

    Each is an ``ArrayDataset`` or a ``StreamedDataset`` (decoded batch by batch);
    ``notes`` says what loading skipped (files that are not images, unreadable images).
    """

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.train.class_names


_LUMINANCE = np.array([0.299, 0.587, 0.114], np.float32)   # PIL's "L" conversion


def with_channels(dataset: ArrayDataset, channels: int) -> ArrayDataset:
    """``dataset`` with ``channels`` channels: grey repeated into RGB, RGB made grey by
    luminance; unchanged if it has them already. Any other conversion is an error."""
    have = dataset.images.shape[-1]
    if have == channels:
        return dataset
    if (have, channels) == (1, 3):
        images = np.repeat(dataset.images, 3, axis=-1)
    elif (have, channels) == (3, 1):
        grey = dataset.images.astype(np.float32) @ _LUMINANCE
        if dataset.images.dtype == np.uint8:
            grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        images = grey[..., None]
    else:
        raise DatasetFormatError(f"{dataset.name} has {have}-channel images and the model takes "
                                 f"{channels}; only grey <-> RGB conversions are made")
    return dataclasses.replace(dataset, images=images)

