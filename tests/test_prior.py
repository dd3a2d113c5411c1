"""Prior against independent references: NumPyro built from the raw arrays, dense SciPy.

Every reference here is computed from the SWAG arrays with the DESIGN formula

    Σ = λ·(½·diag(var) + ½·D̂ᵀD̂/(K − 1)) + ε·I       (K − 1 taken as 1 when K = 1)

and never through the Prior's own helpers (``as_numpyro`` and ``covariance`` are
checked against the references, not used as them). The module runs in float64
(``jax.enable_x64`` for this module only; tests that need float32 switch it off).
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
import scipy.stats

from bayes_transfer.errors import PriorError, SpecMismatchError
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior

D = 13
SCALES = (1e-3, 1.0, 1e4)
FLOORS = (0.0, 0.1)
KINDS = ("lowrank1", "lowrank2", "lowrank5", "diag", "l2", "l2sp", "iso_swag", "flat")


@pytest.fixture(autouse=True, scope="module")
def x64():
    """float64 for this module only: the config is restored at teardown."""
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------- fixtures
def make_params(seed: int, dtype=np.float64) -> dict:
    """Backbone leaves of 8 + 2 + 3 = 13 scalars and a head that priors must ignore."""
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.normal(size=s).astype(dtype)  # noqa: E731
    return {"backbone": {"block": {"kernel": n(2, 2, 2), "bias": n(2)},
                         "norm": {"scale": n(3)}},
            "head": {"kernel": n(3, 2), "bias": n(2)}}


def ref_ravel(tree) -> np.ndarray:
    """The covered leaves in sorted-path order, written out by hand."""
    b = tree["backbone"]
    return np.concatenate([np.ravel(b["block"]["bias"]), np.ravel(b["block"]["kernel"]),
                           np.ravel(b["norm"]["scale"])]).astype(np.float64)


def swag_arrays(seed: int, rank: int, d: int = D):
    rng = np.random.default_rng(100 + seed)
    mean = rng.normal(size=d)
    var = rng.uniform(0.05, 1.0, size=d)
    deviations = 0.5 * rng.normal(size=(rank, d))
    return mean, var, deviations


def build(kind: str, spec: ParamSpec, lam: float, floor: float):
    """(prior, reference mean (d,), reference covariance (d, d) or None for flat)."""
    d = spec.size
    rank = int(kind[-1]) if kind.startswith("lowrank") else 5
    mean, var, dev = swag_arrays(rank, rank, d)
    swag = Prior.lowrank(spec, mean, var, dev, scale=lam, floor=floor)
    eye = np.eye(d)
    if kind.startswith("lowrank"):
        cov = lam * (0.5 * np.diag(var) + 0.5 * dev.T @ dev / max(rank - 1, 1)) + floor * eye
        return swag, mean, cov
    if kind == "diag":
        prior = Prior.diagonal(spec, mean, var, scale=lam, floor=floor)
        return prior, mean, lam * np.diag(var) + floor * eye
    if kind == "l2":
        prior = swag.for_method("l2").rescale(lam, floor)
        return prior, np.zeros(d), (lam + floor) * eye
    if kind == "l2sp":
        prior = swag.for_method("l2sp").rescale(lam, floor)
        return prior, mean, (lam + floor) * eye
    if kind == "iso_swag":
        avg = np.mean(0.5 * var + 0.5 * np.sum(dev ** 2, axis=0) / (rank - 1))
        return swag.for_method("isotropic"), mean, (lam * avg + floor) * eye
    if kind == "flat":
        return swag.for_method("standard"), mean, None
    raise AssertionError(kind)


def numpyro_reference(kind, spec, lam, floor, mean, cov):
    """LowRankMultivariateNormal from the raw arrays (a zero factor for diagonal kinds)."""
    d = spec.size
    rank = int(kind[-1]) if kind.startswith("lowrank") else 5
    _, var, dev = swag_arrays(rank, rank, d)
    if kind.startswith("lowrank"):
        factor = math.sqrt(lam / (2 * max(rank - 1, 1))) * dev.T
        diag = 0.5 * lam * var + floor
    else:
        factor = np.zeros((d, 1))
        diag = np.diag(cov).copy()
    return dist.LowRankMultivariateNormal(jnp.asarray(mean), jnp.asarray(factor),
                                          jnp.asarray(diag))


# Jitted once per prior structure and shared by the tests (the prior is an argument).
_value_and_grad = jax.jit(lambda prior, x: jax.value_and_grad(prior.log_prob)(x))


@pytest.fixture(scope="module")
def spec():
    return ParamSpec.from_params(make_params(0))


# ---------------------------------------------------------------------- log_prob
@pytest.mark.parametrize("floor", FLOORS)
@pytest.mark.parametrize("lam", SCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_and_grad_match_references(kind, lam, floor, spec):
    prior, mean, cov = build(kind, spec, lam, floor)
    assert prior.scale.dtype == jnp.float64
    params = make_params(7)
    theta = ref_ravel(params)
    points = [theta, mean + 0.3 * np.random.default_rng(1).normal(size=D), mean]

    for x in points:
        lp, g = _value_and_grad(prior, jnp.asarray(x))
        lp, g = float(lp), np.asarray(g)
        if cov is None:
            assert lp == 0.0
            np.testing.assert_array_equal(g, 0.0)
            continue
        dense = scipy.stats.multivariate_normal(mean, cov).logpdf(x)
        ref = float(numpyro_reference(kind, spec, lam, floor, mean, cov).log_prob(x))
        np.testing.assert_allclose(ref, dense, rtol=1e-10)   # the two references agree
        np.testing.assert_allclose(lp, dense, rtol=1e-9, atol=0)
        g_ref = -np.linalg.solve(cov, x - mean)
        np.testing.assert_allclose(g, g_ref, rtol=1e-9, atol=1e-9 * np.abs(g_ref).max())

    # gradient w.r.t. a tree: the tree's structure, the head's gradient exactly 0
    lp_tree, g_tree = _value_and_grad(prior, params)
    assert jax.tree.structure(g_tree) == jax.tree.structure(params)
    for leaf in jax.tree.leaves(g_tree["head"]):
        np.testing.assert_array_equal(leaf, 0.0)
    np.testing.assert_allclose(float(lp_tree), float(_value_and_grad(prior, theta)[0]),
                               rtol=1e-12)
    if cov is not None:
        g_ref = -np.linalg.solve(cov, theta - mean)
        np.testing.assert_allclose(ref_ravel(g_tree), g_ref, rtol=1e-9,
                                   atol=1e-9 * np.abs(g_ref).max())
    # the head does not enter log p
    other = jax.tree.map(lambda x: x, params)
    other["head"] = jax.tree.map(lambda x: x + 5.0, params["head"])
    assert float(_value_and_grad(prior, other)[0]) == float(lp_tree)


@pytest.mark.parametrize("kind", KINDS)
def test_as_numpyro_and_covariance(kind, spec):
    for lam in SCALES:
        for floor in FLOORS:
            prior, mean, cov = build(kind, spec, lam, floor)
            x = jnp.asarray(ref_ravel(make_params(3)))
            np.testing.assert_allclose(float(prior.as_numpyro().log_prob(x)),
                                       float(prior.log_prob(x)), rtol=1e-11)
            if cov is None:
                with pytest.raises(PriorError, match="flat"):
                    prior.covariance()
                continue
            np.testing.assert_allclose(np.asarray(prior.covariance()), cov, rtol=1e-12,
                                       atol=1e-15 * np.abs(cov).max())
            np.testing.assert_allclose(np.asarray(prior.variance()), np.diag(cov), rtol=1e-12)


@pytest.mark.parametrize("kind", ["lowrank1", "lowrank2", "lowrank5", "diag", "iso_swag"])
def test_scale_multiplies_whole_covariance(kind, spec):
    """cov(2λ) − εI == 2·(cov(λ) − εI): the reference code's λ² on D̂ᵀD̂ would fail this."""
    for lam in SCALES:
        for floor in FLOORS:
            prior, _, _ = build(kind, spec, lam, floor)
            eps = floor * np.eye(D)
            c1 = np.asarray(prior.covariance())
            c2 = np.asarray(prior.rescale(2 * lam).covariance())
            np.testing.assert_allclose(c2 - eps, 2 * (c1 - eps), rtol=1e-12,
                                       atol=1e-14 * np.abs(c2).max())
            # and the low-rank part alone scales like λ, not λ²
            if kind.startswith("lowrank"):
                off = ~np.eye(D, dtype=bool)
                np.testing.assert_allclose(c2[off], 2 * c1[off], rtol=1e-12, atol=1e-14 * lam)


