"""MAP fine-tuning under a prior, with λ chosen on the validation split (or learned in
one run: by the Laplace evidence, ``scale="evidence"``,
:mod:`bayes_transfer.inference.evidence`; by the data-emphasized ELBO,
``scale="de-elbo"``, :mod:`bayes_transfer.inference.elbo`).

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
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bayes_transfer import data as btdata
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.evaluation import metrics as btmetrics
from bayes_transfer.inference.elbo import ElboConfig, fit_with_elbo
from bayes_transfer.inference.evidence import EvidenceConfig, fit_with_evidence
from bayes_transfer.params import flatten_with_paths, map_with_paths, top_block_paths
from bayes_transfer.prior import METHODS, Prior, restrict_prior
from bayes_transfer.training import TrainConfig, TrainResult, fit, map_loss, predict, split_model
from bayes_transfer.training.optim import layer_lr_factors, make_optimizer, with_lr_factors

#: The ways ``finetune(scale=...)`` chooses λ besides a number: the validation grid, or
#: learned in one run (the Laplace evidence, the data-emphasized ELBO).
CHOSEN_SCALES = ("auto", "evidence", "de-elbo")

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
    # Equal budgets: every method gets learning_rates × (its λ grid, or for a method
    # without a prior strength, standard, the weight_decays grid), chosen on validation.
    learning_rates: tuple[float, ...] | None = None  # None: (train.learning_rate,)
    weight_decays: tuple[float, ...] | None = None   # decoupled weight decay of the flat-
                                                     # prior methods (None: as many as the
                                                     # λ grid has values, equal_weight_decays)
    max_extensions: int = 0          # when validation picks an end of the variances, try a
                                     # decade further, up to this many times per end
    refit: bool = False              # the validation split is part of the labelled budget:
                                     # retrain the choice on train ∪ val (data.load(...,
                                     # val_from_shots=...)); evidence: train on train ∪ val
    # scale="evidence": λ learned in one run (bayes_transfer.inference.evidence)
    evidence: EvidenceConfig = EvidenceConfig()
    # scale="de-elbo": λ learned in one run (bayes_transfer.inference.elbo)
    elbo: ElboConfig = ElboConfig()


@dataclasses.dataclass
class FinetuneResult:
    method: str
    scale: float                      # the chosen λ (inf: no prior term)
    metrics: dict                     # test metrics of the chosen run
    val_metrics: dict                 # validation metrics of the chosen run
    sweep: list[dict]                 # every candidate: scale, variance, val metrics
    result: TrainResult               # the chosen run (params, state, history)
    test_probs: np.ndarray | None = None
    # scale="evidence": λ after each update (and at the end, not applied); "de-elbo":
    # λ* and σ at each epoch's end (and at the end); else empty
    evidence_trace: list[dict] = dataclasses.field(default_factory=list)
    learning_rate: float = math.nan   # the chosen learning rate
    weight_decay: float = 0.0         # the chosen (decoupled) weight decay
    grid_extended: list[dict] = dataclasses.field(default_factory=list)  # v (or wd) added
    grid_clipped: bool = False        # still at an end of the grid after max_extensions
    budget: int = 1                   # configurations trained to choose (shared ones too)
    steps: int = 0                    # their optimizer steps (+ the refit's)
    seconds: float = 0.0              # wall time of the call
    refit: bool = False               # the result was retrained on train ∪ val

    def summary(self) -> dict:
        return {"method": self.method, "scale": self.scale, **self.metrics}


def scale_grid(prior: Prior, variances=DEFAULT_VARIANCES, include_no_prior=True) -> list:
    """λ candidates for ``prior``: λ = v / mean(diag Σ₀) for each effective variance v."""
    if prior.kind == "flat":
        return [math.inf]
    base = float(jnp.mean(prior.base_variance()))
    grid = [v / base for v in variances]
    return grid + ([math.inf] if include_no_prior else [])


def equal_weight_decays(n: int) -> tuple[float, ...]:
    """The weight decays standard fine-tuning (no prior strength to tune) is tried with
    when a λ grid has ``n`` values, so that it gets the same budget: 0 (its own no-prior
    limit), then decades up to 1. ``n = 4``: (0, 0.01, 0.1, 1)."""
    return (0.0,) + tuple(10.0 ** -k for k in range(n - 2, -1, -1))


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
    ``config.select_by``; a number fixes λ; ``"evidence"`` learns λ with the weights in
    one run on the training set by the Laplace evidence, no validation split
    (:mod:`bayes_transfer.inference.evidence`; the trajectory is ``evidence_trace``);
    ``"de-elbo"`` likewise by the data-emphasized ELBO (:mod:`bayes_transfer.inference.elbo`).
    ``cache`` (a dict) shares the no-prior run
    between methods that all include it, as they start from the same point: use one
    dict per (model initialisation, splits, config), never across them.

    Equal budgets: with ``config.learning_rates`` every learning rate is crossed with the
    λ grid, and a method without a prior strength (standard) is crossed with
    ``config.weight_decays`` instead (by default :func:`equal_weight_decays`, as many as
    the λ grid has values, so standard is tuned as much as the others);
    ``config.max_extensions`` extends a grid whose end validation picks; ``config.refit``
    retrains the choice on train ∪ val (the validation examples are part of the labelled
    budget, ``data.load(..., val_from_shots=True)``).
    The result records the budget (configurations), optimizer steps and seconds.

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
    t0 = time.perf_counter()
    method_prior = prior.for_method(method)
    _, params, _ = split_model(model)
    params = prior.init_params(params)
    params, method_prior = _reinit_top(model, params, method_prior, config.reinit_top)
    evaluate = evaluate_classification if evaluate is None else evaluate
    if isinstance(scale, str) and scale not in CHOSEN_SCALES:
        raise BayesTransferError(f"scale must be a number, 'auto', 'evidence' or 'de-elbo', "
                                 f"got {scale!r}")
    if scale in ("evidence", "de-elbo"):
        out = _finetune_one_run(scale, model, splits, method, method_prior, params, config,
                                evaluate, loss_fn)
        return dataclasses.replace(out, seconds=time.perf_counter() - t0)
    num_train = len(splits.train)
    loss = _loss(num_train, config, loss_fn)
    sign = -1.0 if config.select_by in HIGHER_IS_BETTER else 1.0
    flat = method_prior.kind == "flat"
    base = 1.0 if flat else float(jnp.mean(method_prior.base_variance()))
    rates = tuple(config.learning_rates or (config.train.learning_rate,))
    if scale == "auto":
        grid = scale_grid(method_prior, config.variances, config.include_no_prior)
    else:
        grid = [float(scale)]
    decays = (config.train.weight_decay,)
    if flat and config.weight_decays:
        decays = tuple(config.weight_decays)
    elif flat and scale == "auto":     # as many configurations as a prior method's grid
        decays = equal_weight_decays(len(config.variances) + config.include_no_prior)
    tag = lambda lr, wd: ((f"-lr{lr:.6g}" if len(rates) > 1 else "")  # noqa: E731
                          + (f"-wd{wd:.6g}" if wd != config.train.weight_decay else ""))

    runs: dict[tuple, dict] = {}

    def run(lr, lam, wd):
        if (lr, lam, wd) in runs:
            return
        key = ("no-prior", lr, wd) if math.isinf(lam) else None
        train = _train_config(config.train, lr, wd)
        steps = train.total_steps(btdata.num_batches(num_train, train.batch_size))
        if cache is not None and key in cache:
            runs[(lr, lam, wd)] = cache[key]
            return
        ckpt = (None if checkpoint_dir is None
                else os.path.join(checkpoint_dir, f"{method}-lam{lam:.6g}{tag(lr, wd)}"))
        optimizer = layer_lr_optimizer(dataclasses.replace(config, train=train), num_train,
                                       method_prior.spec.paths, params)
        result = fit(model, splits.train, loss, dataclasses.replace(
            train, desc=f"{method} λ={lam:.3g}{tag(lr, wd)}", checkpoint_dir=ckpt),
            aux=method_prior.rescale(lam), params=params, optimizer=optimizer)
        val, _ = evaluate(result, splits.val)
        if config.select_by not in val:
            raise BayesTransferError(f"select_by={config.select_by!r} is not a validation "
                                     f"metric; choose one of {sorted(val)}")
        entry = {"scale": lam, "variance": lam * base, "val": _floats(val), "result": result,
                 "learning_rate": lr, "weight_decay": wd, "steps": steps}
        runs[(lr, lam, wd)] = entry
        if cache is not None and key is not None:
            cache[key] = entry

    def best():   # a diverged run (NaN) can never be chosen; ties: the first tried
        return min(runs.values(), key=lambda r: _finite_or_inf(sign * r["val"][config.select_by]))

    for lr in rates:
        for lam in grid:
            for wd in decays:
                run(lr, lam, wd)
    extended, clipped = [], False
    if scale == "auto" and config.max_extensions > 0:
        extend = _extend_decays if flat else functools.partial(_extend_grid, base=base)
        extended, clipped = extend(run, best, runs, config)
    chosen = best()
    final, refit_steps = chosen["result"], 0
    if config.refit:
        final, refit_steps = _refit(model, splits, method_prior, params, config, loss_fn,
                                    chosen)
    test, test_probs = evaluate(final, splits.test)
    sweep = [{k: v for k, v in r.items() if k != "result"} for r in runs.values()]
    return FinetuneResult(method=method, scale=chosen["scale"], metrics=_floats(test),
                          val_metrics=chosen["val"], sweep=sweep, result=final,
                          test_probs=test_probs, learning_rate=chosen["learning_rate"],
                          weight_decay=chosen["weight_decay"], grid_extended=extended,
                          grid_clipped=clipped, budget=len(runs),
                          steps=sum(r["steps"] for r in runs.values()) + refit_steps,
                          seconds=time.perf_counter() - t0, refit=config.refit)


def _loss(num_train: int, config: FinetuneConfig, loss_fn):
    loss = map_loss(num_train, head_decay=config.head_decay) if loss_fn is None else loss_fn
    return with_l2(loss, config.l2)


def _train_config(train: TrainConfig, lr: float, wd: float) -> TrainConfig:
    """``train`` at learning rate ``lr`` and weight decay ``wd`` (decoupled: Adam becomes
    AdamW when ``wd`` > 0; SGD adds ``wd``·θ to its gradient). Unchanged values leave the
    config, and so the cached optimizer and the numbers, as they were."""
    changes = {"learning_rate": lr}
    if wd != train.weight_decay:
        changes["weight_decay"] = wd
        if train.optimizer == "adam" and wd:
            changes["optimizer"] = "adamw"
    return dataclasses.replace(train, **changes)


def _extend_grid(run, best, runs: dict, config: FinetuneConfig, *, base: float):
    """While validation picks an end of the tried variances (at its learning rate), try
    one decade further, at most ``config.max_extensions`` times per end. Returns (the
    added candidates, whether the choice is still at an end)."""
    added, used = [], {"low": 0, "high": 0}
    while True:
        b = best()
        if math.isinf(b["scale"]):
            return added, False
        tried = sorted(r["variance"] for (lr, lam, wd), r in runs.items()
                       if lr == b["learning_rate"] and math.isfinite(lam))
        top_is_open = any(math.isinf(lam) for (lr, lam, _) in runs if lr == b["learning_rate"])
        if b["variance"] <= tried[0]:
            side, factor = "low", 0.1
        elif b["variance"] >= tried[-1] and not top_is_open:
            side, factor = "high", 10.0
        else:
            return added, False
        if used[side] >= config.max_extensions:
            return added, True
        used[side] += 1
        variance = b["variance"] * factor
        added.append({"variance": variance, "learning_rate": b["learning_rate"],
                      "side": side})
        run(b["learning_rate"], variance / base, b["weight_decay"])


def _extend_decays(run, best, runs: dict, config: FinetuneConfig):
    """Standard fine-tuning's counterpart of :func:`_extend_grid`: while validation picks
    the largest weight decay tried (at its learning rate), try ten times more, at most
    ``config.max_extensions`` times. The other end, no weight decay, is the open one."""
    added = []
    while True:
        b = best()
        tried = [wd for (lr, _, wd) in runs if lr == b["learning_rate"]]
        if b["weight_decay"] <= 0 or b["weight_decay"] < max(tried):
            return added, False
        if len(added) >= config.max_extensions:
            return added, True
        decay = b["weight_decay"] * 10.0
        added.append({"weight_decay": decay, "learning_rate": b["learning_rate"],
                      "side": "high"})
        run(b["learning_rate"], b["scale"], decay)


def _union(a, b):
    """The examples of two in-memory datasets together."""
    if not (hasattr(a, "images") and hasattr(a, "subset")):
        raise BayesTransferError("refit needs in-memory datasets (ArrayDataset)")
    return dataclasses.replace(a, images=np.concatenate([a.images, b.images]),
                               labels=np.concatenate([a.labels, b.labels]))


def _refit(model, splits, method_prior, params, config: FinetuneConfig, loss_fn, chosen):
    """The chosen configuration retrained on train ∪ val (every labelled example): the
    same λ, learning rate and weight decay, N = n in the prior term."""
    data = _union(splits.train, splits.val)
    n = len(data)
    train = _train_config(config.train, chosen["learning_rate"], chosen["weight_decay"])
    optimizer = layer_lr_optimizer(dataclasses.replace(config, train=train), n,
                                   method_prior.spec.paths, params)
    result = fit(model, data, _loss(n, config, loss_fn),
                 dataclasses.replace(train, desc="refit on train+val"),
                 aux=method_prior.rescale(chosen["scale"]), params=params, optimizer=optimizer)
    return result, train.total_steps(btdata.num_batches(n, train.batch_size))


def _finetune_one_run(how: str, model, splits, method, method_prior, params,
                      config: FinetuneConfig, evaluate, loss_fn) -> FinetuneResult:
    """One run with λ learned on the training set (with ``config.refit``: on train ∪ val,
    every labelled example) by the Laplace evidence (``how="evidence"``,
    ``bayes_transfer.inference.evidence``) or the DE-ELBO (``"de-elbo"``,
    ``bayes_transfer.inference.elbo``)."""
    data = _union(splits.train, splits.val) if config.refit else splits.train
    n = len(data)
    loss = _loss(n, config, loss_fn)
    train = dataclasses.replace(config.train, desc=f"{method} λ={how}")
    optimizer = layer_lr_optimizer(config, n, method_prior.spec.paths, params)
    if method_prior.kind != "flat" and loss_fn is not None:
        raise BayesTransferError(f"scale={how!r} needs the classification likelihood; it "
                                 f"does not take a custom loss_fn")
    if method_prior.kind == "flat":        # nothing to learn: one plain run
        result, lam, trace = fit(model, data, loss, train, aux=method_prior,
                                 params=params, optimizer=optimizer), math.inf, []
    elif how == "de-elbo":
        if optimizer is not None or config.l2:
            raise BayesTransferError("scale='de-elbo' does not combine with layer_lr, "
                                     "layer_lr_decay or l2; use scale='evidence' or 'auto'")
        result, lam, trace = fit_with_elbo(model, data, train, method_prior,
                                           config=config.elbo, params=params,
                                           head_decay=config.head_decay)
    else:
        result, lam, trace = fit_with_evidence(
            model, data, loss, train, method_prior, config=config.evidence,
            params=params, optimizer=optimizer, extra_curvature=n * config.l2,
            head_precision=n * config.head_decay)
    val = (_floats(evaluate(result, splits.val)[0])
           if len(splits.val) and not config.refit else {})
    test, test_probs = evaluate(result, splits.test)
    base = 1.0 if method_prior.kind == "flat" else float(jnp.mean(method_prior.base_variance()))
    sweep = [{"scale": lam, "variance": lam * base, "val": val}]
    return FinetuneResult(method=method, scale=lam, metrics=_floats(test), val_metrics=val,
                          sweep=sweep, result=result, test_probs=test_probs,
                          evidence_trace=trace, learning_rate=train.learning_rate,
                          weight_decay=train.weight_decay, budget=1,
                          steps=train.total_steps(btdata.num_batches(n, train.batch_size)),
                          refit=config.refit)


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
