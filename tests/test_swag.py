"""SWAG collection against a direct float64 NumPy computation over recorded parameters."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bayes_transfer.errors import PriorError, SpecMismatchError
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.swag import (DEFAULT_VAR_FLOOR, SwagCollector, SwagConfig, SwagConfigError,
                                 SwagState, cyclic_lr, swag_collector, swag_prior, swag_sample,
                                 swag_stats)


def make_params(rng, center=None) -> dict:
    """Backbone of 6 + 4 = 10 scalars around ``center``, a head the collector ignores."""
    shapes = {"backbone": {"conv": {"kernel": (3, 2)}, "dense": {"bias": (4,)}},
              "head": {"kernel": (2, 3)}}
    if center is None:
        return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                            is_leaf=lambda s: isinstance(s, tuple))
    return jax.tree.map(lambda c: (c + 0.1 * rng.normal(size=c.shape)).astype(np.float32),
                        center)


def ref_ravel(tree) -> np.ndarray:
    b = tree["backbone"]
    return np.concatenate([np.ravel(b["conv"]["kernel"]), np.ravel(b["dense"]["bias"])]
                          ).astype(np.float64)


def run(config: SwagConfig, steps: int, seed: int = 0, jit: bool = True):
    """Feed ``steps`` random parameter trees; return (state, spec, recorded (steps, d))."""
    rng = np.random.default_rng(seed)
    center = make_params(rng)
    spec = ParamSpec.from_params(center)
    swag = swag_collector(spec, config)
    update = jax.jit(swag.update, donate_argnums=0) if jit else swag.update
    state = swag.init(center)
    recorded = []
    for _ in range(steps):
        params = make_params(rng, center)
        recorded.append(ref_ravel(params))
        state = update(state, params)
    return state, spec, np.stack(recorded) if recorded else np.zeros((0, spec.size))


def reference(recorded: np.ndarray, config: SwagConfig):
    """Mean, population variance and the last K deviations θᵢ − θ̄ᵢ, in float64."""
    snaps = np.stack([recorded[s] for s in range(len(recorded))
                      if s >= config.start_step and (s - config.start_step + 1) % config.every == 0])
    devs = np.stack([snaps[i] - snaps[:i + 1].mean(0) for i in range(len(snaps))])
    return snaps, snaps.mean(0), snaps.var(0), devs[-config.rank:]


CASES = [
    # (config, steps, expected snapshot count)
    (SwagConfig(rank=4, start_step=3, every=2), 23, 10),   # wraps the ring buffer twice
    (SwagConfig(rank=3, start_step=1, every=3), 13, 4),    # wraps once
    (SwagConfig(rank=4, start_step=0, every=1), 4, 4),     # exactly K
    (SwagConfig(rank=5, start_step=2, every=1), 5, 3),     # fewer than K
]


@pytest.mark.parametrize("config,steps,count", CASES)
def test_statistics_match_numpy(config, steps, count):
    state, spec, recorded = run(config, steps)
    assert isinstance(state, SwagState)
    assert int(state.step) == steps and int(state.count) == count
    assert state.step.dtype == jnp.int32 and state.count.dtype == jnp.int32
    assert state.mean.dtype == jnp.float32 and state.deviations.shape == (config.rank, spec.size)
    snaps, mean, var, devs = reference(recorded, config)
    assert len(snaps) == count
    np.testing.assert_allclose(np.asarray(state.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.m2) / count, var, rtol=1e-4, atol=1e-7)
    m, v, d = swag_stats(state)
    np.testing.assert_allclose(np.asarray(m), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v), var, rtol=1e-4, atol=1e-7)
    assert d.shape == (min(count, config.rank), spec.size)
    np.testing.assert_allclose(np.asarray(d), devs, rtol=1e-4, atol=1e-6)   # chronological
    # var = max(m2/n, var_floor)
    _, v_floor, _ = swag_stats(state, var_floor=float(np.median(var)))
    np.testing.assert_allclose(np.asarray(v_floor), np.maximum(var, np.median(var)), rtol=1e-4)


def test_snapshot_schedule():
    config = SwagConfig(rank=2, start_step=5, every=3)
    taken = [s for s in range(20) if config.is_snapshot(s)]
    assert taken == [7, 10, 13, 16, 19]
    np.testing.assert_array_equal(np.asarray(config.is_snapshot(jnp.arange(20))),
                                  [s in taken for s in range(20)])
    assert [s for s in range(5) if SwagConfig().is_snapshot(s)] == [0, 1, 2, 3, 4]
    # the collector follows the same schedule: count goes up exactly at those steps
    rng = np.random.default_rng(0)
    params = make_params(rng)
    swag = swag_collector(ParamSpec.from_params(params), config)
    state, counts = swag.init(params), []
    update = jax.jit(swag.update)
    for _ in range(20):
        state = update(state, make_params(rng, params))
        counts.append(int(state.count))
    assert [s for s in range(20) if counts[s] > (counts[s - 1] if s else 0)] == taken


def test_jit_matches_eager():
    config = SwagConfig(rank=3, start_step=1, every=2)
    jitted, _, rec1 = run(config, 12, seed=3, jit=True)
    eager, _, rec2 = run(config, 12, seed=3, jit=False)
    np.testing.assert_array_equal(rec1, rec2)
    for a, b in zip(jitted, eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_non_snapshot_step_does_not_ravel():
    """The concatenation of the covered leaves happens only inside the cond's snapshot branch."""
    rng = np.random.default_rng(0)
    params = make_params(rng)
    swag = swag_collector(ParamSpec.from_params(params), SwagConfig(rank=2, every=10))
    jaxpr = jax.make_jaxpr(swag.update)(swag.init(params), params).jaxpr
    top = [e.primitive.name for e in jaxpr.eqns]
    assert "cond" in top
    assert "concatenate" not in top and "dynamic_update_slice" not in top
    cond = next(e for e in jaxpr.eqns if e.primitive.name == "cond")
    branches = [[e.primitive.name for e in b.jaxpr.eqns] for b in cond.params["branches"]]
    assert branches[0] == []                                   # skip: identity
    assert "concatenate" in branches[1] and "dynamic_update_slice" in branches[1]


