"""Bayesian model averaging of the predictive distribution, and the posterior front door.

Given S parameter samples θ₁..θ_S (SGLD, downstream SWAG, ...), the Bayesian model
average is the mean of the predictive *probabilities*,

    p(y | x, D) ≈ (1/S)·Σₛ softmax(f(x; θₛ)),

never the softmax of averaged logits or parameters. :func:`bma_predict` computes it
batched and jitted: samples go to the device a chunk at a time and a ``lax.scan`` runs
over the chunk, so memory holds one chunk of parameters and one batch of outputs. The
output can be (N, C) class probabilities or (N, H, W, C) per-pixel ones.

:class:`PosteriorSamples` holds samples as (params, rest) pairs on the host, spilling
to one ``.npz`` file per sample beyond ``max_in_memory``. :func:`sample_posterior` is
the one call the CLI makes: MAP (λ on validation) → samples → BMA test metrics.

Example::

    samples, metrics = sample_posterior(model, splits, prior, method="swag", samples=20)
    probs = bma_predict(graphdef, samples, None, splits.test)
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bayes_transfer import data as btdata
from bayes_transfer import metrics as btmetrics
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.train import make_apply

__all__ = ["PosteriorSamples", "bma_predict", "refresh_batch_stats", "PosteriorConfig",
           "PosteriorResult", "sample_posterior", "evaluate_probs"]


# --------------------------------------------------------------------------- storage
class PosteriorSamples(collections.abc.Sequence):
    """A sequence of posterior samples, each a ``(params, rest)`` pair of host arrays.

    The first ``max_in_memory`` samples (all, if None) stay in memory; later ones are
    written to ``directory`` as ``sample_00012.npz`` (the leaves, in tree order) and
    read back on access. ``rest`` is the non-parameter state (BatchNorm statistics)
    that goes with the sample, or None. ``steps`` records where each sample came from
    (a chain step, or the sample index); ``info`` is free-form metadata.

    Example::

        store = PosteriorSamples("runs/sgld", max_in_memory=4)
        store.append(params, rest)
        params, rest = store[0]
    """

    def __init__(self, directory=None, *, max_in_memory: int | None = None):
        if max_in_memory is not None and int(max_in_memory) < 0:
            raise BayesTransferError(f"max_in_memory must be >= 0, got {max_in_memory!r}")
        self.max_in_memory = None if max_in_memory is None else int(max_in_memory)
        self.directory = None if directory is None else Path(directory)
        self.steps: list[int] = []
        self.info: dict = {}
        self._memory: list[list[np.ndarray]] = []
        self._files: list[Path] = []
        self._treedef = None

    def append(self, params, rest=None, *, step: int | None = None) -> None:
        leaves, treedef = jax.tree.flatten(jax.device_get((params, rest)))
        leaves = [np.asarray(x) for x in leaves]
        if self._treedef is None:
            self._treedef = treedef
        elif treedef != self._treedef:
            raise BayesTransferError("a sample's structure differs from the first sample's")
        if self.max_in_memory is None or len(self._memory) < self.max_in_memory:
            self._memory.append(leaves)
        else:
            if self.directory is None:
                self.directory = Path(tempfile.mkdtemp(prefix="bayes_transfer_samples_"))
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"sample_{len(self):05d}.npz"
            np.savez(path, *leaves)
            self._files.append(path)
        self.steps.append(len(self) - 1 if step is None else int(step))

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    def _leaves(self, i: int) -> list[np.ndarray]:
        if i < len(self._memory):
            return self._memory[i]
        with np.load(self._files[i - len(self._memory)]) as f:
            return [f[f"arr_{j}"] for j in range(len(f.files))]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        return jax.tree.unflatten(self._treedef, self._leaves(i % len(self)))

    @property
    def files(self) -> list[Path]:
        """The ``.npz`` files of the samples kept on disk."""
        return list(self._files)

    def params(self) -> list:
        """All samples' parameters (loads the spilled ones)."""
        return [p for p, _ in self]

    def __repr__(self) -> str:
        return (f"PosteriorSamples(n={len(self)}, in_memory={len(self._memory)}, "
                f"on_disk={len(self._files)}, directory={self.directory})")


