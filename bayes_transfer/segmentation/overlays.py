"""Pictures of segmentation results: image, truth, prediction and errors side by side."""
from __future__ import annotations

import os

import numpy as np

from bayes_transfer.evaluation.plots import save_figure


def _class_colours(num_classes: int, hidden=()) -> np.ndarray:
    """A distinct colour per shown class (tab10 while they fit), grey for hidden ones."""
    import matplotlib

    shown = [c for c in range(num_classes) if c not in hidden]
    cmap = matplotlib.colormaps["tab10" if len(shown) <= 10 else "tab20"]
    colours = np.full((num_classes, 3), 0.5)
    for k, c in enumerate(shown):
        colours[c] = cmap(k % cmap.N)[:3]
    return colours


def _overlay(grey: np.ndarray, labels: np.ndarray, colours: np.ndarray, hidden, alpha: float):
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    tint = colours[np.clip(labels, 0, len(colours) - 1)]
    shown = ~np.isin(labels, hidden)
    rgb[shown] = (1 - alpha) * rgb[shown] + alpha * tint[shown]
    return rgb


def save_overlays(dataset, probs, path, *, indices=None, max_images: int = 4,
                  window: int | None = None, alpha: float = 0.45, title: str | None = None,
                  dpi: int = 120):
    """PNG grid: for each image, the image, the truth and the prediction over it, and errors.

    ``probs`` are ``(N, H, W, C)`` probabilities (or ``(N, H, W)`` predicted labels) of
    ``dataset``'s whole images; ``indices`` picks which (default: the first
    ``max_images``). Classes named ``background`` are left untinted; the last column
    shows wrong pixels in red and the prediction's confidence as brightness elsewhere.
    ``window`` shows only the top-left ``window × window`` pixels (large images: a
    readable figure and a small file). Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    probs = np.asarray(probs)
    pred = probs if probs.ndim == 3 else np.argmax(probs, axis=-1)
    conf = None if probs.ndim == 3 else probs.max(axis=-1)
    indices = list(range(min(max_images, len(dataset)))) if indices is None else list(indices)
    names = list(dataset.class_names or [str(c) for c in range(dataset.num_classes)])
    hidden = [i for i, n in enumerate(names) if n == "background"]
    colours = _class_colours(dataset.num_classes, hidden)
    fig, axes = plt.subplots(len(indices), 4, figsize=(10, 2.6 * len(indices) + 0.6),
                             squeeze=False)
    for row, i in enumerate(indices):
        win = (slice(None, window), slice(None, window))
        image = dataset.images[i][win].astype(np.float32)
        image = image / 255.0 if dataset.images.dtype == np.uint8 else image
        grey = image[..., 0] if image.shape[-1] == 1 else image.mean(-1)
        truth = dataset.masks[i][win]
        pred_i, conf_i = pred[i][win], None if conf is None else conf[i][win]
        valid = (truth != dataset.ignore_index if dataset.ignore_index is not None
                 else np.ones(truth.shape, bool))
        wrong = (pred_i != truth) & valid
        err = np.repeat((grey if conf_i is None else conf_i)[..., None], 3, -1) * 0.6
        err[wrong] = (0.9, 0.1, 0.1)
        panels = [(np.repeat(grey[..., None], 3, -1), "image"),
                  (_overlay(grey, truth, colours, hidden, alpha), "truth"),
                  (_overlay(grey, pred_i, colours, hidden, alpha), "prediction"),
                  (err, "errors (red)")]
        for col, (img, label) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=9)
        axes[row, 3].set_xlabel(f"{100 * wrong.sum() / max(np.sum(valid), 1):.1f}% of pixels "
                                f"wrong", fontsize=8)
    shown = [c for c in range(dataset.num_classes) if c not in hidden]
    fig.legend(handles=[Patch(color=colours[c], label=names[c]) for c in shown],
               loc="lower center", ncol=min(len(shown), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return os.fspath(save_figure(fig, path, dpi=dpi))
