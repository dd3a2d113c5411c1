"""λ by the data-emphasized ELBO: its pieces against NumPyro and dense references, its
one training run against the closed-form optimum of Bayesian linear regression.

* ``Prior.inverse_trace`` and ``Prior.inverse_diagonal`` (Woodbury) against the dense inverse;
* ``profile_kl`` against NumPyro's multivariate-normal KL minimised over λ numerically;
* the real loop (``fit_with_elbo``: one weight sample per step, Adam) on a linear model
  with a Gaussian likelihood, where the optimum of κ·E_q[log p(y|θ)] − KL(q‖p_λ) over
  (m, σ, λ) solves three closed-form equations: it ends there, at κ = d/n and at κ = 1;
* ``finetune(scale="de-elbo")`` end to end on digits, where the plain ELBO (κ = 1)
  learns a far stronger prior than the data-emphasized one (the paper's point).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import optimize

from bayes_transfer import BayesTransferError, data, models
from bayes_transfer.data import ArrayDataset
from bayes_transfer.inference import ElboConfig
from bayes_transfer.inference.elbo import block_profile_kl, fit_with_elbo, profile_kl
from bayes_transfer.params import backbone_blocks
from bayes_transfer.inference.map import FinetuneConfig, finetune
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.training import TrainConfig, predict, split_model
from linear_regression import NOISE, LinearModel, as_images, gaussian_nll, regression
from small_priors import random_lowrank_prior


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _priors(d, rng, dtype="float64"):
    spec = ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=(dtype,))
    mean, var = rng.normal(size=d), rng.uniform(0.2, 2.0, d)
    dev = rng.normal(size=(4, d))
    return {"lowrank": Prior.lowrank(spec, mean, var, dev),
            "lowrank+floor": Prior.lowrank(spec, mean, var, dev, floor=0.05),
            "diag": Prior.diagonal(spec, mean, var),
            "l2sp": Prior.isotropic(spec, mean, 1.0)}


@pytest.mark.parametrize("kind", ["lowrank", "lowrank+floor", "diag", "l2sp"])
def test_inverse_trace_is_the_trace_of_the_dense_inverse(x64, kind):
    prior = _priors(9, np.random.default_rng(0))[kind].rescale(0.3)
    dense = np.asarray(prior.covariance())
    np.testing.assert_allclose(float(prior.inverse_trace()), np.trace(np.linalg.inv(dense)),
                               rtol=1e-10)
    np.testing.assert_allclose(np.asarray(prior.inverse_diagonal()),
                               np.diag(np.linalg.inv(dense)), rtol=1e-10)
    # the DE-ELBO's t leaves the floor out: λ·Σ₀ is the covariance whose scale is learned
    dense = np.asarray(prior.rescale(1.0, floor=0.0).covariance())
    np.testing.assert_allclose(float(prior.rescale(1.0, floor=0.0).inverse_trace()),
                               np.trace(np.linalg.inv(dense)), rtol=1e-10)


def test_the_blocked_weighted_gram_is_the_dense_product():
    from bayes_transfer.prior.woodbury import _GRAM_BLOCK, weighted_gram
    rng = np.random.default_rng(2)
    d = 2 * _GRAM_BLOCK + 123                    # two full blocks and a remainder
    dev, w = rng.normal(size=(3, d)).astype(np.float32), rng.uniform(0.5, 2, d)
    np.testing.assert_allclose(np.asarray(weighted_gram(jnp.asarray(dev, jnp.bfloat16),
                                                        jnp.asarray(w, jnp.float32))),
                               (np.asarray(jnp.asarray(dev, jnp.bfloat16), np.float64) * w)
                               @ np.asarray(jnp.asarray(dev, jnp.bfloat16), np.float64).T,
                               rtol=1e-4)


@pytest.mark.parametrize("kind", ["lowrank", "diag", "l2sp"])
def test_profile_kl_is_numpyros_kl_minimised_over_lambda(x64, kind):
    rng = np.random.default_rng(1)
    d = 7
    prior = _priors(d, rng)[kind]
    m, std = rng.normal(size=d), 0.3
    sigma0 = np.asarray(prior.covariance())
    q = dist.MultivariateNormal(jnp.asarray(m), std**2 * jnp.eye(d))

    def kl(log_lam):
        p = dist.MultivariateNormal(jnp.asarray(prior.mean), math.exp(log_lam) * sigma0)
        return float(dist.kl_divergence(q, p))

    best = optimize.minimize_scalar(kl, bracket=(-3.0, 3.0), tol=1e-12)
    value, lam = profile_kl(prior.quadratic(jnp.asarray(m)), prior.inverse_trace(), std, d)
    np.testing.assert_allclose(float(lam), math.exp(best.x), rtol=1e-5)
    # profile_kl leaves out the constant ½·log|Σ₀|
    np.testing.assert_allclose(float(value) + 0.5 * np.linalg.slogdet(sigma0)[1], best.fun,
                               rtol=1e-9)


@pytest.mark.parametrize("kind", ["lowrank", "diag"])
def test_block_profile_kl_is_numpyros_kl_at_per_block_scales(x64, kind):
    rng = np.random.default_rng(4)
    d, ids = 9, np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    prior = _priors(d, rng)[kind]
    m, std, log_rel = rng.normal(size=d), 0.3, rng.normal(size=3)
    sigma0 = np.asarray(prior.covariance())
    inv_diag = np.diag(np.linalg.inv(sigma0))
    traces = np.bincount(ids, inv_diag)
    sizes = np.bincount(ids).astype(float)
    u = (m - np.asarray(prior.mean)) * np.exp(-0.5 * log_rel)[ids]
    quad_u = float(prior.quadratic(jnp.asarray(np.asarray(prior.mean) + u)))
    value, lam = block_profile_kl(quad_u, jnp.asarray(traces), jnp.asarray(sizes),
                                  jnp.asarray(log_rel), std, d)
    q = dist.MultivariateNormal(jnp.asarray(m), std**2 * jnp.eye(d))

    def kl(log_lam):         # the KL at R scaled by exp(log_lam): min over it is value
        r_half = np.sqrt(np.exp(log_lam + log_rel)[ids])
        cov = r_half[:, None] * sigma0 * r_half[None, :]
        return float(dist.kl_divergence(q, dist.MultivariateNormal(jnp.asarray(prior.mean)
                                                                   * jnp.ones(d), cov)))

    best = optimize.minimize_scalar(kl, bracket=(-3.0, 3.0), tol=1e-12)
    np.testing.assert_allclose(float(lam), math.exp(best.x), rtol=1e-5)
    np.testing.assert_allclose(float(value) + 0.5 * np.linalg.slogdet(sigma0)[1], best.fun,
                               rtol=1e-9)
    if kind == "diag":       # block-diagonal Σ₀: the per-block optimum in closed form
        res = optimize.minimize(lambda z: float(block_profile_kl(
            float(prior.quadratic(jnp.asarray(np.asarray(prior.mean) + (m - np.asarray(
                prior.mean)) * np.exp(-0.5 * z)[ids]))), jnp.asarray(traces),
            jnp.asarray(sizes), jnp.asarray(z), std, d)[0]), np.zeros(3), tol=1e-12)
        z = res.x
        u = (m - np.asarray(prior.mean)) * np.exp(-0.5 * z)[ids]
        _, lam = block_profile_kl(float(prior.quadratic(jnp.asarray(np.asarray(prior.mean)
                                                                    + u))),
                                  jnp.asarray(traces), jnp.asarray(sizes), jnp.asarray(z),
                                  std, d)
        r = (m - np.asarray(prior.mean)) ** 2 * inv_diag
        want = (std**2 * traces + np.bincount(ids, r)) / sizes
        np.testing.assert_allclose(float(lam) * np.exp(z), want, rtol=1e-4)


# --------------------------------------------------------------------------- linear-Gaussian
def _closed_form(prior, x, y, kappa):
    """The joint optimum (m, σ, λ) of the DE-ELBO of linear regression, by iterating its
    three stationarity equations (each an exact coordinate maximisation)."""
    d = x.shape[1]
    a = x.T @ x / NOISE**2
    p = np.linalg.inv(np.asarray(prior.rescale(1.0, floor=0.0).covariance(), np.float64))
    mu = np.asarray(prior.mean, np.float64)
    t, lam = np.trace(p), 1.0
    for _ in range(5000):
        m = np.linalg.solve(kappa * a + p / lam, kappa * x.T @ y / NOISE**2 + p @ mu / lam)
        var = d / (kappa * np.trace(a) + t / lam)
        lam = (var * t + (m - mu) @ p @ (m - mu)) / d
    return m, math.sqrt(var), lam


@pytest.mark.parametrize("kappa", [None, 1.0])
def test_one_run_ends_at_the_closed_form_optimum_of_linear_regression(kappa):
    rng = np.random.default_rng(3)
    x, y = regression(rng)
    n, d = x.shape
    spec = ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float32",))
    prior = Prior.lowrank(spec, jnp.asarray(rng.normal(size=d) * 0.5, jnp.float32),
                          jnp.asarray(rng.uniform(0.2, 1.0, d), jnp.float32),
                          jnp.asarray(rng.normal(size=(3, d)) * 0.5, jnp.float32))
    dataset = ArrayDataset(images=as_images(x, y), labels=np.zeros(n, np.int32),
                           num_classes=1, name="linear")
    train = TrainConfig(steps=3000, batch_size=n, optimizer="adam", learning_rate=0.02,
                        schedule="cosine", progress=False)
    model = LinearModel(d)
    _, params, _ = split_model(model)
    config = ElboConfig(kappa=kappa, init_std=0.01, std_learning_rate=0.02)
    result, scale, trace = fit_with_elbo(model, dataset, train, prior, config=config,
                                         params=prior.init_params(params),
                                         nll_fn=gaussian_nll)
    want_m, want_std, want_lam = _closed_form(prior, x, y, d / n if kappa is None else kappa)
    assert trace[-1]["kappa"] == pytest.approx(d / n if kappa is None else 1.0)
    np.testing.assert_allclose(np.asarray(spec.ravel(result.params)), want_m, atol=0.02)
    np.testing.assert_allclose(trace[-1]["std"], want_std, rtol=0.03)
    np.testing.assert_allclose(scale, want_lam, rtol=0.03)


# --------------------------------------------------------------------------- networks
@pytest.fixture(scope="module")
def digits():
    return data.load("digits", shots_per_class=5, seed=0), random_lowrank_prior()


def _config(kappa=None, steps=60, **changes):
    return FinetuneConfig(train=TrainConfig(steps=steps, batch_size=16, optimizer="adam",
                                            learning_rate=1e-3, progress=False),
                          elbo=ElboConfig(kappa=kappa), **changes)


def test_finetune_learns_the_scale_in_one_run_and_the_elbo_underfits(digits):
    splits, prior = digits
    fresh = lambda: models.create("small_cnn", 10, seed=0, width=0.5)  # noqa: E731
    res = finetune(fresh(), splits, prior, "lowrank", scale="de-elbo", config=_config())
    trace = res.evidence_trace
    assert res.budget == 1 and res.result.history[-1]["step"] == 60   # one run
    assert trace[-1]["step"] == 60 and res.scale == trace[-1]["scale"]
    assert 0 < res.scale < math.inf and trace[-1]["kappa"] == prior.dim / len(splits.train)
    assert all(t["std"] > 0 for t in trace)
    # the result holds q's mean as plain model parameters: predict works on it
    assert predict(res.result, splits.test).shape == (len(splits.test), 10)
    assert set(res.metrics) >= {"error", "nll", "ece"}
    # κ = 1, the plain ELBO: the KL outweighs n examples, a much stronger prior
    plain = finetune(fresh(), splits, prior, "lowrank", scale="de-elbo", config=_config(1.0))
    assert plain.scale < res.scale / 5 and plain.metrics["error"] > res.metrics["error"]
    # a method without a prior strength is one plain run
    flat = finetune(fresh(), splits, prior, "standard", scale="de-elbo",
                    config=_config(steps=6))
    assert math.isinf(flat.scale) and flat.evidence_trace == []


def test_per_block_scales_are_learned_for_every_backbone_block(digits):
    splits, prior = digits
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    config = dataclasses.replace(_config(steps=20), elbo=ElboConfig(per_block=True))
    res = finetune(model, splits, prior, "diag", scale="de-elbo", config=config)
    end = res.evidence_trace[-1]
    _, params, _ = split_model(models.create("small_cnn", 10, seed=0, width=0.5))
    assert list(end["block_scales"]) == [b for b, _ in backbone_blocks(params)]
    scales = np.array(list(end["block_scales"].values()))
    assert np.all(np.isfinite(scales) & (scales > 0)) and np.ptp(scales) > 0
    assert predict(res.result, splits.test).shape == (len(splits.test), 10)


def test_de_elbo_refuses_what_it_cannot_do(digits):
    splits, prior = digits
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    with pytest.raises(BayesTransferError, match="layer_lr"):
        finetune(model, splits, prior, "diag", scale="de-elbo", config=_config(layer_lr=0.1))
    with pytest.raises(BayesTransferError, match="kappa must be > 0"):
        finetune(model, splits, prior, "diag", scale="de-elbo", config=_config(kappa=-1.0))
    with pytest.raises(BayesTransferError, match="'auto', 'evidence' or 'de-elbo'"):
        finetune(model, splits, prior, "diag", scale="elbo", config=_config())