def test_state_is_a_plain_pytree_and_checkpoints(tmp_path):
    state, _, _ = run(SwagConfig(rank=3, start_step=0, every=2), 9)
    copied = jax.tree.map(lambda x: x, state)
    assert isinstance(copied, SwagState)
    assert len(jax.tree.leaves(state)) == 5
    as_numpy = jax.tree.map(np.asarray, state)
    assert isinstance(as_numpy, SwagState)

    ckptr = ocp.StandardCheckpointer()
    path = tmp_path / "swag"
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckptr.restore(path, target)
    ckptr.close()
    assert isinstance(restored, SwagState)
    for a, b in zip(restored, state):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and collection resumes from the restored state as if never interrupted
    assert int(restored.count) == int(state.count)


@pytest.mark.parametrize("config,steps,count", CASES)
def test_swag_prior_covariance(config, steps, count):
    state, spec, recorded = run(config, steps)
    _, mean, var, devs = reference(recorded, config)
    k = len(devs)
    prior = swag_prior(state, spec)
    assert prior.kind == "lowrank" and prior.rank == k and float(prior.scale) == 1.0
    cov = 0.5 * np.diag(var) + 0.5 * devs.T @ devs / max(k - 1, 1)
    np.testing.assert_allclose(np.asarray(prior.covariance()), cov, rtol=1e-4,
                               atol=1e-5 * np.abs(cov).max())
    np.testing.assert_allclose(np.asarray(prior.mean), mean, rtol=1e-5, atol=1e-6)
    # scale and floor are the prior's λ and ε: λ multiplies the whole covariance
    scaled = swag_prior(state, spec, scale=3.0, floor=0.5)
    np.testing.assert_allclose(np.asarray(scaled.covariance()), 3.0 * cov + 0.5 * np.eye(len(mean)),
                               rtol=1e-4, atol=1e-5)
    # other kinds through Prior.for_method
    diag = swag_prior(state, spec, kind="diag")
    np.testing.assert_allclose(np.asarray(diag.variance()), var, rtol=1e-4, atol=1e-7)
    iso = swag_prior(state, spec, kind="isotropic")
    np.testing.assert_allclose(float(iso.var), np.mean(np.diag(cov)), rtol=1e-4)


