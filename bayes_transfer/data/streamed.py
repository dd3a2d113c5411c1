"""`StreamedDataset`: examples of an image source, decoded when a batch needs them.

It looks like an ``ArrayDataset`` to the rest of the package (``len``, ``labels``,
``num_classes``, ``name``, ``class_names``, ``image_shape``, ``subset``), so class
subsets, few-shot sampling, label noise, ``fit``, ``predict`` and BatchNorm refreshes
take either; only the images are not held in memory. Batches come from the grain
pipeline (`bayes_transfer.data.pipeline`): training batches get a random-resized crop
and a flip, all others a resize and centre crop, at ``spec.size`` (`image_ops`).

``workers`` grain worker processes decode and transform (0: in this process).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from bayes_transfer.data.array_dataset import ArrayDataset
from bayes_transfer.data.errors import DatasetFormatError
from bayes_transfer.data.image_ops import InputSpec, transform
from bayes_transfer.data.pipeline import decode_all, eval_batches

SKIP_HINT = ("replace or remove it, or pass --skip-bad-images (load(..., "
             "skip_bad_images=True)) to leave out every unreadable image (they are counted "
             "and listed)")


def load_example(source, index: int, spec: InputSpec, rng, flip: bool = True) -> np.ndarray:
    """``source[index]`` transformed (training if ``rng`` is given), or a
    `DatasetFormatError` naming the file: never an anonymous error from a worker."""
    try:
        return transform(source[index], spec, rng, flip)
    except Exception as e:     # PIL raises OSError, SyntaxError, ValueError, ...
        raise DatasetFormatError(f"cannot read image {source.describe(index)}: "
                                 f"{type(e).__name__}: {e}; {SKIP_HINT}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedDataset:
    """Examples ``indices`` of ``source`` with labels ``labels`` (after any relabelling).

    Attributes:
      source: an image source (`bayes_transfer.data.sources` describes the interface).
      indices: ``(N,)`` positions in ``source``.
      labels: ``(N,)`` int32 class ids in ``0..num_classes-1``.
      spec: the model's input (size, channels, normalisation).
      workers: grain worker processes for decoding (0: decode in this process).
    """

    source: Any
    indices: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    spec: InputSpec
    class_names: tuple[str, ...] | None = None
    workers: int = 0

    def __post_init__(self):
        indices = np.asarray(self.indices, np.int64)
        labels = np.asarray(self.labels, np.int32)
        if indices.shape != labels.shape or indices.ndim != 1:
            raise ValueError(f"{indices.shape} indices but {labels.shape} labels")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "labels", labels)
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    @classmethod
    def from_source(cls, source, spec: InputSpec, *, workers: int = 0) -> "StreamedDataset":
        """Every example of ``source``, with its own labels and class names."""
        return cls(source, np.arange(len(source)), source.labels, source.num_classes,
                   source.name, spec, source.class_names, workers)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.spec.shape

    @property
    def normalization(self):
        return self.spec.mean, self.spec.std

    @property
    def fingerprint(self) -> str:
        """The source's fingerprint and which of its examples: a checkpoint records it."""
        digest = hashlib.sha256(self.indices.tobytes() + self.labels.tobytes()).hexdigest()
        return f"{self.source.fingerprint}:{len(self)}:{digest[:16]}:{self.spec.as_dict()}"

    def subset(self, indices) -> "StreamedDataset":
        """The examples at ``indices`` (positions in this dataset), same classes."""
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, indices=self.indices[indices], labels=self.labels[indices])

    def example(self, i: int, rng=None, *, flip: bool = True) -> np.ndarray:
        """Example ``i`` as a uint8 ``image_shape`` array (training transform with ``rng``:
        a random-resized crop, flipped half the time if ``flip``)."""
        return load_example(self.source, int(self.indices[i]), self.spec, rng, flip)

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.indices[i]))

    def eval_batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                     drop_remainder: bool = True):
        """What `bayes_transfer.data.batches` yields for this dataset (evaluation
        transform, decoded by the grain pipeline)."""
        return eval_batches(self, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                            drop_remainder=drop_remainder)

    def materialize(self) -> ArrayDataset:
        """All examples decoded (evaluation transform) into an in-memory ``ArrayDataset``
        that keeps this dataset's normalisation: few-shot sets live in memory."""
        images = decode_all(self)
        return ArrayDataset(images=images, labels=self.labels, num_classes=self.num_classes,
                            name=self.name, class_names=self.class_names,
                            normalization=self.normalization)

    def __repr__(self) -> str:
        return (f"StreamedDataset(name={self.name!r}, n={len(self)}, image_shape="
                f"{self.image_shape}, num_classes={self.num_classes}, source={self.source!r})")
