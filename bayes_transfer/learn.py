"""Learn a prior on a source task: train, then collect SWAG statistics, then save.

Two phases of the one training loop: (1) supervised training to convergence with a
cosine schedule; (2) more epochs at a constant learning rate while a SWAG collector
records the backbone's running mean, variance and last K deviations. The result is a
:class:`~bayes_transfer.prior.Prior` with its metadata (architecture, source data,
SWAG settings, source accuracy), ready for :func:`bayes_transfer.save_prior`.
"""
from __future__ import annotations

import dataclasses
import os

from flax import nnx

from bayes_transfer.evaluation import metrics as btmetrics
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.ssl import as_simclr_model, linear_probe
from bayes_transfer.swag import SwagConfig, swag_collector, swag_prior
from bayes_transfer.training import (TrainConfig, TrainResult, cross_entropy_loss, fit, predict,
                                     refresh_batch_stats)


@dataclasses.dataclass(frozen=True)
class LearnPriorConfig:
    train: TrainConfig = TrainConfig(epochs=4, batch_size=128, learning_rate=0.05,
                                     augment=True, desc="source")
    swag_epochs: float = 2.0
    swag_learning_rate: float = 0.01
    swag: SwagConfig = SwagConfig(rank=20, every=50)


def accuracy(result: TrainResult, dataset) -> float:
    logits = predict(result, dataset)
    return float(btmetrics.accuracy(logits, dataset.labels))


def learn_prior(model: nnx.Module, splits, config: LearnPriorConfig = LearnPriorConfig(), *,
                checkpoint_dir: str | None = None, loss_fn=cross_entropy_loss,
                metadata: dict | None = None) -> tuple[Prior, TrainResult]:
    """Source training then SWAG collection; returns (prior, final training result).

    ``checkpoint_dir`` makes both phases resumable (each keeps its own sub-directory).
    ``loss_fn`` is the source objective (cross-entropy, or SimCLR's NT-Xent). With
    ``bayes_transfer.ssl.simclr_loss`` a classifier is wrapped in a ``SimCLRModel`` (its
    backbone plus a projection head, which the prior does not cover), the metadata says
    ``source.method = "simclr"`` and has the test ``linear_probe_accuracy``.
    """
    def ckpt(name):
        return None if checkpoint_dir is None else os.path.join(checkpoint_dir, name)

    simclr = getattr(loss_fn, "objective", None) == "simclr"
    if simclr:  # a projection head outside backbone/: the prior covers what it would anyway
        model = as_simclr_model(model)
    pretrain = fit(model, splits.train, loss_fn,
                   dataclasses.replace(config.train, checkpoint_dir=ckpt("pretrain")))
    graphdef, params, rest = pretrain.graphdef, pretrain.state.params, pretrain.state.rest
    model = nnx.merge(graphdef, params, rest)

    spec = ParamSpec.from_params(params, config.swag.rule)
    collector = swag_collector(spec, config.swag)
    swag_train = dataclasses.replace(config.train, epochs=config.swag_epochs,
                                     learning_rate=config.swag_learning_rate,
                                     schedule="constant", checkpoint_dir=ckpt("swag"),
                                     seed=config.train.seed + 1, desc="swag")
    collected = fit(model, splits.train, loss_fn, swag_train, swag=collector)
    prior = swag_prior(collected.state.swag, spec, var_floor=config.swag.var_floor)

    info = {
        "kind": prior.kind,
        "swag": {"rank": config.swag.rank, "every": config.swag.every,
                 "start_step": config.swag.start_step, "var_floor": config.swag.var_floor,
                 "snapshots": int(collected.state.swag.count),
                 "epochs": config.swag_epochs, "learning_rate": config.swag_learning_rate,
                 "schedule": "constant"},
        "training": {k: v for k, v in dataclasses.asdict(config.train).items()
                     if k not in ("checkpoint_dir", "progress", "desc")},
    }
    if loss_fn is cross_entropy_loss and getattr(splits, "test", None) is not None:
        info["source_accuracy"] = accuracy(collected, splits.test)
        info["source_accuracy_at_mean"] = accuracy_at_mean(collected, prior, splits)
    if simclr:
        if getattr(model, "architecture", None) is not None:
            info["architecture"] = model.architecture
        if getattr(splits, "test", None) is not None and len(getattr(splits, "val", ())):
            info["linear_probe_accuracy"] = linear_probe(collected, splits)
    info.update(metadata or {})
    if simclr:
        info["source"] = {**info.get("source", {}), "method": "simclr"}
    return prior.with_metadata(info), collected


def accuracy_at_mean(result: TrainResult, prior: Prior, splits) -> float:
    """Test accuracy with the backbone at the prior mean (SWA), BN statistics refreshed."""
    params = prior.init_params(result.state.params)
    rest = refresh_batch_stats(result.graphdef, params, result.state.rest, splits.train)
    mean_result = TrainResult(result.graphdef, result.state._replace(params=params, rest=rest),
                              [])
    return accuracy(mean_result, splits.test)