def test_var_floor_applies_to_frozen_coordinates():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    spec = ParamSpec.from_params(params)
    swag = swag_collector(spec, SwagConfig(rank=2))
    state = swag.init(params)
    for _ in range(3):
        p = make_params(rng, params)
        p["backbone"]["dense"]["bias"] = params["backbone"]["dense"]["bias"]   # never moves
        state = swag.update(state, p)
    prior = swag_prior(state, spec)
    np.testing.assert_array_equal(np.asarray(prior.var[6:]), np.float32(DEFAULT_VAR_FLOOR))
    assert np.all(np.asarray(prior.var[:6]) > 1e-6)
    assert np.isfinite(float(prior.log_prob(params)))
    floored = swag_prior(state, spec, var_floor=1e-3)
    np.testing.assert_array_equal(np.asarray(floored.var[6:]), np.float32(1e-3))


def test_too_few_snapshots_is_a_clear_error():
    for steps in (0, 1):
        state, spec, _ = run(SwagConfig(rank=4, start_step=0, every=1), steps)
        with pytest.raises(PriorError, match=f"has {steps} snapshot\\(s\\).*at least 2"):
            swag_prior(state, spec)
    state, spec, _ = run(SwagConfig(rank=4, start_step=5, every=2), 6)   # warm-up not over
    with pytest.raises(PriorError, match="start_step"):
        swag_prior(state, spec)
    with pytest.raises(PriorError, match="no snapshot"):
        swag_stats(run(SwagConfig(), 0)[0])


def test_swag_sample_is_the_scale_one_prior():
    state, spec, _ = run(SwagConfig(rank=3), 8)
    key = jax.random.key(4)
    x = swag_sample(state, spec, key, 5)
    assert x.shape == (5, spec.size)
    np.testing.assert_array_equal(np.asarray(x),
                                  np.asarray(swag_prior(state, spec).sample(key, 5)))
    assert swag_sample(state, spec, key).shape == (spec.size,)


def test_spec_and_config_errors():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    spec = ParamSpec.from_params(params)
    for bad in (dict(rank=0), dict(every=0), dict(start_step=-1), dict(var_floor=0.0),
                dict(rank=2.5)):
        with pytest.raises(SwagConfigError):
            SwagConfig(**bad)
    swag = swag_collector(spec, SwagConfig(rank=2))
    wrong = make_params(rng)
    wrong["backbone"]["dense"]["bias"] = np.zeros(5, np.float32)
    with pytest.raises(SpecMismatchError, match="backbone/dense/bias"):
        swag.init(wrong)
    # a tree instead of a spec: the config's rule selects the covered parameters
    swag2 = swag_collector(params, SwagConfig(rank=2, rule=r"^backbone/conv/"))
    assert swag2.init(params).mean.shape == (6,)
    # a (d,) vector works as parameters too
    state = swag.init(jnp.zeros(spec.size))
    state = swag.update(state, jnp.ones(spec.size))
    np.testing.assert_array_equal(np.asarray(state.mean), 1.0)
    with pytest.raises(PriorError, match="d=10"):
        swag.update(state, jnp.ones(spec.size + 1))
    other = swag_collector(ParamSpec.from_params(params, r"^backbone/conv/"), SwagConfig(rank=2))
    s = other.init(params)
    s = other.update(other.update(s, params), make_params(rng, params))
    with pytest.raises(PriorError, match="d=6 parameters but the spec covers d=10"):
        swag_prior(s, spec)


def test_cyclic_lr():
    sched = cyclic_lr(0.1, 0.01, 4)
    lrs = np.array([float(sched(t)) for t in range(9)])
    np.testing.assert_allclose(lrs[:4], [0.1 - 0.09 * k / 4 for k in (1, 2, 3, 4)], rtol=1e-6)
    np.testing.assert_allclose(lrs[4:8], lrs[:4], rtol=1e-6)          # periodic
    assert lrs[3] == pytest.approx(0.01) and lrs[7] == pytest.approx(0.01)
    # with every = cycle length the snapshots fall on the lowest learning rate
    config = SwagConfig(every=4, start_step=8)
    assert all(float(sched(s)) == pytest.approx(0.01) for s in range(40) if config.is_snapshot(s))
    with pytest.raises(SwagConfigError):
        cyclic_lr(0.1, 0.01, 0)


