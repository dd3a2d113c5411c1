"""SGLD: exactness against closed-form posteriors, temperature, cyclical schedule, the loop.

Tolerances are derived, not guessed: every Monte Carlo estimate is compared within
k = 4 standard errors, with the standard error from the autocorrelation-corrected
effective sample size (NumPyro's ESS over many independent chains), plus the known
O(η) bias of the Euler–Maruyama discretisation (computed exactly for Gaussian targets).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numpyro.diagnostics import effective_sample_size

from bayes_transfer.data import ArrayDataset
from bayes_transfer.inference.sgld import (SGLDConfig, SGLDState, cyclical_sgld,
                                           cyclical_sgld_schedule, run_sgld, sgld,
                                           sgld_collection_steps)
from bayes_transfer.training.objectives import map_loss
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior, prior_preconditioner
from bayes_transfer.training import TrainConfig, fit, split_model

K_SIGMA = 4.0


def _run_chains(loss, tx, params0, keys, *, burnin, draws, thin, precond=None):
    """Parallel chains (vmap over keys) of full-batch SGLD in one jitted scan.

    Returns the draws, a pytree with leaves of shape (chains, draws, ...).
    """
    grad = jax.grad(loss)

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(grad(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    def chain(key):
        state = SGLDState(jnp.zeros((), jnp.int32), key, precond)
        carry = jax.lax.scan(step, (params0, state), None, length=burnin)[0]

        def draw(carry, _):
            carry = jax.lax.scan(step, carry, None, length=thin)[0]
            return carry, carry[0]

        return jax.lax.scan(draw, carry, None, length=draws)[1]

    return jax.jit(jax.vmap(chain))(keys)


def _mean_and_se(x):
    """Mean over (chains, draws) of x (chains, draws, ...) and its ESS-based SE."""
    x = np.asarray(x, np.float64)
    ess = np.asarray(effective_sample_size(x))
    sd = x.reshape(-1, *x.shape[2:]).std(axis=0)
    return x.mean(axis=(0, 1)), sd / np.sqrt(ess), ess


# --------------------------------------------------------------------------- (1) exactness
def test_sgld_matches_linear_gaussian_posterior():
    d, n, noise = 3, 50, 0.5
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + noise * rng.normal(size=n)
    mu0, s0 = np.full(d, 0.3), 1.0

    params0 = {"w": jnp.zeros(d, jnp.float32)}
    spec = ParamSpec.from_params(params0, rule="^w$")
    prior = Prior.isotropic(spec, mean=jnp.asarray(mu0, jnp.float32), var=s0 ** 2)
    Xj, yj = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)

    def loss(p):   # the loop's loss: mean NLL − log p(θ)/N  (= U/N)
        nll = jnp.mean((yj - Xj @ p["w"]) ** 2) / (2 * noise ** 2)
        return nll - prior.log_prob(p) / n

    # Closed form: precision A, mean A⁻¹b.
    A = X.T @ X / noise ** 2 + np.eye(d) / s0 ** 2
    b = X.T @ y / noise ** 2 + mu0 / s0 ** 2
    post_mean, post_cov = np.linalg.solve(A, b), np.linalg.inv(A)
    lam, Q = np.linalg.eigh(A)
    eps = 0.02 / lam.max()                       # ε = η/N: ε·λ_max = 0.02
    lr = eps * n
    # Euler–Maruyama's exact stationary law for a Gaussian target: same mean,
    # covariance Q diag(1/(λ(1 − ελ/2))) Qᵀ; the difference is the O(η) bias allowed.
    em_cov = Q @ np.diag(1 / (lam * (1 - eps * lam / 2))) @ Q.T
    bias = np.abs(em_cov - post_cov)
    burnin = int(math.ceil(10 / (eps * lam.min())))   # (1 − ελ_min)^burnin < e^-10

    tx = sgld(lr, num_train=n, temperature=1.0)
    keys = jax.random.split(jax.random.PRNGKey(1), 128)
    draws = _run_chains(loss, tx, params0, keys, burnin=burnin, draws=400, thin=50)["w"]
    draws = np.asarray(draws, np.float64)                      # (chains, draws, d)

    mean, se_mean, ess = _mean_and_se(draws)
    assert ess.min() > 2000, ess                              # the check has power
    np.testing.assert_array_less(np.abs(mean - post_mean), K_SIGMA * se_mean)

    centred = draws - mean
    products = centred[..., :, None] * centred[..., None, :]   # (chains, draws, d, d)
    cov, se_cov, _ = _mean_and_se(products)
    np.testing.assert_array_less(np.abs(cov - post_cov), K_SIGMA * se_cov + bias)
    # And the tolerance is tight: a few percent of the posterior standard deviations.
    sd = np.sqrt(np.diag(post_cov))
    assert np.all(K_SIGMA * np.diag(se_cov) + np.diag(bias) < 0.1 * sd ** 2)


# --------------------------------------------------------------------------- (2) temperature
def _stationary_variance(temperature, seed, *, precond=None, sigma2=0.5, n=100, eh=0.01):
    """SGLD on U(θ) = θ²/(2σ²) (loss U/N): sample variance, its SE, and ε·h."""
    eps = eh * sigma2 / (1.0 if precond is None else precond)   # ε·h·m = eh
    tx = sgld(eps * n, num_train=n, temperature=temperature)

    def loss(p):
        return p["x"] ** 2 / (2 * sigma2 * n)

    keys = jax.random.split(jax.random.PRNGKey(seed), 512)
    m = None if precond is None else {"x": jnp.float32(precond)}
    draws = _run_chains(loss, tx, {"x": jnp.float32(0.0)}, keys, burnin=int(12 / eh),
                        draws=800, thin=10, precond=m)["x"]
    x = np.asarray(draws, np.float64)
    var, se, _ = _mean_and_se(x ** 2)     # the target's mean is exactly 0
    return float(var), float(se)


@pytest.mark.parametrize("precond", [None, 0.25])
def test_stationary_variance_is_the_tempered_targets(precond):
    sigma2, eh = 0.5, 0.01
    var1, se1 = _stationary_variance(1.0, 0, precond=precond, sigma2=sigma2, eh=eh)
    var2, se2 = _stationary_variance(2.0, 1, precond=precond, sigma2=sigma2, eh=eh)
    # Discretisation bias: stationary variance T·σ²/(1 − εh/2), 0.5% at εh = 0.01.
    bias = eh / 2
    tol1 = K_SIGMA * se1 / (1.0 * sigma2) + bias
    assert tol1 < 0.1                                   # within 10%, derived
    assert abs(var1 / sigma2 - 1) < tol1, (var1, tol1)
    tol2 = K_SIGMA * se2 / (2.0 * sigma2) + bias
    assert abs(var2 / (2 * sigma2) - 1) < tol2, (var2, tol2)
    ratio_tol = K_SIGMA * math.hypot(se1 / var1, se2 / var2)
    assert abs(var2 / var1 - 2) < 2 * ratio_tol, var2 / var1


def test_zero_temperature_is_sgd_and_noise_scale_is_exact():
    g = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
    p = jax.tree.map(jnp.zeros_like, g)
    sgd_updates, _ = optax.sgd(0.1).update(g, optax.sgd(0.1).init(p), p)
    tx0 = sgld(0.1, num_train=10, temperature=0.0)
    updates, state = tx0.update(g, tx0.init(p), p)
    jax.tree.map(np.testing.assert_allclose, updates, sgd_updates)
    assert int(state.count) == 1
    # Noise: θ' − θ + η·g = √(2ηT/N)·ξ, ξ standard normal (checked on many coordinates).
    big = {"w": jnp.zeros(200_000)}
    tx = sgld(0.3, num_train=50, temperature=2.0, seed=3)
    upd, _ = tx.update(big, tx.init(big), big)
    sd = float(jnp.std(upd["w"]))
    expected = math.sqrt(2 * 0.3 * 2.0 / 50)
    assert abs(sd / expected - 1) < K_SIGMA * math.sqrt(0.5 / 200_000)


# --------------------------------------------------------------------------- (3) cyclical
def test_cyclical_schedule_shape_noise_and_collection_points():
    s = cyclical_sgld_schedule(0.1, 10, exploration_fraction=0.5)
    counts = jnp.arange(30)
    lr = np.asarray(s(counts))
    np.testing.assert_allclose(lr[0], 0.1)
    np.testing.assert_allclose(lr[5], 0.05, rtol=1e-6)               # half-way: cos = 0
    np.testing.assert_allclose(lr[:10], lr[10:20], rtol=1e-6)        # periodic
    assert np.all(np.diff(lr[:10]) < 0) and lr[9] < 0.003            # cosine to ~0
    np.testing.assert_allclose(lr[:10], 0.05 * (np.cos(np.pi * np.arange(10) / 10) + 1),
                               rtol=1e-5)
    noise = np.asarray(s.noise(counts))
    np.testing.assert_array_equal(noise[:10], [0] * 5 + [1] * 5)     # explore, then sample
    assert s.sample_steps(3) == [9, 19, 29]                          # end of each cycle
    assert np.asarray(s.is_sample_step(counts)).nonzero()[0].tolist() == [9, 19, 29]

    m = cyclical_sgld_schedule(0.1, 10, exploration_fraction=0.2, samples_per_cycle=2)
    assert m.sample_positions() == [5, 9]                            # sampling phase 2..9
    config = SGLDConfig(cycle_steps=10, exploration_fraction=0.2, samples_per_cycle=2,
                        burnin_cycles=1)
    assert sgld_collection_steps(config, 3) == [15, 19, 25]
    constant = SGLDConfig(schedule="constant", cycle_steps=7, burnin_cycles=2)
    assert sgld_collection_steps(constant, 3) == [20, 27, 34]

    # In the exploration phase the update is plain SGD (no noise).
    tx = cyclical_sgld(0.1, 10, num_train=5, exploration_fraction=0.5)
    p = {"w": jnp.zeros(1000)}
    g = {"w": jnp.ones(1000)}
    state = tx.init(p)
    upd, state = tx.update(g, state, p)
    np.testing.assert_allclose(upd["w"], -0.1)
    state = state._replace(count=jnp.int32(6))
    upd, _ = tx.update(g, state, p)
    assert float(jnp.std(upd["w"])) > 0.5 * math.sqrt(2 * float(s(6)) / 5)


# --------------------------------------------------------------------------- in the loop
class _Backbone(nnx.Module):
    def __init__(self, *, rngs):
        self.dense = nnx.Linear(16, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)   # as the project's models

    def __call__(self, x, *, train=False):
        h = self.dense(x.reshape(x.shape[0], -1))
        return nnx.relu(self.bn(h, use_running_average=not train))


class _Tiny(nnx.Module):
    def __init__(self, num_classes=3, *, rngs):
        self.backbone = _Backbone(rngs=rngs)
        self.head = nnx.Linear(8, num_classes, rngs=rngs)

    def features(self, x, *, train=False):
        return self.backbone(x, train=train)

    def __call__(self, x, *, train=False):
        return self.head(self.features(x, train=train))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    images = rng.uniform(0, 0.3, (40, 4, 4, 1)).astype(np.float32)
    images[np.arange(40), labels, 0, 0] += 0.7
    data = ArrayDataset(images, labels, num_classes=3, name="synthetic")
    model = _Tiny(rngs=nnx.Rngs(0))
    _, params, _ = split_model(model)
    spec = ParamSpec.from_params(params)
    var = jnp.asarray(rng.uniform(1e-3, 1e-2, spec.size), jnp.float32)
    prior = Prior.diagonal(spec, spec.ravel(params), var)
    return model, data, prior


def test_sgld_in_fit_differs_by_seed_and_is_reproducible(tiny):
    model, data, prior = tiny
    loss = map_loss(len(data), head_decay=1e-3)
    config = TrainConfig(epochs=2, batch_size=10, progress=False)

    def run(tx):
        result = fit(model, data, loss, config, aux=prior, optimizer=tx)
        assert int(result.state.opt_state.count) == 8
        return np.asarray(result.state.params["head"]["kernel"][...])

    tx0 = sgld(1e-2, num_train=len(data), seed=0)
    a, b, a2 = run(tx0), run(sgld(1e-2, num_train=len(data), seed=1)), run(tx0)
    np.testing.assert_array_equal(a, a2)
    assert np.all(np.isfinite(a)) and np.abs(a - b).max() > 1e-4


def test_run_sgld_collects_at_cycle_ends_and_streams_to_disk(tiny, tmp_path):
    model, data, prior = tiny
    config = SGLDConfig(learning_rate=1e-2, cycle_steps=4, burnin_cycles=1, batch_size=10,
                        progress=False)
    samples = run_sgld(model, data, prior, config, num_samples=3, max_in_memory=1,
                       sample_dir=tmp_path, refresh_bn=True, bn_batches=3)
    assert len(samples) == 3 and samples.steps == [7, 11, 15]
    assert len(samples.files) == 2 and all(f.exists() for f in samples.files)
    kernels = [np.asarray(p["head"]["kernel"][...]) for p, _ in samples]
    assert all(np.all(np.isfinite(k)) for k in kernels)
    assert np.abs(kernels[1] - kernels[2]).max() > 1e-5         # the chain moves
    # One chain across the fit calls: the SGLD state (key, step count: the schedule's
    # phase) is handed on, so the count is the total, not the last segment's 4 steps.
    assert samples.info["chain_count"] == 16
    p, rest = samples[2]
    assert jax.tree.structure(rest) == jax.tree.structure(split_model(model)[2])
    # Preconditioner: the prior's relative variances on the backbone, 1 on the head.
    m = prior_preconditioner(prior, split_model(model)[1])
    assert float(jnp.max(m["backbone"]["dense"]["kernel"][...])) == pytest.approx(1.0)
    np.testing.assert_array_equal(m["head"]["kernel"][...], 1.0)