# --------------------------------------------------------------------------- BatchNorm
@functools.lru_cache(maxsize=32)
def _train_forward(graphdef):
    apply = make_apply(graphdef)

    @jax.jit
    def forward(params, rest, x):
        return apply(params, rest, x, train=True)[1]

    return forward


def refresh_batch_stats(graphdef, params, rest, dataset, *, num_batches: int = 40,
                        batch_size: int = 256, seed: int = 0):
    """BatchNorm running statistics recomputed for ``params`` on ``dataset``.

    Runs ``num_batches`` training-mode forward passes (cycling over epochs when the
    dataset is smaller than that, as few-shot sets are): with BatchNorm momentum 0.9,
    40 batches leave 0.9⁴⁰ ≈ 1.5% of the old statistics. Needed for every parameter
    sample that no training step produced (SWAG samples, averages). Compiled once per
    model.
    """
    if not jax.tree.leaves(rest):
        return rest
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


# --------------------------------------------------------------------------- BMA
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


# --------------------------------------------------------------------------- metrics
def evaluate_probs(probs, labels, *, num_classes: int | None = None) -> dict[str, float]:
    """Test metrics of predictive probabilities: error, NLL, ECE, Brier, accuracy (and
    mIoU / pixel accuracy for (N, H, W) label maps)."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    out = btmetrics.classification_metrics(probs, labels)
    if labels.ndim > 1:
        c = num_classes or probs.shape[-1]
        pred = probs.argmax(-1)
        out["miou"] = float(btmetrics.mean_iou(pred, labels, c))
        out["pixel_accuracy"] = float(btmetrics.pixel_accuracy(pred, labels))
    return out


# --------------------------------------------------------------------------- front door
def _default_map_config():
    from bayes_transfer.inference.map import FinetuneConfig
    return FinetuneConfig()


def _default_sgld_config():
    from bayes_transfer.inference.sgld import SGLDConfig
    return SGLDConfig()


def _default_swag_config():
    from bayes_transfer.inference.swag_downstream import SwagDownstreamConfig
    return SwagDownstreamConfig()


@dataclasses.dataclass(frozen=True)
class PosteriorConfig:
    """Settings of :func:`sample_posterior` (plain Python).

    Attributes:
      prior_method: the prior each sample is drawn under (``Prior.for_method``).
      scale: λ, or ``"auto"``: the λ MAP fine-tuning chooses on validation.
      start: ``"map"`` (the chain/SWAG starts from the MAP solution) or ``"prior"``
        (from the prior mean with a fresh head; SGLD only, needs a numeric scale).
      map: the MAP fine-tuning settings (``FinetuneConfig``).
      sgld, swag: the samplers' settings (``SGLDConfig``, ``SwagDownstreamConfig``).
      refresh_bn: recompute BatchNorm statistics per sample (always done for SWAG).
      calibrate: also report test metrics after temperature scaling fitted on the
        validation BMA (``calibrated_metrics``).
      eval_batch_size, sample_chunk: :func:`bma_predict`'s batching.
      max_in_memory, sample_dir: where samples beyond ``max_in_memory`` go.
    """

    prior_method: str = "lowrank"
    scale: Any = "auto"
    start: str = "map"
    map: Any = dataclasses.field(default_factory=_default_map_config)
    sgld: Any = dataclasses.field(default_factory=_default_sgld_config)
    swag: Any = dataclasses.field(default_factory=_default_swag_config)
    refresh_bn: bool = True
    calibrate: bool = True
    eval_batch_size: int = 500
    sample_chunk: int = 8
    max_in_memory: int | None = 32
    sample_dir: str | None = None


@dataclasses.dataclass
class PosteriorResult:
    """What :func:`sample_posterior` returns; unpacks as ``samples, metrics = result``."""

    method: str
    scale: float
    samples: PosteriorSamples
    metrics: dict                       # BMA test metrics
    val_metrics: dict                   # BMA validation metrics
    test_probs: np.ndarray
    map_metrics: dict | None = None     # the MAP starting point's test metrics
    temperature: float | None = None
    calibrated_metrics: dict | None = None

    def __iter__(self):
        yield self.samples
        yield self.metrics

    def summary(self) -> dict:
        return {"method": self.method, "scale": self.scale, "samples": len(self.samples),
                **self.metrics}


def sample_posterior(model, splits, prior, method: str = "sgld", samples: int = 10,
                     config: PosteriorConfig | None = None, *, map_result=None,
                     log=None) -> PosteriorResult:
    """Posterior samples downstream and their Bayesian-model-average test metrics.

    1. MAP fine-tuning under ``prior.for_method(config.prior_method)`` gives the start
       and, with ``config.scale="auto"``, λ (chosen on validation; the test split is
       read only after the choice). Pass ``map_result`` (a ``FinetuneResult``) to reuse one.
    2. ``method="sgld"``: :func:`~bayes_transfer.inference.sgld.run_sgld` under the same
       prior and λ; ``method="swag"``: SWAG collected at a constant learning rate from
       the MAP solution, then sampled (:mod:`~bayes_transfer.inference.swag_downstream`).
    3. :func:`bma_predict` on validation and test; optional temperature scaling.

    Returns a :class:`PosteriorResult`; ``samples, metrics = sample_posterior(...)``.
    """
    from bayes_transfer.inference import calibration
    from bayes_transfer.inference.map import finetune
    from bayes_transfer.inference.sgld import run_sgld
    from bayes_transfer.inference.swag_downstream import swag_posterior
    from bayes_transfer.train import split_model

    config = config or PosteriorConfig()
    log = log or (lambda msg: None)
    if method not in ("sgld", "swag"):
        raise BayesTransferError(f"unknown posterior method {method!r}; use 'sgld' or 'swag'")
    if int(samples) < 1:
        raise BayesTransferError(f"samples must be >= 1, got {samples!r}")
    method_prior = prior.for_method(config.prior_method)

    graphdef, params, rest = split_model(model)
    map_metrics = None
    if config.start == "map" or config.scale == "auto":
        if map_result is None:
            map_result = finetune(model, splits, prior, config.prior_method,
                                  scale=config.scale, config=config.map)
        scale = float(map_result.scale)
        map_metrics = dict(map_result.metrics)
        log(f"MAP ({config.prior_method}): λ={scale:.3g} test {map_metrics}")
    else:
        scale = float(config.scale)
    if config.start == "map":
        params, rest = map_result.result.state.params, map_result.result.state.rest
    elif config.start == "prior":
        params = prior.init_params(params)
    else:
        raise BayesTransferError(f"unknown start {config.start!r}; use 'map' or 'prior'")
    aux = method_prior.rescale(scale)
    start_model = nnx.merge(graphdef, params, rest)

    if method == "sgld":
        store = run_sgld(start_model, splits, aux, config.sgld, num_samples=int(samples),
                         params=params, max_in_memory=config.max_in_memory,
                         sample_dir=config.sample_dir, refresh_bn=config.refresh_bn)
    else:
        store = swag_posterior(start_model, splits, aux, config.swag, num_samples=int(samples),
                               max_in_memory=config.max_in_memory,
                               sample_dir=config.sample_dir)

    bma = functools.partial(bma_predict, graphdef, store, None,
                            batch_size=config.eval_batch_size, sample_chunk=config.sample_chunk)
    val_probs = bma(splits.val)
    test_probs = bma(splits.test)
    val_metrics = evaluate_probs(val_probs, splits.val.labels)
    test_metrics = evaluate_probs(test_probs, splits.test.labels)
    log(f"{method} BMA over {len(store)} samples: test {test_metrics}")
    temperature = calibrated = None
    if config.calibrate:
        # The BMA's log-probabilities play the logits' part (softmax(log p̄ / T)).
        t = calibration.fit_temperature(np.log(np.clip(val_probs, 1e-12, 1.0)),
                                        splits.val.labels)
        temperature = float(t)
        cal = calibration.apply_temperature(np.log(np.clip(test_probs, 1e-12, 1.0)), t)
        calibrated = evaluate_probs(cal, splits.test.labels)
    return PosteriorResult(method=method, scale=scale, samples=store, metrics=test_metrics,
                           val_metrics=val_metrics, test_probs=test_probs,
                           map_metrics=map_metrics, temperature=temperature,
                           calibrated_metrics=calibrated)
