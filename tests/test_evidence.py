"""Evidence-based λ: the Laplace evidence against dense and closed-form references.

* ``log_evidence`` against the dense formula −½rᵀΣ⁻¹r − ½log|I + ΣH| (every kind, a
  diagonal or a factor curvature, the head integrated out);
* Bayesian linear regression, where the Laplace evidence is the marginal likelihood
  N(y; Xθ̄, XΣ_λXᵀ + σ²I) in closed form: the one training run of
  ``fit_with_evidence`` (the real loop, MAP steps and evidence steps alternating)
  ends at the λ that maximises it, and goes to the no-prior limit when the prior's
  mean is far from the data;
* the GGN factor of a small CNN against Jᵀ(diag p − ppᵀ)J from full Jacobians;
* ``finetune(scale="evidence")`` end to end on digits.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from bayes_transfer import data, models
from bayes_transfer.data import ArrayDataset
from bayes_transfer.inference.evidence import (EvidenceConfig, _curvature_form, fit_with_evidence,
                                               ggn_curvature)
from bayes_transfer.inference.map import FinetuneConfig, finetune
from bayes_transfer.params import HEAD_RULE, ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.prior.evidence import log_evidence, maximise_log_evidence
from bayes_transfer.training import TrainConfig, split_model
from bayes_transfer.training.objectives import prior_penalty
from linear_regression import NOISE, LinearModel, as_images, gaussian_nll, regression
from small_priors import random_lowrank_prior


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _spec(d):
    return ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float64",))


def _priors(d, rng):
    spec = _spec(d)
    mean, var = rng.normal(size=d), rng.uniform(0.2, 2.0, d)
    dev = rng.normal(size=(4, d))
    return {"lowrank": Prior.lowrank(spec, mean, var, dev),
            "lowrank+floor": Prior.lowrank(spec, mean, var, dev, floor=0.05),
            "diag": Prior.diagonal(spec, mean, var, floor=0.01),
            "l2sp": Prior.isotropic(spec, mean, 1.0),
            "l2": Prior.isotropic(spec, None, 0.7, floor=0.1)}


def _dense(prior, theta, hess, lam):
    sigma = np.asarray(prior.rescale(lam).covariance())
    r = theta - np.broadcast_to(np.asarray(prior.mean), theta.shape)
    return -0.5 * (r @ np.linalg.solve(sigma, r)
                   + np.linalg.slogdet(np.eye(len(r)) + sigma @ hess)[1])


@pytest.mark.parametrize("kind", ["lowrank", "lowrank+floor", "diag", "l2sp", "l2"])
def test_log_evidence_matches_the_dense_formula(x64, kind, monkeypatch):
    import bayes_transfer.prior.evidence as ev
    monkeypatch.setattr(ev, "_BLOCK", 8)        # several blocks and a remainder at d = 37
    rng = np.random.default_rng(0)
    d = 37
    prior = _priors(d, rng)[kind]
    theta = rng.normal(size=d)
    h = rng.uniform(0, 5, d)
    g = rng.normal(size=(9, d))
    for lam in (1e-2, 1.0, 30.0):
        np.testing.assert_allclose(log_evidence(prior, theta, h, lam),
                                   _dense(prior, theta, np.diag(h), lam), rtol=1e-10)
        np.testing.assert_allclose(log_evidence(prior, theta, g, lam),
                                   _dense(prior, theta, g.T @ g, lam), rtol=1e-10)
    # the head ψ integrated out under N(ψ*, I/p): the joint evidence less a λ-free term
    gh, p = rng.normal(size=(9, 3)), 0.3
    others = gh @ gh.T / p
    joint = np.zeros((d + 3, d + 3))
    joint[:d, :d] = np.asarray(prior.rescale(2.0).covariance())
    joint[d:, d:] = np.eye(3) / p
    j = np.concatenate([g, gh], 1)
    r = theta - np.broadcast_to(np.asarray(prior.mean), (d,))
    ref = (-0.5 * (r @ np.linalg.solve(joint[:d, :d], r)
                   + np.linalg.slogdet(np.eye(d + 3) + joint @ j.T @ j)[1])
           + 0.5 * np.linalg.slogdet(np.eye(9) + others)[1])
    np.testing.assert_allclose(log_evidence(prior, theta, g, 2.0, others=others), ref,
                               rtol=1e-10)


@pytest.mark.parametrize("kind", ["lowrank", "lowrank+floor", "diag", "l2sp"])
def test_the_search_finds_the_maximum_of_a_dense_scan(x64, kind):
    rng = np.random.default_rng(1)
    d = 23
    prior = _priors(d, rng)[kind]
    theta = np.asarray(prior.mean) + rng.normal(size=d)
    g = rng.normal(size=(11, d))
    step = maximise_log_evidence(prior, theta, g, lower=1e-6, upper=1e6, tol=1e-10)
    assert step.limit is None
    best = optimize.minimize_scalar(lambda t: -_dense(prior, theta, g.T @ g, math.exp(t)),
                                    bracket=(-3.0, 3.0), tol=1e-12)
    np.testing.assert_allclose(step.scale, math.exp(best.x), rtol=1e-6)
    np.testing.assert_allclose(step.log_evidence, -best.fun, rtol=1e-10)
    if kind in ("lowrank", "l2sp"):     # ε = 0: MacKay's fixed point rᵀΣ₀⁻¹r/λ = γ
        np.testing.assert_allclose(step.quad, step.effective_params, rtol=1e-6)


# --------------------------------------------------------------------------- linear-Gaussian
def _gaussian_loss(num_train):
    def loss(apply, params, rest, batch, key, prior):
        pred, rest = apply(params, rest, batch["image"], train=True)
        nll = gaussian_nll(pred, batch)
        return nll + prior_penalty(prior, params, num_train), (rest, {"nll": nll})
    return loss


def _log_marginal(prior, x, y, lam):
    """log N(y; Xθ̄, XΣ_λXᵀ + σ²I): the evidence of Bayesian linear regression."""
    cov = x @ np.asarray(prior.rescale(lam).covariance()) @ x.T + NOISE**2 * np.eye(len(y))
    r = y - x @ np.broadcast_to(np.asarray(prior.mean), (x.shape[1],))
    return -0.5 * (r @ np.linalg.solve(cov, r) + np.linalg.slogdet(2 * np.pi * cov)[1])


def _fit_linear(prior, x, y, evidence: EvidenceConfig, steps_per_update=300):
    n, d = x.shape
    images = as_images(x, y, np.float64)
    dataset = ArrayDataset(images=images.astype(np.float32), labels=np.zeros(n, np.int32),
                           num_classes=1, name="linear")
    # float64 inputs: the dataset stores float32, the test's precision needs float64
    dataset = _Float64Dataset(dataset, images)
    train = TrainConfig(steps=steps_per_update * (evidence.updates + 1), batch_size=n,
                        optimizer="sgd", momentum=0.0, learning_rate=0.1,
                        schedule="constant", progress=False)
    model = LinearModel(d)
    _, params, _ = split_model(model)
    params = prior.init_params(params)
    factor = x / NOISE          # the Hessian of the summed NLL is XᵀX/σ² = GᵀG, exactly
    return fit_with_evidence(model, dataset, _gaussian_loss(n), train, prior,
                             config=evidence, params=params,
                             curvature=lambda res: jnp.asarray(factor))


class _Float64Dataset:
    """An ArrayDataset look-alike whose batches keep float64 inputs (full batch)."""

    def __init__(self, dataset, images):
        self.dataset, self.images = dataset, images
        self.labels, self.num_classes, self.name = dataset.labels, 1, "linear"

    def __len__(self):
        return len(self.dataset)

    def make_batch(self, idx, rng):
        return {"image": self.images[idx], "label": self.labels[idx]}


def test_one_run_ends_at_the_closed_form_evidence_optimum_of_linear_regression(x64):
    rng = np.random.default_rng(3)
    x, y = regression(rng)
    d = x.shape[1]
    spec = _spec(d)
    prior = Prior.lowrank(spec, rng.normal(size=d) * 0.5, rng.uniform(0.2, 1.0, d),
                          rng.normal(size=(3, d)) * 0.5)
    best = optimize.minimize_scalar(lambda t: -_log_marginal(prior, x, y, math.exp(t)),
                                    bracket=(-3.0, 3.0), tol=1e-12)
    lam_star = math.exp(best.x)
    assert 1e-2 < lam_star < 1e2       # an interior optimum, not an end of the search
    config = EvidenceConfig(updates=12, init_variance=1.0, min_variance=1e-2,
                            max_variance=1e4)
    result, scale, trace = _fit_linear(prior, x, y, config)
    assert len(trace) == config.updates + 1 and not trace[-1]["applied"]
    np.testing.assert_allclose(scale, lam_star, rtol=1e-4)
    np.testing.assert_allclose(trace[-1]["scale"], lam_star, rtol=1e-4)
    # and the weights are the posterior mean at λ*
    sigma = np.asarray(prior.rescale(lam_star).covariance())
    precision = x.T @ x / NOISE**2 + np.linalg.inv(sigma)
    post = np.linalg.solve(precision, x.T @ y / NOISE**2
                           + np.linalg.solve(sigma, np.asarray(prior.mean)))
    np.testing.assert_allclose(np.asarray(_spec(d).ravel(result.params, jnp.float64)), post,
                               rtol=1e-5, atol=1e-7)


def test_a_prior_far_from_the_data_goes_to_the_no_prior_limit(x64):
    rng = np.random.default_rng(4)
    x, y = regression(rng)
    d = x.shape[1]
    far = np.full(d, 300.0)
    prior = Prior.lowrank(_spec(d), far, rng.uniform(0.2, 1.0, d), rng.normal(size=(3, d)))
    # the closed-form optimum is a prior broader than the search allows
    best = optimize.minimize_scalar(lambda t: -_log_marginal(prior, x, y, math.exp(t)),
                                    bracket=(0.0, 5.0), tol=1e-12)
    assert math.exp(best.x) > 1e4
    config = EvidenceConfig(updates=4, min_variance=1e-2, max_variance=1e4)
    result, scale, trace = _fit_linear(prior, x, y, config)
    assert math.isinf(scale)
    assert [t["limit"] for t in trace] == ["upper"] * len(trace)
    ols = np.linalg.lstsq(x, y, rcond=None)[0]           # no prior: least squares
    np.testing.assert_allclose(np.asarray(_spec(d).ravel(result.params, jnp.float64)), ols,
                               rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- networks
@pytest.fixture(scope="module")
def splits():
    return data.load("digits", shots_per_class=5, seed=0)


def test_the_ggn_factor_is_j_transpose_softmax_hessian_j(splits):
    model = models.create("small_cnn", 10, seed=0, width=0.25)
    graphdef, params, rest = split_model(model)
    spec = ParamSpec.from_params(params)
    head = ParamSpec.from_params(params, HEAD_RULE)
    subset = splits.train.subset(np.arange(3))
    from bayes_transfer.training import TrainResult, TrainState, make_apply
    result = TrainResult(graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, None),
                         [])
    g, gh = ggn_curvature(result, subset, spec, head_spec=head, batch_size=2)
    diag = ggn_curvature(result, subset, spec, form="diag", batch_size=2)
    assert g.shape == (3 * 10, spec.size) and gh.shape == (3 * 10, head.size)
    np.testing.assert_allclose(diag, jnp.sum(g * g, 0), rtol=1e-4, atol=1e-9)
    apply = make_apply(graphdef)
    x = next(iter(data.batches(subset, 3, seed=0, epoch=0, shuffle=False)))["image"]
    ref = 0.0
    for i in range(3):
        def logits(theta):
            return apply(spec.replace(params, theta), rest, x[i:i + 1], train=False)[0][0]
        theta = spec.ravel(params)
        jac = np.asarray(jax.jacobian(logits)(theta), np.float64)      # (C, d)
        p = np.asarray(jax.nn.softmax(logits(theta)), np.float64)
        ref = ref + jac.T @ ((np.diag(p) - np.outer(p, p)) @ jac)
    approx = np.asarray(g, np.float64).T @ np.asarray(g, np.float64)
    np.testing.assert_allclose(approx, ref, atol=1e-5 * np.abs(ref).max())
    # S sampled labels per example: rows (e_y − p)ᵀJ/√S
    assert ggn_curvature(result, subset, spec, samples=2, batch_size=2).shape == (6, spec.size)


def test_auto_curvature_is_the_exact_factor_then_sampled_labels_then_the_diagonal():
    config = EvidenceConfig()                                # max_rows = 1024
    assert _curvature_form(config, 50, 5, 131_000, 0.0) == ("factor", 0)      # 250 rows
    assert _curvature_form(config, 500, 10, 131_000, 0.0) == ("factor", 2)    # 2 per example
    assert _curvature_form(config, 27_000, 5, 131_000, 0.0) == ("diag", 0)
    assert _curvature_form(config, 50, 5, 131_000, 1e-3) == ("diag", 0)       # + plain L2
    assert _curvature_form(config, 50, 5, 10**8, 0.0) == ("diag", 0)          # 1 GiB cap


def test_finetune_learns_the_scale_in_one_run_on_digits(splits):
    prior = random_lowrank_prior()
    config = FinetuneConfig(train=TrainConfig(steps=12, batch_size=16, optimizer="adam",
                                              learning_rate=1e-3, progress=False),
                            evidence=EvidenceConfig(updates=3))
    res = finetune(models.create("small_cnn", 10, seed=0, width=0.5), splits, prior,
                   "lowrank", scale="evidence", config=config)
    trace = res.evidence_trace
    assert [t["step"] for t in trace] == [3, 6, 9, 12]
    assert [t["applied"] for t in trace] == [True, True, True, False]
    assert res.scale == trace[-2]["scale"] and 0 < res.scale
    base = float(jnp.mean(prior.base_variance()))
    assert all(1e-8 <= t["variance"] / 1.0001 and (t["scale"] == math.inf or
               t["variance"] <= 1e6 * 1.0001) for t in trace)
    assert all(math.isfinite(t["log_evidence"]) for t in trace)
    np.testing.assert_allclose(trace[-2]["variance"], trace[-2]["scale"] * base, rtol=1e-6)
    assert res.result.history[-1]["step"] == 12          # one run, not a sweep
    assert len(res.sweep) == 1 and set(res.metrics) >= {"error", "nll", "ece"}
    # a method without a prior strength is one plain run
    flat = finetune(models.create("small_cnn", 10, seed=0, width=0.5), splits, prior,
                    "standard", scale="evidence", config=config)
    assert math.isinf(flat.scale) and flat.evidence_trace == []
