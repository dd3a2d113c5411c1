"""Transferability measures: how well a backbone's frozen features fit a target task,
computed *before* fine-tuning (no gradient step, no test data).

- :func:`logme`: LogME (You, Liu, Wang & Long, "LogME: Practical Assessment of
  Pre-trained Models for Transfer Learning", ICML 2021). For each class k, a Bayesian
  linear regression of the one-vs-rest target y_k ∈ {0,1}ⁿ on the features F (n×D),

      w ~ N(0, α⁻¹I),   y_k | F, w ~ N(Fw, β⁻¹I),

  has the marginal likelihood (evidence) p(y_k | F, α, β) = N(y_k; 0, α⁻¹FFᵀ + β⁻¹I).
  α and β are set to a maximum of the evidence by MacKay's fixed-point updates

      γ = Σᵢ βσᵢ²/(α + βσᵢ²),   m = β(αI + βFᵀF)⁻¹Fᵀy,   α ← γ/mᵀm,   β ← (n − γ)/‖Fm − y‖²

  (σᵢ the singular values of F; one SVD serves every class and iteration), and LogME
  is the maximised log evidence divided by n, averaged over the classes. Higher is
  better. Like the paper, the features are used as they are (no bias column, no
  standardisation), so values are comparable between backbones on one target, not
  between targets.
- :func:`knn_accuracy`: k-nearest-neighbour accuracy with cosine similarity, leave-one-
  out on one labelled set, or fitted on one set and scored on another.
- :func:`target_features` extracts the features of a prior's (or a model's) backbone on
  a target dataset; :func:`transferability` computes both measures on a task's
  labelled splits (train and validation; the test split is never read).

Example::

    prior = bt.load_prior("fashion-mnist/small-cnn")
    splits = bt.data.load("mnist_5k", shots_per_class=10, seed=0)
    print(transferability(prior, splits))     # {'logme': ..., 'knn': ..., ...}
"""
from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from bayes_transfer import models
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.prior import Prior
from bayes_transfer.ssl.linear_probe import extract_features
from bayes_transfer.training import refresh_batch_stats

__all__ = ["knn_accuracy", "logme", "logme_per_class", "model_for", "target_features",
           "transferability"]


