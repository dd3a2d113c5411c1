"""SWAG statistics collection, optax-style: ``(init, update)`` over parameters.

SWAG (Maddox et al., 2019) fits a Gaussian to the parameters an SGD run visits at a
high constant or cyclic learning rate. A collector records, over the covered
parameters θ ∈ R^d (a :class:`~bayes_transfer.params.ParamSpec`), one *snapshot* every
``every`` training steps after a warm-up of ``start_step`` steps:

- the running mean θ̄ₙ = (1/n)·Σᵢ θᵢ;
- ``m2`` = Σᵢ (θᵢ − θ̄ₙ)², updated with Welford's algorithm. It is the numerically
  stable form of SWAG's running second moment: ``var = sq_mean − θ̄² = m2 / n``
  without the cancellation that makes ``sq_mean − θ̄²`` negative in float32;
- a ring buffer of the last K deviations ``θᵢ − θ̄ᵢ`` (θ̄ᵢ the mean *after* including
  θᵢ, as in the reference SWAG code), stored K×d row-major.

:func:`swag_prior` turns the statistics into a :class:`~bayes_transfer.prior.Prior`,

    N(θ̄, λ·(½·diag(var) + ½·D̂ᵀD̂/(K − 1)) + ε·I),   var = max(m2/n, var_floor).

Example (a training loop: ``update`` once per step, after the optimizer)::

    spec = ParamSpec.from_params(params)                      # the backbone
    swag = swag_collector(spec, SwagConfig(rank=20, every=50))
    opt = optax.sgd(0.01)                                     # constant LR, or cyclic_lr
    opt_state, swag_state = opt.init(params), swag.init(params)

    @jax.jit
    def step(params, opt_state, swag_state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, swag.update(swag_state, params)

    ...
    prior = swag_prior(swag_state, spec, scale=1e3)

The state is a NamedTuple of arrays: it goes through ``jax.jit`` (donate it),
``jax.tree.map``, sharding and orbax checkpoints like an optimizer state.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer.errors import BayesTransferError, PriorError
from bayes_transfer.params import BACKBONE_RULE, ParamSpec
from bayes_transfer.prior import Prior

__all__ = [
    "DEFAULT_VAR_FLOOR", "SwagConfig", "SwagConfigError", "SwagState", "SwagCollector",
    "swag_collector", "swag_stats", "swag_prior", "swag_sample", "cyclic_lr",
]

#: Default ``var_floor`` (the DESIGN's): the smallest per-coordinate SWAG variance kept.
#: Welford's ``m2/n`` is never negative, so the floor is not there to hide cancellation
#: (the reference code clamps ``sq_mean − θ̄²`` at 1e-30 for that); it only keeps the
#: prior proper where a coordinate never moved (frozen or dead units give var = 0).
#: 1e-10 (a standard deviation of 1e-5) is far below the SWAG variances of networks
#: trained at SWAG learning rates (typically 1e-7…1e-3), and λ·var_floor stays a normal
#: float32 number for every λ ≥ 1e-8, so log p and its gradient remain finite.
DEFAULT_VAR_FLOOR = 1e-10


class SwagConfigError(BayesTransferError, ValueError):
    """A SwagConfig with impossible settings (rank < 1, every < 1, ...)."""


class SwagState(NamedTuple):
    """Running SWAG statistics (a plain pytree of arrays; checkpoint it with orbax).

    Attributes:
      step: int32, the number of training steps ``update`` has seen.
      count: int32, the number of snapshots collected (n).
      mean: (d,) float32 running mean θ̄ₙ of the snapshots.
      m2: (d,) float32 running sum of squared deviations Σᵢ (θᵢ − θ̄ₙ)² (Welford), so
        that the SWAG variance ``sq_mean − θ̄² = m2 / count``.
      deviations: (K, d) float32 ring buffer; snapshot i (0-based) writes row
        ``i mod K`` with θᵢ − θ̄ᵢ, θ̄ᵢ the mean after including θᵢ. Rows are in
        chronological order only after :func:`swag_stats` unrolls them.
    """

    step: jax.Array
    count: jax.Array
    mean: jax.Array
    m2: jax.Array
    deviations: jax.Array


@dataclasses.dataclass(frozen=True)
class SwagConfig:
    """What a SWAG collector records, and when.

    Snapshot timing. ``update`` is called once per training step with the parameters
    *after* that step's optimizer update. Let ``s`` be the 0-based index of that step
    counted from the collector's ``init`` (``state.step`` before the call). A snapshot
    is taken iff::

        s >= start_step  and  (s - start_step + 1) % every == 0

    i.e. at steps ``start_step + every − 1``, ``start_step + 2·every − 1``, ...: after
    the last step of each block of ``every`` steps. With a cyclic learning rate of
    cycle length ``every`` (:func:`cyclic_lr`) whose cycles start at ``start_step``
    (take ``start_step`` a multiple of ``every``), that is the end of each cycle, at the
    lowest learning rate. With a constant learning rate any ``every`` works; ``every``
    > 1 only thins out correlated snapshots.

    Attributes:
      rank: K, the number of deviations kept (the rank of the low-rank part).
      start_step: warm-up steps (from ``init``) before the first snapshot may be taken.
      every: M, one snapshot every M steps.
      var_floor: the DESIGN's var_floor: ``var = max(m2/n, var_floor)`` (see
        :data:`DEFAULT_VAR_FLOOR`). Used by :func:`swag_prior`/:func:`swag_stats` when
        given the config; the collector's state does not depend on it.
      rule: the regular expression over parameter paths selecting the covered
        parameters (``ParamSpec.from_params(params, rule)``); the default is the backbone.
    """

    rank: int = 20
    start_step: int = 0
    every: int = 1
    var_floor: float = DEFAULT_VAR_FLOOR
    rule: str = BACKBONE_RULE

    def __post_init__(self):
        if not (isinstance(self.rank, (int, np.integer)) and self.rank >= 1):
            raise SwagConfigError(f"SwagConfig.rank (K) must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.every, (int, np.integer)) and self.every >= 1):
            raise SwagConfigError(f"SwagConfig.every must be an integer >= 1, got {self.every!r}")
        if not (isinstance(self.start_step, (int, np.integer)) and self.start_step >= 0):
            raise SwagConfigError(
                f"SwagConfig.start_step must be an integer >= 0, got {self.start_step!r}")
        if not (float(self.var_floor) > 0 and np.isfinite(self.var_floor)):
            raise SwagConfigError(
                f"SwagConfig.var_floor must be a positive finite number, got {self.var_floor!r}")

    def is_snapshot(self, step):
        """Whether training step ``step`` (0-based, from ``init``) takes a snapshot.

        Works on Python ints, NumPy and JAX integer arrays.
        """
        offset = step - self.start_step
        return (offset >= 0) & ((offset + 1) % self.every == 0)

    def spec(self, params) -> ParamSpec:
        """The ParamSpec of the parameters this config's ``rule`` selects in ``params``."""
        return ParamSpec.from_params(params, self.rule)


