"""Prior strength by the data-emphasized ELBO: λ learned with θ in one run, no validation.

``finetune(..., scale="de-elbo")`` fits a Gaussian q(θ) = N(m, σ²I) over the weights the
prior covers (the head stays a point estimate with its weight decay, as in every other
method) by maximising

    κ·E_q[log p(y | θ)]  −  KL(q ‖ N(θ̄, λ·Σ₀))

over m, σ and λ together. κ = 1 is the ELBO; Harvey, Petrov & Hughes ("Learning
hyperparameters via a data-emphasized variational objective", AISTATS 2026,
arXiv:2502.01861) show that with d ≫ n and an isotropic q the ELBO prefers q ≈ prior and
underfits, and recommend κ = d/n, which up-weights the data but not the prior. That is
the default here.

The KL is Gaussian, so λ has a closed form at every step. With t = tr(Σ₀⁻¹) and
r(m) = (m − θ̄)ᵀΣ₀⁻¹(m − θ̄),

    KL = ½·[(σ²t + r)/λ − d + d·log λ + log|Σ₀| − d·log σ²],   λ* = (σ²t + r)/d,

and at λ* the KL is ½·d·(log λ* − log σ²) + ½·log|Σ₀|. The loss is the KL at λ* (its
gradient in m and σ is that of the KL at any fixed λ equal to λ*, since ∂KL/∂λ = 0
there), so no λ is ever searched: one run, λ* read off the last step. Per example, with
κ = d/n, the loss is

    mean NLL at θ = m + σ·ε  +  ½·log(σ²t + r(m)) − ½·log σ²      (+ constants)

t is computed once (O(K²d) for the low-rank prior, by Woodbury); r is the prior's own
quadratic form; nothing d×d is formed. Predictions use the mean m, like the MAP
methods, so the two are compared on the same footing.

Compared with the Laplace evidence (:mod:`bayes_transfer.inference.evidence`), which
RESULTS.md found to learn too strong a prior at a few examples per class, this needs
no curvature pass, but one weight sample per step and a second learning rate, that of
log σ. ε, the prior's floor, is left out of Σ₀ (λ·Σ₀ is the covariance whose scale is
learned).

``ElboConfig(per_block=True)`` gives each backbone block b (``params.backbone_blocks``)
its own scale λ·ρ_b: the covariance is λ·R^½Σ₀R^½, R = diag(ρ_b on block b). With
t_b = Σ_{i∈b} (Σ₀⁻¹)ᵢᵢ and u = R^−½(m − θ̄), the KL is
½·[(σ²Σ_b t_b/ρ_b + uᵀΣ₀⁻¹u)/λ − d + d·log λ + Σ_b d_b·log ρ_b + log|Σ₀| − d·log σ²]:
λ* is still closed-form, and log ρ is learned by gradient with log σ (the KL is
invariant to a common factor of the ρ_b, which λ* absorbs). For a block-diagonal Σ₀
(diagonal, isotropic) the optimum is λ*ρ_b = (σ²t_b + r_b)/d_b, block by block.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayes_transfer.data import num_batches
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.params import backbone_blocks, map_with_paths
from bayes_transfer.prior import Prior
from bayes_transfer.training import TrainResult, fit
from bayes_transfer.training.objectives import head_sq_norm
from bayes_transfer.training.optim import make_optimizer
from bayes_transfer.training.predict import split_model


@dataclasses.dataclass(frozen=True)
class ElboConfig:
    """How ``scale="de-elbo"`` learns λ."""

    kappa: float | None = None    # weight of the log-likelihood; None: d/n (data-emphasized),
                                  # 1.0: the ELBO itself
    init_std: float = 1e-3        # σ of q at the start (the weights' noise scale)
    std_learning_rate: float = 0.05   # Adam's step on log σ (and log ρ): at most this
                                      # many nats a step
    per_block: bool = False       # a scale per backbone block (λ·ρ_b), not one λ


def profile_kl(quad, trace, std, dim: int):
    """(min over λ of KL(N(m, σ²I) ‖ N(θ̄, λΣ₀)) less its constant ½·log|Σ₀|, λ*)."""
    var = jnp.square(std)
    lam = (var * trace + quad) / dim
    return 0.5 * dim * (jnp.log(lam) - jnp.log(var)), lam


def block_profile_kl(quad_u, block_traces, block_sizes, log_rel, std, dim: int):
    """(min over λ of KL(N(m, σ²I) ‖ N(θ̄, λ·R^½Σ₀R^½)) less ½·log|Σ₀|, λ*), R = diag(ρ_b
    = exp(log_rel) on block b); ``quad_u`` = uᵀΣ₀⁻¹u with u = R^−½(m − θ̄)."""
    var = jnp.square(std)
    lam = (var * jnp.sum(block_traces * jnp.exp(-log_rel)) + quad_u) / dim
    kl = 0.5 * (dim * jnp.log(lam) + jnp.sum(block_sizes * log_rel) - dim * jnp.log(var))
    return kl, lam


def softmax_nll(logits, batch) -> jax.Array:
    """The mean cross-entropy of a classification batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


