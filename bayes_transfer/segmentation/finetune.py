"""Semantic segmentation under a learned prior: data, MAP fine-tuning, metrics, save/load.

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

from bayes_transfer.data import scenes, seg_dataset
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.evaluation import metrics as btmetrics
from bayes_transfer.inference.map import (DEFAULT_VARIANCES, FinetuneConfig, FinetuneResult,
                                          finetune)
from bayes_transfer.models import segmentation_model_from_prior
from bayes_transfer.models.segmentation import (SegmentationModel, create_segmentation,
                                                segmentation_config)
from bayes_transfer.training import TrainConfig, TrainResult, predict
from bayes_transfer.training.checkpoints import read_model_info, read_weights, write_model_dir
from bayes_transfer.training.objectives import head_sq_norm, map_loss

__all__ = [
    "DECODER_RULE", "DATASETS", "default_config", "evaluate_segmentation", "finetune_segmentation",
    "load_segmentation_model", "load_task", "model_from_prior", "predict_probs",
    "save_segmentation_model", "segmentation_loss", "segmentation_metrics",
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
    and d ≈ 1e5 covered weights, smaller ones freeze the encoder). ``steps`` is the run's length,
    whatever the training-set size (``TrainConfig.steps``).
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
        train = dataclasses.replace(train, steps=steps)
    config = dataclasses.replace(config, train=train)
    loss = segmentation_loss(len(splits.train), decoder_decay=config.head_decay,
                             ignore_index=splits.train.ignore_index)

    def evaluate(result, dataset):
        return evaluate_segmentation(result, dataset, batch_size=eval_batch_size, n_bins=n_bins)

    return finetune(model, splits, prior, method, scale=scale, config=config, cache=cache,
                    loss_fn=loss, evaluate=evaluate)


# ------------------------------------------------------------------------------ save / load

def save_segmentation_model(result: TrainResult, path, *, extra: dict | None = None) -> Path:
    """Write ``path/model.json`` (``{"task": "segmentation", "model": config}``) and the
    weights (orbax), atomically, like ``bayes_transfer.training.checkpoints.save_model``."""
    return write_model_dir(result, path, {"task": "segmentation",
                                          "model": segmentation_config(result.model),
                                          **(extra or {})})


def load_segmentation_model(path):
    """(model, info) from a directory written by :func:`save_segmentation_model`."""
    info = read_model_info(path)
    if info.get("task") != "segmentation":
        raise BayesTransferError(f"{path} holds a {info.get('task', 'classification')} model, "
                                 f"not a segmentation model")
    return read_weights(path, create_segmentation(**info["model"])), info