# ---------------------------------------------------------------------- closed forms
def test_special_cases_closed_forms(spec):
    params = make_params(11)
    theta = ref_ravel(params)
    mean, var, _ = swag_arrays(5, 5)
    for lam in SCALES:
        iso = Prior.isotropic(spec, mean, 0.37, scale=lam)
        np.testing.assert_allclose(
            float(iso.log_prob(params)),
            np.sum(scipy.stats.norm.logpdf(theta, mean, np.sqrt(0.37 * lam))), rtol=1e-12)
        l2 = Prior.isotropic(spec, None, 1.0, scale=lam)
        np.testing.assert_allclose(np.asarray(l2.grad_log_prob(jnp.asarray(theta))),
                                   -theta / lam, rtol=1e-12)
        np.testing.assert_allclose(
            float(l2.log_prob(params)), np.sum(scipy.stats.norm.logpdf(theta, 0, np.sqrt(lam))),
            rtol=1e-12)
        diag = Prior.diagonal(spec, mean, var, scale=lam, floor=0.1)
        np.testing.assert_allclose(
            float(diag.log_prob(params)),
            np.sum(scipy.stats.norm.logpdf(theta, mean, np.sqrt(lam * var + 0.1))), rtol=1e-12)
    flat = Prior.flat(spec, mean)
    lp, g = jax.value_and_grad(flat.log_prob)(params)
    assert float(lp) == 0.0
    for leaf in jax.tree.leaves(g):
        np.testing.assert_array_equal(leaf, 0.0)
    with pytest.raises(PriorError, match="flat"):
        flat.sample(jax.random.key(0))
    # λ → ∞ of any prior is the flat prior
    assert Prior.lowrank(spec, mean, var, np.ones((2, D))).rescale(math.inf).kind == "flat"


