"""Semantic segmentation under a learned prior: data, MAP fine-tuning, metrics, pictures.

The encoder of a :class:`~bayes_transfer.models.segmentation.SegmentationModel` is the
backbone a classification prior covers, so every fine-tuning method of
:func:`bayes_transfer.inference.map.finetune` (standard, l2, l2sp, isotropic, diag,
lowrank; λ chosen on validation mIoU or pixel NLL) applies unchanged. The objective is
``map_loss(N, task="segmentation")``: per-pixel cross-entropy averaged per image, plus
``−log p(θ_backbone)/N`` with N the number of training *images*, plus a weight decay on
the decoder (the segmentation "head")::

    import bayes_transfer as bt
    from bayes_transfer import segmentation as seg

    prior = bt.load_prior("fashion-mnist/small-cnn")
    splits = seg.load_task("isbi", num_train=6, seed=0)       # or "fashion_scenes", a DIR
    model = seg.model_from_prior(prior, splits.num_classes)
    res = seg.finetune_segmentation(model, splits, prior, "lowrank", steps=300)
    print(res.scale, res.metrics["miou"])
    seg.save_overlays(splits.test, res.test_probs, "outputs/isbi_overlays.png")
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer import metrics as btmetrics
from bayes_transfer.data.batching import num_batches
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.inference.map import (DEFAULT_VARIANCES, FinetuneConfig, FinetuneResult,
                                          finetune)
from bayes_transfer.models.segmentation import (SegmentationModel, create_segmentation,
                                                segmentation_config,
                                                segmentation_model_from_prior)
from bayes_transfer.objectives import head_sq_norm, map_loss
from bayes_transfer.train import TrainConfig, TrainResult, predict

__all__ = [
    "DECODER_RULE", "DATASETS", "default_config", "evaluate_segmentation", "finetune_segmentation",
    "load_segmentation_model", "load_task", "model_from_prior", "predict_probs",
    "save_overlays", "save_segmentation_model", "segmentation_loss", "segmentation_metrics",
]

#: Parameters of the decoder, the segmentation counterpart of a classifier's head.
DECODER_RULE = r"^decoder/"

#: Named segmentation tasks of :func:`load_task` (any other name is taken as a folder).
DATASETS = {
    "isbi": "ISBI-2012 EM membranes: 30 labelled 512×512 images, 2 classes, split by image",
    "fashion_scenes": "2-4 Fashion-MNIST objects pasted on 64×64 canvases; 11 classes "
                      "(background + 10 garments), or background + a class subset",
}

model_from_prior = segmentation_model_from_prior


# ------------------------------------------------------------------------------ data

def load_task(name: str, num_train: int, *, seed: int = 0, **options):
    """Train / val / test `Splits` of a segmentation task.

    ``name``: ``"isbi"`` (:func:`~bayes_transfer.data.seg_dataset.load_isbi`; ``num_train``
    images, options ``crop``, ``crops_per_image``, ``val``, ``path`` ...),
    ``"fashion_scenes"`` (:func:`~bayes_transfer.data.scenes.load_fashion_scenes`;
    ``num_train`` scenes, options ``classes``, ``canvas``, ``num_val``, ``num_test`` ...)
    or the path of an ``image/`` + ``label/`` folder
    (:func:`~bayes_transfer.data.seg_dataset.load_segmentation_splits`).
    """
    from bayes_transfer.data import scenes, seg_dataset

    if name in ("isbi", "isbi2012", seg_dataset.ISBI_NAME):
        return seg_dataset.load_isbi(num_train, seed=seed, **options)
    if name in ("fashion_scenes", "fashion-scenes"):
        return scenes.load_fashion_scenes(num_train, seed=seed, **options)
    if os.path.isdir(name):
        return seg_dataset.load_segmentation_splits(name, num_train, seed=seed, **options)
    raise BayesTransferError(f"unknown segmentation dataset {name!r}: use one of "
                             f"{', '.join(DATASETS)} or the path of a folder holding "
                             f"image/ and label/")


# ------------------------------------------------------------------------------ loss

@functools.lru_cache(maxsize=64)
def segmentation_loss(num_train: int, *, decoder_decay: float = 0.0,
                      ignore_index: int | None = None):
    """``map_loss(num_train, task="segmentation")`` + ``decoder_decay·‖θ_decoder‖²/2``.

    Cached per setting, so a λ sweep or several seeds reuse one compiled step.
    """
    base = map_loss(num_train, task="segmentation", ignore_index=ignore_index)
    if not decoder_decay:
        return base

    def loss_fn(apply, params, rest, batch, rng, prior):
        loss, (new_rest, parts) = base(apply, params, rest, batch, rng, prior)
        decay = 0.5 * decoder_decay * head_sq_norm(params, DECODER_RULE)
        return loss + decay, (new_rest, parts)

    return loss_fn


# ------------------------------------------------------------------------------ evaluation

def predict_probs(result_or_model, dataset, *, batch_size: int = 4) -> np.ndarray:
    """Per-pixel class probabilities ``(N, H, W, C)`` of whole images (no crops)."""
    whole = dataset.whole() if hasattr(dataset, "whole") else dataset
    logits = predict(result_or_model, whole, batch_size=batch_size)
    return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def segmentation_metrics(probs, masks, num_classes: int, *, ignore_index: int | None = None,
                         n_bins: int = 15, class_names=None) -> dict[str, float]:
    """mIoU, pixel accuracy, pixel NLL / ECE / Brier and per-class IoU, as Python floats.

    IoUs come from the confusion matrix summed over all images (``iou/<class>`` is NaN
    for a class in neither the prediction nor the truth; ``miou`` averages the others).
    NLL, ECE (``n_bins`` equal-width confidence bins) and Brier treat every non-ignored
    pixel as one prediction.
    """
    probs = np.asarray(probs)
    masks = np.asarray(masks)
    pred = np.argmax(probs, axis=-1)
    cm = btmetrics.confusion_matrix(pred, masks, num_classes, ignore_index)
    iou = np.asarray(btmetrics.iou_from_confusion(cm))
    valid = (masks != ignore_index) if ignore_index is not None else np.ones(masks.shape, bool)
    p, y = probs[valid], masks[valid]
    acc = float(btmetrics.pixel_accuracy(pred[valid], y))
    out = {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
           "pixel_accuracy": acc, "error": 1.0 - acc,
           "nll": float(btmetrics.nll(p, y)), "ece": float(btmetrics.ece(p, y, n_bins)),
           "brier": float(btmetrics.brier(p, y))}
    names = class_names or [str(c) for c in range(num_classes)]
    out.update({f"iou/{name}": float(v) for name, v in zip(names, iou)})
    return out


def evaluate_segmentation(result_or_model, dataset, *, batch_size: int = 4,
                          n_bins: int = 15) -> tuple[dict[str, float], np.ndarray]:
    """(:func:`segmentation_metrics`, probabilities) on the whole images of ``dataset``."""
    probs = predict_probs(result_or_model, dataset, batch_size=batch_size)
    metrics = segmentation_metrics(probs, dataset.masks, dataset.num_classes,
                                   ignore_index=dataset.ignore_index, n_bins=n_bins,
                                   class_names=dataset.class_names)
    return metrics, probs


# ------------------------------------------------------------------------------ fine-tuning

def default_config(*, steps: int = 300, batch_size: int = 4, learning_rate: float = 1e-3,
                   decoder_decay: float = 1e-4, variances=DEFAULT_VARIANCES,
                   select_by: str = "miou", seed: int = 0, progress: bool = False
                   ) -> tuple[FinetuneConfig, int]:
    """(FinetuneConfig, steps) for segmentation: Adam, cosine schedule, λ by val mIoU.

    ``config.head_decay`` is the decoder's weight decay; ``variances`` the effective prior
    variances of the λ grid (default: classification's, 1e-2..100: with N = a few images
    and d ≈ 1e5 covered weights, smaller ones freeze the encoder). The number of epochs is set from
    ``steps`` by :func:`finetune_segmentation` (it depends on the training-set size).
    """
    train = TrainConfig(epochs=1, batch_size=batch_size, optimizer="adam",
                        learning_rate=learning_rate, schedule="cosine", seed=seed,
                        progress=progress, desc="segment")
    return FinetuneConfig(train=train, head_decay=decoder_decay, variances=tuple(variances),
                          select_by=select_by), steps


def finetune_segmentation(model: SegmentationModel, splits, prior, method: str = "lowrank", *,
                          scale="auto", config: FinetuneConfig | None = None,
                          steps: int | None = 300, cache: dict | None = None,
                          eval_batch_size: int = 4, n_bins: int = 15) -> FinetuneResult:
    """MAP fine-tuning of a segmentation model under ``prior.for_method(method)``.

    Same protocol as classification (:func:`~bayes_transfer.inference.map.finetune`):
    encoder starts at the prior mean, fresh decoder; ``scale="auto"`` tries the λ grid
    and keeps the best validation ``config.select_by`` (``"miou"`` by default, maximised;
    ``"nll"`` is the pixel NLL, minimised). ``steps`` fixes the number of optimizer steps
    whatever the training-set size (``None``: ``config.train.epochs``). Metrics are
    those of :func:`segmentation_metrics`; ``test_probs`` are the test probabilities.
    """
    if config is None:
        config = default_config()[0]
    train = config.train
    if train.augment:
        # The loop's augmentation shifts images only, which would misalign the masks;
        # segmentation datasets crop and flip image and mask together instead.
        train = dataclasses.replace(train, augment=False)
    if steps is not None:
        per_epoch = num_batches(splits.train, train.batch_size)
        train = dataclasses.replace(train, epochs=steps / per_epoch)
    config = dataclasses.replace(config, train=train)
    loss = segmentation_loss(len(splits.train), decoder_decay=config.head_decay,
                             ignore_index=splits.train.ignore_index)

    def evaluate(result, dataset):
        return evaluate_segmentation(result, dataset, batch_size=eval_batch_size, n_bins=n_bins)

    return finetune(model, splits, prior, method, scale=scale, config=config, cache=cache,
                    loss_fn=loss, evaluate=evaluate)


# ------------------------------------------------------------------------------ pictures

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
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ save / load

def save_segmentation_model(result: TrainResult, path, *, extra: dict | None = None) -> Path:
    """Write ``path/model.json`` (``{"task": "segmentation", "model": config}``) and the
    weights (orbax), atomically, like ``bayes_transfer.checkpoints.save_model``."""
    from bayes_transfer.checkpoints import write_model_dir

    return write_model_dir(result, path, {"task": "segmentation",
                                          "model": segmentation_config(result.model),
                                          **(extra or {})})


def load_segmentation_model(path):
    """(model, info) from a directory written by :func:`save_segmentation_model`."""
    from bayes_transfer.checkpoints import read_model_info, read_weights

    info = read_model_info(path)
    if info.get("task") != "segmentation":
        raise BayesTransferError(f"{path} holds a {info.get('task', 'classification')} model, "
                                 f"not a segmentation model")
    return read_weights(path, create_segmentation(**info["model"])), info
