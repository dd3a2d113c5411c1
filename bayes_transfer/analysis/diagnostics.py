"""Gradient diagnostics of MAP fine-tuning: how the likelihood and the prior pull.

The MAP objective (``bayes_transfer.objectives.map_loss``) is

    L(θ) = NLL_B(θ) + P(θ),   P(θ) = −log p(θ)/N   (+ head decay on the head),

and over the parameters the prior covers its gradient is g_lik + g_prior with
g_lik = ∇NLL_B and g_prior = ∇P (both gradients of *loss* terms: the step goes along
their negative sum). :func:`gradient_diagnostics` reports, over the covered parameters,

- ``cosine`` = cos(g_lik, g_prior): −1 when the prior pulls straight against the data
  (NaN at θ = θ̄, e.g. the first step of fine-tuning, where g_prior = 0);
- ``ratio`` = ‖g_prior‖ / ‖g_lik‖: how much of the step the prior decides (it grows
  linearly in 1/λ; with plain SGD the prior's share of the *step* is this ratio);
- ``lik_norm``, ``prior_norm``;
- with an Adam optimizer state, ``adam_cosine`` and ``adam_ratio``: the same after
  Adam's preconditioning g ↦ g/(√ν̂ + ε) with its current second-moment estimate ν̂.
  Adam divides each coordinate by the size of the *total* gradient, so a strong prior
  does not take larger steps, and the prior's relative share is what moves with λ.

:func:`trace_gradients` fine-tunes the same start under the same prior with several
optimizers (SGD and Adam by default) through :func:`bayes_transfer.train.fit`, and logs
these numbers at the end of every ``every``-th epoch (and before the first step) on
fixed batches of the training set.

Example::

    traces = trace_gradients(model, splits, prior, method="lowrank", variance=1.0)
    for name, trace in traces.items():
        print(name, trace.series("cosine"), trace.series("ratio"))
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bayes_transfer import data as btdata
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.inference.map import evaluate_classification
from bayes_transfer.training import (TrainConfig, TrainResult, TrainState, fit, make_apply,
                                     split_model)
from bayes_transfer.training.objectives import map_loss, prior_penalty

__all__ = ["DEFAULT_OPTIMIZERS", "GradientTrace", "adam_preconditioner", "gradient_diagnostics",
           "trace_gradients"]

#: The optimizers :func:`trace_gradients` compares by default: the fine-tuning default
#: (Adam, lr 1e-2, cosine) and SGD with momentum 0.9 at the same learning rate.
DEFAULT_OPTIMIZERS = {
    "sgd": TrainConfig(epochs=40, batch_size=32, optimizer="sgd", learning_rate=1e-2,
                       momentum=0.9, schedule="cosine", progress=False),
    "adam": TrainConfig(epochs=40, batch_size=32, optimizer="adam", learning_rate=1e-2,
                        schedule="cosine", progress=False),
}


def _vectors(graphdef, params, rest, batches, prior, num_train: int, task: str):
    """(g_lik per batch (B, d), g_prior (d,)) over the prior-covered parameters."""
    fn = _grad_fns(graphdef, num_train, task)
    g_prior = fn["prior"](params, prior)
    g_lik = jnp.stack([fn["lik"](params, rest, b, prior) for b in batches])
    return g_lik, g_prior


@functools.lru_cache(maxsize=16)
def _grad_fns(graphdef, num_train: int, task: str):
    apply = make_apply(graphdef)
    nll = map_loss(num_train, task=task)     # prior None, no head decay: the likelihood only

    @jax.jit
    def lik(params, rest, batch, prior):
        grads = jax.grad(lambda p: nll(apply, p, rest, batch, None, None)[0])(params)
        return prior.spec.ravel(grads)

    @jax.jit
    def prior_grad(params, prior):
        grads = jax.grad(lambda p: prior_penalty(prior, p, num_train))(params)
        return prior.spec.ravel(grads)

    return {"lik": lik, "prior": prior_grad}


def adam_preconditioner(opt_state, spec, *, eps: float = 1e-8) -> jax.Array | None:
    """1/(√ν̂ + ε) over ``spec``'s parameters from the Adam state inside ``opt_state``
    (ν̂ the bias-corrected second moment, optax's default b2 = 0.999), or None when
    ``opt_state`` holds no Adam state or Adam has not stepped yet."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    if not found or int(found[0].count) == 0:
        return None
    state = found[0]
    nu_hat = spec.ravel(state.nu) / (1.0 - 0.999 ** int(state.count))
    return 1.0 / (jnp.sqrt(nu_hat) + eps)


def _cos_ratio(a, b) -> tuple[float, float, float, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else math.nan
    return cos, (nb / na if na > 0 else math.inf), na, nb


def gradient_diagnostics(model_or_result, batches, prior, num_train: int, *, params=None,
                         opt_state=None, task: str = "classification") -> dict:
    """Cosine and norm ratio of the likelihood and prior gradients (module docstring).

    Args:
      model_or_result: an ``nnx.Module`` or a ``TrainResult`` (its params, BatchNorm
        state and, unless ``opt_state`` is given, optimizer state are used).
      batches: one batch dict (``{"image", "label"}``, as ``bayes_transfer.data.batches``
        yields) or a list of them; the likelihood gradient is the mean over them.
      prior: the prior *at the λ used* (``prior.for_method(m).rescale(λ)``); covered
        parameters define the vectors compared.
      num_train: N of the prior term −log p(θ)/N.
      params: overrides the model's parameters.
      opt_state: an optimizer state holding an Adam state, for ``adam_cosine`` and
        ``adam_ratio``.

    Returns ``{"cosine", "ratio", "lik_norm", "prior_norm"}`` from the mean likelihood
    gradient, ``"batch_cosine"``/``"batch_ratio"`` (means over the batches of the
    per-batch values: what one step sees) and, with Adam, ``"adam_cosine"``,
    ``"adam_ratio"``.
    """
    if prior is None or prior.kind == "flat":
        raise BayesTransferError("gradient diagnostics need a proper prior (not flat)")
    if isinstance(model_or_result, TrainResult):
        graphdef, state = model_or_result.graphdef, model_or_result.state
        p, rest = state.params, state.rest
        opt_state = state.opt_state if opt_state is None else opt_state
    else:
        graphdef, p, rest = split_model(model_or_result)
    p = p if params is None else params
    batches = [batches] if isinstance(batches, dict) else list(batches)
    g_lik_all, g_prior = _vectors(graphdef, p, rest, batches, prior, num_train, task)
    g_lik = jnp.mean(g_lik_all, 0)
    cos, ratio, ln, pn = _cos_ratio(g_lik, g_prior)
    per_batch = [_cos_ratio(g, g_prior) for g in g_lik_all]
    out = {"cosine": cos, "ratio": ratio, "lik_norm": ln, "prior_norm": pn,
           "batch_cosine": float(np.mean([c[0] for c in per_batch])),
           "batch_ratio": float(np.mean([c[1] for c in per_batch]))}
    precond = None if opt_state is None else adam_preconditioner(opt_state, prior.spec)
    if precond is not None:
        cos_a, ratio_a, _, _ = _cos_ratio(g_lik * precond, g_prior * precond)
        out.update(adam_cosine=cos_a, adam_ratio=ratio_a)
    return out


@dataclasses.dataclass
class GradientTrace:
    """Diagnostics of one fine-tuning run: one record per logged epoch (epoch 0 is the
    start), each with the training loss parts of that epoch's last step, the gradient
    numbers of :func:`gradient_diagnostics` and, if asked, validation metrics."""

    optimizer: str
    config: TrainConfig
    records: list[dict]
    result: TrainResult

    def series(self, key: str) -> np.ndarray:
        """One logged number along training (NaN where a record lacks it)."""
        return np.array([r.get(key, math.nan) for r in self.records], np.float64)


def trace_gradients(model: nnx.Module, splits, prior, *, method: str = "lowrank",
                    scale: float | None = None, variance: float | None = None,
                    optimizers: dict[str, TrainConfig] | None = None,
                    head_decay: float = 1e-4, every: int = 1, num_batches: int = 4,
                    diag_batch_size: int = 32, validate: bool = True) -> dict[str, GradientTrace]:
    """Fine-tune from the prior mean under ``prior.for_method(method)`` at one λ with each
    optimizer, logging :func:`gradient_diagnostics` along training.

    λ is ``scale``, or ``variance / mean(diag Σ₀)`` for an effective variance (as in
    ``bayes_transfer.inference.map.scale_grid``). ``optimizers`` maps a name to a
    :class:`TrainConfig` (default :data:`DEFAULT_OPTIMIZERS`). Every run starts from the
    same point (``model``'s head and BatchNorm state, the backbone at the prior mean)
    and runs through :func:`bayes_transfer.train.fit`; the diagnostics are computed in
    its ``eval_fn`` at the end of every ``every``-th epoch, on the first
    ``num_batches`` batches (size ``diag_batch_size``) of a fixed order of
    ``splits.train``. ``validate`` adds validation ``val_nll`` and ``val_error``.
    """

    if (scale is None) == (variance is None):
        raise BayesTransferError("give exactly one of scale (λ) or variance (λ·mean diag Σ₀)")
    method_prior = prior.for_method(method)
    if method_prior.kind == "flat":
        raise BayesTransferError(f"method {method!r} has no prior term to diagnose")
    lam = scale if scale is not None else variance / float(jnp.mean(method_prior.base_variance()))
    aux = method_prior.rescale(float(lam))
    train = splits.train
    num_train = len(train)
    _, params, _ = split_model(model)
    params = prior.init_params(params)
    loss = map_loss(num_train, head_decay=head_decay)
    diag_batches = []
    for epoch in range(num_batches):
        for b in btdata.batches(train, diag_batch_size, seed=12345, epoch=epoch):
            diag_batches.append(b)
            break
    optimizers = DEFAULT_OPTIMIZERS if optimizers is None else optimizers

    traces = {}
    for name, config in optimizers.items():
        records = []

        def log(result, epoch, extra):
            record = {"epoch": epoch, "step": int(result.state.step), **extra,
                      **gradient_diagnostics(result, diag_batches, aux, num_train)}
            if validate:
                val, _ = evaluate_classification(result, splits.val)
                record.update(val_nll=float(val["nll"]), val_error=float(val["error"]))
            records.append(record)
            return record

        graphdef, _, rest = split_model(model)
        start = TrainResult(graphdef, _start_state(params, rest), [])
        log(start, 0, {})

        def eval_fn(result):
            epoch = len(result.history) + 1
            if epoch % every:
                return {}
            record = log(result, epoch, {})
            return {k: record[k] for k in ("cosine", "ratio")}

        result = fit(model, train, loss, dataclasses.replace(config, desc=f"trace {name}"),
                     aux=aux, params=params, eval_fn=eval_fn)
        for record in records[1:]:   # the training loss parts of each logged epoch
            match = [h for h in result.history if h["epoch"] == record["epoch"]]
            if match:
                record.update({k: match[0][k] for k in ("loss", "nll", "prior") if k in match[0]})
        traces[name] = GradientTrace(name, config, records, result)
    return traces


def _start_state(params, rest):

    return TrainState(jnp.zeros((), jnp.int32), params, rest, None)