def test_l2_weight_decay_correspondence(spec):
    """L2 decay α·‖θ‖²/2 per example over N examples is the (1/N)·log p term with λ = 1/(αN)."""
    alpha, n = 5e-4, 1000
    prior = Prior.isotropic(spec, None, 1.0, scale=1.0 / (alpha * n))
    theta = jnp.asarray(ref_ravel(make_params(2)))
    g = prior.grad_log_prob(theta) / n
    np.testing.assert_allclose(np.asarray(g), -alpha * np.asarray(theta), rtol=1e-12)


def test_init_params_sets_backbone_to_mean(spec):
    mean, var, dev = swag_arrays(2, 2)
    prior = Prior.lowrank(spec, mean, var, dev)
    params = make_params(4)
    new = prior.init_params(params)
    np.testing.assert_array_equal(ref_ravel(new), mean)
    np.testing.assert_array_equal(new["head"]["kernel"], params["head"]["kernel"])


# ---------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["lowrank", "diag", "isotropic"])
def test_sample_moments(kind):
    d, n = 5, 200_000
    spec5 = ParamSpec.from_params({"backbone": {"w": np.zeros(d)}})
    rng = np.random.default_rng(5)
    mean, var, dev = rng.normal(size=d), rng.uniform(0.1, 2.0, size=d), rng.normal(size=(2, d))
    lam, floor = 2.0, 0.1
    if kind == "lowrank":
        prior = Prior.lowrank(spec5, mean, var, dev, scale=lam, floor=floor)
        cov = lam * (0.5 * np.diag(var) + 0.5 * dev.T @ dev) + floor * np.eye(d)
    elif kind == "diag":
        prior = Prior.diagonal(spec5, mean, var, scale=lam, floor=floor)
        cov = np.diag(lam * var + floor)
    else:
        prior = Prior.isotropic(spec5, mean, 0.7, scale=lam, floor=floor)
        cov = (lam * 0.7 + floor) * np.eye(d)
    x = np.asarray(prior.sample(jax.random.key(0), n))
    assert x.shape == (n, d) and x.dtype == np.float64
    assert prior.sample(jax.random.key(1)).shape == (d,)
    # mean: standard error sqrt(Σᵢᵢ/n)
    se_mean = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < 5 * se_mean), (x.mean(0) - mean) / se_mean
    # covariance: Var(Ĉᵢⱼ) ≈ (ΣᵢᵢΣⱼⱼ + Σᵢⱼ²)/n for Gaussian samples
    emp = np.cov(x, rowvar=False)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)
    assert np.all(np.abs(emp - cov) < 5 * se_cov), (emp - cov) / se_cov


