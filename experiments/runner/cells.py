"""The grid of cells (prior, shots, seed, method) and running one cell.

Every method of a cell gets the same tuning budget (``config["tuning"]``): each learning
rate × each effective prior variance (standard fine-tuning: × each weight decay), best
on validation; a variant with ``"scale": "evidence"`` (or ``"de-elbo"``) is one run
instead, λ learned on every labelled example. A sampler (``sgld:M``,
``swag:M``) starts from the tuned MAP run of its base method M, which it shares with M
when both run on the same (prior, shots, seed).
"""
from __future__ import annotations

import dataclasses
import math

import bayes_transfer as bt
from bayes_transfer.inference import PosteriorConfig, sample_posterior
from bayes_transfer.inference import ElboConfig, EvidenceConfig
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
                             select_by=tuning["select_by"],
                             weight_decays=tuple(tuning["weight_decays"] or ()) or None,
                             max_extensions=int(tuning["extend"]),
                             refit=tuning["validation"] == "within",
                             evidence=EvidenceConfig(**tuning["evidence"]),
                             elbo=ElboConfig(**tuning["elbo"]))


def tuned_map(prior, splits, method: str, tuning: dict, seed: int, caches: dict,
              variant: dict | None = None):
    """MAP fine-tuning with the shared budget: every lr × every λ (or weight decay, for
    standard fine-tuning), best on validation; or, for a variant with ``"scale":
    "evidence"`` or ``"de-elbo"``, one run at the first learning rate with λ learned."""
    options = dict(variant or {})
    method = options.pop("method", method)
    scale = options.pop("scale", "auto")
    if "elbo" in options:            # the DE-ELBO's settings, over the config's
        options["elbo"] = ElboConfig(**{**tuning["elbo"], **options["elbo"]})
    # The no-prior runs are shared only between methods that start alike.
    cache_key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    rates = tuple(tuning["learning_rates"])
    model = bt.models.from_prior(prior, splits.train.num_classes, seed=seed)
    config = dataclasses.replace(finetune_config(tuning, rates[0], seed),
                                 learning_rates=rates if scale == "auto" else None, **options)
    res = bt.finetune(model, splits, prior, method, scale=scale, config=config,
                      cache=caches.setdefault(cache_key, {}))
    # per learning rate: its best λ (the format of rows before equal budgets)
    sign = -1.0 if tuning["select_by"] in HIGHER_IS_BETTER else 1.0
    trials = []
    for lr in (rates if scale == "auto" else rates[:1]):
        sweep = [s for s in res.sweep if s.get("learning_rate", lr) == lr]
        best = min(sweep, key=lambda s: (sign * s["val"][tuning["select_by"]])
                   if s["val"] and math.isfinite(s["val"][tuning["select_by"]]) else math.inf)
        trials.append({"learning_rate": lr, "scale": best["scale"], "val": best["val"],
                       "sweep": sweep})
    chosen = dataclasses.replace(config, learning_rates=None, train=dataclasses.replace(
        config.train, learning_rate=res.learning_rate))
    return res, res.learning_rate, chosen, trials


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
    row = {"learning_rate": lr, "scale": res.scale, "tuning": trials,
           "weight_decay": res.weight_decay, "budget": res.budget, "steps": res.steps,
           "map_seconds": round(res.seconds, 1), "refit": res.refit}
    if res.grid_extended or res.grid_clipped:
        row.update(grid_extended=res.grid_extended, grid_clipped=res.grid_clipped)
    if res.evidence_trace:
        row["evidence_trace"] = res.evidence_trace
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
