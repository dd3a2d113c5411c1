"""The grid of cells (prior, shots, seed, method) and running one cell.

Every method of a cell gets the same tuning budget (``config["tuning"]``): each learning
rate × each effective prior variance, best on validation. A sampler (``sgld:M``,
``swag:M``) starts from the tuned MAP run of its base method M, which it shares with M
when both run on the same (prior, shots, seed).
"""
from __future__ import annotations

import dataclasses
import math

import bayes_transfer as bt
from bayes_transfer.inference import PosteriorConfig, sample_posterior
from bayes_transfer.inference.map import HIGHER_IS_BETTER
from bayes_transfer.inference.sgld import SGLDConfig
from bayes_transfer.inference.swag_downstream import SwagDownstreamConfig


def cell_key(prior: str, shots, seed: int, method: str) -> str:
    """The key of a cell in ``runs.jsonl``."""
    return f"{prior}|{shots}|{seed}|{method}"


def grid(config: dict) -> list[tuple]:
    """Every cell of ``config`` as (prior label, shots, seed, method), in running order."""
    return [(p, s, seed, m) for p in config["priors"] for s in config["shots"]
            for seed in config["seeds"] for m in config["methods"]]


def finetune_config(tuning: dict, lr: float, seed: int):
    """The ``FinetuneConfig`` of one learning rate: ``tuning["steps"]`` optimizer steps."""
    train = bt.TrainConfig(steps=tuning["steps"], batch_size=tuning["batch_size"],
                           optimizer="adam", learning_rate=lr, schedule="cosine", seed=seed,
                           progress=False, desc="finetune")
    return bt.FinetuneConfig(train=train, head_decay=tuning["head_decay"],
                             variances=tuple(tuning["variances"]),
                             select_by=tuning["select_by"])


def tuned_map(prior, splits, method: str, tuning: dict, seed: int, caches: dict,
              variant: dict | None = None):
    """MAP fine-tuning with the shared budget: every lr × every λ, best on validation."""
    options = dict(variant or {})
    method = options.pop("method", method)
    # The no-prior run is shared only between methods that start alike.
    cache_key = tuple(sorted(options.items()))
    sign = -1.0 if tuning["select_by"] in HIGHER_IS_BETTER else 1.0
    best, trials = None, []
    for lr in tuning["learning_rates"]:
        model = bt.models.from_prior(prior, splits.train.num_classes, seed=seed)
        config = dataclasses.replace(finetune_config(tuning, lr, seed),
                                     **options)
        res = bt.finetune(model, splits, prior, method, config=config,
                       cache=caches.setdefault((lr, cache_key), {}))
        value = sign * res.val_metrics[tuning["select_by"]]
        trials.append({"learning_rate": lr, "scale": res.scale, "val": res.val_metrics,
                       "sweep": res.sweep})
        if best is None or (math.isfinite(value) and value < best[0]):
            best = (value, lr, config, res)
    _, lr, config, res = best
    return res, lr, config, trials


def run_cell(prior, splits, method: str, config: dict, seed: int, maps: dict, caches: dict):
    """One method on one (prior, shots, seed): a result row and the test probabilities.

    ``maps`` (base method → tuned MAP run) and ``caches`` (the no-prior runs) are shared
    by the methods of one (prior, shots, seed).
    """
    tuning = config["tuning"]
    sampler, _, base = method.rpartition(":")
    if base not in maps:
        maps[base] = tuned_map(prior, splits, base, tuning, seed, caches,
                               config["variants"].get(base))
    res, lr, map_config, trials = maps[base]
    row = {"learning_rate": lr, "scale": res.scale, "tuning": trials}
    if not sampler:
        return {**row, "test": res.metrics, "val": res.val_metrics}, res.test_probs

    # A sampler: samples under the base prior, from its tuned MAP run and λ.
    post = config.get("posterior", {})
    sgld = SGLDConfig(**{"seed": seed, "progress": False, **post.get("sgld", {})})
    swag = SwagDownstreamConfig(**{"seed": seed, "progress": False, **post.get("swag", {})})
    pconf = PosteriorConfig(prior_method=base, scale="auto", map=map_config, sgld=sgld,
                            swag=swag)
    model = bt.models.from_prior(prior, splits.train.num_classes, seed=seed)
    out = sample_posterior(model, splits, prior, sampler, samples=int(post.get("samples", 10)),
                           config=pconf, map_result=res)
    row.update(test=out.metrics, val=out.val_metrics, samples=len(out.samples),
               map_test=out.map_metrics, temperature=out.temperature,
               calibrated_test=out.calibrated_metrics)
    return row, out.test_probs