# ---------------------------------------------------------------------- rescale & jit
def test_rescale_shares_arrays_and_recomputes_chol(spec):
    """Only λ, ε and what depends on them (the cached Cholesky factor, log|Σ|) change."""
    mean, var, dev = swag_arrays(5, 5)
    prior = Prior.lowrank(spec, mean, var, dev, scale=1.0, floor=0.1)
    other = prior.rescale(10.0)
    assert other.deviations is prior.deviations
    assert other.mean is prior.mean and other.var is prior.var
    assert float(other.scale) == 10.0 and float(other.floor) == pytest.approx(0.1)
    assert other.floor is prior.floor
    assert not np.allclose(np.asarray(other.chol), np.asarray(prior.chol))
    assert float(other.logdet) != float(prior.logdet)
    assert float(prior.scale) == 1.0          # the original is unchanged
    third = prior.rescale(10.0, 0.0)
    assert third.deviations is prior.deviations and float(third.floor) == 0.0
    # the cached factor is the Cholesky factor of I + W δ⁻¹ Wᵀ (independent computation)
    delta = 10.0 * 0.5 * var + 0.1
    w = math.sqrt(10.0 / (2 * 4)) * dev
    np.testing.assert_allclose(np.asarray(other.chol) @ np.asarray(other.chol).T,
                               np.eye(5) + (w / delta) @ w.T, rtol=1e-12)
    cov = np.diag(delta) + w.T @ w
    np.testing.assert_allclose(float(other.logdet), np.linalg.slogdet(cov)[1], rtol=1e-12)
    # a prior built without the cache (e.g. by hand) computes log|Σ| in log_prob
    import dataclasses
    uncached = dataclasses.replace(other, logdet=None)
    x = jnp.asarray(ref_ravel(make_params(1)))
    np.testing.assert_allclose(float(uncached.log_prob(x)), float(other.log_prob(x)), rtol=1e-12)


def test_jit_does_not_retrace_when_scale_changes(spec):
    mean, var, dev = swag_arrays(5, 5)
    prior = Prior.lowrank(spec, mean, var, dev)
    theta = jnp.asarray(ref_ravel(make_params(1)))
    traces = []

    @jax.jit
    def f(p, x):
        traces.append(1)
        return jax.value_and_grad(p.log_prob)(x)

    x = np.asarray(theta)
    for lam, floor in ((1e-3, 0.0), (1.0, 0.1), (1e4, 0.0), (3.0, 0.1)):
        lp, _ = f(prior.rescale(lam, floor), theta)
        cov = lam * (0.5 * np.diag(var) + 0.5 * dev.T @ dev / 4) + floor * np.eye(D)
        np.testing.assert_allclose(float(lp), scipy.stats.multivariate_normal(mean, cov).logpdf(x),
                                   rtol=1e-9)
    assert len(traces) == 1


# ---------------------------------------------------------------------- validation
def test_validation_errors(spec):
    mean, var, dev = swag_arrays(3, 3)
    bad_mean = mean.copy()
    bad_mean[4] = np.nan
    with pytest.raises(PriorError, match="mean contains NaN or Inf"):
        Prior.lowrank(spec, bad_mean, var, dev)
    bad_dev = dev.copy()
    bad_dev[1, 2] = np.inf
    with pytest.raises(PriorError, match="deviations contains NaN or Inf"):
        Prior.lowrank(spec, mean, var, bad_dev)
    for v in (0.0, -1e-3):
        bad_var = var.copy()
        bad_var[0] = v
        with pytest.raises(PriorError, match="variances must be positive"):
            Prior.lowrank(spec, mean, bad_var, dev)
        with pytest.raises(PriorError, match="variances must be positive"):
            Prior.diagonal(spec, mean, bad_var)
    with pytest.raises(PriorError, match="variances must be positive"):
        Prior.isotropic(spec, mean, 0.0)
    with pytest.raises(PriorError, match=re.escape("mean has shape (12,); expected (13,)")):
        Prior.lowrank(spec, mean[:12], var, dev)
    with pytest.raises(PriorError, match=re.escape("var has shape (14,)")):
        Prior.diagonal(spec, mean, np.ones(14))
    with pytest.raises(PriorError, match=re.escape("expected (K, 13)")):
        Prior.lowrank(spec, mean, var, dev[:, :7])
    with pytest.raises(PriorError, match="K >= 1"):
        Prior.lowrank(spec, mean, var, dev[0])
    for lam in (0.0, -1.0, math.nan):
        with pytest.raises(PriorError, match="scale λ must be a positive finite number"):
            Prior.lowrank(spec, mean, var, dev, scale=lam)
        with pytest.raises(PriorError, match="scale λ must be a positive finite number"):
            Prior.lowrank(spec, mean, var, dev).rescale(lam)
    with pytest.raises(PriorError, match="floor ε must be finite and >= 0"):
        Prior.diagonal(spec, mean, var, floor=-0.1)
    with pytest.raises(PriorError, match="floor ε must be finite and >= 0"):
        Prior.diagonal(spec, mean, var).rescale(1.0, math.inf)
    prior = Prior.diagonal(spec, mean, var)
    with pytest.raises(PriorError, match="length d=13"):
        prior.log_prob(jnp.zeros(12))
    with pytest.raises(SpecMismatchError, match="missing"):
        prior.log_prob({"backbone": {"block": {"bias": jnp.zeros(2)}}})
    with pytest.raises(PriorError, match="unknown method"):
        prior.for_method("bayes")
    with pytest.raises(PriorError, match="needs SWAG deviations"):
        prior.for_method("lowrank")


