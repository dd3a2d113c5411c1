"""The Prior: a Gaussian over the covered parameters, learned from a SWAG posterior.

A prior fitted on a source task is

    p(θ) = N(θ̄, λ·Σ₀ + ε·I),   Σ₀ = ½·diag(var) + ½·D̂ᵀD̂ / (K − 1)      (kind "lowrank")

with θ̄ the SWAG mean, ``var`` the SWAG diagonal variance, D̂ ∈ R^{K×d} the last K
deviations, λ the scale (it multiplies the *whole* covariance) and ε a floor. The
baselines are the same type with a simpler Σ₀:

=============  ===============================  =========================================
kind           Σ₀                               used for
=============  ===============================  =========================================
``lowrank``    ½·diag(var) + ½·D̂ᵀD̂/(K−1)       learned low-rank SWAG prior
``diag``       diag(var)                        diagonal SWAG prior (SWAG-Diag)
``isotropic``  var·I (``var`` a scalar)         L2 (mean 0), L2-SP (mean θ̄), iso-SWAG
``flat``       none: log p(θ) = 0               standard fine-tuning, the λ → ∞ limit
=============  ===============================  =========================================

The log-density never forms a d×d matrix: with Σ = diag(δ) + WᵀW, δ = λ·diag(Σ₀) + ε
and W = √(λ/(2(K−1)))·D̂, the Woodbury identity and the matrix determinant lemma give

    rᵀΣ⁻¹r = rᵀδ⁻¹r − ‖L⁻¹ W δ⁻¹ r‖²,   log|Σ| = Σᵢ log δᵢ + 2·Σₖ log Lₖₖ

where L is the Cholesky factor of the K×K capacitance ``I + W δ⁻¹ Wᵀ``. L and log|Σ|
do not depend on θ: they are cached in the prior (recomputed only by
:meth:`Prior.rescale`, in one pass over D̂). One call reads D̂ once; its gradient (a
hand-written JVP rule, :mod:`bayes_transfer.prior.woodbury`) reads it once more: O(K·d) memory traffic,
no d×d or K×d temporaries, and at large d no d-vector besides θ and the gradient
(``experiments/bench_prior.py`` measures the time, ``experiments/bench_memory.py`` the
memory).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer.errors import PriorError
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior.sharding import SHARD_MIN_DIM, shard_prior
from bayes_transfer.prior.woodbury import (all_finite, all_positive, capacitance_cholesky,
                                           capacitance_cholesky_host, inverse_diagonal_lowrank,
                                           on_host, weighted_gram, woodbury_quad)

KINDS = ("lowrank", "diag", "isotropic", "flat")

#: Fine-tuning methods and the prior kind each one uses (see :meth:`Prior.for_method`).
METHODS = ("standard", "l2", "l2sp", "isotropic", "diag", "lowrank")

def _as_scalar(x):
    # float64 when x64 is enabled (tests against references), float32 otherwise.
    return jnp.asarray(x, dtype=jnp.result_type(float))


@jax.jit
def _logdet_of(prior: "Prior") -> jax.Array:
    return prior._log_det()



@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["mean", "var", "deviations", "scale", "floor", "chol", "logdet"],
    meta_fields=["spec", "kind", "info"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class Prior:
    """Gaussian prior over the parameters selected by ``spec`` (see module docstring).

    Build one with :meth:`lowrank`, :meth:`diagonal`, :meth:`isotropic`, :meth:`flat`,
    from a SWAG state (``bayes_transfer.swag``) or from an artifact
    (``bayes_transfer.load_prior``). It is a pytree, so it can be passed into jitted
    functions; changing λ with :meth:`rescale` does not trigger recompilation.

    Example::

        prior = Prior.lowrank(spec, mean, var, deviations, scale=1e3)
        lp = prior.log_prob(params)             # params: a tree, or a (d,) vector
        g = jax.grad(prior.log_prob)(params)    # same tree structure as params
    """

    mean: jax.Array               # (d,), or () for a zero-mean prior
    var: jax.Array                # (d,) SWAG variance, or () for isotropic
    deviations: jax.Array | None  # (K, d) SWAG deviations D̂ (kind "lowrank" only)
    scale: jax.Array              # λ
    floor: jax.Array              # ε
    chol: jax.Array | None        # cached Cholesky factor of the K×K capacitance
    spec: ParamSpec
    kind: str
    info: str = "{}"              # JSON metadata (architecture, source, ...): hashable, static
    logdet: jax.Array | None = None  # cached log|Σ| (set by rescale; recomputed when None)

    @property
    def metadata(self) -> dict:
        """The artifact metadata this prior was loaded with (architecture, source, λ range)."""
        return json.loads(self.info)

    def with_metadata(self, metadata: dict) -> "Prior":
        return dataclasses.replace(self, info=json.dumps(metadata, sort_keys=True))

    # ------------------------------------------------------------------ builders
    @classmethod
    def lowrank(cls, spec: ParamSpec, mean, var, deviations, *, scale=1.0, floor=0.0) -> "Prior":
        """The learned SWAG prior N(mean, λ·(½diag(var) + ½D̂ᵀD̂/(K−1)) + εI)."""
        deviations = jnp.asarray(deviations)
        if deviations.ndim != 2 or deviations.shape[0] < 1:
            raise PriorError(f"deviations must be a (K, d) matrix with K >= 1, got shape "
                             f"{deviations.shape}")
        return cls.from_arrays(spec, mean, var, deviations, scale, floor, "lowrank")

    @classmethod
    def diagonal(cls, spec: ParamSpec, mean, var, *, scale=1.0, floor=0.0) -> "Prior":
        """N(mean, λ·diag(var) + εI): the SWAG-diagonal prior."""
        return cls.from_arrays(spec, mean, var, None, scale, floor, "diag")

    @classmethod
    def isotropic(cls, spec: ParamSpec, mean=None, var=1.0, *, scale=1.0, floor=0.0) -> "Prior":
        """N(mean, λ·var·I + εI); ``mean=None`` is the zero-mean (L2) prior.

        With ``var = 1`` the scale λ is the prior variance: L2 weight decay α on a
        training set of N examples corresponds to λ = 1/(α·N).
        """
        mean = jnp.zeros((), jnp.float32) if mean is None else mean
        var = jnp.asarray(var)
        if not jnp.issubdtype(var.dtype, jnp.floating):   # keeps float64 under x64
            var = var.astype(jnp.float32)
        return cls.from_arrays(spec, mean, var.reshape(()), None, scale, floor, "isotropic")

    @classmethod
    def flat(cls, spec: ParamSpec, mean=None) -> "Prior":
        """The improper flat prior (log p = 0): standard fine-tuning, started at ``mean``."""
        mean = jnp.zeros((), jnp.float32) if mean is None else mean
        return cls.from_arrays(spec, mean, jnp.ones((), jnp.float32), None, math.inf, 0.0, "flat")

    @classmethod
    def from_arrays(cls, spec, mean, var, deviations, scale, floor, kind) -> "Prior":
        """A validated prior of any ``kind`` from its stored arrays (what an artifact holds)."""
        prior = cls(mean=jnp.asarray(mean), var=jnp.asarray(var), deviations=deviations,
                    scale=_as_scalar(scale), floor=_as_scalar(floor), chol=None,
                    spec=spec, kind=kind)
        prior.validate()
        return prior.rescale(scale, floor)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "Prior":
        """Raise PriorError if shapes are inconsistent or values unusable (eager only)."""
        d = self.spec.size
        if self.kind not in KINDS:
            raise PriorError(f"unknown prior kind {self.kind!r}; expected one of {KINDS}")
        for name in ("mean", "var"):
            x = getattr(self, name)
            if x.shape not in ((), (d,)):
                raise PriorError(f"prior {name} has shape {x.shape}; expected ({d},) to match "
                                 f"the {len(self.spec.paths)} covered arrays, or a scalar")
        if self.deviations is not None and self.deviations.shape[1:] != (d,):
            raise PriorError(f"prior deviations have shape {self.deviations.shape}; "
                             f"expected (K, {d})")
        if isinstance(self.mean, jax.core.Tracer):
            return self
        checks = [("mean", self.mean), ("var", self.var)]
        if self.deviations is not None:
            checks.append(("deviations", self.deviations))
        for name, x in checks:
            if not bool(all_finite(x)):
                raise PriorError(f"prior {name} contains NaN or Inf; the artifact is corrupt "
                                 f"or the SWAG run diverged")
        if self.kind != "flat" and not bool(all_positive(self.var)):
            raise PriorError("prior variances must be positive; refit SWAG with a var_floor > 0")
        self._check_scale_floor()
        return self

    def _check_scale_floor(self) -> None:
        if isinstance(self.scale, jax.core.Tracer) or isinstance(self.floor, jax.core.Tracer):
            return
        scale, floor = float(self.scale), float(self.floor)
        if not (scale > 0) or (math.isinf(scale) and self.kind != "flat"):
            raise PriorError(f"prior scale λ must be a positive finite number, got {scale}; "
                             f"use Prior.flat (or rescale(inf)) for no prior")
        if not (floor >= 0) or math.isinf(floor):
            raise PriorError(f"prior floor ε must be finite and >= 0, got {floor}")

    # ------------------------------------------------------------------ structure
    @property
    def dim(self) -> int:
        """d, the number of covered parameters."""
        return self.spec.size

    @property
    def rank(self) -> int:
        """K, the number of deviation rows (0 unless kind is "lowrank")."""
        return 0 if self.deviations is None else int(self.deviations.shape[0])

    def _compute_dtype(self):
        return jnp.promote_types(self.var.dtype, jnp.float32)

    def diag_part(self, dtype=None):
        """δ = λ·diag(Σ₀) + ε, the diagonal of the covariance without the low-rank part."""
        dtype = dtype or self._compute_dtype()
        base = self.var.astype(dtype)
        if self.kind == "lowrank":
            base = 0.5 * base
        return self.scale.astype(dtype) * base + self.floor.astype(dtype)

    def _factor_coef(self, dtype=None):
        """c with W = √c·D̂: c = λ / (2(K − 1)); K − 1 is taken as 1 when K = 1."""
        dtype = dtype or self._compute_dtype()
        return self.scale.astype(dtype) / (2.0 * max(self.rank - 1, 1))

    def rescale(self, scale, floor=None) -> "Prior":
        """The same prior with λ = ``scale`` (and ε = ``floor``); stored arrays are shared.

        ``scale=inf`` gives the flat prior (the no-prior limit of every kind).
        """
        if not isinstance(scale, jax.core.Tracer) and math.isinf(float(scale)):
            return dataclasses.replace(self, scale=_as_scalar(math.inf), chol=None,
                                       logdet=None, deviations=None, kind="flat")
        new = dataclasses.replace(self, scale=_as_scalar(scale),
                                  floor=self.floor if floor is None else _as_scalar(floor))
        if new.kind == "flat":
            raise PriorError("a flat prior has no scale; build the prior you want to rescale "
                             "from its SWAG arrays")
        new._check_scale_floor()
        if new.deviations is None:
            new = dataclasses.replace(new, chol=None)
        else:
            dtype = new._compute_dtype()
            host = [on_host(x) for x in (new.deviations, new.var, new.scale, new.floor)]
            if new.deviations.dtype.itemsize < 4 and all(x is not None for x in host):
                dev, var, scale, floor = host
                chol = jnp.asarray(capacitance_cholesky_host(
                    dev, var, float(scale), float(floor), float(new._factor_coef(dtype)), dtype))
            else:
                chol = capacitance_cholesky(new.deviations, new.var, new.scale.astype(dtype),
                                             new.floor.astype(dtype), new._factor_coef(dtype))
            new = dataclasses.replace(new, chol=chol)
        # log|Σ| does not depend on θ: computing it here saves a pass of d logarithms
        # (the costliest elementwise term on CPU) in every log_prob call.
        new = dataclasses.replace(new, logdet=_logdet_of(new))
        if not isinstance(new.logdet, jax.core.Tracer) and not bool(jnp.isfinite(new.logdet)):
            # e.g. λ·var/2 below the dtype's smallest normal number with ε = 0: δ flushes
            # to 0 and every log_prob would be NaN or ±inf
            raise PriorError(
                f"the covariance is not representable in {new._compute_dtype()} at "
                f"λ={float(new.scale):g}, ε={float(new.floor):g} (log|Σ| = "
                f"{float(new.logdet)}): some variances λ·Σ₀ + ε underflow to 0 or overflow; "
                f"use a floor ε > 0 (e.g. 1e-12) or a larger λ")
        return new

    def for_method(self, method: str) -> "Prior":
        """The prior a fine-tuning method uses, derived from this (SWAG) prior.

        ``standard``: flat, start at θ̄. ``l2``: N(0, λI). ``l2sp``: N(θ̄, λI).
        ``isotropic``: N(θ̄, λ·σ̄²I), σ̄² the average of Σ₀'s diagonal. ``diag``:
        N(θ̄, λ·diag(var)). ``lowrank``: this prior. λ and ε are kept (reset to 1 for
        l2/l2sp, whose Σ₀ is I).
        """
        derived = self._derive(method)
        return dataclasses.replace(derived, info=self.info)

    def _derive(self, method: str) -> "Prior":
        if method == "standard":
            return Prior.flat(self.spec, self.mean)
        if method in ("l2", "l2sp"):
            return Prior.isotropic(self.spec, None if method == "l2" else self.mean, 1.0,
                                   floor=self.floor)
        if method == "isotropic":
            return Prior.isotropic(self.spec, self.mean, jnp.mean(self.base_variance()),
                                   scale=self.scale, floor=self.floor)
        if method == "diag":
            if self.kind not in ("lowrank", "diag"):
                raise PriorError(f"a diagonal prior needs SWAG variances; this prior is "
                                 f"{self.kind!r}")
            return Prior.diagonal(self.spec, self.mean, self.var, scale=self.scale,
                                  floor=self.floor)
        if method == "lowrank":
            if self.kind != "lowrank":
                raise PriorError(f"method 'lowrank' needs SWAG deviations; this prior is "
                                 f"{self.kind!r}")
            return self
        raise PriorError(f"unknown method {method!r}; expected one of {METHODS}")

    # ------------------------------------------------------------------ density
    def _flat_params(self, params) -> jax.Array:
        if isinstance(params, (jax.Array, np.ndarray)) and params.ndim == 1:
            if params.shape[0] != self.dim:
                raise PriorError(f"a flat parameter vector must have length d={self.dim}, "
                                 f"got {params.shape[0]}")
            return params
        return self.spec.ravel(params, dtype=self._compute_dtype())

    def log_prob(self, params) -> jax.Array:
        """log p(θ) of a parameter tree (covered leaves only) or of a (d,) vector."""
        theta = self._flat_params(params)
        dtype = jnp.promote_types(theta.dtype, self._compute_dtype())
        if self.kind == "flat":
            return jnp.zeros((), dtype) * jnp.sum(theta[:0])   # keeps a (zero) gradient path
        quad = self._quad(theta.astype(dtype), dtype)
        logdet = (self._log_det(dtype) if self.logdet is None else self.logdet.astype(dtype))
        return -0.5 * (self.dim * math.log(2 * math.pi) + logdet + quad)

    def quadratic(self, params) -> jax.Array:
        """(θ − θ̄)ᵀΣ⁻¹(θ − θ̄) = −2·(log p(θ) − log p(θ̄)): the part of −log p that θ
        changes, without the constant log-normaliser ½log|2πΣ| (0 for a flat prior)."""
        theta = self._flat_params(params)
        dtype = jnp.promote_types(theta.dtype, self._compute_dtype())
        if self.kind == "flat":
            return jnp.zeros((), dtype) * jnp.sum(theta[:0])
        return self._quad(theta.astype(dtype), dtype)

    def _quad(self, theta, dtype) -> jax.Array:
        if self.deviations is not None:
            return woodbury_quad(theta, self.mean, self.var, self.deviations,
                                 self.scale.astype(dtype), self.floor.astype(dtype),
                                 self.chol.astype(dtype))
        r = theta - self.mean.astype(dtype)
        return jnp.vdot(r, r / self.diag_part(dtype))

    def _log_det(self, dtype=None) -> jax.Array:
        """log|Σ| = Σᵢ log δᵢ + 2·Σₖ log Lₖₖ (determinant lemma); cached by rescale."""
        dtype = dtype or self._compute_dtype()
        diag = self.diag_part(dtype)
        logdet = jnp.sum(jnp.log(diag)) if diag.ndim else self.dim * jnp.log(diag)
        if self.chol is not None:
            logdet = logdet + 2.0 * jnp.sum(jnp.log(jnp.diagonal(self.chol).astype(dtype)))
        return logdet

    def inverse_trace(self) -> jax.Array:
        """tr Σ⁻¹, never forming Σ: Σ 1/δ − c·tr(C⁻¹·D̂δ⁻²D̂ᵀ) with C = LLᵀ the cached
        capacitance (Woodbury), one blocked pass over D̂. Infinite for a flat prior."""
        if self.kind == "flat":
            return jnp.full((), jnp.inf)
        dtype = self._compute_dtype()
        delta = jnp.broadcast_to(self.diag_part(dtype), (self.dim,))
        trace = jnp.sum(1.0 / delta)
        if self.deviations is None:
            return trace
        gram = self._factor_coef(dtype) * weighted_gram(self.deviations, 1.0 / delta ** 2)
        chol = self.chol.astype(dtype)
        return trace - jnp.trace(jax.scipy.linalg.cho_solve((chol, True), gram))

    def inverse_diagonal(self) -> jax.Array:
        """diag Σ⁻¹, a (d,) vector, never forming Σ: 1/δ − c·‖L⁻¹D̂ᵢ‖²/δᵢ² per coordinate
        (Woodbury; L the cached capacitance factor), in blocks of D̂'s columns."""
        if self.kind == "flat":
            raise PriorError("a flat prior has no covariance")
        dtype = self._compute_dtype()
        delta = jnp.broadcast_to(self.diag_part(dtype), (self.dim,))
        if self.deviations is None:
            return 1.0 / delta
        return inverse_diagonal_lowrank(self.deviations, delta, self.chol.astype(dtype),
                                        self._factor_coef(dtype))

    def grad_log_prob(self, params):
        """∇θ log p(θ), with the structure of ``params``."""
        return jax.grad(self.log_prob)(params)

    # ------------------------------------------------------------------ moments & samples
    def base_variance(self) -> jax.Array:
        """diag(Σ₀), shape (d,) or ()."""
        dtype = self._compute_dtype()
        var = self.var.astype(dtype)
        if self.kind != "lowrank":
            return var
        dev = self.deviations.astype(dtype)
        return 0.5 * var + 0.5 * jnp.sum(dev * dev, axis=0) / max(self.rank - 1, 1)

    def variance(self) -> jax.Array:
        """diag(Σ) = λ·diag(Σ₀) + ε, shape (d,) or ()."""
        if self.kind == "flat":
            return jnp.full((), jnp.inf)
        return self.scale * self.base_variance() + self.floor

    def covariance(self) -> jax.Array:
        """The dense d×d covariance: for tests and small models only (d ≤ 20,000)."""
        if self.kind == "flat":
            raise PriorError("a flat prior has no covariance")
        if self.dim > 20_000:
            raise PriorError(f"refusing to form a {self.dim}×{self.dim} covariance; use "
                             f"log_prob/sample, which never do")
        dtype = self._compute_dtype()
        cov = jnp.diag(jnp.broadcast_to(self.diag_part(dtype), (self.dim,)))
        if self.deviations is not None:
            dev = self.deviations.astype(dtype)
            cov = cov + self._factor_coef(dtype) * dev.T @ dev
        return cov

    def sample(self, key, n: int | None = None) -> jax.Array:
        """Draw θ ~ p: shape (d,), or (n, d) when ``n`` is given. Never forms Σ."""
        if self.kind == "flat":
            raise PriorError("cannot sample from a flat (improper) prior")
        shape = () if n is None else (n,)
        dtype = self._compute_dtype()
        k1, k2 = jax.random.split(key)
        z = jax.random.normal(k1, shape + (self.dim,), dtype)
        theta = self.mean.astype(dtype) + jnp.sqrt(self.diag_part(dtype)) * z
        if self.deviations is not None:
            u = jax.random.normal(k2, shape + (self.rank,), dtype)
            theta = theta + jnp.sqrt(self._factor_coef(dtype)) * (u @ self.deviations.astype(dtype))
        return theta

    def init_params(self, params):
        """``params`` with the covered leaves set to the prior mean (pretrained weights)."""
        self.spec.check(params)
        mean = jnp.broadcast_to(self.mean, (self.dim,))
        return self.spec.replace(params, mean)

    # ------------------------------------------------------------------ interop
    def as_numpyro(self):
        """This prior as a NumPyro distribution over the (d,) vector θ (reference/export)."""
        import numpyro.distributions as dist

        if self.kind == "flat":
            return dist.ImproperUniform(dist.constraints.real_vector, (), (self.dim,))
        dtype = self._compute_dtype()
        loc = jnp.broadcast_to(self.mean.astype(dtype), (self.dim,))
        diag = jnp.broadcast_to(self.diag_part(dtype), (self.dim,))
        if self.deviations is None:
            return dist.Normal(loc, jnp.sqrt(diag)).to_event(1)
        factor = jnp.sqrt(self._factor_coef(dtype)) * self.deviations.astype(dtype).T
        return dist.LowRankMultivariateNormal(loc, factor, diag)

    def astype(self, dtype) -> "Prior":
        """The same prior with its large arrays stored in ``dtype`` (e.g. bfloat16)."""
        cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
        new = dataclasses.replace(self, mean=cast(self.mean), var=cast(self.var),
                                  deviations=cast(self.deviations))
        # The cached factor must describe the rounded arrays, not the originals.
        return new if new.kind == "flat" else new.rescale(new.scale, new.floor)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored arrays (mean, var, deviations)."""
        arrays = [self.mean, self.var] + ([] if self.deviations is None else [self.deviations])
        return int(sum(x.size * x.dtype.itemsize for x in arrays))

    def shard(self, mesh, axis: str = "data", *, min_dim: int = SHARD_MIN_DIM) -> "Prior":
        """This prior placed on ``mesh``: see :func:`shard_prior`."""
        return shard_prior(self, mesh, axis, min_dim=min_dim)

    def __repr__(self) -> str:
        return (f"Prior(kind={self.kind!r}, d={self.dim}, K={self.rank}, "
                f"scale={float(self.scale):.4g}, floor={float(self.floor):.4g}, "
                f"dtype={self.var.dtype})")