@functools.lru_cache(maxsize=32)
def elbo_loss(num_train: int, kappa: float, *, head_decay: float = 0.0,
              nll_fn: Callable = softmax_nll):
    """The loss of ``fit`` for the DE-ELBO: params are ``{"mean": θ, "log_std": log σ}``
    and ``aux`` is ``(Σ₀'s prior: λ = 1, no floor, tr Σ₀⁻¹)``; per block, params add
    ``"log_rel": log ρ`` and aux is ``(prior, (t_b, d_b, the block of each weight))``.
    ``nll_fn(outputs, batch)`` is the mean negative log-likelihood of a batch. Metrics:
    ``nll`` at the sampled weights, ``prior`` (the KL at λ* per κ·n), ``scale`` (λ*) and
    ``std`` (σ)."""

    def loss_fn(apply, params, rest, batch, key, aux):
        prior, trace = aux
        mean, std = params["mean"], jnp.exp(params["log_std"])
        covered = {p: i for i, p in enumerate(prior.spec.paths)}
        noise_key = jax.random.fold_in(key, 2)    # 1 is the augmentation's

        def perturb(path, x):
            if path not in covered:
                return x
            eps = jax.random.normal(jax.random.fold_in(noise_key, covered[path]), x.shape)
            return x + (std * eps).astype(x.dtype)

        weights = map_with_paths(perturb, mean)
        logits, new_rest = apply(weights, rest, batch["image"], train=True)
        nll = nll_fn(logits, batch)
        kl, lam = _profiled_kl(prior, trace, params)
        penalty = kl / (kappa * num_train)
        loss = nll + penalty + 0.5 * head_decay * head_sq_norm(mean)
        return loss, (new_rest, {"nll": nll, "prior": penalty, "scale": lam, "std": std})

    return loss_fn