def test_float32_finite_over_scale_range():
    """λ from 1e-8 to 1e12: finite log p and gradient in float32."""
    with jax.enable_x64(False):
        params = make_params(0, np.float32)
        spec32 = ParamSpec.from_params(params)
        mean, var, dev = swag_arrays(5, 5)
        base = Prior.lowrank(spec32, mean.astype(np.float32), 1e-3 * var.astype(np.float32),
                             0.03 * dev.astype(np.float32))
        assert base.mean.dtype == jnp.float32 and base.scale.dtype == jnp.float32
        f = jax.jit(lambda p, x: jax.value_and_grad(p.log_prob)(x))
        theta = jnp.asarray(ref_ravel(params), jnp.float32)
        for kind in ("lowrank", "diag", "isotropic", "l2sp"):
            prior = base.for_method(kind)
            for lam in np.logspace(-8, 12, 6):
                for floor in (0.0, 1e-4):
                    lp, g = f(prior.rescale(float(lam), floor), theta)
                    assert lp.dtype == jnp.float32
                    assert np.isfinite(float(lp)), (kind, lam, floor)
                    assert np.all(np.isfinite(np.asarray(g))), (kind, lam, floor)
                    assert np.any(np.asarray(g) != 0)
        # the tree gradient keeps the tree's dtypes
        g_tree = jax.grad(base.log_prob)(params)
        assert g_tree["backbone"]["norm"]["scale"].dtype == jnp.float32


def test_bfloat16_storage():
    with jax.enable_x64(False):
        spec32 = ParamSpec.from_params(make_params(0, np.float32))
        mean, var, dev = (a.astype(np.float32) for a in swag_arrays(5, 5))
        p32 = Prior.lowrank(spec32, mean, var, dev, scale=2.0, floor=0.01)
        p16 = p32.astype(jnp.bfloat16)
        assert p16.deviations.dtype == jnp.bfloat16 and p16.mean.dtype == jnp.bfloat16
        assert p16.nbytes * 2 == p32.nbytes
        theta = jnp.asarray(mean + np.random.default_rng(0).normal(size=D) * np.sqrt(var),
                            jnp.float32)
        lp16, lp32 = float(p16.log_prob(theta)), float(p32.log_prob(theta))
        assert p16.log_prob(theta).dtype == jnp.float32
        np.testing.assert_allclose(lp16, lp32, rtol=2e-2)
        # and exactly the prior of the rounded arrays (its cached factor was refreshed)
        rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
                   for a in (mean, var, dev)]
        ref = Prior.lowrank(spec32, *rounded, scale=2.0, floor=0.01)
        np.testing.assert_allclose(lp16, float(ref.log_prob(theta)), rtol=1e-5)
        g16 = np.asarray(jax.grad(p16.log_prob)(theta))
        g32 = np.asarray(jax.grad(p32.log_prob)(theta))
        np.testing.assert_allclose(g16, g32, rtol=0.1, atol=0.05 * np.abs(g32).max())


# ---------------------------------------------------------------------- ParamSpec
def test_paramspec_ravel_unravel_replace_roundtrip():
    params = make_params(9)
    spec = ParamSpec.from_params(params)
    assert spec.paths == ("backbone/block/bias", "backbone/block/kernel", "backbone/norm/scale")
    assert spec.shapes == ((2,), (2, 2, 2), (3,)) and spec.size == D
    assert spec.offsets == (0, 2, 10, 13)
    vec = spec.ravel(params, dtype=jnp.float64)
    np.testing.assert_array_equal(np.asarray(vec), ref_ravel(params))
    parts = spec.unravel(vec)
    assert set(parts) == set(spec.paths)
    np.testing.assert_array_equal(parts["backbone/block/kernel"], params["backbone"]["block"]["kernel"])
    assert parts["backbone/block/kernel"].dtype == jnp.float64
    new = spec.replace(params, vec + 1.0)
    np.testing.assert_array_equal(ref_ravel(new), ref_ravel(params) + 1.0)
    np.testing.assert_array_equal(new["head"]["kernel"], params["head"]["kernel"])
    assert jax.tree.structure(new) == jax.tree.structure(params)
    assert ParamSpec.from_json(spec.to_json()) == spec
    spec.check(new)


