"""The prior sharded along d over 8 simulated CPU devices equals the prior on one device.

The checks run in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is fixed when
JAX starts); this file is also that subprocess's script.
"""
import json
import os
import subprocess
import sys

import numpy as np


def _check_on_eight_devices() -> dict:
    import warnings

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from bayes_transfer import data, models
    from bayes_transfer.training.objectives import map_loss
    from bayes_transfer.params import ParamSpec
    from bayes_transfer.prior import Prior, shard_prior
    from bayes_transfer.training import make_apply, split_model

    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    graphdef, params, rest = split_model(model)
    spec = ParamSpec.from_params(params)
    d, k = spec.size, 5
    assert d % 8 == 0, d
    rng = np.random.default_rng(0)
    mean = spec.ravel(params) + jnp.asarray(rng.normal(0, 1e-2, d), jnp.float32)
    var = jnp.asarray(rng.uniform(1e-4, 1e-3, d), jnp.float32)
    dev = jnp.asarray(rng.normal(0, 1e-2, (k, d)), jnp.float32)
    prior = Prior.lowrank(spec, mean, var, dev, scale=30.0, floor=1e-6)
    sharded = shard_prior(prior, mesh, min_dim=0)
    out = {"d": d}

    # Placement: (d,) and (K, d) arrays split along d, the small factors replicated.
    for name, shape in [("mean", (d // 8,)), ("var", (d // 8,)), ("deviations", (k, d // 8))]:
        x = getattr(sharded, name)
        assert {s.data.shape for s in x.addressable_shards} == {shape}, (name, x.sharding)
        assert len(x.sharding.device_set) == 8
    for name in ("chol", "scale", "floor", "logdet"):
        assert getattr(sharded, name).sharding.is_fully_replicated, name
    assert np.array_equal(np.asarray(sharded.deviations), np.asarray(prior.deviations))

    # log_prob and its gradient under jit, params replicated as in data parallelism.
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, theta: p.log_prob(theta), argnums=1))
    rep_params = jax.device_put(params, NamedSharding(mesh, P()))
    lp1, g1 = value_and_grad(prior, params)           # one device
    lp8, g8 = value_and_grad(sharded, rep_params)     # sharded over 8
    out["log_prob"] = [float(lp1), float(lp8)]
    out["grad_max_rel"] = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)))

    # The same after rescaling the sharded prior (its capacitance is recomputed).
    lp1s, _ = value_and_grad(prior.rescale(1e3), params)
    lp8s, _ = value_and_grad(sharded.rescale(1e3), rep_params)
    out["rescaled"] = [float(lp1s), float(lp8s)]

    # bfloat16 storage through the fused multiply-reduce that large d uses (the
    # hand-written gradient; the unsharded capacitance is built on the host, the sharded
    # one's, after rescaling, by XLA).
    from bayes_transfer.prior import woodbury as prior_module
    prior_module._MATVEC_MAX_DIM, saved_max = 0, prior_module._MATVEC_MAX_DIM
    p16 = prior.astype(jnp.bfloat16)
    s16 = shard_prior(p16, mesh, min_dim=0)
    assert {s.data.shape for s in s16.deviations.addressable_shards} == {(k, d // 8)}
    fused = jax.jit(jax.value_and_grad(lambda p, theta: p.log_prob(theta), argnums=1))
    out["bf16"] = []
    for a, b in ((p16, s16), (p16.rescale(1e3), s16.rescale(1e3))):
        (lp1, g1), (lp8, g8) = fused(a, params), fused(b, rep_params)
        out["bf16"].append([float(lp1), float(lp8), max(
            float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-30))
            for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)))])
    prior_module._MATVEC_MAX_DIM = saved_max

    # A data-parallel MAP step: batch sharded over "data", prior sharded along d.
    splits = data.load("digits", seed=0)
    batch = next(iter(data.batches(splits.train, 64, seed=0, epoch=0)))
    loss_fn = map_loss(len(splits.train), head_decay=1e-4)
    apply = make_apply(graphdef)

    @jax.jit
    def step(p, r, b, prior_):
        return jax.value_and_grad(
            lambda q: loss_fn(apply, q, r, b, jax.random.PRNGKey(0), prior_)[0])(p)

    l1, s1 = step(params, rest, batch, prior)
    l8, s8 = step(rep_params, jax.device_put(rest, NamedSharding(mesh, P())),
                  jax.device_put(batch, NamedSharding(mesh, P("data"))), sharded)
    out["map_loss"] = [float(l1), float(l8)]
    out["map_grad_max_rel"] = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)))

    # Through the one training loop: fit keeps the prior sharded (no gather) and the
    # state replicated, and three steps end where the unsharded prior's run ends.
    from bayes_transfer.training import loop
    seen = []
    real_place = loop.place_aux
    loop.place_aux = lambda aux, m: seen.append(real_place(aux, m)) or seen[-1]
    config = loop.TrainConfig(epochs=3 * 64 / len(splits.train), batch_size=64,
                              optimizer="adam", learning_rate=1e-3, progress=False)
    fits = [loop.fit(model, splits.train, loss_fn, config, aux=p_) for p_ in (prior, sharded)]
    loop.place_aux = real_place
    assert {s.data.shape for s in seen[1].deviations.addressable_shards} == {(k, d // 8)}
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(fits[1].state.params))
    out["fit_max_rel"] = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
        for a, b in zip(jax.tree.leaves(fits[0].state.params),
                        jax.tree.leaves(fits[1].state.params)))

    # Below the threshold, or with d not divisible by the devices: replicated.
    small = shard_prior(prior, mesh)                  # default threshold: 2**20 > d
    assert small.deviations.sharding.is_fully_replicated
    odd_spec = ParamSpec.from_params({"backbone": {"w": jnp.zeros((8 * 1000 + 3,))}})
    odd = Prior.lowrank(odd_spec, jnp.zeros(odd_spec.size), jnp.ones(odd_spec.size),
                        jnp.ones((2, odd_spec.size)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        odd = odd.shard(mesh, min_dim=0)
    assert any("not divisible" in str(w.message) for w in caught)
    assert odd.mean.sharding.is_fully_replicated
    return out


def test_sharded_prior_on_eight_devices_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["d"] >= 10_000
    np.testing.assert_allclose(*out["log_prob"], rtol=1e-5)
    np.testing.assert_allclose(*out["rescaled"], rtol=1e-5)
    np.testing.assert_allclose(*out["map_loss"], rtol=1e-5)
    assert out["grad_max_rel"] < 1e-5, out
    for lp1, lp8, grad_rel in out["bf16"]:
        np.testing.assert_allclose(lp1, lp8, rtol=1e-5)
        assert grad_rel < 1e-5, out
    assert out["map_grad_max_rel"] < 1e-4, out
    assert out["fit_max_rel"] < 1e-4, out


if __name__ == "__main__":
    print(json.dumps(_check_on_eight_devices()))
