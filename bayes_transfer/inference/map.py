"""MAP fine-tuning under a prior, with λ chosen on the validation split.

Every method starts from the same point (backbone = prior mean θ̄, a fresh head with the
same seed), trains with the same settings and gets the same grid of candidate scales;
they differ only in the prior (``Prior.for_method``). The grid is a common range of
*effective variances* v (λ = v / σ̄²₀, σ̄²₀ the average of the method's Σ₀ diagonal), so
L2-SP with Σ₀ = I and a SWAG prior whose variances are ~1e-5 are tuned over the same
span of prior strengths, plus the no-prior limit λ = ∞. The test split is only read
after the choice.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bayes_transfer import metrics as btmetrics
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.objectives import map_loss
from bayes_transfer.prior import METHODS, Prior
from bayes_transfer.train import TrainConfig, TrainResult, fit, predict, split_model

#: Effective prior variances tried for every method (besides the no-prior limit).
#: With d ≈ 1e5 covered weights and N ≈ 100 examples the prior term dominates the
#: likelihood unless v is large, so the grid reaches v = 100.
DEFAULT_VARIANCES = (1e-2, 1e-1, 1.0, 10.0, 100.0)

#: Validation metrics that are maximised by the choice of λ (all others are minimised).
HIGHER_IS_BETTER = frozenset({"accuracy", "miou", "pixel_accuracy"})


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Settings shared by every fine-tuning method (the same budget for each)."""

    # Adam, not SGD: a strong learned prior is a stiff quadratic (curvature up to
    # 1/(λ·var_min·N)) on which SGD at a usable learning rate diverges.
    train: TrainConfig = TrainConfig(epochs=40, batch_size=32, optimizer="adam",
                                     learning_rate=1e-2, schedule="cosine", desc="finetune")
    head_decay: float = 1e-4
    variances: tuple[float, ...] = DEFAULT_VARIANCES
    include_no_prior: bool = True
    select_by: str = "nll"           # validation metric optimised by the choice of λ
                                     # (maximised if in HIGHER_IS_BETTER, else minimised)


@dataclasses.dataclass
class FinetuneResult:
    method: str
    scale: float                      # the chosen λ (inf: no prior term)
    metrics: dict                     # test metrics of the chosen run
    val_metrics: dict                 # validation metrics of the chosen run
    sweep: list[dict]                 # every candidate: scale, variance, val metrics
    result: TrainResult               # the chosen run (params, state, history)
    test_probs: np.ndarray | None = None

    def summary(self) -> dict:
        return {"method": self.method, "scale": self.scale, **self.metrics}


def scale_grid(prior: Prior, variances=DEFAULT_VARIANCES, include_no_prior=True) -> list:
    """λ candidates for ``prior``: λ = v / mean(diag Σ₀) for each effective variance v."""
    if prior.kind == "flat":
        return [math.inf]
    base = float(jnp.mean(prior.base_variance()))
    grid = [v / base for v in variances]
    return grid + ([math.inf] if include_no_prior else [])


def _probs(logits) -> np.ndarray:
    return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


def evaluate_classification(result: TrainResult, dataset) -> tuple[dict, np.ndarray]:
    """(classification metrics, predictive probabilities) of ``result`` on ``dataset``."""
    probs = _probs(predict(result, dataset))
    return btmetrics.classification_metrics(probs, dataset.labels), probs


def finetune(
    model: nnx.Module,
    splits,
    prior: Prior,
    method: str = "lowrank",
    *,
    scale: float | str = "auto",
    config: FinetuneConfig = FinetuneConfig(),
    cache: dict | None = None,
    loss_fn: Callable | None = None,
    evaluate: Callable[[TrainResult, object], tuple[dict, np.ndarray | None]] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``splits.train`` under ``prior.for_method(method)``.

    ``scale="auto"`` tries :func:`scale_grid` and keeps the λ with the best validation
    ``config.select_by``; a number fixes λ. ``cache`` (a dict) shares the no-prior run
    between methods that all include it, as they start from the same point: use one
    dict per (model initialisation, splits, config), never across them.

    Other tasks plug in here: ``loss_fn`` replaces the classification MAP loss (it gets
    the prior as the training loop's ``aux``; e.g. ``map_loss(N, task="segmentation")``)
    and ``evaluate(result, dataset) -> (metrics, probs)`` replaces the classification
    metrics (``config.select_by`` must be one of its keys). See
    ``bayes_transfer.segmentation.finetune_segmentation``.

    Example::

        model = bt.models.create("small_cnn", num_classes=10, seed=0)
        res = finetune(model, splits, prior, "lowrank")
        print(res.scale, res.metrics["error"])
    """
    if method not in METHODS:
        raise BayesTransferError(f"unknown method {method!r}; choose one of {METHODS}")
    method_prior = prior.for_method(method)
    _, params, _ = split_model(model)
    params = prior.init_params(params)
    num_train = len(splits.train)
    loss = _loss(num_train, config.head_decay) if loss_fn is None else loss_fn
    evaluate = evaluate_classification if evaluate is None else evaluate
    sign = -1.0 if config.select_by in HIGHER_IS_BETTER else 1.0
    if scale == "auto":
        grid = scale_grid(method_prior, config.variances, config.include_no_prior)
    else:
        grid = [float(scale)]
    base = 1.0 if method_prior.kind == "flat" else float(jnp.mean(method_prior.base_variance()))

    runs = []
    for lam in grid:
        key = "no-prior" if math.isinf(lam) else None
        if cache is not None and key in cache:
            run = cache[key]
        else:
            aux = method_prior.rescale(lam)
            result = fit(model, splits.train, loss, dataclasses.replace(
                config.train, desc=f"{method} λ={lam:.3g}"), aux=aux, params=params)
            val, _ = evaluate(result, splits.val)
            if config.select_by not in val:
                raise BayesTransferError(f"select_by={config.select_by!r} is not a validation "
                                         f"metric; choose one of {sorted(val)}")
            run = {"scale": lam, "variance": lam * base, "val": _floats(val), "result": result}
            if cache is not None and key is not None:
                cache[key] = run
        runs.append(run)
    # A diverged run (NaN) can never be chosen.
    best = min(runs, key=lambda r: _finite_or_inf(sign * r["val"][config.select_by]))
    test, test_probs = evaluate(best["result"], splits.test)
    sweep = [{k: v for k, v in r.items() if k != "result"} for r in runs]
    return FinetuneResult(method=method, scale=best["scale"], metrics=_floats(test),
                          val_metrics=best["val"], sweep=sweep, result=best["result"],
                          test_probs=test_probs)


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _floats(d: dict) -> dict:
    return {k: float(v) for k, v in d.items()}


_LOSSES: dict = {}


def _loss(num_train: int, head_decay: float):
    # One loss function object per setting, so the compiled step is reused across runs.
    key = (num_train, head_decay)
    if key not in _LOSSES:
        _LOSSES[key] = map_loss(num_train, head_decay=head_decay)
    return _LOSSES[key]