class SwagCollector(NamedTuple):
    """A pair of pure functions, like ``optax.GradientTransformation`` but over params.

    Attributes:
      init: ``init(params) -> SwagState``, all statistics zero.
      update: ``update(state, params) -> SwagState``; call once per training step
        with the parameters after the optimizer update. Jit-friendly: the snapshot
        runs under ``lax.cond``, so a non-snapshot step only increments ``step``.
    """

    init: Callable[..., SwagState]
    update: Callable[[SwagState, object], SwagState]


def _flat(spec: ParamSpec, params) -> jax.Array:
    """(d,) float32 vector of the covered parameters (a (d,) array is taken as is)."""
    if isinstance(params, (jax.Array, np.ndarray)) and params.ndim == 1:
        if params.shape[0] != spec.size:
            raise PriorError(f"a flat parameter vector must have length d={spec.size}, "
                             f"got {params.shape[0]}")
        return jnp.asarray(params, jnp.float32)
    return spec.ravel(params, dtype=jnp.float32)


def _skip(state: SwagState, params) -> SwagState:
    del params
    return state


def swag_collector(spec: ParamSpec, config: SwagConfig = SwagConfig()) -> SwagCollector:
    """A SWAG collector over the parameters ``spec`` covers (see :class:`SwagConfig`).

    ``spec`` may also be a parameter tree, from which ``config.rule`` selects the
    covered parameters. ``update`` also accepts a (d,) vector instead of a tree.

    Example::

        swag = swag_collector(spec, SwagConfig(rank=20, every=50))
        update = jax.jit(swag.update, donate_argnums=0)   # or call it inside your step
        state = swag.init(params)
        for batch in data:
            params, opt_state = train_step(params, opt_state, batch)
            state = update(state, params)
        prior = swag_prior(state, spec)
    """
    if not isinstance(spec, ParamSpec):
        spec = config.spec(spec)
    if not isinstance(config, SwagConfig):
        raise SwagConfigError(f"config must be a SwagConfig, got {type(config).__name__}")
    d, rank = spec.size, int(config.rank)

    def init(params=None) -> SwagState:
        if params is not None:
            if isinstance(params, (jax.Array, np.ndarray)) and params.ndim == 1:
                _flat(spec, params)   # length check
            else:
                spec.check(params)
        return SwagState(
            step=jnp.zeros((), jnp.int32),
            count=jnp.zeros((), jnp.int32),
            mean=jnp.zeros((d,), jnp.float32),
            m2=jnp.zeros((d,), jnp.float32),
            deviations=jnp.zeros((rank, d), jnp.float32),
        )

    def snapshot(state: SwagState, params) -> SwagState:
        theta = _flat(spec, params)
        n = state.count + 1
        delta = theta - state.mean
        mean = state.mean + delta / n.astype(jnp.float32)
        dev = theta - mean
        m2 = state.m2 + delta * dev
        row = jnp.remainder(state.count, rank)
        deviations = jax.lax.dynamic_update_slice(
            state.deviations, dev[None, :].astype(state.deviations.dtype),
            (row, jnp.zeros((), row.dtype)))
        return SwagState(state.step, n, mean, m2, deviations)

    def update(state: SwagState, params) -> SwagState:
        take = config.is_snapshot(state.step)
        # The parameters are ravelled inside the taken branch only: a step without a
        # snapshot neither reads them nor touches the (K, d) buffer.
        new = jax.lax.cond(take, snapshot, _skip, state, params)
        return new._replace(step=state.step + 1)

    return SwagCollector(init, update)


