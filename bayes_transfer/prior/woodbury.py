"""The Woodbury kernels behind ``Prior.log_prob``: no d×d matrix, O(K·d) memory traffic.

With Σ = diag(δ) + WᵀW, δ = λ·diag(Σ₀) + ε and W = √(λ/(2(K−1)))·D̂, the Woodbury
identity and the matrix determinant lemma give

    rᵀΣ⁻¹r = rᵀδ⁻¹r − ‖L⁻¹ W δ⁻¹ r‖²,   log|Σ| = Σᵢ log δᵢ + 2·Σₖ log Lₖₖ

where L is the Cholesky factor of the K×K capacitance ``I + W δ⁻¹ Wᵀ``
(:func:`capacitance_cholesky`, one pass over D̂). :func:`woodbury_quad` reads D̂ once and
its hand-written JVP rule once more; at large d no d-vector besides θ and the gradient
(``experiments/bench_prior.py`` measures the time, ``experiments/bench_memory.py`` the
memory).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


_GRAM_BLOCK = 1 << 15   # columns of D̂ per step of the capacitance's one pass


def _gram_pass(dev, vec, weight, dtype):
    """D̂·diag(weight(vec))·D̂ᵀ in ``dtype``, in one pass over D̂ in blocks of columns: the
    temporaries are (K, block), not (K, d), D̂ is read once rather than K times, and the
    weights are formed block by block from the d-vector ``vec``."""
    rank, d = dev.shape
    block = min(d, _GRAM_BLOCK)
    n_full = d // block

    def gram(cols, v):
        cols = cols.astype(dtype)
        return (cols * weight(v)) @ cols.T

    def body(i, acc):
        start = i * block
        return acc + gram(jax.lax.dynamic_slice_in_dim(dev, start, block, axis=1),
                          jax.lax.dynamic_slice_in_dim(vec, start, block))

    total = jax.lax.fori_loop(0, n_full, body, jnp.zeros((rank, rank), dtype))
    if n_full * block < d:
        total = total + gram(dev[:, n_full * block:], vec[n_full * block:])
    return total


@jax.jit
def capacitance_cholesky(dev, var, scale, floor, coef):
    """Cholesky factor of I + coef·D̂ δ⁻¹ D̂ᵀ, δ = λ·var/2 + ε (var of shape (d,) or ()).

    One blocked pass over D̂ (:func:`_gram_pass`); δ⁻¹ is formed block by block too
    (eagerly it was two d-vectors at load time). Jitted: eager rescales compile once
    per shape.
    """
    dtype = scale.dtype
    var = jnp.broadcast_to(var, (dev.shape[1],))
    # 1/δ, as Prior._diag rounds it
    total = _gram_pass(dev, var, lambda v: 1.0 / (scale * (0.5 * v.astype(dtype)) + floor),
                       dtype)
    return jnp.linalg.cholesky(jnp.eye(dev.shape[0], dtype=dtype) + coef * total)


@jax.jit
def weighted_gram(dev, weights):
    """D̂·diag(w)·D̂ᵀ (K×K, in ``weights``' dtype), one blocked pass over D̂."""
    return _gram_pass(dev, weights, lambda w: w, weights.dtype)


@jax.jit
def inverse_diagonal_lowrank(dev, delta, chol, coef):
    """diag of (diag(δ) + coef·D̂ᵀD̂)⁻¹ = 1/δ − coef·‖L⁻¹D̂ᵢ‖²/δᵢ² (L Lᵀ = I + coef·D̂δ⁻¹D̂ᵀ),
    block by block of D̂'s columns: temporaries (K, block), never (K, d)."""
    rank, d = dev.shape
    block = min(d, _GRAM_BLOCK)

    def part(cols, dl):
        z = jax.scipy.linalg.solve_triangular(chol, cols.astype(delta.dtype), lower=True)
        return 1.0 / dl - coef * jnp.sum(z * z, 0) / dl ** 2

    n_full = d // block

    def body(i, out):
        start = i * block
        return jax.lax.dynamic_update_slice_in_dim(
            out, part(jax.lax.dynamic_slice_in_dim(dev, start, block, axis=1),
                      jax.lax.dynamic_slice_in_dim(delta, start, block)), start, 0)

    out = jax.lax.fori_loop(0, n_full, body, jnp.zeros((d,), delta.dtype))
    if n_full * block < d:
        out = out.at[n_full * block:].set(part(dev[:, n_full * block:],
                                               delta[n_full * block:]))
    return out


@jax.jit
def all_finite(x):
    # max|x| is NaN or Inf iff some entry is: one fused reduction, where
    # jnp.all(jnp.isfinite(x)) materialises a (K, d) boolean temporary on CPU.
    return jnp.isfinite(jnp.max(jnp.abs(x)))


@jax.jit
def all_positive(x):
    # one fused reduction, where jnp.all(x > 0) materialises a (d,) boolean temporary
    return jnp.min(x) > 0


# ---------------------------------------------------------------------- Woodbury term
#: Below this d, D̂·a is a BLAS matrix-vector product (the fastest on CPU; its operand is
#: one more d-vector). From it on, reductions over d (_rows_dot), after which the gradient
#: can take over a's memory: the value and gradient then need no d-vector besides θ and
#: the gradient.
_MATVEC_MAX_DIM = 1 << 22
#: Rows of a bfloat16 factor read through one widened view of it in a single elementwise
#: pass: XLA:CPU emits a fused producer at most ~15 times per fusion, else materialises it.
_ROWS_PER_VIEW = 12
#: Rows of a float32 D̂ per variadic reduction in the forward product from _MATVEC_MAX_DIM
#: on (measured fastest on CPU among 1, 5, 10 and 20 rows at d = 23.5M; see _rows_dot).
_ROWS_PER_REDUCE = 10


def _widen(x, dtype, signed=False):
    """``x`` as ``dtype`` inside an elementwise pass.

    A bfloat16 array is widened through its bits (a float32 with the same top 16 bits):
    XLA:CPU upcasts a bfloat16 array as a whole before any slice of it, and merges equal
    converts, so a convert that a reduction also reads would be materialised (a float32
    copy). ``signed`` gives a second, distinct view of the same bits.
    """
    if x.dtype != jnp.bfloat16:
        return x.astype(dtype)
    narrow, wide = (jnp.int16, jnp.int32) if signed else (jnp.uint16, jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, narrow).astype(wide) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def _factor_rows(dev, dtype):
    """D̂'s K rows as ``dtype`` vectors, to be summed in one elementwise pass."""
    if dev.dtype != jnp.bfloat16:
        return [dev[k].astype(dtype) for k in range(dev.shape[0])]
    # Two distinct views of the bits, _ROWS_PER_VIEW rows each; rows beyond (K > 24) come
    # from a plain upcast, which XLA:CPU materialises for the whole factor (correct, but a
    # float32 copy of it).
    views = [_widen(dev, dtype), _widen(dev, dtype, signed=True)]
    return [views[k // _ROWS_PER_VIEW][k] if k < len(views) * _ROWS_PER_VIEW
            else dev[k].astype(dtype) for k in range(dev.shape[0])]


def _rows_dot(dev, a):
    """D̂·a as variadic reductions over d, _ROWS_PER_REDUCE rows at a time.

    Each is one loop over d that reads a once for all its rows; ``jnp.sum(D̂ * a, 1)``
    reads a once per row (K times), and a BLAS product keeps a from being overwritten by
    the gradient (one more d-vector).
    """
    out = []
    for lo in range(0, dev.shape[0], _ROWS_PER_REDUCE):
        rows = tuple(dev[k] * a for k in range(lo, min(lo + _ROWS_PER_REDUCE, dev.shape[0])))
        out += jax.lax.reduce(rows, (jnp.zeros((), a.dtype),) * len(rows),
                              lambda xs, ys: tuple(x + y for x, y in zip(xs, ys)), (0,))
    return jnp.stack(out)


def _woodbury_forward(theta, mean, var, dev, scale, floor, chol):
    """quad = rᵀΣ⁻¹r and what its derivative reuses: a = δ⁻¹r, y = L⁻¹·√c·D̂a and √c."""
    dtype = theta.dtype
    delta = 0.5 * scale * _widen(var, dtype) + floor
    a = (theta - _widen(mean, dtype)) / delta
    sqrt_c = jnp.sqrt(scale / (2.0 * max(dev.shape[0] - 1, 1)))
    if dev.dtype != dtype:   # the convert of a low-precision D̂ fuses into the reduction
        b = jnp.sum(dev.astype(dtype) * a, axis=1)
    elif theta.shape[0] < _MATVEC_MAX_DIM:
        b = dev @ a
    else:
        b = _rows_dot(dev, a)
    y = jax.scipy.linalg.solve_triangular(chol, sqrt_c * b, lower=True)
    # rᵀδ⁻¹r = Σ a²δ, from a and var only: a reduction that shared the subexpressions of a
    # (r, δ) with it would make XLA materialise them.
    quad = (0.5 * scale * jnp.sum(a * (a * var.astype(dtype))) + floor * jnp.sum(a * a)
            - jnp.vdot(y, y))
    return quad, a, y, sqrt_c


@jax.custom_jvp
def woodbury_quad(theta, mean, var, dev, scale, floor, chol):
    """rᵀΣ⁻¹r, r = θ − mean, for Σ = diag(δ) + c·D̂ᵀD̂, δ = λ·var/2 + ε, c = λ/(2(K−1)).

    ``chol`` is the Cholesky factor of I + c·D̂δ⁻¹D̂ᵀ; all arrays in θ's dtype except
    mean, var and D̂ (any stored dtype). The JVP rule is written out so that the gradient
    Σ⁻¹r is one elementwise pass over D̂'s rows (autodiff materialises D̂ᵀz and r and, for
    a bfloat16 D̂, a float32 copy of it); it covers every argument, so λ, ε, the arrays and
    the factor stay differentiable.
    """
    return _woodbury_forward(theta, mean, var, dev, scale, floor, chol)[0]


@functools.partial(woodbury_quad.defjvp, symbolic_zeros=True)
def _woodbury_quad_jvp(primals, tangents):
    from jax.custom_derivatives import SymbolicZero

    theta, mean, var, dev, scale, floor, chol = primals
    quad, a, y, sqrt_c = _woodbury_forward(*primals)
    dtype = theta.dtype
    z = jax.scipy.linalg.solve_triangular(chol, y, lower=True, trans="T")
    zc = sqrt_c * z
    delta = 0.5 * scale * _widen(var, dtype) + floor
    # v = Σ⁻¹r = a − √c·δ⁻¹D̂ᵀz, ∂quad/∂θ = 2v: the sum over rows is one elementwise
    # pass (a dot would materialise D̂ᵀz), written as a − t/δ so v can reuse a's memory.
    v = a - sum(zc[k] * row for k, row in enumerate(_factor_rows(dev, dtype))) / delta
    d_theta, d_mean, d_var, d_dev, d_scale, d_floor, d_chol = (
        None if isinstance(t, SymbolicZero) else t for t in tangents)
    out = jnp.zeros((), dtype)
    if d_theta is not None:
        out = out + 2 * jnp.vdot(v, d_theta.astype(dtype))
    if d_mean is not None:
        out = out - 2 * jnp.sum(v * d_mean.astype(dtype))
    if d_var is not None or d_scale is not None or d_floor is not None:
        w = a * (a - 2 * v)                                   # ∂quad/∂δ
        if d_var is not None:
            out = out + 0.5 * scale * jnp.sum(w * d_var.astype(dtype))
        if d_floor is not None:
            out = out + jnp.sum(w) * d_floor.astype(dtype)
        if d_scale is not None:                               # δ and c are ∝ λ
            out = out + (0.5 * jnp.sum(w * var.astype(dtype)) - jnp.vdot(y, y) / scale
                         ) * d_scale.astype(dtype)
    if d_dev is not None:
        out = out - 2 * jnp.vdot(zc, d_dev.astype(dtype) @ a)
    if d_chol is not None:                  # the solves read only the lower triangle
        out = out + 2 * jnp.vdot(z, jnp.tril(d_chol.astype(dtype)) @ y)
    return quad, out


def on_host(x):
    """``x`` as a zero-copy NumPy array if it is concrete and on one CPU device, else None."""
    if isinstance(x, np.ndarray):
        return x
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return None
    devices = x.sharding.device_set
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    return np.asarray(x)


def capacitance_cholesky_host(dev, var, scale, floor, coef, dtype):
    """:func:`capacitance_cholesky` on the host, for a low-precision D̂ on the CPU.

    XLA:CPU upcasts a bfloat16 array as a whole before slicing it (a float32 copy of D̂,
    twice its size); NumPy upcasts one block of columns at a time. ``einsum`` rather than
    ``@``: a multithreaded BLAS competes with XLA's spinning threads (1000× slower here).
    """
    rank, d = dev.shape
    dtype = np.dtype(dtype)
    block = 1 << 16
    gram = np.zeros((rank, rank), np.float64)
    for start in range(0, d, block):
        cols = dev[:, start:start + block].astype(dtype)
        v = var if var.ndim == 0 else var[start:start + block]
        inv = 1 / (dtype.type(0.5 * scale) * v.astype(dtype) + dtype.type(floor))
        gram += np.einsum("ki,li->kl", cols * inv, cols)
    return np.linalg.cholesky(np.eye(rank) + coef * gram).astype(dtype)
