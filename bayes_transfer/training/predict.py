"""Running a model functionally: apply, predict over a dataset, refresh BatchNorm."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from flax import nnx

from bayes_transfer import data as btdata
from bayes_transfer.training.state import TrainResult


def split_model(model: nnx.Module):
    """(graphdef, params, rest): trainable parameters apart from state like BN stats."""
    return nnx.split(model, nnx.Param, ...)


def make_apply(graphdef) -> Callable:
    """A pure function running the model: apply(params, rest, x, train, method)."""

    def apply(params, rest, x, train: bool = False, method: str | None = None):
        # copy=True: the variables must belong to the innermost trace (grad inside jit).
        model = nnx.merge(graphdef, params, rest, copy=True)
        fn = model if method is None else getattr(model, method)
        out = fn(x, train=train)
        return out, nnx.state(model, nnx.Not(nnx.Param))

    return apply


def batch_for(dataset, images_of_32px: int) -> int:
    """A default batch size: ``images_of_32px`` for images up to 32×32, fewer for larger
    images (the same pixels a batch), so a 224² ResNet-50 pass fits in memory."""
    shape = getattr(dataset, "image_shape", None)
    if not shape or shape[0] * shape[1] <= 32 * 32:
        return images_of_32px
    return max(1, images_of_32px * 32 * 32 // (shape[0] * shape[1]))


def predict(result_or_model, dataset, *, batch_size: int | None = None,
            method: str | None = None, params=None) -> np.ndarray:
    """Model outputs (logits, or ``method``'s output) over a whole dataset, in order.

    ``batch_size``: by default 500 images of up to 32×32 (fewer larger ones, `batch_for`).
    """
    batch_size = batch_for(dataset, 500) if batch_size is None else batch_size
    if isinstance(result_or_model, TrainResult):
        graphdef, p, rest = (result_or_model.graphdef, result_or_model.state.params,
                             result_or_model.state.rest)
    else:
        graphdef, p, rest = split_model(result_or_model)
    p = p if params is None else params
    return _predict_fn(graphdef, method)(p, rest, dataset, batch_size)


@functools.lru_cache(maxsize=32)
def _predict_fn(graphdef, method):
    apply = make_apply(graphdef)

    @jax.jit
    def forward(params, rest, x):
        return apply(params, rest, x, train=False, method=method)[0]

    def run(params, rest, dataset, batch_size):
        outs = []
        n = len(dataset)
        batch_size = min(batch_size, n)
        for batch in btdata.batches(dataset, batch_size, seed=0, epoch=0, shuffle=False,
                                    drop_remainder=False):
            x = batch["image"]
            pad = batch_size - len(x)
            if pad:  # a fixed shape avoids recompiling for the last batch
                x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            outs.append(np.asarray(forward(params, rest, x))[: batch_size - pad])
        return np.concatenate(outs)

    return run


@functools.lru_cache(maxsize=32)
def _train_forward(graphdef):
    apply = make_apply(graphdef)

    @jax.jit
    def forward(params, rest, x):
        return apply(params, rest, x, train=True)[1]

    return forward


def refresh_batch_stats(graphdef, params, rest, dataset, *, num_batches: int = 40,
                        batch_size: int | None = None, seed: int = 0):
    """BatchNorm running statistics recomputed for ``params`` on ``dataset``.

    Runs ``num_batches`` training-mode forward passes (cycling over epochs when the
    dataset is smaller than that, as few-shot sets are): with BatchNorm momentum 0.9,
    40 batches leave 0.9⁴⁰ ≈ 1.5% of the old statistics. Needed for every parameter
    sample that no training step produced (SWAG samples, averages, a prior's mean).
    Compiled once per model. ``batch_size``: by default 256 images of up to 32×32 (fewer
    larger ones, `batch_for`).
    """
    if not jax.tree.leaves(rest):
        return rest
    batch_size = batch_for(dataset, 256) if batch_size is None else batch_size
    forward = _train_forward(graphdef)
    done, epoch = 0, 0
    while done < num_batches:
        for batch in btdata.batches(dataset, batch_size, seed=seed, epoch=epoch):
            if done >= num_batches:
                break
            rest = forward(params, rest, batch["image"])
            done += 1
        epoch += 1
    return rest