def _chronological(state: SwagState) -> tuple[int, jax.Array]:
    """(n, the min(n, K) valid deviation rows, oldest first). Eager: reads ``count``."""
    count = int(state.count)
    rank = int(state.deviations.shape[0])
    valid = min(count, rank)
    start = (count - valid) % rank   # slot of the oldest valid row
    order = (start + np.arange(valid)) % rank
    return count, state.deviations[order]


def swag_stats(state: SwagState, var_floor: float = DEFAULT_VAR_FLOOR):
    """``(mean, var, deviations)`` as plain arrays: (d,), (d,) and (min(n, K), d).

    ``var = max(m2 / n, var_floor)``; the deviation rows are in chronological order
    (oldest first). The arrays are new buffers, never the state's own, so they stay
    valid when the state is later donated to a jitted ``update``. Eager only (it
    reads ``state.count`` on the host).
    """
    count, deviations = _chronological(state)
    if count < 1:
        raise PriorError("the SWAG state holds no snapshot yet (count = 0)")
    var = jnp.maximum(state.m2 / jnp.asarray(count, state.m2.dtype),
                      jnp.asarray(var_floor, state.m2.dtype))
    return jnp.copy(state.mean), var, deviations


def swag_prior(state: SwagState, spec: ParamSpec, *, kind: str = "lowrank", scale=1.0,
               floor=0.0, var_floor: float = DEFAULT_VAR_FLOOR) -> Prior:
    """The prior N(θ̄, λ·Σ_swag + ε·I) from SWAG statistics.

    ``kind`` is ``"lowrank"`` (Σ_swag = ½·diag(var) + ½·D̂ᵀD̂/(K − 1), with the
    ``min(count, K)`` deviations collected) or any fine-tuning method name of
    :meth:`Prior.for_method` (``"diag"``, ``"isotropic"``, ``"l2sp"``, ...).
    ``var_floor`` should be the collecting config's ``var_floor``. Eager only.
    Needs at least two snapshots: one snapshot has no spread.
    """
    if not isinstance(state, SwagState):
        raise PriorError(f"swag_prior needs a SwagState, got {type(state).__name__}")
    count = int(state.count)
    if count < 2:
        raise PriorError(
            f"the SWAG state has {count} snapshot(s) after {int(state.step)} step(s); a "
            f"prior needs at least 2. Collect longer, or lower SwagConfig.start_step / "
            f"SwagConfig.every (a snapshot is taken at steps s >= start_step with "
            f"(s - start_step + 1) % every == 0).")
    if state.mean.shape != (spec.size,):
        raise PriorError(f"the SWAG state covers d={state.mean.shape[0]} parameters but the "
                         f"spec covers d={spec.size}; pass the spec the collector was built with")
    mean, var, deviations = swag_stats(state, var_floor)
    if kind == "diag":        # skips the low-rank prior's capacitance (a pass over D̂)
        return Prior.diagonal(spec, mean, var, scale=scale, floor=floor)
    prior = Prior.lowrank(spec, mean, var, deviations, scale=scale, floor=floor)
    return prior if kind == "lowrank" else prior.for_method(kind)


