"""Shuffled mini-batches of an `ArrayDataset` as numpy dicts, reproducible per (seed, epoch)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from bayes_transfer.data.array_dataset import ArrayDataset
from bayes_transfer.data.normalization import NORMALIZATION_STATS, normalize


def num_batches(dataset: ArrayDataset | int, batch_size: int, *,
                drop_remainder: bool = True) -> int:
    """How many batches `batches` yields per epoch (``dataset`` may be its length).

    A dataset smaller than ``batch_size`` gives one batch (the whole dataset),
    even with ``drop_remainder``: few-shot training sets can be tiny.
    """
    n = dataset if isinstance(dataset, int) else len(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n == 0:
        return 0
    if n <= batch_size:
        return 1
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def batches(dataset: ArrayDataset, batch_size: int, *, seed: int, epoch: int,
            shuffle: bool = True, drop_remainder: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{"image": float32 NHWC normalised, "label": int32}`` batches for one epoch.

    The order is ``np.random.default_rng([seed, epoch]).permutation(n)`` (or
    ``0..n-1`` without ``shuffle``), so a resumed run sees the same batches. Each
    example appears at most once per epoch; with ``drop_remainder`` the last
    incomplete batch is skipped, except that a dataset smaller than
    ``batch_size`` is yielded whole as a single batch. Images are normalised with
    the dataset's mean/std when ``dataset.name`` has stored statistics (see
    `normalize`), otherwise only scaled to [0, 1].

    A `StreamedDataset` (images decoded when needed) yields the same batches (same
    order) through the grain pipeline, each image resized and centre-cropped to its
    model's input and normalised with ``dataset.normalization``; an ``ArrayDataset``
    with ``normalization`` set is normalised with it.

    A dataset that defines ``make_batch(indices, rng)`` (a segmentation dataset,
    yielding ``{"image", "mask"}`` and cutting random crops) builds its own batches;
    ``rng`` is ``np.random.default_rng([seed, epoch, batch index])``.
    """
    n = len(dataset)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    eval_batches = getattr(dataset, "eval_batches", None)
    if eval_batches is not None:        # a StreamedDataset: decoded by the grain pipeline
        yield from eval_batches(batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                                drop_remainder=drop_remainder)
        return
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    stats_name = dataset.name if dataset.name in NORMALIZATION_STATS else None
    # (mean, std) of an ArrayDataset decoded from images; a segmentation dataset's
    # `normalization` names statistics, and it builds its own batches (make_batch).
    norm = getattr(dataset, "normalization", None)
    mean, std = norm if isinstance(norm, tuple) else (None, None)
    size = min(batch_size, n)
    make_batch = getattr(dataset, "make_batch", None)
    for b in range(num_batches(n, batch_size, drop_remainder=drop_remainder)):
        idx = order[b * size:(b + 1) * size]
        if make_batch is not None:
            yield make_batch(idx, np.random.default_rng([seed, epoch, b]))
            continue
        if mean is not None:
            yield {"image": normalize(dataset.images[idx], mean=mean, std=std),
                   "label": dataset.labels[idx]}
            continue
        yield {"image": normalize(dataset.images[idx], stats_name),
               "label": dataset.labels[idx]}