def test_paramspec_check_names_first_mismatch():
    params = make_params(0)
    spec = ParamSpec.from_params(params)
    wrong = make_params(0)
    wrong["backbone"]["block"]["kernel"] = np.zeros((2, 4))
    wrong["backbone"]["norm"]["scale"] = np.zeros(5)       # also wrong, but later
    msg = ("parameter 'backbone/block/kernel': the prior expects shape (2, 2, 2) float64, "
           "the model has shape (2, 4) float64")
    with pytest.raises(SpecMismatchError, match=re.escape(msg)):
        spec.check(wrong)
    missing = make_params(0)
    del missing["backbone"]["norm"]
    with pytest.raises(SpecMismatchError, match="'backbone/norm/scale' .* missing"):
        spec.check(missing)
    extra = make_params(0)
    extra["backbone"]["extra"] = np.zeros(1)
    with pytest.raises(SpecMismatchError, match="'backbone/extra' matches the prior's rule"):
        spec.check(extra)
    as32 = jax.tree.map(lambda x: x.astype(np.float32), params)
    with pytest.raises(SpecMismatchError, match="float32"):
        spec.check(as32)


def test_paramspec_rule_selection():
    params = make_params(0)
    block = ParamSpec.from_params(params, r"^backbone/block/")
    assert block.paths == ("backbone/block/bias", "backbone/block/kernel") and block.size == 10
    everything = ParamSpec.from_params(params, r".")
    assert len(everything.paths) == 5 and everything.size == D + 8
    no_bias = ParamSpec.from_params(params, r"^backbone/(?!.*bias$)")
    assert no_bias.paths == ("backbone/block/kernel", "backbone/norm/scale")
    with pytest.raises(SpecMismatchError, match="selects no parameter"):
        ParamSpec.from_params(params, r"^encoder/")
    # a prior over a custom rule ignores everything else
    mean, var, _ = swag_arrays(1, 1, 10)
    prior = Prior.diagonal(block, mean, var)
    g = jax.grad(prior.log_prob)(params)
    np.testing.assert_array_equal(g["backbone"]["norm"]["scale"], 0.0)
    assert np.any(np.asarray(g["backbone"]["block"]["kernel"]) != 0)


# ---------------------------------------------------------------------- caches
def test_log_prob_is_differentiable_in_scale_and_floor(spec):
    """d log p / dλ through rescale (the cached factor and log|Σ|), against a dense formula."""
    mean, var, dev = swag_arrays(3, 3)
    prior = Prior.lowrank(spec, mean, var, dev)
    x = ref_ravel(make_params(5))
    s0 = 0.5 * np.diag(var) + 0.5 * dev.T @ dev / 2
    for lam, floor in ((0.3, 0.0), (2.0, 0.1)):
        g_lam, g_floor = jax.grad(lambda l, f: prior.rescale(l, f).log_prob(jnp.asarray(x)),
                                  argnums=(0, 1))(lam, floor)
        cov = lam * s0 + floor * np.eye(D)
        prec = np.linalg.inv(cov)
        r = x - mean
        for deriv, got in ((s0, g_lam), (np.eye(D), g_floor)):
            ref = -0.5 * np.trace(prec @ deriv) + 0.5 * r @ prec @ deriv @ prec @ r
            np.testing.assert_allclose(float(got), ref, rtol=1e-9)


def test_capacitance_in_blocks_of_columns(spec, monkeypatch):
    """The one-pass capacitance gives the same factor whatever the column block size."""
    import bayes_transfer.prior.woodbury as prior_module

    mean, var, dev = swag_arrays(5, 5)
    inv = 1.0 / (0.5 * var + 0.1)
    ref = np.linalg.cholesky(np.eye(5) + 0.25 * (dev * inv) @ dev.T)
    for block in (4, 13, 64):      # 3 full blocks + a tail; exactly one block; d < block
        monkeypatch.setattr(prior_module, "_GRAM_BLOCK", block)
        fn = jax.jit(prior_module.capacitance_cholesky.__wrapped__)
        got = fn(jnp.asarray(dev), jnp.asarray(var), jnp.float64(1.0), jnp.float64(0.1),
                 jnp.float64(0.25))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12)
    # a scalar variance is broadcast along d
    ref = np.linalg.cholesky(np.eye(5) + 0.25 * dev @ dev.T / (0.5 * 0.3 + 0.1))
    got = fn(jnp.asarray(dev), jnp.float64(0.3), jnp.float64(1.0), jnp.float64(0.1),
             jnp.float64(0.25))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-12)


