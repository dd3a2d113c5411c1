"""Mixed source datasets: ``"fashion_mnist:0-4+mnist_5k"`` is Fashion-MNIST classes 0–4
followed by the ten MNIST-5k digits, one 15-class task.

Each part keeps its own normalisation (a garment is standardised with Fashion-MNIST's
statistics, a digit with MNIST's), so a prior learned on a mix sees every image exactly
as a prior learned on that part alone would. The mixed images are therefore stored
already standardised as float32, under a name with no entry in `NORMALIZATION_STATS`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from bayes_transfer.data.array_dataset import ArrayDataset
from bayes_transfer.data.normalization import NORMALIZATION_STATS, normalize

MIX_SEPARATOR = "+"


def parse_classes(text: str | None) -> tuple[int, ...] | None:
    """``"0-4"`` → ``(0, 1, 2, 3, 4)``; ``"5,7"`` → ``(5, 7)``; empty or None → None."""
    if not text:
        return None
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-"))
            return tuple(range(lo, hi + 1))
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"cannot read classes {text!r}: write a range '0-4' or a list "
                         f"'5,6,7'") from None


def is_mix(name: str) -> bool:
    """Whether ``name`` names a mix (``a+b``) or a class subset (``a:0-4``) of datasets."""
    return MIX_SEPARATOR in name or ":" in name


def parse_mix(name: str) -> list[tuple[str, tuple[int, ...] | None]]:
    """``"fashion_mnist:0-4+mnist_5k"`` → ``[("fashion_mnist", (0,…,4)), ("mnist_5k", None)]``."""
    parts = []
    for part in name.split(MIX_SEPARATOR):
        dataset, _, classes = part.strip().partition(":")
        if not dataset:
            raise ValueError(f"empty dataset name in mix {name!r}; write e.g. "
                             f"'fashion_mnist:0-4+mnist_5k'")
        parts.append((dataset, parse_classes(classes)))
    return parts


def mix_datasets(parts: Sequence[ArrayDataset], name: str) -> ArrayDataset:
    """One dataset with the classes of ``parts`` side by side (part i's labels shifted by
    the classes before it), each part's images standardised with its own statistics."""
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"cannot mix datasets of different image shapes {sorted(shapes)} "
                         f"in {name!r}")
    images, labels, names, offset = [], [], [], 0
    for p in parts:
        stats = p.name if p.name in NORMALIZATION_STATS else None
        images.append(normalize(p.images, stats))
        labels.append(p.labels + offset)
        names += ([f"{p.name}:{c}" for c in p.class_names] if p.class_names is not None
                  else [f"{p.name}:{c}" for c in range(p.num_classes)])
        offset += p.num_classes
    return ArrayDataset(images=np.concatenate(images), labels=np.concatenate(labels),
                        num_classes=offset, name=name, class_names=tuple(names))


def load_mix_arrays(name: str, load_arrays: Callable, select_classes: Callable,
                    **kwargs) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` of the mix ``name``: each part loaded with ``load_arrays``."""
    trains, tests = [], []
    for dataset, classes in parse_mix(name):
        train, test = load_arrays(dataset, **kwargs)
        if classes is not None:
            train, test = select_classes(train, classes), select_classes(test, classes)
        trains.append(train)
        tests.append(test)
    return mix_datasets(trains, name), mix_datasets(tests, name)
