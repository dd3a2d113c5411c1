"""Datasets for bayes_transfer: offline tfds builders, few-shot splits, augmentation, batches.

>>> from bayes_transfer import data
>>> splits = data.load("mnist_5k", shots_per_class=10, seed=0)  # doctest: +SKIP
>>> for batch in data.batches(splits.train, 32, seed=0, epoch=0):  # doctest: +SKIP
...     ...

Datasets resolve offline first (prepared tfds data → local source files → tfds
catalog download only if allowed); see `load` and `DATASETS`.
"""

from bayes_transfer.data.array_dataset import ArrayDataset, Splits
from bayes_transfer.data.augmentation import augment
from bayes_transfer.data.batching import batches, num_batches
from bayes_transfer.data.errors import DatasetFormatError, DatasetNotFoundError, UnknownDatasetError
from bayes_transfer.data.loading import DATASETS, load, load_arrays, select_classes, split_dataset
from bayes_transfer.data.image_ops import InputSpec
from bayes_transfer.data.normalization import NORMALIZATION_STATS, normalize
from bayes_transfer.data.pipeline import batch_stream, find_unreadable, prefetch
from bayes_transfer.data.segmentation import load_segmentation_folder
from bayes_transfer.data.splitting import few_shot_indices
from bayes_transfer.data.streamed import StreamedDataset

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "InputSpec",
    "NORMALIZATION_STATS",
    "Splits",
    "StreamedDataset",
    "UnknownDatasetError",
    "augment",
    "batch_stream",
    "batches",
    "few_shot_indices",
    "find_unreadable",
    "load",
    "load_arrays",
    "load_segmentation_folder",
    "normalize",
    "prefetch",
    "num_batches",
    "select_classes",
    "split_dataset",
]