# ---------------------------------------------------------------------- hand-written JVP
def _quad_by_autodiff(theta, mean, var, dev, scale, floor, chol):
    """rᵀΣ⁻¹r by Woodbury in plain jnp, differentiated by JAX: the reference for the rule."""
    delta = 0.5 * scale * var + floor
    r = theta - mean
    a = r / delta
    b = jnp.sqrt(scale / (2.0 * max(dev.shape[0] - 1, 1))) * (dev @ a)
    y = jax.scipy.linalg.solve_triangular(jnp.tril(chol), b, lower=True)
    return jnp.vdot(r, a) - jnp.vdot(y, y)


@pytest.mark.parametrize("fused", [False, True], ids=["matvec", "fused"])
def test_woodbury_jvp_rule_in_every_argument(spec, monkeypatch, fused):
    """The custom JVP of the Woodbury term against autodiff, in each argument and all at
    once, forward and reverse, and its Hessian in θ against the dense precision."""
    import bayes_transfer.prior.woodbury as prior_module

    if fused:      # the multi-reduce that large d uses
        monkeypatch.setattr(prior_module, "_MATVEC_MAX_DIM", 0)
    mean, var, dev = swag_arrays(4, 4)
    prior = Prior.lowrank(spec, mean, var, dev, scale=3.0, floor=0.05)
    x = jnp.asarray(ref_ravel(make_params(2)))
    args = (x, prior.mean, prior.var, prior.deviations, prior.scale, prior.floor, prior.chol)
    quad = prior_module.woodbury_quad
    np.testing.assert_allclose(float(quad(*args)), float(_quad_by_autodiff(*args)), rtol=1e-12)
    for i in range(len(args)):
        got = jax.grad(quad, argnums=i)(*args)
        ref = jax.grad(_quad_by_autodiff, argnums=i)(*args)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-10,
                                   atol=1e-12 * float(np.abs(ref).max()), err_msg=str(i))
    rng = np.random.default_rng(0)
    tangents = tuple(jnp.asarray(rng.normal(size=np.shape(a))) for a in args)
    np.testing.assert_allclose(float(jax.jvp(quad, args, tangents)[1]),
                               float(jax.jvp(_quad_by_autodiff, args, tangents)[1]), rtol=1e-10)
    cov = np.asarray(prior.covariance())
    np.testing.assert_allclose(np.asarray(jax.hessian(prior.log_prob)(x)), -np.linalg.inv(cov),
                               rtol=1e-8, atol=1e-10)


def _dense_reference(prior):
    """Mean and covariance in float64 from the prior's stored (possibly rounded) arrays."""
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    lam, eps, dev = float(prior.scale), float(prior.floor), f64(prior.deviations)
    cov = (np.diag(0.5 * lam * f64(prior.var) + eps)
           + lam / (2 * max(prior.rank - 1, 1)) * dev.T @ dev)
    return f64(prior.mean), cov


@pytest.mark.parametrize("rank", [5, 20, 26])
@pytest.mark.parametrize("fused", [False, True], ids=["matvec", "fused"])
def test_lowrank_log_prob_and_grad_float32_and_bfloat16_storage(monkeypatch, fused, rank):
    """log p and ∇θ in float32, stored in float32 or bfloat16, against a dense float64
    reference of the stored arrays: both forward paths, and bfloat16 factors with up to 24
    rows (two widened views) and beyond (rows from a plain upcast)."""
    import bayes_transfer.prior.woodbury as prior_module

    if fused:
        monkeypatch.setattr(prior_module, "_MATVEC_MAX_DIM", 0)
    d = 600
    with jax.enable_x64(False):
        spec32 = ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float32",))
        rng = np.random.default_rng(rank)
        mean = rng.normal(size=d).astype(np.float32)
        var = rng.uniform(1e-3, 1e-2, d).astype(np.float32)
        dev = (0.05 * rng.normal(size=(rank, d))).astype(np.float32)
        theta = jnp.asarray(mean + 0.05 * rng.normal(size=d).astype(np.float32))
        f = jax.jit(lambda p, t: jax.value_and_grad(p.log_prob)(t))
        for storage in (jnp.float32, jnp.bfloat16):
            prior = Prior.lowrank(spec32, mean, var, dev, scale=2.0, floor=1e-4).astype(storage)
            lp, g = f(prior, theta)
            assert lp.dtype == g.dtype == jnp.float32
            ref_mean, cov = _dense_reference(prior)
            x = np.asarray(theta, np.float64)
            ref_lp = scipy.stats.multivariate_normal(ref_mean, cov).logpdf(x)
            ref_g = -np.linalg.solve(cov, x - ref_mean)
            what = f"{jnp.dtype(storage).name} K={rank}"
            np.testing.assert_allclose(float(lp), ref_lp, rtol=2e-5, err_msg=what)
            np.testing.assert_allclose(np.asarray(g), ref_g, rtol=1e-3,
                                       atol=1e-4 * np.abs(ref_g).max(), err_msg=what)


