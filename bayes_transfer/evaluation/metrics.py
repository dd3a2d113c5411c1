"""Evaluation metrics: classification (accuracy, NLL, Brier, ECE, reliability) and
segmentation (confusion matrix, IoU, mIoU, pixel accuracy).

Pure ``jax.numpy`` functions of arrays; everything but :func:`classification_metrics`
(which returns Python floats for reports) can be called inside ``jax.jit`` (keep
``n_bins``, ``num_classes`` and ``ignore_index`` static).

Conventions:
- ``probs``/``logits`` have the classes on the last axis, ``labels`` are integer
  class indices with the remaining shape; any leading shape works (``(N, C)`` for
  images, ``(N, H, W, C)`` for pixels) and every example/pixel weighs the same.
- ``ignore_index``: pixels (or examples) whose label equals it are left out.
- Confidence bins are equal-width on [0, 1] and right-closed, ``(lo, hi]``, with the
  first bin ``[0, 1/n]``.

Example::

    probs = jax.nn.softmax(logits)
    classification_metrics(probs, labels)
    # {'error': 0.083, 'nll': 0.25, 'ece': 0.012, 'brier': 0.12, 'accuracy': 0.917}
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "accuracy", "error", "nll", "brier", "ece", "reliability", "classification_metrics",
    "confusion_matrix", "iou_from_confusion", "iou_per_class", "mean_iou", "pixel_accuracy",
]

_TINY = 1e-12


def _flatten(x, labels):
    x = jnp.asarray(x)
    labels = jnp.asarray(labels)
    return x.reshape(-1, x.shape[-1]), labels.reshape(-1).astype(jnp.int32)


def _to_probs(x, from_logits: bool):
    return jax.nn.softmax(x, axis=-1) if from_logits else x


# --------------------------------------------------------------------------- classification

def accuracy(probs_or_logits, labels) -> jax.Array:
    """Fraction of examples whose arg-max class is the label (probs or logits alike)."""
    x, y = _flatten(probs_or_logits, labels)
    return jnp.mean(jnp.argmax(x, axis=-1) == y)


def error(probs_or_logits, labels) -> jax.Array:
    """1 - accuracy."""
    return 1.0 - accuracy(probs_or_logits, labels)


def nll(probs_or_logits, labels, *, from_logits: bool = False) -> jax.Array:
    """Mean negative log-likelihood of the labels, in nats.

    From probabilities (default; clipped at 1e-12 so a confident mistake is large but
    finite) or, with ``from_logits=True``, from logits via ``log_softmax``.
    """
    x, y = _flatten(probs_or_logits, labels)
    if from_logits:
        logp = jax.nn.log_softmax(x, axis=-1)
    else:
        logp = jnp.log(jnp.clip(x, _TINY, 1.0))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def brier(probs_or_logits, labels, *, from_logits: bool = False) -> jax.Array:
    """Multi-class Brier score: sum over classes of (p - onehot)^2, mean over examples.

    Between 0 (perfect) and 2 (all mass on a wrong class).
    """
    x, y = _flatten(probs_or_logits, labels)
    p = _to_probs(x, from_logits)
    onehot = jax.nn.one_hot(y, p.shape[-1], dtype=p.dtype)
    return jnp.mean(jnp.sum((p - onehot) ** 2, axis=-1))


def _binned(probs, labels, n_bins: int):
    p, y = _flatten(probs, labels)
    conf = jnp.max(p, axis=-1)
    correct = (jnp.argmax(p, axis=-1) == y).astype(p.dtype)
    edges = jnp.linspace(0.0, 1.0, n_bins + 1, dtype=p.dtype)
    # right-closed bins (lo, hi]: bin i holds edges[i] < conf <= edges[i+1]
    idx = jnp.clip(jnp.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    counts = jnp.bincount(idx, length=n_bins).astype(p.dtype)
    conf_sum = jnp.bincount(idx, weights=conf, length=n_bins)
    acc_sum = jnp.bincount(idx, weights=correct, length=n_bins)
    return edges, counts, conf_sum, acc_sum


def ece(probs, labels, n_bins: int = 15) -> jax.Array:
    """Expected calibration error (Guo et al. 2017) of the top-class confidence.

    ``sum_b (n_b / n) * |acc_b - conf_b|`` over ``n_bins`` equal-width bins.
    """
    _, counts, conf_sum, acc_sum = _binned(probs, labels, n_bins)
    return jnp.sum(jnp.abs(acc_sum - conf_sum)) / jnp.maximum(jnp.sum(counts), 1.0)


def reliability(probs, labels, n_bins: int = 15) -> dict[str, jax.Array]:
    """Data of a reliability diagram.

    Returns ``bin_edges`` (n_bins + 1,), and per bin the mean ``confidence``, the
    ``accuracy`` (both NaN for empty bins) and the ``counts``.
    """
    edges, counts, conf_sum, acc_sum = _binned(probs, labels, n_bins)
    safe = jnp.maximum(counts, 1.0)
    empty = counts == 0
    return {"bin_edges": edges,
            "confidence": jnp.where(empty, jnp.nan, conf_sum / safe),
            "accuracy": jnp.where(empty, jnp.nan, acc_sum / safe),
            "counts": counts.astype(jnp.int32)}


def classification_metrics(probs, labels, *, n_bins: int = 15,
                           from_logits: bool = False) -> dict[str, float]:
    """``{"error", "nll", "ece", "brier", "accuracy"}`` as Python floats."""
    p, y = _flatten(probs, labels)
    p = _to_probs(p, from_logits)
    acc = float(accuracy(p, y))
    return {"error": 1.0 - acc, "nll": float(nll(p, y)), "ece": float(ece(p, y, n_bins)),
            "brier": float(brier(p, y)), "accuracy": acc}


# --------------------------------------------------------------------------- segmentation

def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None
                     ) -> jax.Array:
    """(num_classes, num_classes) counts: rows are the target class, columns the prediction.

    ``pred`` and ``target`` are integer maps of the same shape (e.g. ``(N, H, W)``;
    take ``argmax(logits, -1)`` first). Pixels whose target is ``ignore_index`` are
    not counted; so are pixels whose target or prediction is outside
    ``[0, num_classes)``. Confusion matrices of batches add up to the dataset's.
    """
    pred = jnp.asarray(pred).reshape(-1).astype(jnp.int32)
    target = jnp.asarray(target).reshape(-1).astype(jnp.int32)
    valid = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    if ignore_index is not None:
        valid &= target != ignore_index
    flat = jnp.where(valid, target * num_classes + pred, 0)
    counts = jnp.bincount(flat, weights=valid.astype(jnp.int32), length=num_classes ** 2)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def iou_from_confusion(cm) -> jax.Array:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both maps."""
    cm = jnp.asarray(cm).astype(jnp.float32)
    tp = jnp.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    return jnp.where(union > 0, tp / jnp.maximum(union, 1.0), jnp.nan)


