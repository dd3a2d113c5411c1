"""Scale uint8 images to [0, 1] and standardise them with per-dataset statistics."""

from __future__ import annotations

import numpy as np

# Mean and standard deviation of the pixel values in [0, 1] over each dataset's
# full train split (computed once with `pixel_stats`; tests check they still
# match). Class subsets and few-shot sets use the statistics of the whole
# dataset, so source and target tasks from one dataset see the same inputs.
NORMALIZATION_STATS: dict[str, tuple[float, float]] = {
    "fashion_mnist": (0.2860406, 0.3530242),
    "mnist_5k": (0.1310732, 0.3082813),
    "digits": (0.3056909, 0.3761054),  # after the 0..16 → 0..255 rescale
    "isbi2012_membrane": (0.4947577, 0.1726351),  # all 30 labelled images
}


def pixel_stats(images) -> tuple[float, float]:
    """``(mean, std)`` of uint8 ``images`` scaled to [0, 1] (float64 accumulation)."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    return float(x.mean()), float(x.std())


def normalize(images, dataset: str | None = None, *, mean: float | None = None,
              std: float | None = None):
    """float32 images: uint8 → ``/255`` into [0, 1], then ``(x − mean) / std``.

    ``mean``/``std`` come from ``dataset``'s entry in `NORMALIZATION_STATS`, or
    are given directly (scalars, or one value per channel); with neither, images are
    only scaled to [0, 1]. float32 input is taken to be in [0, 1] already. Works on
    numpy and jax arrays.

    >>> float(normalize(np.full((1, 2, 2, 1), 255, np.uint8))[0, 0, 0, 0])
    1.0
    """
    if dataset is not None:
        if dataset not in NORMALIZATION_STATS:
            raise ValueError(f"no normalisation statistics for {dataset!r}; known: "
                             f"{sorted(NORMALIZATION_STATS)} (or pass mean= and std=)")
        if mean is None and std is None:
            mean, std = NORMALIZATION_STATS[dataset]
    x = images.astype(np.float32)
    if images.dtype == np.uint8:
        x = x / np.float32(255.0)
    if mean is not None or std is not None:
        x = (x - _const(mean, 0.0)) / _const(std, 1.0)
    return x


def _const(value, default):
    """float32 scalar, or a float32 vector for per-channel statistics."""
    if value is None:
        return np.float32(default)
    if np.ndim(value):
        return np.asarray(value, np.float32)
    return np.float32(value)