# ---------------------------------------------------------------------------- LogME
def logme_per_class(features, labels, *, num_classes: int | None = None, tol: float = 1e-10,
                    max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log evidence / n, α, β) of each class's one-vs-rest regression, at the optimum.

    All in float64; ``features`` (n, D), ``labels`` (n,) integer class ids.
    """
    f = np.asarray(features, np.float64)
    y_int = np.asarray(labels).astype(np.int64)
    if f.ndim != 2 or len(f) != len(y_int) or len(f) < 2:
        raise BayesTransferError(f"logme needs (n, D) features and n labels with n >= 2, got "
                                 f"{f.shape} and {y_int.shape}")
    if not np.all(np.isfinite(f)):
        raise BayesTransferError("logme: the features contain NaN or Inf")
    n, dim = f.shape
    c = int(num_classes if num_classes is not None else y_int.max() + 1)
    y = np.eye(c)[y_int]                                        # (n, C) one-hot targets
    u, s, _ = np.linalg.svd(f, full_matrices=False)             # F = U diag(s) Vᵀ, r = min(n, D)
    s2 = s ** 2
    z = u.T @ y                                                 # (r, C): targets in U's basis
    out_sq = np.maximum(np.sum(y * y, 0) - np.sum(z * z, 0), 0.0)   # ‖y‖² outside span(U)
    alpha, beta = np.ones(c), np.ones(c)

    def moments(alpha, beta):
        den = alpha + beta * s2[:, None]                        # (r, C) eigenvalues of A
        mm = np.sum((beta * s[:, None] * z / den) ** 2, 0)      # mᵀm
        res = out_sq + np.sum((alpha * z / den) ** 2, 0)        # ‖Fm − y‖²
        gamma = np.sum(beta * s2[:, None] / den, 0)
        return den, mm, res, gamma

    tiny = np.finfo(np.float64).tiny
    for _ in range(max_iter):
        _, mm, res, gamma = moments(alpha, beta)
        new_alpha = gamma / np.maximum(mm, tiny)
        new_beta = np.maximum(n - gamma, tiny) / np.maximum(res, tiny)
        done = np.all(np.abs(np.log(new_alpha / alpha)) < tol) and np.all(
            np.abs(np.log(new_beta / beta)) < tol)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    den, mm, res, _ = moments(alpha, beta)
    # log|A| with A = αI + βFᵀF (D×D): r eigenvalues α + βσᵢ², D − r equal to α.
    logdet = np.sum(np.log(den), 0) + (dim - len(s)) * np.log(alpha)
    evidence = (0.5 * n * np.log(beta) + 0.5 * dim * np.log(alpha) - 0.5 * n * np.log(2 * np.pi)
                - 0.5 * beta * res - 0.5 * alpha * mm - 0.5 * logdet)
    return evidence / n, alpha, beta


def logme(features, labels, *, num_classes: int | None = None) -> float:
    """LogME of ``features`` (n, D) for integer ``labels`` (n,): the maximised log evidence
    per example of a Bayesian linear model, averaged over one-vs-rest classes (You et al.,
    ICML 2021; see the module docstring). Higher means the features fit the labels better.

    Example::

        score = logme(target_features(prior, splits.train), splits.train.labels)
    """
    return float(np.mean(logme_per_class(features, labels, num_classes=num_classes)[0]))


# ---------------------------------------------------------------------------- kNN
def knn_accuracy(features, labels, eval_features=None, eval_labels=None, *, k: int = 5) -> float:
    """k-nearest-neighbour accuracy under cosine similarity.

    Without ``eval_features`` it is leave-one-out over ``features`` (each example is
    classified by its k nearest *other* examples); with them, ``features`` are the
    neighbours and ``eval_features`` are scored. Majority vote; a tie goes to the class
    whose tied neighbours are more similar in total. ``k`` is capped at the number of
    neighbours available. (With one example per class, leave-one-out carries no
    information: score a validation set instead.)
    """
    x = _unit(features)
    y = np.asarray(labels).astype(np.int64)
    loo = eval_features is None
    q = x if loo else _unit(eval_features)
    qy = y if loo else np.asarray(eval_labels).astype(np.int64)
    if len(x) != len(y) or len(q) != len(qy):
        raise BayesTransferError("knn_accuracy: features and labels differ in length")
    num_neighbours = len(x) - (1 if loo else 0)
    if num_neighbours < 1 or len(q) == 0:
        raise BayesTransferError("knn_accuracy needs at least one neighbour and one query")
    k = max(1, min(int(k), num_neighbours))
    c = int(max(y.max(), qy.max()) + 1)
    correct = 0
    for start in range(0, len(q), 1024):        # (chunk, n) similarities at a time
        sim = q[start:start + 1024] @ x.T
        if loo:
            rows = np.arange(sim.shape[0])
            sim[rows, rows + start] = -np.inf
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn, 1)
        votes = np.zeros((sim.shape[0], c))
        rows = np.repeat(np.arange(sim.shape[0]), k)
        # counts decide; summed similarity (|Σ| ≤ k, scaled below 1/2) only breaks ties
        np.add.at(votes, (rows, y[nn].ravel()), 1.0 + nn_sim.ravel() / (2.0 * k + 1.0))
        correct += int(np.sum(np.argmax(votes, 1) == qy[start:start + 1024]))
    return correct / len(q)


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise BayesTransferError(f"features must be (n, D), got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------- features
def model_for(prior_or_model, *, model: nnx.Module | None = None, seed: int = 0) -> nnx.Module:
    """The model whose features are measured.

    A model is returned as it is (its weights are the pretrained ones). A ``Prior`` gives
    ``model`` (or, without it, the architecture in ``prior.metadata["architecture"]``,
    freshly initialised with ``seed``) with the backbone set to the prior mean.
    """
    if not isinstance(prior_or_model, Prior):
        return prior_or_model
    prior = prior_or_model
    if model is None:
        try:
            return models.from_prior(prior, seed=seed, at_mean=True)
        except models.ModelConfigError as e:
            raise BayesTransferError(
                f"{e}; pass model=<a model of the prior's architecture>") from None
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, prior.init_params(params), rest)


def target_features(prior_or_model, dataset, *, model: nnx.Module | None = None,
                    refresh_bn: bool = True, bn_steps: int = 40,
                    batch_size: int = 256) -> np.ndarray:
    """(n, F) backbone features of ``dataset`` from a prior's mean or a model, before any
    fine-tuning (``bayes_transfer.ssl.linear_probe.extract_features``, eval mode).

    ``refresh_bn``: first re-estimate the BatchNorm running statistics on ``dataset``'s
    images (``bn_steps`` train-mode passes over batches of at most ``batch_size``; labels
    are not read). A prior stores no BatchNorm statistics, so without this a prior's
    features would be normalised by a fresh model's (mean 0, variance 1).
    """

    net = model_for(prior_or_model, model=model)
    if refresh_bn:
        graphdef, params, rest = nnx.split(net, nnx.Param, ...)
        rest = refresh_batch_stats(graphdef, params, rest, dataset, num_batches=bn_steps,
                                   batch_size=min(batch_size, len(dataset)))
        net = nnx.merge(graphdef, params, rest)
    return np.asarray(extract_features(net, dataset, batch_size=batch_size))


def transferability(prior_or_model, splits, *, model: nnx.Module | None = None, k: int = 5,
                    parts: tuple[str, ...] = ("train", "val"), refresh_bn: bool = True) -> dict:
    """LogME and kNN accuracy of the backbone's features on a task's labelled splits.

    The ``parts`` (default train and validation, never test) are pooled: LogME is
    computed on the pool, kNN accuracy is leave-one-out over it. Returns
    ``{"logme", "knn", "knn_chance", "knn_normalized", "num_examples"}``, where
    ``knn_normalized = (knn − chance)/(1 − chance)`` (chance = 1/num_classes): 0 is
    chance, 1 perfect.
    """
    if "test" in parts:
        raise BayesTransferError("transferability must not read the test split")
    datasets = [getattr(splits, p) for p in parts]
    pool = dataclasses.replace(datasets[0], images=np.concatenate([d.images for d in datasets]),
                               labels=np.concatenate([d.labels for d in datasets]))
    feats = target_features(prior_or_model, pool, model=model, refresh_bn=refresh_bn)
    labels, num_classes = np.asarray(pool.labels), pool.num_classes
    knn = knn_accuracy(feats, labels, k=k)
    chance = 1.0 / num_classes
    return {"logme": logme(feats, labels, num_classes=num_classes), "knn": knn,
            "knn_chance": chance, "knn_normalized": (knn - chance) / (1.0 - chance),
            "num_examples": int(len(labels))}