def test_value_and_grad_temporaries_at_large_d():
    """XLA's memory analysis of the jitted value and gradient at d ≥ _MATVEC_MAX_DIM
    (compiled for abstract arrays, nothing allocated): no d-sized temporary for a (d,)
    θ, at most two for a tree (the ravelled θ and the term split into the leaves'
    gradients; see docs/benchmarks.md), float32 and bfloat16 storage."""
    from jax import ShapeDtypeStruct as S

    import bayes_transfer.prior.woodbury as prior_module

    if jax.default_backend() != "cpu":
        pytest.skip("the memory analysis is for XLA:CPU")
    with jax.enable_x64(False):
        shapes = {"a": (3, 3, 256, 512), "b": (512,), "c": (1024, 1024), "d": (700, 3000)}
        spec32 = ParamSpec(paths=tuple(f"backbone/{k}" for k in shapes),
                           shapes=tuple(shapes.values()), dtypes=("float32",) * len(shapes))
        d, k, f32 = spec32.size, 20, jnp.float32
        assert d >= prior_module._MATVEC_MAX_DIM
        tree = {"backbone": {name: S(s, f32) for name, s in shapes.items()}}
        value_and_grad = jax.jit(lambda p, t: jax.value_and_grad(p.log_prob)(t))
        for storage in (jnp.float32, jnp.bfloat16):
            prior = Prior(mean=S((d,), storage), var=S((d,), storage),
                          deviations=S((k, d), storage), scale=S((), f32), floor=S((), f32),
                          chol=S((k, k), f32), spec=spec32, kind="lowrank", logdet=S((), f32))
            for theta, most in ((S((d,), f32), 0.05), (tree, 2.05)):
                compiled = value_and_grad.lower(prior, theta).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes
                assert temp <= most * 4 * d, (jnp.dtype(storage).name, type(theta), temp / d)


def test_capacitance_of_a_bfloat16_factor_on_the_host(monkeypatch):
    """A bfloat16 factor's capacitance is built in NumPy, a block of columns at a time
    (XLA:CPU would upcast the whole factor): the same factor as the XLA path."""
    import bayes_transfer.prior.woodbury as prior_module

    with jax.enable_x64(False):
        d = 3000
        spec32 = ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float32",))
        mean, var, dev = (a.astype(np.float32) for a in swag_arrays(6, 6, d))
        calls = []
        host = prior_module.capacitance_cholesky_host
        # Prior.rescale calls it by the name prior.prior imported
        monkeypatch.setattr("bayes_transfer.prior.prior.capacitance_cholesky_host",
                            lambda *a: calls.append(1) or host(*a))
        p16 = Prior.lowrank(spec32, mean, var, dev, scale=2.0, floor=0.01).astype(jnp.bfloat16)
        assert calls                      # built on the host (and not for float32 storage)
        n = len(calls)
        Prior.lowrank(spec32, mean, var, dev, scale=2.0, floor=0.01)
        assert len(calls) == n
        xla = prior_module.capacitance_cholesky(p16.deviations, p16.var, jnp.float32(2.0),
                                                 jnp.float32(0.01), jnp.float32(2.0 / 10))
        np.testing.assert_allclose(np.asarray(p16.chol), np.asarray(xla), rtol=1e-5, atol=1e-6)
        # under jit (λ traced) the XLA path is used: same log p
        x = jnp.asarray(mean)
        eager = float(p16.rescale(5.0).log_prob(x))
        traced = float(jax.jit(lambda p, s: p.rescale(s).log_prob(x))(p16, jnp.float32(5.0)))
        np.testing.assert_allclose(eager, traced, rtol=1e-5)