def test_in_an_optax_training_loop_with_nnx_state():
    """The docstring's pattern: one jitted step with optax + collector, nnx.State params."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.backbone = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.tanh(self.backbone(x)))

    model = Net(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    spec = ParamSpec.from_params(params)
    assert spec.paths == ("backbone/bias", "backbone/kernel") and spec.size == 16
    swag = swag_collector(spec, SwagConfig(rank=4, start_step=10, every=5))
    opt = optax.sgd(cyclic_lr(0.05, 0.01, 5))
    x = jax.random.normal(jax.random.key(1), (64, 3))
    y = jnp.sin(x.sum(1, keepdims=True))

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    @jax.jit
    def step(params, opt_state, swag_state):
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, swag.update(swag_state, params)

    opt_state, swag_state = opt.init(params), swag.init(params)
    snaps = []
    for s in range(40):
        params, opt_state, swag_state = step(params, opt_state, swag_state)
        if swag_state.count > len(snaps):
            snaps.append(np.asarray(spec.ravel(params)))
    assert int(swag_state.count) == len(snaps) == 6
    prior = swag_prior(swag_state, spec, scale=10.0)
    np.testing.assert_allclose(np.asarray(prior.mean), np.mean(snaps, 0), rtol=1e-5, atol=1e-6)
    assert isinstance(prior, Prior)
    new = prior.init_params(params)
    np.testing.assert_allclose(np.asarray(spec.ravel(new)), np.mean(snaps, 0), rtol=1e-6)


def test_collector_is_optax_shaped():
    swag = swag_collector(ParamSpec.from_params(make_params(np.random.default_rng(0))))
    assert isinstance(swag, SwagCollector) and isinstance(swag, tuple)
    init, update = swag
    assert init is swag.init and update is swag.update
    hash(swag)   # usable as a static/cache key (train.py caches compiled steps on it)


_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bayes_transfer.params import ParamSpec
    from bayes_transfer.swag import SwagConfig, swag_collector, swag_stats
    assert jax.device_count() == 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))   # Auto axes, as train.py
    rng = np.random.default_rng(0)
    def params():
        return {"backbone": {"a": rng.normal(size=(8, 6)).astype(np.float32),
                             "b": rng.normal(size=(4,)).astype(np.float32)},
                "head": {"w": rng.normal(size=(6, 2)).astype(np.float32)}}
    p0 = params()
    spec = ParamSpec.from_params(p0)
    swag = swag_collector(spec, SwagConfig(rank=3, every=2))
    shard = lambda p: {"backbone": {"a": jax.device_put(p["backbone"]["a"], NamedSharding(mesh, P("x"))),
                                    "b": jax.device_put(p["backbone"]["b"], NamedSharding(mesh, P()))},
                       "head": {"w": jax.device_put(p["head"]["w"], NamedSharding(mesh, P(None, "x")))}}
    state = swag.init(p0)
    state = state._replace(mean=jax.device_put(state.mean, NamedSharding(mesh, P("x"))),
                           m2=jax.device_put(state.m2, NamedSharding(mesh, P("x"))),
                           deviations=jax.device_put(state.deviations, NamedSharding(mesh, P(None, "x"))))
    plain = swag.init(p0)
    update = jax.jit(swag.update, donate_argnums=0)
    for _ in range(9):
        p = params()
        state = update(state, shard(p))
        plain = swag.update(plain, p)
    assert len(state.deviations.sharding.device_set) == 2
    for a, b in zip(swag_stats(state), swag_stats(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    print("OK", int(state.count))
""")


def test_sharded_params_and_state():
    """Sharded (2 host devices) params and state under jit give the unsharded statistics."""
    out = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout


def test_prior_survives_donating_the_state():
    """swag_prior copies what it takes: collection can go on with a donated state."""
    rng = np.random.default_rng(0)
    params = make_params(rng)
    spec = ParamSpec.from_params(params)
    swag = swag_collector(spec, SwagConfig(rank=2))      # count < K and count > K below
    update = jax.jit(swag.update, donate_argnums=0)
    state = swag.init(params)
    for n_steps in (2, 3):
        for _ in range(n_steps):
            state = update(state, make_params(rng, params))
        prior = swag_prior(state, spec)
        mean = np.asarray(prior.mean).copy()
        state = update(state, make_params(rng, params))   # donates the old buffers
        np.testing.assert_array_equal(np.asarray(prior.mean), mean)
        assert np.all(np.isfinite(np.asarray(prior.deviations)))
