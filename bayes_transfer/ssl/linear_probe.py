"""Linear-probe evaluation: how linearly separable are a frozen backbone's features?

The standard yardstick of self-supervised representations (SimCLR §4, "linear
evaluation protocol"): freeze the backbone, compute features of the train / val / test
images, fit a multinomial logistic regression on the train features with its L2 weight
chosen on val, and report test accuracy.

The regression is fitted full-batch with L-BFGS (``optax.lbfgs``, zoom line search)
for every L2 weight of the grid at once (``vmap``), on features standardised with the
train set's mean and standard deviation. It is a convex problem, so the result depends
on the features only, not on a learning rate.

Example::

    acc = linear_probe(result, splits)            # a TrainResult, or a model
    details = probe_features(xtr, ytr, xval, yval, xte, yte)
    details.accuracy, details.l2, details.val_accuracy
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.training import predict

__all__ = ["DEFAULT_L2_GRID", "LinearProbeResult", "extract_features", "fit_logistic_regression",
           "linear_probe", "probe_features"]

#: L2 weights tried (on the mean cross-entropy scale: loss = CE + ½·l2·‖W‖²).
DEFAULT_L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class LinearProbeResult(NamedTuple):
    """A fitted probe: test accuracy and what led to it.

    Attributes:
      accuracy: test accuracy of the probe with the chosen L2 weight.
      val_accuracy: validation accuracy of the chosen probe.
      l2: the chosen L2 weight.
      grid: ``{l2: val_accuracy}`` over the whole grid.
      weights, bias: the probe on standardised features, (F, C) and (C,).
      mean, std: the train features' standardisation, (F,) each.
    """

    accuracy: float
    val_accuracy: float
    l2: float
    grid: dict
    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def logits(self, features) -> np.ndarray:
        """Probe logits of raw (unstandardised) features."""
        x = (np.asarray(features, np.float32) - self.mean) / self.std
        return x @ self.weights + self.bias


def extract_features(model_or_result, dataset, *, batch_size: int = 500) -> np.ndarray:
    """Frozen backbone features (N, F) of a dataset (eval mode, BatchNorm running stats).

    Works for a ``TrainResult`` or any model with a ``features`` method (a classifier or
    a :class:`~bayes_transfer.ssl.SimCLRModel`).
    """
    return predict(model_or_result, dataset, batch_size=batch_size, method="features")


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_logistic_regression(x: jax.Array, y: jax.Array, l2: jax.Array, *, num_classes: int,
                            steps: int = 100):
    """Multinomial logistic regression by full-batch L-BFGS, one fit per entry of ``l2``.

    Minimises ``mean CE(x W + b, y) + ½·l2·‖W‖²`` (the bias is not penalised) from zero,
    for ``steps`` L-BFGS iterations. Returns ``(W, b)`` of shapes ``(L, F, C)`` and
    ``(L, C)`` for the ``L`` values of ``l2``.
    """
    x = jnp.asarray(x, jnp.float32)
    f = x.shape[1]

    def fit_one(lam):
        def loss(p):
            w, b = p
            ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()
            return ce + 0.5 * lam * jnp.sum(w * w)

        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(loss)
        params = (jnp.zeros((f, num_classes)), jnp.zeros((num_classes,)))

        def step(carry, _):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
            return (optax.apply_updates(p, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return params

    return jax.vmap(fit_one)(jnp.asarray(l2, jnp.float32))


def _accuracy(x, y, w, b) -> np.ndarray:
    """Accuracy of each of L probes: (L,)."""
    logits = jnp.einsum("nf,lfc->lnc", jnp.asarray(x), w) + b[:, None, :]
    return np.asarray(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)[None], axis=1))


def probe_features(train_x, train_y, val_x, val_y, test_x, test_y, *,
                   l2_grid: Sequence[float] = DEFAULT_L2_GRID, steps: int = 100,
                   num_classes: int | None = None) -> LinearProbeResult:
    """Fit logistic-regression probes on train features, pick L2 on val, score on test."""
    train_x = np.asarray(train_x, np.float32)
    train_y = np.asarray(train_y, np.int32)
    if train_x.ndim != 2 or len(train_x) != len(train_y) or len(train_x) == 0:
        raise BayesTransferError(f"probe_features needs (N, F) features and N labels, got "
                                 f"{train_x.shape} and {train_y.shape}")
    if len(val_x) == 0:
        raise BayesTransferError("probe_features needs a non-empty validation set to pick L2")
    num_classes = int(num_classes or max(train_y.max(), np.max(val_y), np.max(test_y)) + 1)
    mean = train_x.mean(0)
    std = np.maximum(train_x.std(0), 1e-6)

    def standardise(x):
        return (np.asarray(x, np.float32) - mean) / std

    grid = tuple(float(v) for v in l2_grid)
    w, b = fit_logistic_regression(standardise(train_x), train_y, jnp.asarray(grid),
                                   num_classes=num_classes, steps=steps)
    val_acc = _accuracy(standardise(val_x), np.asarray(val_y), w, b)
    best = int(np.argmax(val_acc))  # ties: the first (weakest) L2 of the grid
    test_acc = _accuracy(standardise(test_x), np.asarray(test_y), w[best:best + 1],
                         b[best:best + 1])[0]
    return LinearProbeResult(
        accuracy=float(test_acc), val_accuracy=float(val_acc[best]), l2=grid[best],
        grid={g: float(a) for g, a in zip(grid, val_acc)},
        weights=np.asarray(w[best]), bias=np.asarray(b[best]), mean=mean, std=std)


def linear_probe(model_or_result, splits, *, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                 steps: int = 100, max_train: int | None = None, batch_size: int = 500,
                 details: bool = False):
    """Test accuracy of a linear probe on the frozen backbone features.

    Args:
      model_or_result: a ``TrainResult`` (e.g. from ``fit`` or ``learn_prior``) or a model
        with a ``features`` method (a ``SimCLRModel`` or a classifier).
      splits: a ``data.Splits``; the probe trains on ``train``, picks its L2 weight on
        ``val`` and is scored on ``test``.
      l2_grid: the L2 weights tried.
      steps: L-BFGS iterations per fit.
      max_train: use only the first ``max_train`` training images (a quicker probe).
      details: return the whole :class:`LinearProbeResult` instead of the accuracy.

    Returns:
      The test accuracy (a float), or a :class:`LinearProbeResult` with ``details``.
    """
    train = splits.train
    if max_train is not None and max_train < len(train):
        train = train.subset(np.arange(max_train))
    sets = (train, splits.val, splits.test)
    # one batch shape for all three sets: one compilation of the forward pass
    batch_size = min(batch_size, *(len(ds) for ds in sets))
    feats = [extract_features(model_or_result, ds, batch_size=batch_size) for ds in sets]
    result = probe_features(feats[0], train.labels, feats[1], splits.val.labels, feats[2],
                            splits.test.labels, l2_grid=l2_grid, steps=steps,
                            num_classes=splits.train.num_classes)
    return result if details else result.accuracy