def iou_per_class(pred, target, num_classes: int, ignore_index: int | None = None
                  ) -> jax.Array:
    """(num_classes,) IoU of each class; NaN where the class is in neither map."""
    return iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def mean_iou(pred, target, num_classes: int, ignore_index: int | None = None) -> jax.Array:
    """Mean IoU over the classes present in the prediction or the target."""
    return jnp.nanmean(iou_per_class(pred, target, num_classes, ignore_index))


def pixel_accuracy(pred, target, ignore_index: int | None = None) -> jax.Array:
    """Fraction of (non-ignored) pixels predicted right."""
    pred = jnp.asarray(pred)
    target = jnp.asarray(target)
    valid = jnp.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    n = jnp.sum(valid)
    return jnp.sum((pred == target) & valid) / jnp.maximum(n, 1)


def evaluate_probs(probs, labels, *, num_classes: int | None = None) -> dict[str, float]:
    """Test metrics of predictive probabilities: error, NLL, ECE, Brier, accuracy (and
    mIoU / pixel accuracy for (N, H, W) label maps)."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    out = classification_metrics(probs, labels)
    if labels.ndim > 1:
        c = num_classes or probs.shape[-1]
        pred = probs.argmax(-1)
        out["miou"] = float(mean_iou(pred, labels, c))
        out["pixel_accuracy"] = float(pixel_accuracy(pred, labels))
    return out
