"""Bayesian model averaging of the predictive distribution.

Given S parameter samples θ₁..θ_S (SGLD, downstream SWAG, ...), the Bayesian model
average is the mean of the predictive *probabilities*,

    p(y | x, D) ≈ (1/S)·Σₛ softmax(f(x; θₛ)),

never the softmax of averaged logits or parameters. :func:`bma_predict` computes it
batched and jitted: samples go to the device a chunk at a time and a ``lax.scan`` runs
over the chunk, so memory holds one chunk of parameters and one batch of outputs. The
output can be (N, C) class probabilities or (N, H, W, C) per-pixel ones.

Samples come as a :class:`~bayes_transfer.inference.samples.PosteriorSamples` (or any
sequence of parameter trees); :mod:`bayes_transfer.inference.posterior` draws them.

Example::

    probs = bma_predict(graphdef, samples, None, splits.test)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer import data as btdata
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.evaluation.metrics import evaluate_probs
from bayes_transfer.inference.samples import PosteriorSamples
from bayes_transfer.training import make_apply

__all__ = ["bma_predict", "evaluate_probs"]


@functools.lru_cache(maxsize=32)
def _bma_step(graphdef, method, per_sample_rest: bool):
    apply = make_apply(graphdef)

    def member(p, r, x):
        out = apply(p, r, x, train=False, method=method)[0]
        return jax.nn.softmax(out.astype(jnp.float32), axis=-1)

    @jax.jit
    def summed(params, rests, weights, x):
        """Σₛ wₛ·softmax(f(x; θₛ)) over a stacked chunk of samples (lax.scan)."""
        first = jax.tree.map(lambda a: a[0], params)
        r0 = jax.tree.map(lambda a: a[0], rests) if per_sample_rest else rests
        acc = jnp.zeros(jax.eval_shape(member, first, r0, x).shape, jnp.float32)

        def body(acc, item):
            if per_sample_rest:
                p, r, w = item
            else:
                (p, w), r = item, rests
            return acc + w * member(p, r, x), None

        xs = (params, rests, weights) if per_sample_rest else (params, weights)
        return jax.lax.scan(body, acc, xs)[0]

    return summed


def _is_sequence(x) -> bool:
    return isinstance(x, (list, tuple, PosteriorSamples))


def _stack(trees):
    # On the host: an eager jnp.stack would compile once per leaf shape.
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _image_batches(dataset, batch_size: int):
    """Normalised float32 image batches in order, each padded to ``batch_size``."""
    if isinstance(dataset, btdata.ArrayDataset):
        images = (b["image"] for b in btdata.batches(dataset, batch_size, seed=0, epoch=0,
                                                     shuffle=False, drop_remainder=False))
    else:   # an array of model-ready inputs
        inputs = np.asarray(dataset)
        images = (inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size))
    for x in images:
        pad = batch_size - len(x)
        if pad:   # a fixed shape avoids recompiling for the last batch
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        yield x, batch_size - pad


def bma_predict(graphdef, samples, rest=None, dataset=None, batch_size: int = 256, *,
                method: str | None = None, sample_chunk: int = 8,
                stacked_rest: bool = False) -> np.ndarray:
    """Bayesian model average of predictive probabilities over S parameter samples.

    Args:
      graphdef: the model's graph definition (``split_model(model)[0]``).
      samples: a list of parameter trees; a :class:`PosteriorSamples` (each item a
        ``(params, rest)`` pair); or one stacked parameter tree whose leaves have a
        leading axis of size S.
      rest: the non-parameter state: one tree shared by all samples, a list with one
        per sample, or (``stacked_rest=True``) a tree stacked like ``samples``. None
        takes each :class:`PosteriorSamples` item's own ``rest``.
      dataset: an ``ArrayDataset`` (normalised as in training) or an array of inputs.
      batch_size: examples per forward pass.
      method: the model method giving the logits (None: ``__call__``).
      sample_chunk: samples on the device at once (a ``lax.scan`` runs over them).

    Returns:
      float32 probabilities (N, ..., C): (N, C) for classifiers, (N, H, W, C) for
      segmentation models; the mean over samples of ``softmax(logits)``.

    Example::

        probs = bma_predict(graphdef, [params_a, params_b], rest, splits.test)
    """
    if dataset is None:
        raise BayesTransferError("bma_predict needs a dataset")
    if isinstance(samples, PosteriorSamples):
        pairs = samples
        num = len(samples)
        if rest is None:
            get = lambda i: pairs[i]                                    # noqa: E731
            per_sample = True
        else:
            get = lambda i: (pairs[i][0], None)                         # noqa: E731
            per_sample = False
    elif _is_sequence(samples):
        num = len(samples)
        per_sample = _is_sequence(rest)
        if per_sample and len(rest) != num:
            raise BayesTransferError(f"{num} samples but {len(rest)} rest states")
        get = (lambda i: (samples[i], rest[i])) if per_sample else (lambda i: (samples[i], None))
    else:   # stacked
        leaves = jax.tree.leaves(samples)
        if not leaves:
            raise BayesTransferError("bma_predict: the stacked samples have no arrays")
        num = int(leaves[0].shape[0])
        per_sample = bool(stacked_rest) or _is_sequence(rest)
        if _is_sequence(rest):
            rest = _stack(rest)
            stacked_rest = True

        def get(i):
            p = jax.tree.map(lambda a: a[i], samples)
            r = jax.tree.map(lambda a: a[i], rest) if stacked_rest else None
            return p, r
    if num < 1:
        raise BayesTransferError("bma_predict needs at least one sample")

    n = len(dataset)
    batch_size = max(1, min(int(batch_size), n))
    batches = list(_image_batches(dataset, batch_size))
    chunk = max(1, min(int(sample_chunk), num))
    step = _bma_step(graphdef, method, per_sample)
    total = None
    for start in range(0, num, chunk):
        idx = list(range(start, min(start + chunk, num)))
        weights = np.zeros(chunk, np.float32)
        weights[: len(idx)] = 1.0
        idx = idx + [idx[-1]] * (chunk - len(idx))     # pad with weight 0: one compile
        items = [get(i) for i in idx]
        params = _stack([p for p, _ in items])
        rests = _stack([r for _, r in items]) if per_sample else rest
        outs = []
        for x, valid in batches:
            outs.append(np.asarray(step(params, rests, jnp.asarray(weights), x),
                                   np.float64)[:valid])
        out = np.concatenate(outs)
        total = out if total is None else total + out
    return (total / num).astype(np.float32)
