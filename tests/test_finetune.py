"""MAP fine-tuning: the objective's prior term, the λ grid, the validation choice."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayes_transfer import data, models
from bayes_transfer.inference.map import FinetuneConfig, finetune, scale_grid
from bayes_transfer.training.objectives import head_sq_norm, map_loss, prior_penalty
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.training import TrainConfig, make_apply, split_model

CONFIG = FinetuneConfig(train=TrainConfig(epochs=4, batch_size=32, optimizer="adam",
                                          learning_rate=1e-3, progress=False),
                        variances=(1e-4, 1e-1))


@pytest.fixture(scope="module")
def splits():
    return data.load("digits", shots_per_class=5, seed=0)


@pytest.fixture(scope="module")
def prior():
    """A low-rank prior around a model's initial backbone (synthetic SWAG arrays)."""
    model = models.create("small_cnn", 10, seed=1, width=0.5)
    _, params, _ = split_model(model)
    spec = ParamSpec.from_params(params)
    rng = np.random.default_rng(0)
    mean = spec.ravel(params)
    var = jnp.asarray(rng.uniform(1e-4, 1e-3, spec.size), jnp.float32)
    dev = jnp.asarray(rng.normal(0, 1e-2, (4, spec.size)), jnp.float32)
    return Prior.lowrank(spec, mean, var, dev).with_metadata(
        {"architecture": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1,
                          "width": 0.5}})


def test_map_loss_adds_minus_log_prior_over_n_and_head_decay(splits, prior):
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    graphdef, params, rest = split_model(model)
    apply = make_apply(graphdef)
    batch = next(iter(data.batches(splits.train, 16, seed=0, epoch=0)))
    n = len(splits.train)
    key = jax.random.PRNGKey(0)
    plain, _ = map_loss(n)(apply, params, rest, batch, key, None)
    with_prior, (_, parts) = map_loss(n, head_decay=0.3)(apply, params, rest, batch, key, prior)
    # −log p(θ)/N less its constant ½log|2πΣ|/N, i.e. ½(θ − θ̄)ᵀΣ⁻¹(θ − θ̄)/N
    expected = plain + 0.5 * prior.quadratic(params) / n + 0.15 * head_sq_norm(params)
    np.testing.assert_allclose(with_prior, expected, rtol=1e-5)
    mean = prior.spec.replace(params, prior.mean)
    np.testing.assert_allclose(parts["prior"],
                               (prior.log_prob(mean) - prior.log_prob(params)) / n, rtol=1e-4)
    # the objective's gradient is that of −log p(θ)/N
    def objective(p):
        return map_loss(n, head_decay=0.3)(apply, p, rest, batch, key, prior)[0]

    def with_constant(p):
        return (map_loss(n)(apply, p, rest, batch, key, None)[0]
                + prior_penalty(prior, p, n) + 0.15 * head_sq_norm(p))
    for a, b in zip(jax.tree.leaves(jax.grad(objective)(params)),
                    jax.tree.leaves(jax.grad(with_constant)(params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    flat, _ = map_loss(n)(apply, params, rest, batch, key, prior.for_method("standard"))
    np.testing.assert_allclose(flat, plain, rtol=1e-6)


def test_scale_grid_spans_the_same_effective_variances_for_every_method(prior):
    for method in ("l2sp", "isotropic", "diag", "lowrank"):
        p = prior.for_method(method)
        grid = scale_grid(p, (1e-3, 1.0))
        assert math.isinf(grid[-1])
        base = float(jnp.mean(p.base_variance()))
        np.testing.assert_allclose([g * base for g in grid[:-1]], [1e-3, 1.0], rtol=1e-5)
    assert scale_grid(prior.for_method("standard")) == [math.inf]


def test_finetune_chooses_scale_on_validation_and_reports_test(splits, prior):
    cache = {}
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    res = finetune(model, splits, prior, "lowrank", config=CONFIG, cache=cache)
    assert len(res.sweep) == 3                      # two variances + the no-prior limit
    best = min(res.sweep, key=lambda r: r["val"]["nll"])
    assert res.scale == best["scale"]
    assert res.val_metrics == best["val"]
    assert set(res.metrics) >= {"error", "nll", "ece", "brier"}
    assert res.test_probs.shape == (len(splits.test), 10)
    # The no-prior run is shared with the next method instead of being trained again.
    res2 = finetune(model, splits, prior, "standard", config=CONFIG, cache=cache)
    assert res2.sweep[0]["val"] == res.sweep[-1]["val"]


def test_a_strong_prior_keeps_the_backbone_at_its_mean(splits, prior):
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    mean = np.asarray(prior.mean)

    def moved(scale):
        res = finetune(model, splits, prior, "l2sp", scale=scale, config=CONFIG)
        return float(np.linalg.norm(np.asarray(prior.spec.ravel(res.result.params)) - mean))

    assert moved(1e-7) < 0.2 * moved(math.inf)


def test_unknown_method_is_a_clear_error(splits, prior):
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    with pytest.raises(Exception, match="unknown method 'l3'"):
        finetune(model, splits, prior, "l3", config=CONFIG)


def test_the_loss_a_user_reads_starts_at_the_nll(splits, prior):
    """From the prior mean the displayed loss is the NLL (plus the head's tiny decay),
    not the prior's log-normaliser: at v = 100 that constant is thousands per example."""
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    lam = 100.0 / float(jnp.mean(prior.base_variance()))
    config = FinetuneConfig(train=TrainConfig(steps=1, batch_size=32, optimizer="adam",
                                              learning_rate=1e-3, progress=False))
    res = finetune(model, splits, prior, "lowrank", scale=lam, config=config)
    first = res.result.history[0]            # metrics of step 1, at θ = θ̄
    assert first["prior"] == 0.0
    assert first["loss"] == pytest.approx(first["nll"], abs=1e-3)
    n = len(splits.train)
    assert abs(float(prior_penalty(prior.rescale(lam), prior.mean, n))) > 1e3
