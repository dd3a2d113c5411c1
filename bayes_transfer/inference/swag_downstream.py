"""SWAG fitted downstream: a Gaussian posterior around the fine-tuned solution, sampled.

After MAP fine-tuning, training goes on at a constant learning rate with a SWAG
collector riding along in the one training loop (``fit(..., swag=collector)``); by
default it covers *all* parameters (backbone and head), since the downstream posterior
is over the whole network. The collected statistics define N(θ̄, s·Σ_swag) (``s`` the
``sample_scale``; the SWAG paper samples at s = 0.5 or 1), sampled exactly as
:func:`bayes_transfer.swag.swag_sample` does; each sample gets its own BatchNorm
statistics (:func:`~bayes_transfer.inference.bma.refresh_batch_stats`), which no
training step produced for it. The loss is the MAP objective under the same prior.

Example::

    result, spec = collect_swag(map_model, splits, prior.rescale(lam), SwagDownstreamConfig())
    samples = sample_swag(result, spec, SwagDownstreamConfig(), 20, splits.train)
    probs = bma_predict(result.graphdef, samples, None, splits.test)
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import optax

from bayes_transfer import data as btdata
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.inference.samples import PosteriorSamples
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import prior_preconditioner
from bayes_transfer.swag import SwagConfig, swag_collector, swag_prior
from bayes_transfer.training import (TrainConfig, TrainResult, fit, map_loss,
                                     refresh_batch_stats, split_model)
from bayes_transfer.training.optim import make_optimizer, scale_by_tree

__all__ = ["ALL_PARAMS_RULE", "SwagDownstreamConfig", "collect_swag", "sample_swag",
           "swag_posterior"]

#: The rule covering every trainable parameter (backbone and head).
ALL_PARAMS_RULE = r"^"


@dataclasses.dataclass(frozen=True)
class SwagDownstreamConfig:
    """Settings of downstream SWAG (plain Python).

    Attributes:
      epochs: epochs of constant-learning-rate training while statistics are collected.
      learning_rate, optimizer, momentum: the constant-rate optimizer ("sgd" with
        momentum, as in SWAG, or "adam").
      precondition: scale SGD's steps by the prior's relative variances
        (:func:`~bayes_transfer.inference.sgld.prior_preconditioner`): a learned prior
        is too stiff for plain SGD at a useful rate.
      every: steps between snapshots; 0 means once per epoch (SWAG's choice).
      rank: K, the deviations kept; kind: "lowrank" (SWAG) or "diag" (SWAG-Diag).
      rule: the parameters covered (default all of them).
      sample_scale: s, samples are drawn from N(θ̄, s·Σ_swag).
      head_decay: as in ``map_loss``.
      bn_batches: forward passes used to refresh each sample's BatchNorm statistics.
    """

    epochs: float = 10.0
    learning_rate: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    precondition: bool = True
    batch_size: int = 32
    every: int = 0
    rank: int = 20
    kind: str = "lowrank"
    rule: str = ALL_PARAMS_RULE
    sample_scale: float = 1.0
    head_decay: float = 1e-4
    bn_batches: int = 40
    augment: bool = False
    seed: int = 0
    progress: bool = True


def _optimizer(config: SwagDownstreamConfig, train: TrainConfig, total: int, prior,
               params) -> optax.GradientTransformation:
    """``train``'s optimizer, after the prior's diagonal preconditioner for SGD."""
    tx = make_optimizer(train, total)
    precond = (prior_preconditioner(prior, params)
               if config.optimizer == "sgd" and config.precondition else None)
    return tx if precond is None else optax.chain(scale_by_tree(precond), tx)


def collect_swag(model, splits, prior=None, config: SwagDownstreamConfig = SwagDownstreamConfig(),
                 *, params=None, loss_fn=None) -> tuple[TrainResult, ParamSpec]:
    """Train at a constant learning rate from ``model`` (the MAP solution), collecting SWAG.

    ``prior`` is the rescaled prior of the MAP objective (None: no prior term).
    Returns the training result (its ``state.swag`` holds the statistics) and the spec
    of the covered parameters.
    """
    train = getattr(splits, "train", splits)
    n = len(train)
    if prior is not None and prior.kind == "flat":
        prior = None
    _, start, _ = split_model(model)
    params = start if params is None else params
    spe = btdata.num_batches(train, config.batch_size)
    every = int(config.every) or spe
    train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size,
                               optimizer=config.optimizer, learning_rate=config.learning_rate,
                               momentum=config.momentum, schedule="constant",
                               augment=config.augment, seed=config.seed,
                               progress=config.progress, desc="swag (downstream)")
    total = train_config.total_steps(spe)
    swag_config = SwagConfig(rank=int(config.rank), every=every, rule=config.rule)
    spec = swag_config.spec(params)
    if total // every < 2:
        raise BayesTransferError(
            f"downstream SWAG would take {total // every} snapshot(s) in {total} steps "
            f"(one every {every}); raise epochs or lower every: SWAG needs at least 2")
    loss_fn = loss_fn or map_loss(n, head_decay=config.head_decay)
    result = fit(model, train, loss_fn, train_config, aux=prior,
                 optimizer=_optimizer(config, train_config, total, prior, params),
                 swag=swag_collector(spec, swag_config), params=params)
    return result, spec


@functools.lru_cache(maxsize=32)
def _sampler(spec: ParamSpec):
    @jax.jit
    def draw(posterior, base, key):
        # = swag_sample(state, spec, key) written into the parameter tree, in one program.
        return spec.replace(base, posterior.sample(key))

    return draw


def sample_swag(result: TrainResult, spec: ParamSpec, config: SwagDownstreamConfig,
                num_samples: int, bn_dataset=None, *, max_in_memory: int | None = None,
                sample_dir=None) -> PosteriorSamples:
    """``num_samples`` parameter sets from the collected SWAG posterior, BN refreshed.

    Each sample is θ ~ N(θ̄, s·Σ_swag) over the covered parameters (the others keep
    their last training values), written into the parameter tree; with ``bn_dataset``
    its BatchNorm statistics are recomputed there.
    """
    state = result.state.swag
    if state is None:
        raise BayesTransferError("the training result holds no SWAG statistics")
    posterior = swag_prior(state, spec, kind=config.kind, scale=float(config.sample_scale))
    key = jax.random.PRNGKey(config.seed + 1)
    samples = PosteriorSamples(sample_dir, max_in_memory=max_in_memory)
    samples.info = {"method": "swag", **dataclasses.asdict(config),
                    "snapshots": int(state.count)}
    base, rest0 = result.state.params, result.state.rest
    draw = _sampler(spec)
    for i in range(int(num_samples)):
        params = draw(posterior, base, jax.random.fold_in(key, i))
        rest = rest0
        if bn_dataset is not None:
            rest = refresh_batch_stats(result.graphdef, params, rest0, bn_dataset,
                                       num_batches=config.bn_batches)
        samples.append(params, rest, step=i)
    return samples


def swag_posterior(model, splits, prior=None, config: SwagDownstreamConfig = SwagDownstreamConfig(),
                   *, num_samples: int = 20, params=None, max_in_memory: int | None = None,
                   sample_dir=None) -> PosteriorSamples:
    """:func:`collect_swag` then :func:`sample_swag` (BN refreshed on the training set)."""
    result, spec = collect_swag(model, splits, prior, config, params=params)
    if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result.state.params)):
        raise BayesTransferError("downstream SWAG training diverged (non-finite parameters); "
                                 "lower SwagDownstreamConfig.learning_rate")
    train = getattr(splits, "train", splits)
    return sample_swag(result, spec, config, num_samples, train,
                       max_in_memory=max_in_memory, sample_dir=sample_dir)
