"""The posterior front door: MAP (λ on validation) → samples → BMA test metrics.

:func:`sample_posterior` is the one call the CLI makes.

Example::

    samples, metrics = sample_posterior(model, splits, prior, method="swag", samples=20)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from flax import nnx

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.evaluation.metrics import evaluate_probs
from bayes_transfer.inference import calibration
from bayes_transfer.inference.bma import bma_predict
from bayes_transfer.inference.map import CHOSEN_SCALES, FinetuneConfig, finetune
from bayes_transfer.inference.samples import PosteriorSamples
from bayes_transfer.inference.sgld import SGLDConfig, run_sgld
from bayes_transfer.inference.swag_downstream import SwagDownstreamConfig, swag_posterior
from bayes_transfer.training import split_model

__all__ = ["PosteriorConfig", "PosteriorResult", "sample_posterior"]


@dataclasses.dataclass(frozen=True)
class PosteriorConfig:
    """Settings of :func:`sample_posterior` (plain Python).

    Attributes:
      prior_method: the prior each sample is drawn under (``Prior.for_method``).
      scale: λ, or ``"auto"``: the λ MAP fine-tuning chooses on validation, or
        ``"evidence"`` or ``"de-elbo"``: the λ it learns in one run
        (``bayes_transfer.inference.evidence``, ``bayes_transfer.inference.elbo``).
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
    map: Any = dataclasses.field(default_factory=FinetuneConfig)
    sgld: Any = dataclasses.field(default_factory=SGLDConfig)
    swag: Any = dataclasses.field(default_factory=SwagDownstreamConfig)
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
    config = config or PosteriorConfig()
    log = log or (lambda msg: None)
    if method not in ("sgld", "swag"):
        raise BayesTransferError(f"unknown posterior method {method!r}; use 'sgld' or 'swag'")
    if int(samples) < 1:
        raise BayesTransferError(f"samples must be >= 1, got {samples!r}")
    method_prior = prior.for_method(config.prior_method)

    graphdef, params, rest = split_model(model)
    map_metrics = None
    if config.start == "map" or config.scale in CHOSEN_SCALES:
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