def fit_with_elbo(model, dataset, train, prior: Prior, *, config: ElboConfig = ElboConfig(),
                  params=None, head_decay: float = 0.0, nll_fn: Callable = softmax_nll):
    """One run of ``fit`` on the DE-ELBO. Returns ``(result, scale, trace)``: the
    TrainResult whose parameters are q's mean m, λ* at the end, and the trace (λ*, σ
    and the NLL at each epoch's end, then λ* and σ at the end)."""
    if prior.kind == "flat":
        raise BayesTransferError("a flat prior has no λ to learn")
    if not config.init_std > 0 or not config.std_learning_rate > 0:
        raise BayesTransferError("de-elbo: init_std and std_learning_rate must be > 0")
    n, dim = len(dataset), prior.dim
    kappa = dim / n if config.kappa is None else float(config.kappa)
    if not kappa > 0:
        raise BayesTransferError(f"de-elbo: kappa must be > 0, got {config.kappa}")
    if params is None:
        _, params, _ = split_model(model)
    total = train.total_steps(num_batches(n, train.batch_size))
    # log σ gets its own learning rate (same schedule, Adam): one scalar whose useful
    # range spans decades.
    std_train = dataclasses.replace(train, learning_rate=config.std_learning_rate,
                                    optimizer="adam", weight_decay=0.0)
    start = {"mean": params, "log_std": jnp.log(jnp.asarray(config.init_std, jnp.float32))}
    base = prior.rescale(1.0, floor=0.0)
    if config.per_block:
        names, ids = _blocks(params, prior)
        block_traces = jax.ops.segment_sum(base.inverse_diagonal(), ids, len(names))
        block_sizes = jnp.asarray(np.bincount(np.asarray(ids), minlength=len(names)),
                                  block_traces.dtype)
        traces = (block_traces, block_sizes, ids)
        start["log_rel"] = jnp.zeros(len(names), jnp.float32)
    else:
        traces = base.inverse_trace()
    optimizer = _partition(make_optimizer(train, total), make_optimizer(std_train, total),
                           tuple(start))
    loss = elbo_loss(n, kappa, head_decay=head_decay, nll_fn=nll_fn)
    result = fit(model, dataset, loss, train, aux=(base, traces), params=start,
                 optimizer=optimizer)
    v0 = float(jnp.mean(prior.base_variance()))     # v = λ·mean diag Σ₀, as the grids
    trace = [{"step": h["step"], "scale": h["scale"], "variance": h["scale"] * v0,
              "std": h["std"], "nll": h["nll"]} for h in result.history]
    final = result.state.params                     # λ* at the end, from the final m, σ, ρ
    mean, std = final["mean"], jnp.exp(final["log_std"])
    _, scale = _profiled_kl(base, traces, final)
    if config.per_block:
        rel = np.exp(np.asarray(final["log_rel"], np.float64))
        end = {"block_scales": dict(zip(names, (float(scale) * rel).tolist())),
               "block_variances": dict(zip(names, (float(scale) * rel * v0).tolist()))}
    else:
        end = {}
    trace.append({"step": total, "scale": float(scale), "variance": float(scale) * v0,
                  "std": float(std), "kappa": kappa, **end})
    mean_only = TrainResult(result.graphdef,
                            result.state._replace(params=mean, opt_state=None),
                            result.history)
    return mean_only, float(scale), trace


def _profiled_kl(prior: Prior, traces, params):
    """(KL at λ*, λ*) of q = N(params["mean"], σ²I): one scale (``traces`` = tr Σ₀⁻¹) or,
    with ``params["log_rel"]``, one per block (``traces`` = (t_b, d_b, block ids))."""
    mean, std = params["mean"], jnp.exp(params["log_std"])
    if "log_rel" not in params:
        return profile_kl(prior.quadratic(mean), traces, std, prior.dim)
    block_traces, block_sizes, ids = traces
    u = (prior.spec.ravel(mean) - prior.mean) * jnp.exp(-0.5 * params["log_rel"])[ids]
    return block_profile_kl(prior.quadratic(prior.mean + u), block_traces, block_sizes,
                            params["log_rel"], std, prior.dim)


def _blocks(params, prior: Prior):
    """(block names, the block of each covered weight as a (d,) int32 array)."""
    blocks = [(name, set(paths)) for name, paths in backbone_blocks(params, prior.spec.rule)]
    names, of_leaf = [], []
    for path, shape in zip(prior.spec.paths, prior.spec.shapes):
        name = next((b for b, paths in blocks if path in paths), "other")
        if name not in names:
            names.append(name)
        of_leaf.append((names.index(name), math.prod(shape)))
    ids = np.concatenate([np.full(size, i, np.int32) for i, size in of_leaf])
    return names, jnp.asarray(ids)


@functools.lru_cache(maxsize=32)
def _partition(mean_tx, hyper_tx, keys: tuple):
    # cached: the same optimizers give the same object, so fit's compiled step is reused
    return optax.partition({"mean": mean_tx, "hyper": hyper_tx},
                           {k: "mean" if k == "mean" else "hyper" for k in keys})
