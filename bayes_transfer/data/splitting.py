"""Deterministic, stratified index selection: few-shot sets, hold-outs, class subsets, noise.

Everything here is a pure function of its arguments (numpy in, numpy out), so the
same seed always gives the same indices.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Separate random streams per purpose, so that (for example) adding label noise
# does not change which examples were drawn: rng = default_rng([seed, STREAM]).
_NOISE_STREAM = 1
_HOLDOUT_STREAM = 2
_WITHIN_STREAM = 3


def _take_per_class(labels: np.ndarray, counts: dict[int, int], rng: np.random.Generator,
                    exclude: np.ndarray | None) -> np.ndarray:
    labels = np.asarray(labels)
    allowed = np.ones(len(labels), bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    chosen = []
    for c in sorted(counts):  # fixed class order keeps the draw reproducible
        candidates = np.flatnonzero((labels == c) & allowed)
        if counts[c] > len(candidates):
            raise ValueError(f"class {c} has only {len(candidates)} available examples, "
                             f"{counts[c]} requested")
        # A full permutation (not choice(k)) so that for one seed the k-shot set is
        # a prefix of the (k+1)-shot set: nested training sets for learning curves.
        chosen.append(rng.permutation(candidates)[: counts[c]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def few_shot_indices(labels: np.ndarray, k: int, seed: int, *,
                     exclude: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    """Sorted indices of ``k`` examples of every class present in ``labels``.

    Examples in ``exclude`` are never chosen (use it to draw a validation set
    disjoint from a training set). Same ``(labels, k, seed, exclude)`` → same
    indices; with the same seed and no ``exclude`` the k-shot set is contained in
    every larger-k set. Raises ``ValueError`` if a class has fewer than ``k``.

    >>> few_shot_indices(np.array([0, 0, 1, 1, 1]), 1, seed=0).shape
    (2,)
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    classes = np.unique(np.asarray(labels))
    return _take_per_class(labels, {int(c): k for c in classes},
                           np.random.default_rng(seed), exclude)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(fraction · n_c)`` examples of each class c."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    per_class = {int(c): int(round(fraction * n)) for c, n in zip(classes, counts)}
    return _take_per_class(labels, per_class,
                           np.random.default_rng([seed, _HOLDOUT_STREAM]), None)


def holdout_within(labels: np.ndarray, indices: np.ndarray, per_class: int,
                   seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` examples of each class drawn from ``indices``
    (a validation split taken out of a labelled set rather than beside it)."""
    indices = np.asarray(indices, dtype=np.int64)
    sub = np.asarray(labels)[indices]
    picked = _take_per_class(sub, {int(c): per_class for c in np.unique(sub)},
                             np.random.default_rng([seed, _WITHIN_STREAM]), None)
    return np.sort(indices[picked])


def complement_of(indices: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Sorted ``indices`` that are not in ``part``."""
    return np.setdiff1d(np.asarray(indices, dtype=np.int64), np.asarray(part, dtype=np.int64))


def complement(indices: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices in ``range(n)`` that are not in ``indices``."""
    keep = np.ones(n, bool)
    keep[np.asarray(indices, dtype=np.int64)] = False
    return np.flatnonzero(keep)


def relabel_classes(labels: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keep only ``classes`` and renumber them ``0..len(classes)-1`` in the given order.

    Returns ``(indices_kept, new_labels)``.
    """
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be a non-empty sequence of distinct ids, got {classes}")
    if min(classes) < 0:
        raise ValueError(f"class ids must be >= 0, got {classes}")
    labels = np.asarray(labels)
    kept = np.flatnonzero(np.isin(labels, classes))
    table = np.full(max(classes) + 1, -1, np.int32)  # old id -> new id
    table[classes] = np.arange(len(classes))
    return kept, table[labels[kept]]


def noisy_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """Copy of ``labels`` with exactly ``round(fraction · n)`` of them changed.

    Each changed label becomes a different class drawn uniformly from the other
    ``num_classes − 1`` (so "noise 0.2" really means 20 % wrong labels).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise must be in [0, 1], got {fraction}")
    labels = np.asarray(labels)
    n_flip = int(round(fraction * len(labels)))
    if n_flip and num_classes < 2:
        raise ValueError("label noise needs at least 2 classes")
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    flip = rng.choice(len(labels), size=n_flip, replace=False)
    out = labels.copy()
    out[flip] = (labels[flip] + rng.integers(1, num_classes, size=n_flip)) % num_classes
    return out
