"""Evidence-based prior strength: λ learned with θ in one training run, on all n labels.

``finetune(..., scale="evidence")`` trains once under the prior and, at a few evenly
spaced steps, replaces λ by the maximiser of the Laplace approximation to the marginal
likelihood log p(D | λ) at the current weights (:mod:`bayes_transfer.prior.evidence`):

    E(λ) = −½·(θ − θ̄)ᵀΣ_λ⁻¹(θ − θ̄) − ½·log|I + Σ_λ·H|,   Σ_λ = λ·Σ₀ + ε·I,

with H the diagonal of the generalized Gauss-Newton matrix of the negative
log-likelihood summed over the n training examples (:func:`ggn_diagonal`). This is
MacKay's (1992) evidence framework run online, as Immer et al. (2021, "Scalable
marginal likelihood estimation for model selection in deep learning") and
laplace-torch tune a prior precision: alternate MAP steps on θ with evidence steps on
λ. Why this objective and not the data-emphasized ELBO (Harvey, Petrov & Hughes 2024):

* it is the marginal likelihood itself (exact for a linear model with a Gaussian
  likelihood), so its optimum can be checked against a closed form
  (``tests/test_evidence.py``); the DE-ELBO deliberately optimises something else (a
  likelihood up-weighted by d/n), whose optimum has no such reference;
* it needs no variational parameters (a second d-vector of standard deviations) and
  no Monte-Carlo weight samples in the step: the training step is the MAP step of
  every other method, and λ only changes the prior passed to the loop;
* λ is a 1-D maximisation at fixed θ that reaches either end: when the prior's mean
  is far from where the data want the weights, the fit term wins for every finite λ
  and the run switches to the no-prior limit (λ = ∞, recorded as such).

Its known weakness: the Laplace evidence of a network is only as good as its curvature
approximation (here diagonal, ignoring correlations of the likelihood's Hessian), and
it holds the head and BatchNorm statistics fixed. ``tests/test_evidence.py`` checks it
where it is exact; ``RESULTS.md`` reports where it helps and where it does not.

Cost: one training run plus ``updates`` curvature passes over the n training examples
(C backward passes per example for C classes, or ``samples`` with Monte-Carlo labels)
and one pass over D̂ per Newton step. Nothing d×d is formed, at any prior kind.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer import data as btdata
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.params import HEAD_RULE, ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.prior.evidence import maximise_log_evidence
from bayes_transfer.training import TrainResult, fit, make_apply


@dataclasses.dataclass(frozen=True)
class EvidenceConfig:
    """How ``scale="evidence"`` learns λ (effective variances v = λ·mean diag Σ₀)."""

    updates: int = 8              # λ updates, after steps T·j/(updates + 1), j = 1..updates
    init_variance: float = 1.0    # v the run starts from (before the first update)
    min_variance: float = 1e-8    # the search's range of v; an optimum beyond
    max_variance: float = 1e6     # max_variance is the no-prior limit (λ = ∞)
    curvature: str = "auto"       # the GGN as "factor" (H = GᵀG, G of n·R rows) or "diag"
                                  # (its diagonal). "auto": the exact factor (R = C) while
    max_rows: int = 1024          # n·C <= max_rows, else R = max_rows // n sampled labels,
    max_factor: int = 1 << 28     # and the diagonal when n > max_rows or n·R·d would
                                  # exceed max_factor numbers (1 GiB in float32)
    samples: int = 0              # R: 0 all C classes (exact); S > 0: S sampled labels
                                  # per example (Monte-Carlo Fisher = GGN for softmax)
    batch_size: int = 16          # examples per curvature batch (memory: batch·R·d)
    seed: int = 0                 # for the Monte-Carlo labels


def ggn_curvature(result: TrainResult, dataset, spec, *, form: str = "factor",
                  samples: int = 0, batch_size: int = 16, seed: int = 0,
                  dtype=jnp.float32, head_spec=None):
    """The generalized Gauss-Newton matrix H = Σₙ Jₙᵀ(diag pₙ − pₙpₙᵀ)Jₙ of the summed
    softmax cross-entropy over ``dataset``, on the parameters ``spec`` covers, with the
    model in evaluation mode (BatchNorm running statistics). For softmax it is also the
    Fisher: H = Σₙ Σ_c p_nc·gₙ_c gₙ_cᵀ, g_nc = ∂ log p_nc/∂θ.

    ``form="factor"``: a (n·R, d) matrix G with H = GᵀG exactly, rows √p_nc·g_nc (R = C
    classes); ``"diag"``: its (d,) diagonal. ``samples=S > 0`` uses S labels drawn from
    the model's predictive per example instead of all classes (R = S, unbiased).
    ``head_spec`` (factor form): also return the rows of those parameters, as a pair
    ``(G, G_head)``.
    """
    if form not in ("factor", "diag"):
        raise BayesTransferError(f"form must be 'factor' or 'diag', got {form!r}")
    fn = _ggn_batch_fn(result.graphdef, spec, int(samples), form, jnp.dtype(dtype).name,
                       head_spec if form == "factor" else None)
    parts = []
    key = jax.random.PRNGKey(seed)
    size = min(batch_size, len(dataset))
    for i, batch in enumerate(btdata.batches(dataset, size, seed=0, epoch=0, shuffle=False,
                                             drop_remainder=False)):
        x = batch["image"]
        weight = np.ones(size, np.float32)
        pad = size - len(x)
        if pad:      # a fixed shape: one compilation
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            weight[size - pad:] = 0
        out = fn(result.state.params, result.state.rest, x, weight, jax.random.fold_in(key, i))
        if form == "factor":
            out = tuple(o[: size - pad].reshape(-1, o.shape[-1]) for o in out)
        parts.append(out)
    if form == "diag":
        return sum(parts[1:], parts[0])
    rows = tuple(jnp.concatenate(p) for p in zip(*parts))
    return rows if head_spec is not None else rows[0]


@functools.lru_cache(maxsize=16)
def _ggn_batch_fn(graphdef, spec, samples: int, form: str, dtype: str, head_spec):
    apply = make_apply(graphdef)

    @jax.jit
    def run(params, rest, x, weight, key):
        def one(xi, wi, ki):
            logits, vjp = jax.vjp(lambda p: apply(p, rest, xi[None], train=False)[0][0],
                                  params)
            prob = jax.nn.softmax(logits.astype(jnp.float32))
            classes = prob.shape[0]
            if samples:     # (e_y − p)/√S for S labels y ~ p
                labels = jax.random.categorical(ki, jnp.log(prob + 1e-30), shape=(samples,))
                rows = (jax.nn.one_hot(labels, classes) - prob) / math.sqrt(samples)
            else:           # √p_c·(e_c − p): BBᵀ = diag(p) − ppᵀ, the softmax Hessian
                rows = jnp.sqrt(prob)[:, None] * (jnp.eye(classes) - prob[None, :])
            rows = rows * jnp.sqrt(wi)
            grad = lambda row: spec.ravel(vjp(row.astype(logits.dtype))[0], dtype=dtype)  # noqa: E731
            if form == "factor":                                  # (R, d) [, (R, d_head)]
                both = lambda row: tuple(  # noqa: E731
                    s.ravel(g, dtype=dtype) for g in [vjp(row.astype(logits.dtype))[0]]
                    for s in (spec, head_spec) if s is not None)
                return jax.vmap(both)(rows)
            acc, _ = jax.lax.scan(lambda a, row: (a + jnp.square(grad(row)), None),
                                  jnp.zeros((spec.size,), dtype), rows)
            return acc

        keys = jax.random.split(key, x.shape[0])
        out = jax.vmap(one)(x, weight, keys)
        return out if form == "factor" else jnp.sum(out, axis=0)

    return run


def fit_with_evidence(model, dataset, loss_fn: Callable, train, prior: Prior, *,
                      config: EvidenceConfig = EvidenceConfig(), params=None, optimizer=None,
                      curvature: Callable[[TrainResult], jax.Array] | None = None,
                      extra_curvature: float = 0.0, head_precision: float = 0.0):
    """One run of ``fit`` whose prior's λ is re-learned by the evidence at
    ``config.updates`` evenly spaced steps. Returns ``(result, scale, trace)``: the
    TrainResult, the λ of the run's last stretch (``inf``: the no-prior limit) and the
    trace (one dict per update, and a last one at the end that is not applied).

    ``curvature(result) -> h`` replaces the classification GGN (another likelihood):
    a (d,) diagonal or a (M, d) factor. ``extra_curvature`` is added to every hᵢ (other
    quadratic terms on the covered weights, e.g. N·l2 for a plain L2; diagonal
    curvature only). ``head_precision`` > 0 (N·head_decay for ``map_loss``): the head
    (``HEAD_RULE``) is integrated out under its Gaussian prior of that precision, so the
    evidence is that of the whole model (factor curvature; 0: the head is held fixed).
    """
    if prior.kind == "flat":
        raise BayesTransferError("a flat prior has no λ to learn")
    if config.updates < 1:
        raise BayesTransferError(f"evidence updates must be >= 1, got {config.updates}")
    if not 0 < config.min_variance < config.max_variance:
        raise BayesTransferError("need 0 < min_variance < max_variance")
    base = float(jnp.mean(prior.base_variance()))
    lower, upper = config.min_variance / base, config.max_variance / base
    dtype = jnp.promote_types(prior.var.dtype, jnp.float32)
    total = train.total_steps(btdata.num_batches(dataset, train.batch_size))
    update_at = sorted({round(total * j / (config.updates + 1))
                        for j in range(1, config.updates + 1)} - {0, total})
    if curvature is None:
        form, samples = _curvature_form(config, len(dataset), dataset.num_classes,
                                        prior.dim, extra_curvature)
        head = (_head_spec(params) if head_precision > 0 and form == "factor"
                and params is not None else None)

        def curvature(res):
            out = ggn_curvature(res, dataset, prior.spec, form=form, samples=samples,
                                batch_size=config.batch_size, seed=config.seed, dtype=dtype,
                                head_spec=head)
            if not isinstance(out, tuple):
                return out, None
            return out[0], out[1] @ out[1].T / head_precision
    elif extra_curvature:
        raise BayesTransferError("extra_curvature needs the built-in (diagonal) curvature")
    state = {"scale": config.init_variance / base}
    trace: list[dict] = []

    def evidence_step(step: int, result: TrainResult) -> dict:
        t0 = time.perf_counter()
        theta = prior.spec.ravel(result.state.params, dtype=dtype)
        h = curvature(result)
        h, others = h if isinstance(h, tuple) else (h, None)
        h = h + extra_curvature if extra_curvature else h
        current = state["scale"]
        out = maximise_log_evidence(prior, theta, h, lower=lower, upper=upper, others=others,
                                    start=None if math.isinf(current) else current)
        scale = math.inf if out.limit == "upper" else out.scale
        return {"step": step, "scale": scale, "variance": scale * base,
                "log_evidence": out.log_evidence, "quad": out.quad,
                "effective_params": out.effective_params, "limit": out.limit,
                "iterations": out.iterations, "seconds": time.perf_counter() - t0}

    def on_step(step, result, aux):
        if step not in update_at:
            return aux
        entry = evidence_step(step, result)
        trace.append({**entry, "applied": True})
        if entry["scale"] == state["scale"]:
            return aux
        state["scale"] = entry["scale"]
        return prior.rescale(entry["scale"])

    start = prior.rescale(state["scale"])
    result = fit(model, dataset, loss_fn, train, aux=start, params=params,
                 optimizer=optimizer, on_step=on_step)
    # Where the alternation ended: the optimum at the final weights (not applied; close
    # to the last applied λ when the alternation has converged).
    trace.append({**evidence_step(total, result), "applied": False})
    return result, state["scale"], trace


def _curvature_form(config: EvidenceConfig, n: int, classes: int, dim: int,
                    extra: float) -> tuple[str, int]:
    """(form, sampled labels per example) of the curvature ``config`` asks for."""
    if config.curvature not in ("auto", "factor", "diag"):
        raise BayesTransferError(f"evidence curvature must be 'auto', 'factor' or 'diag', "
                                 f"got {config.curvature!r}")
    if extra and config.curvature == "factor":
        raise BayesTransferError("a plain L2 (l2 > 0) adds a diagonal to the curvature: "
                                 "use curvature='diag' or 'auto'")
    if config.curvature != "auto" or config.samples:
        return ("diag" if extra else config.curvature if config.curvature != "auto"
                else "factor"), config.samples
    samples = 0 if n * classes <= config.max_rows else config.max_rows // n
    rows = n * (samples or classes)
    if extra or n > config.max_rows or rows * dim > config.max_factor:
        return "diag", 0
    return "factor", samples


def _head_spec(params):
    """The head's leaves (``HEAD_RULE``), or None for a model without one."""
    try:
        return ParamSpec.from_params(params, HEAD_RULE)
    except BayesTransferError:
        return None