def swag_sample(state: SwagState, spec: ParamSpec, key, n: int | None = None, *,
                kind: str = "lowrank", var_floor: float = DEFAULT_VAR_FLOOR) -> jax.Array:
    """Samples θ ~ N(θ̄, Σ_swag) from the SWAG posterior itself: (d,), or (n, d).

    The same as ``swag_prior(state, spec, kind=kind, scale=1.0).sample(key, n)``;
    write a sample into a parameter tree with ``spec.replace(params, theta)``.
    """
    return swag_prior(state, spec, kind=kind, scale=1.0, var_floor=var_floor).sample(key, n)


def cyclic_lr(base_lr: float, min_lr: float, cycle_steps: int):
    """SWAG's cyclic learning rate (Izmailov et al., 2018) as an optax schedule.

    Within each cycle of ``cycle_steps`` optimizer steps the rate falls linearly from
    just below ``base_lr`` to ``min_lr``: step t uses
    ``base_lr − (base_lr − min_lr)·((t mod c) + 1)/c``, so the last step of a cycle
    uses ``min_lr`` exactly. Pair it with ``SwagConfig(every=cycle_steps,
    start_step=j·cycle_steps)`` to snapshot at the end of every cycle; the schedule's
    count and the collector's step must start together. A constant learning rate
    (``optax.constant_schedule(lr)`` or a float) works with any ``every``.
    """
    if int(cycle_steps) < 1:
        raise SwagConfigError(f"cycle_steps must be >= 1, got {cycle_steps!r}")
    c = int(cycle_steps)
    base, low = float(base_lr), float(min_lr)

    def schedule(count):
        t = (jnp.remainder(jnp.asarray(count), c) + 1).astype(jnp.float32) / c
        return base - (base - low) * t

    return schedule
