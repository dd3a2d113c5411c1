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
import functools
import math
import os
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bayes_transfer import data as btdata
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.evaluation import metrics as btmetrics
from bayes_transfer.inference.evidence import EvidenceConfig, fit_with_evidence
from bayes_transfer.params import flatten_with_paths, map_with_paths, top_block_paths
from bayes_transfer.prior import METHODS, Prior, restrict_prior
from bayes_transfer.training import TrainConfig, TrainResult, fit, map_loss, predict, split_model
from bayes_transfer.training.optim import layer_lr_factors, make_optimizer, with_lr_factors

#: Effective prior variances tried for every method (besides the no-prior limit).
#: With d ≈ 1e5 covered weights and N ≈ 100 examples the prior term dominates the
#: likelihood unless v is large, so the grid reaches v = 100.
DEFAULT_VARIANCES = (1e-2, 1e-1, 1.0, 10.0, 100.0)

#: Validation metrics that are maximised by the choice of λ (all others are minimised).
HIGHER_IS_BETTER = frozenset({"accuracy", "miou", "pixel_accuracy"})


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Settings shared by every fine-tuning method (the same budget for each).

    Non-binary transfer: ``reinit_top=k`` re-initialises the top k blocks of
    :func:`backbone_blocks` (they keep the values of the model passed to
    :func:`finetune`, a fresh initialisation) and takes them out of the prior (its
    marginal on the other leaves, :func:`restrict_prior`; the λ grid is then relative
    to the kept leaves' variances). ``layer_lr`` multiplies the learning rate of the
    parameters the (restricted) prior covers, the transferred ones, relative to the
    head and the re-initialised blocks (0 freezes them; BatchNorm statistics still
    adapt). ``layer_lr_decay=γ`` makes that layer-wise (discriminative fine-tuning,
    Howard & Ruder 2018): the j-th transferred block below the top one, in
    :func:`backbone_blocks` order, gets ``layer_lr·γʲ``, so the layers nearest the input,
    the most generic ones, move least. ``l2`` adds a plain L2 on every trainable
    parameter (:func:`with_l2`), so ``method="l2sp"`` with ``l2 > 0`` is L2-SP + L2. The
    defaults change nothing.
    """

    # Adam, not SGD: a strong learned prior is a stiff quadratic (curvature up to
    # 1/(λ·var_min·N)) on which SGD at a usable learning rate diverges.
    train: TrainConfig = TrainConfig(epochs=40, batch_size=32, optimizer="adam",
                                     learning_rate=1e-2, schedule="cosine", desc="finetune")
    head_decay: float = 1e-4
    variances: tuple[float, ...] = DEFAULT_VARIANCES
    include_no_prior: bool = True
    select_by: str = "nll"           # validation metric optimised by the choice of λ
                                     # (maximised if in HIGHER_IS_BETTER, else minimised)
    # Non-binary transfer (the defaults transfer the whole backbone, as above):
    reinit_top: int = 0              # keep the top k backbone blocks at the model's fresh
                                     # initialisation, outside the prior (backbone_blocks)
    layer_lr: float = 1.0            # learning-rate multiplier of the transferred (prior-
                                     # covered) parameters relative to the head's
    layer_lr_decay: float = 1.0      # ×γ per transferred block further from the top
    l2: float = 0.0                  # plain L2, ½·l2·‖θ‖² over every trainable parameter,
                                     # on top of the prior (L2-SP + L2) and head_decay
    # scale="evidence": λ learned in one run (bayes_transfer.inference.evidence)
    evidence: EvidenceConfig = EvidenceConfig()


@dataclasses.dataclass
class FinetuneResult:
    method: str
    scale: float                      # the chosen λ (inf: no prior term)
    metrics: dict                     # test metrics of the chosen run
    val_metrics: dict                 # validation metrics of the chosen run
    sweep: list[dict]                 # every candidate: scale, variance, val metrics
    result: TrainResult               # the chosen run (params, state, history)
    test_probs: np.ndarray | None = None
    # scale="evidence": λ after each update (and at the end, not applied); else empty
    evidence_trace: list[dict] = dataclasses.field(default_factory=list)

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
    checkpoint_dir: str | None = None,
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

    ``checkpoint_dir`` makes the sweep resumable after a preemption: each candidate run
    checkpoints in its own sub-directory (``{method}-lam{λ}``), so a rerun restores the
    finished runs and continues the interrupted one, with the same result as an
    uninterrupted sweep (a restored run's ``history`` only holds the epochs it ran).

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
    params, method_prior = _reinit_top(model, params, method_prior, config.reinit_top)
    num_train = len(splits.train)
    loss = map_loss(num_train, head_decay=config.head_decay) if loss_fn is None else loss_fn
    loss = with_l2(loss, config.l2)
    optimizer = layer_lr_optimizer(config, num_train, method_prior.spec.paths, params)
    evaluate = evaluate_classification if evaluate is None else evaluate
    sign = -1.0 if config.select_by in HIGHER_IS_BETTER else 1.0
    if scale == "evidence":
        return _finetune_evidence(model, splits, method, method_prior, params, loss,
                                  optimizer, config, evaluate, loss_fn is not None)
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
            ckpt = (None if checkpoint_dir is None
                    else os.path.join(checkpoint_dir, f"{method}-lam{lam:.6g}"))
            result = fit(model, splits.train, loss, dataclasses.replace(
                config.train, desc=f"{method} λ={lam:.3g}", checkpoint_dir=ckpt),
                aux=aux, params=params, optimizer=optimizer)
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


def _finetune_evidence(model, splits, method, method_prior, params, loss, optimizer,
                       config: FinetuneConfig, evaluate, custom_loss: bool) -> FinetuneResult:
    """One run with λ learned by the Laplace evidence (``bayes_transfer.inference.evidence``)."""
    train = dataclasses.replace(config.train, desc=f"{method} λ=evidence")
    if method_prior.kind == "flat":        # nothing to learn: one plain run
        result, lam, trace = fit(model, splits.train, loss, train, aux=method_prior,
                                 params=params, optimizer=optimizer), math.inf, []
    else:
        if custom_loss:
            raise BayesTransferError("scale='evidence' needs the classification likelihood "
                                     "(its curvature); it does not take a custom loss_fn")
        result, lam, trace = fit_with_evidence(
            model, splits.train, loss, train, method_prior, config=config.evidence,
            params=params, optimizer=optimizer, extra_curvature=len(splits.train) * config.l2,
            head_precision=len(splits.train) * config.head_decay)
    val = _floats(evaluate(result, splits.val)[0]) if len(splits.val) else {}
    test, test_probs = evaluate(result, splits.test)
    base = 1.0 if method_prior.kind == "flat" else float(jnp.mean(method_prior.base_variance()))
    sweep = [{"scale": lam, "variance": lam * base, "val": val}]
    return FinetuneResult(method=method, scale=lam, metrics=_floats(test), val_metrics=val,
                          sweep=sweep, result=result, test_probs=test_probs,
                          evidence_trace=trace)


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _floats(d: dict) -> dict:
    return {k: float(v) for k, v in d.items()}


# ---------------------------------------------------------------------- non-binary transfer
def _reinit_top(model, params, prior: Prior, k: int):
    """(params with the top k blocks back at ``model``'s values, the prior without them)."""
    if not k:
        return params, prior
    _, fresh, _ = split_model(model)
    paths = top_block_paths(params, k, prior.spec.rule)
    fresh_leaves = flatten_with_paths(fresh)
    if all(np.array_equal(np.asarray(fresh_leaves[p]), np.asarray(x))
           for p, x in flatten_with_paths(params).items() if p in paths):
        warnings.warn("reinit_top: the model passed to finetune already holds the prior "
                      "mean in the re-initialised blocks, so they are not re-initialised; "
                      "pass a freshly initialised model", stacklevel=3)
    params = map_with_paths(lambda p, x: fresh_leaves[p] if p in paths else x, params)
    return params, restrict_prior(prior, paths)


@functools.lru_cache(maxsize=32)
def with_l2(loss_fn: Callable, l2: float) -> Callable:
    """``loss_fn`` plus ½·l2·‖θ‖² over every trainable parameter (``loss_fn`` if l2 = 0).

    The term is also reported as the metric ``"l2"``. Cached: one object per (loss, l2),
    so the compiled training step is reused across a λ sweep.
    """
    if not l2:
        return loss_fn

    def loss(apply, params, rest, batch, key, aux):
        value, (rest, metrics) = loss_fn(apply, params, rest, batch, key, aux)
        term = 0.5 * l2 * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))
        return value + term, (rest, dict(metrics, l2=term))

    return loss


def layer_lr_optimizer(config: FinetuneConfig, num_train: int, paths, params):
    """None (fit's own optimizer) unless ``layer_lr`` or ``layer_lr_decay`` is not 1."""
    if config.layer_lr == 1.0 and config.layer_lr_decay == 1.0:
        return None
    for name in ("layer_lr", "layer_lr_decay"):
        value = getattr(config, name)
        if value < 0 or not math.isfinite(value):
            raise BayesTransferError(f"{name} must be a finite number >= 0, got {value}")
    train = config.train
    # the same number of steps as fit computes, so the schedule is the same
    total = train.total_steps(btdata.num_batches(num_train, train.batch_size))
    factors = layer_lr_factors(paths, params, float(config.layer_lr),
                               float(config.layer_lr_decay))
    return with_lr_factors(make_optimizer(train, total), tuple(sorted(factors.items())))
