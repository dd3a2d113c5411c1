"""The Laplace evidence of a prior's scale λ, for every prior kind, without a d×d matrix.

For a posterior mode θ* and a (here diagonal) curvature H = diag(h) of the negative
log-likelihood at θ*, Laplace's method (MacKay 1992, "Bayesian interpolation"; the
generalized Gauss-Newton form of Immer et al. 2021, "Scalable marginal likelihood
estimation for model selection in deep learning") approximates the marginal
likelihood of the prior N(θ̄, Σ_λ), Σ_λ = λ·Σ₀ + ε·I, as

    log p(D | λ) ≈ log p(D | θ*) + E(λ),
    E(λ) = −½·rᵀΣ_λ⁻¹r − ½·log|I + Σ_λ H|,        r = θ* − θ̄

(−½log|Σ| from log p(θ*) and −½log|H + Σ⁻¹| from the Gaussian integral combine into
−½log|I + ΣH|). For a linear model with a Gaussian likelihood it is exact. Held at θ*,
E is what λ changes: the fit term rewards a broad prior when θ* is far from θ̄, the
Occam term −½log|I + ΣH| penalises prior mass the data did not need.

With Σ_λ = diag(δ) + c·D̂ᵀD̂ (δ = λ·b + ε, b = ½·var for kind ``lowrank``, else var;
c = λ/(2(K − 1))), Woodbury and the determinant lemma give

    rᵀΣ⁻¹r        = Σᵢ rᵢ²/δᵢ − c·uᵀ(I + c·G₁)⁻¹u,  u = D̂(r/δ),  G₁ = D̂ diag(1/δ) D̂ᵀ
    log|I + ΣH|   = Σᵢ log(1 + δᵢhᵢ) + log|I + c·G₂|,  G₂ = D̂ diag(h/(1 + δh)) D̂ᵀ

(the second from |A + UV| = |A|·|I + VA⁻¹U| with A = I + diag(δh), U = c·D̂ᵀ,
V = D̂H). One pass over D̂ in blocks of columns gives u, G₁ and G₂: O(K²·d) work,
temporaries of (K, block), never a (K, d) copy or a d×d matrix. λ is then found by a
safeguarded Newton search on dE/d log λ (forward-mode derivatives: no stored
residuals, so memory stays O(d)). With ε = 0, dE/d log λ = ½(rᵀΣ₀⁻¹r/λ − γ), γ the
effective number of parameters tr(ΣH(I + ΣH)⁻¹): the maximiser is MacKay's fixed
point λ = rᵀΣ₀⁻¹r / γ and E is concave in log λ.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from bayes_transfer.errors import PriorError
from bayes_transfer.prior.prior import Prior

_BLOCK = 1 << 15    # columns of D̂ per step of the one pass


@dataclasses.dataclass(frozen=True)
class EvidenceStep:
    """One maximisation of E over λ at a fixed θ* and curvature h."""

    scale: float               # the maximiser (the search's end if it lies beyond)
    log_evidence: float        # E at ``scale``
    quad: float                # rᵀΣ_λ⁻¹r at ``scale``
    effective_params: float    # d log|I + Σ_λH| / d log λ (γ when ε = 0)
    limit: str | None          # "upper" / "lower": the optimum is at or beyond that end
    iterations: int


def _terms(prior: Prior, r, curvature, log_scale):
    """(rᵀΣ⁻¹r, log|I + ΣH|) at λ = exp(log_scale), H = diag(h) or GᵀG (a factor's
    products from :func:`_factor_products`): one blocked pass over D̂."""
    dtype = r.dtype
    lam = jnp.exp(log_scale).astype(dtype)
    eps = prior.floor.astype(dtype)
    var = prior.var.astype(dtype)
    h = None if isinstance(curvature, tuple) else curvature
    if prior.kind != "lowrank":
        delta = lam * var + eps                      # (d,) or () for isotropic
        quad = jnp.sum(r * r / delta)
        logdet = (jnp.sum(jnp.log1p(delta * h)) if h is not None
                  else _factor_logdet(prior, curvature, lam, 0.0))
        return quad, logdet
    dev = prior.deviations
    rank, d = dev.shape
    c = lam / (2.0 * max(rank - 1, 1))
    block = min(d, _BLOCK)
    n_full = d // block

    def chunk(cols, v, rr, hh):
        cols = cols.astype(dtype)
        delta = lam * (0.5 * v) + eps
        inv = 1.0 / delta
        out = ((cols * inv) @ cols.T, cols @ (rr * inv), jnp.sum(rr * rr * inv))
        if hh is None:
            return out
        w = hh / (1.0 + delta * hh)
        return out + ((cols * w) @ cols.T, jnp.sum(jnp.log1p(delta * hh)))

    sl = lambda x, start, size: (  # noqa: E731
        None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, x.ndim - 1))

    def body(i, acc):
        part = chunk(*(sl(x, i * block, block) for x in (dev, var, r, h)))
        return jax.tree.map(jnp.add, acc, part)

    zero = jnp.zeros((), dtype)
    kk = jnp.zeros((rank, rank), dtype)
    acc = (kk, jnp.zeros((rank,), dtype), zero) + ((kk, zero) if h is not None else ())
    acc = jax.lax.fori_loop(0, n_full, body, acc)
    if n_full * block < d:
        s = n_full * block
        acc = jax.tree.map(jnp.add, acc, chunk(dev[:, s:], var[s:], r[s:],
                                               None if h is None else h[s:]))
    g1, u, s1 = acc[:3]
    eye = jnp.eye(rank, dtype=dtype)
    l1 = jnp.linalg.cholesky(eye + c * g1)
    y = jax.scipy.linalg.solve_triangular(l1, u, lower=True)
    quad = s1 - c * jnp.vdot(y, y)
    if h is None:
        return quad, _factor_logdet(prior, curvature, lam, c)
    g2, s2 = acc[3:]
    l2 = jnp.linalg.cholesky(eye + c * g2)
    return quad, s2 + 2.0 * jnp.sum(jnp.log(jnp.diagonal(l2)))


def _factor_logdet(prior: Prior, products, lam, c):
    """log|I_M + GΣ_λGᵀ| = log|I + λ·G diag(b) Gᵀ + ε·GGᵀ + c·(GD̂ᵀ)(GD̂ᵀ)ᵀ| (Sylvester)."""
    gbg, ggt = products[:2]
    m = gbg.shape[0]
    s = jnp.eye(m, dtype=gbg.dtype) + lam * gbg + prior.floor.astype(gbg.dtype) * ggt
    if len(products) == 3:
        s = s + c * products[2] @ products[2].T
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(s))))


@jax.jit
def _factor_products(prior: Prior, factor):
    """(G diag(b) Gᵀ, GGᵀ[, GD̂ᵀ]) for a (M, d) factor G
    (b = ½·var for kind lowrank, else var): one blocked pass over G and D̂."""
    dtype = factor.dtype
    m, d = factor.shape
    var = jnp.broadcast_to(prior.var.astype(dtype), (d,))
    b = 0.5 * var if prior.kind == "lowrank" else var
    dev = prior.deviations
    block = min(d, _BLOCK)
    n_full = d // block

    def chunk(g, bb, dd):
        out = ((g * bb) @ g.T, g @ g.T)
        return out if dd is None else out + (g @ dd.astype(dtype).T,)

    def body(i, acc):
        sl = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(  # noqa: E731
            x, i * block, block, x.ndim - 1)
        return jax.tree.map(jnp.add, acc, chunk(sl(factor), sl(b), sl(dev)))

    mm = jnp.zeros((m, m), dtype)
    acc = (mm, mm) + (() if dev is None else (jnp.zeros((m, dev.shape[0]), dtype),))
    acc = jax.lax.fori_loop(0, n_full, body, acc)
    if n_full * block < d:
        s = n_full * block
        acc = jax.tree.map(jnp.add, acc, chunk(factor[:, s:], b[s:],
                                               None if dev is None else dev[:, s:]))
    return acc


def _objective(prior, r, curvature, log_scale):
    quad, logdet = _terms(prior, r, curvature, log_scale)
    return -0.5 * (quad + logdet)


@jax.jit
def _value(prior, r, curvature, log_scale):
    """(E, quad, d logdet / d log λ) at log λ."""
    f = lambda t: _terms(prior, r, curvature, t)  # noqa: E731
    (quad, logdet), (_, dlogdet) = jax.jvp(f, (log_scale,), (jnp.ones_like(log_scale),))
    return -0.5 * (quad + logdet), quad, dlogdet


@jax.jit
def _slope_and_curvature(prior, r, curvature, log_scale):
    """(dE/dt, d²E/dt²) at t = log λ, by forward mode twice."""
    def slope(t):
        return jax.jvp(lambda s: _objective(prior, r, curvature, s), (t,),
                       (jnp.ones_like(t),))[1]
    return jax.jvp(slope, (log_scale,), (jnp.ones_like(log_scale),))


def _inputs(prior: Prior, theta, curvature, others=None):
    """(r, curvature as _terms takes it): h ≥ 0 for a (d,) diagonal, the products of a
    (M, d) factor G otherwise, whitened by I + ``others`` when given."""
    if prior.kind == "flat":
        raise PriorError("a flat prior has no scale to learn")
    dtype = jnp.promote_types(jnp.asarray(theta).dtype,
                               jnp.promote_types(prior.var.dtype, jnp.float32))
    theta = jnp.asarray(theta, dtype)
    curvature = jnp.asarray(curvature, dtype)
    d = prior.dim
    if theta.shape != (d,) or curvature.ndim not in (1, 2) or curvature.shape[-1] != d:
        raise PriorError(f"θ must be a ({d},) vector and the curvature a ({d},) diagonal "
                         f"or a (M, {d}) factor; got {theta.shape} and {curvature.shape}")
    r = theta - jnp.broadcast_to(prior.mean.astype(dtype), (d,))
    if curvature.ndim == 1:
        if others is not None:
            raise PriorError("the other parameters' term needs a factor curvature (M, d)")
        return r, jnp.maximum(curvature, 0)
    products = _factor_products(prior, curvature)
    if others is not None:
        products = _whiten(products, jnp.asarray(others, dtype))
    return r, tuple(products)


@jax.jit
def _whiten(products, others):
    """The products of L⁻¹G, with LLᵀ = I + ``others``: log|I + K + GΣGᵀ| =
    log|I + K| + log|I + (L⁻¹G)Σ(L⁻¹G)ᵀ|, and the first term is free of λ."""
    m = others.shape[0]
    chol = jnp.linalg.cholesky(jnp.eye(m, dtype=others.dtype) + others)
    solve = lambda x: jax.scipy.linalg.solve_triangular(chol, x, lower=True)  # noqa: E731
    out = [solve(solve(x).T).T for x in products[:2]]
    return tuple(out) + tuple(solve(x) for x in products[2:])


def log_evidence(prior: Prior, theta, curvature, scale, others=None) -> float:
    """E(λ) = −½rᵀΣ_λ⁻¹r − ½log|I + Σ_λH| at λ = ``scale`` (module docstring), with
    H = diag(``curvature``) for a (d,) vector or GᵀG for a (M, d) factor G.

    ``others`` (M, M): K = G_ψ P_ψ⁻¹ G_ψᵀ for parameters ψ outside the prior with a
    Gaussian prior of precision P_ψ (a classifier's head under weight decay) and G_ψ
    their rows of the same factor: the Laplace evidence of θ and ψ together is then,
    up to a term free of λ, E with log|I + GΣGᵀ| replaced by log|I + K + GΣGᵀ| − log|I + K|.
    Without it ψ is held at its value (the evidence conditional on ψ)."""
    r, curvature = _inputs(prior, theta, curvature, others)
    return float(_value(prior, r, curvature, jnp.log(jnp.asarray(scale, r.dtype)))[0])


def maximise_log_evidence(prior: Prior, theta, curvature, *, lower: float, upper: float,
                          others=None, start: float | None = None, tol: float = 1e-7,
                          max_iter: int = 100) -> EvidenceStep:
    """The λ in [``lower``, ``upper``] that maximises E at θ = ``theta`` (a (d,) vector)
    and curvature H of the negative log-likelihood summed over the training set (its
    Hessian or GGN): ``curvature`` is its (d,) diagonal, or a (M, d) factor G with
    H = GᵀG (exact for a GGN of M = n·C rows, :func:`log_evidence`); any prior kind
    but flat. The factor's products are formed once (O(M²·d)); each Newton step then
    costs one pass over D̂ and an M×M Cholesky factorisation. ``others``: see
    :func:`log_evidence`.

    A Newton search on dE/d log λ kept inside a bracket where the slope changes sign
    from + to − (so it ends at a local maximum); if the slope is still positive at
    ``upper`` the optimum is the no-prior side (``limit="upper"``), if negative at
    ``lower``, the other end. ``tol`` is on log λ.
    """
    if not 0 < lower < upper:
        raise PriorError(f"need 0 < lower < upper, got {lower}, {upper}")
    r, h = _inputs(prior, theta, curvature, others)

    def slope(t):
        g, gp = _slope_and_curvature(prior, r, h, jnp.asarray(t, r.dtype))
        return float(g), float(gp)

    lo, hi = math.log(lower), math.log(upper)
    g_lo, _ = slope(lo)
    g_hi, _ = slope(hi)
    iterations, limit = 2, None
    if g_hi >= 0:
        t, limit = hi, "upper"
    elif g_lo <= 0:
        t, limit = lo, "lower"
    else:
        t = min(max(math.log(start), lo), hi) if start else 0.5 * (lo + hi)
        if not lo < t < hi:
            t = 0.5 * (lo + hi)
        for _ in range(max_iter):
            g, gp = slope(t)
            iterations += 1
            if g > 0:
                lo = t
            else:
                hi = t
            step = -g / gp if gp < 0 else math.nan
            new = t + step
            if not (lo < new < hi):
                new = 0.5 * (lo + hi)
            done = abs(new - t) < tol or hi - lo < tol or g == 0
            t = new
            if done:
                break
    e, quad, gamma = _value(prior, r, h, jnp.asarray(t, r.dtype))
    return EvidenceStep(scale=math.exp(t), log_evidence=float(e), quad=float(quad),
                        effective_params=float(gamma), limit=limit, iterations=iterations)
