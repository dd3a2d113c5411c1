"""SimCLR: NT-Xent against a direct loop, on-device views, the projection head outside the
prior, training on real digits, linear probes, and learn_prior with the SimCLR loss."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bayes_transfer import data, models
from bayes_transfer.learn import LearnPriorConfig, learn_prior
from bayes_transfer.params import BACKBONE_RULE, ParamSpec
from bayes_transfer.ssl import (DEFAULT_L2_GRID, SimCLRModel, nt_xent, probe_features,
                                random_resized_crop, random_view, simclr_loss)
from bayes_transfer.ssl.augment import _crop_box
from bayes_transfer.swag import SwagConfig
from bayes_transfer.training import TrainConfig, fit, make_apply, split_model


def nt_xent_loop(z1, z2, tau):
    """NT-Xent straight from the paper's definition, one anchor at a time, in float64."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    n2 = len(z)
    n = n2 // 2
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        denom = sum(math.exp(u[i] @ u[k] / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(u[i] @ u[pos] / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_numpy_loop(tau):
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(6, 5)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(6, 5))).astype(np.float32)
    np.testing.assert_allclose(float(nt_xent(z1, z2, tau)), nt_xent_loop(z1, z2, tau),
                               rtol=1e-5)


def test_nt_xent_temperature_and_stability():
    rng = np.random.default_rng(1)
    z1 = rng.normal(size=(4, 3)).astype(np.float32)
    z2 = rng.normal(size=(4, 3)).astype(np.float32)
    values = [float(nt_xent(z1, z2, t)) for t in (0.05, 0.2, 1.0)]
    assert len(set(values)) == 3  # the temperature matters
    np.testing.assert_allclose(values[0], nt_xent_loop(z1, z2, 0.05), rtol=1e-5)
    # tiny τ: logits of 1e3, still finite (logsumexp), gradient finite
    loss, grad = jax.value_and_grad(nt_xent)(z1, z2, 1e-3)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    # identical views: the loss falls towards log(2N − 2) … 0 as τ → 0 when pairs align
    assert float(nt_xent(z1, z1, 0.01)) < float(nt_xent(z1, z2, 0.01))


def test_nt_xent_invariant_to_consistent_batch_permutation():
    rng = np.random.default_rng(2)
    z1 = rng.normal(size=(8, 4)).astype(np.float32)
    z2 = rng.normal(size=(8, 4)).astype(np.float32)
    perm = rng.permutation(8)
    np.testing.assert_allclose(float(nt_xent(z1[perm], z2[perm], 0.3)),
                               float(nt_xent(z1, z2, 0.3)), rtol=1e-6)
    # swapping the roles of the two views does not matter either
    np.testing.assert_allclose(float(nt_xent(z2, z1, 0.3)), float(nt_xent(z1, z2, 0.3)),
                               rtol=1e-6)
    # …but breaking the pairing does
    assert abs(float(nt_xent(z1, z2[perm], 0.3)) - float(nt_xent(z1, z2, 0.3))) > 1e-4


@pytest.mark.parametrize("shape", [(5, 12, 12, 1), (3, 10, 14, 3)])
def test_views_keep_shape_dtype_and_are_deterministic_per_key(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    a = random_view(jax.random.PRNGKey(1), x)
    b = random_view(jax.random.PRNGKey(1), x)
    c = random_view(jax.random.PRNGKey(2), x)
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(x))
    assert np.all(np.isfinite(np.asarray(a)))


def test_resized_crop_takes_the_box_it_draws():
    # A ramp along the width: after cropping box [x0, x0 + cw) and resizing, the view's
    # mean column value is the box's centre; a full-image crop is the identity.
    h, w = 16, 20
    ramp = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32) + 0.5, (4, h, w))[..., None]
    key = jax.random.PRNGKey(3)
    out = random_resized_crop(key, ramp, scale=(0.3, 0.6))
    for i, k in enumerate(jax.random.split(key, 4)):
        y0, x0, ch, cw = (float(v) for v in _crop_box(k, h, w, (0.3, 0.6), (3 / 4, 4 / 3)))
        assert 0.3 * h * w * 0.99 <= ch * cw <= 0.6 * h * w * 1.01
        np.testing.assert_allclose(float(out[i].mean()), x0 + cw / 2, atol=0.05 * cw)
    same = random_resized_crop(key, ramp, scale=(1.0, 1.0), ratio=(w / h, w / h))
    np.testing.assert_allclose(np.asarray(same), np.asarray(ramp), atol=1e-5)


def test_projection_head_is_outside_the_prior():
    def build():  # abstract models (nnx.eval_shape): shapes and paths, no computation
        sup = models.create("small_cnn", 10, width=0.25, seed=0)
        ssl = SimCLRModel(models.create("small_cnn", 10, width=0.25, seed=1), projection_dim=16)
        return sup, ssl

    sup, ssl = nnx.eval_shape(build)
    spec_sup = ParamSpec.from_params(nnx.state(sup, nnx.Param), BACKBONE_RULE)
    spec_ssl = ParamSpec.from_params(nnx.state(ssl, nnx.Param), BACKBONE_RULE)
    assert spec_ssl.paths == spec_sup.paths and spec_ssl.shapes == spec_sup.shapes
    paths = ParamSpec.from_params(nnx.state(ssl, nnx.Param), ".").paths
    assert any(p.startswith("projector/") for p in paths)
    assert not any(p.startswith("head/") for p in paths)
    assert ssl.architecture == models.model_config(sup)
    x = jnp.zeros((2, 8, 8, 1))
    z, h = nnx.eval_shape(lambda: (build()[1](x), build()[1].features(x)))
    assert z.shape == (2, 16) and h.shape == (2, 32)


# The loss test and the learn_prior test share one compiled train step (same model
# structure, loss and optimizer: 12 steps of Adam each), which keeps this file fast.
SOURCE_TRAIN = dict(batch_size=64, optimizer="adam", learning_rate=3e-3, progress=False)


def test_simclr_steps_lower_the_loss_on_digits():
    splits = data.load("digits", seed=0)
    train = splits.train.subset(np.arange(64))           # one tiny real batch
    model = SimCLRModel(models.create("small_cnn", 10, width=0.25, seed=0))
    loss_fn = simclr_loss(0.2)
    batch = next(data.batches(train, 64, seed=0, epoch=0, shuffle=False))
    graphdef, params, rest = split_model(model)

    @jax.jit
    def evaluate(params, rest):  # the same views (key) before and after training
        return loss_fn(make_apply(graphdef), params, rest, batch, jax.random.PRNGKey(7), None)[0]

    before = float(evaluate(params, rest))
    result = fit(model, train, loss_fn, TrainConfig(epochs=12, **SOURCE_TRAIN))
    after = float(evaluate(result.state.params, result.state.rest))
    assert np.isfinite(before) and after < before - 0.1, (before, after)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_simclr_loss_needs_a_projection_head():
    with pytest.raises(Exception, match="SimCLRModel"):
        fit(models.create("small_cnn", 10, width=0.25),
            data.load("digits").train.subset(np.arange(8)), simclr_loss(0.2),
            TrainConfig(epochs=1, batch_size=8, progress=False))


def test_linear_probe_on_separable_features():
    # 128 training points, 32 features, 10 classes and the default grid and steps: the
    # shapes of the learn_prior test's probe, so the L-BFGS solver compiles once
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32)) * 2.0

    def sample(n):
        y = rng.integers(0, 10, n)
        return (centres[y] + rng.normal(size=(n, 32))).astype(np.float32), y

    (xtr, ytr), (xva, yva), (xte, yte) = sample(128), sample(200), sample(500)
    res = probe_features(xtr, ytr, xva, yva, xte, yte, num_classes=10)
    assert res.accuracy > 0.95 and res.val_accuracy > 0.95, res.grid
    assert res.l2 in DEFAULT_L2_GRID and set(res.grid) == set(DEFAULT_L2_GRID)
    np.testing.assert_allclose(np.mean(np.argmax(res.logits(xte), 1) == yte), res.accuracy)
    # pure-noise features: about chance (10%)
    noise = probe_features(rng.normal(size=(128, 32)), ytr, rng.normal(size=(200, 32)), yva,
                           rng.normal(size=(500, 32)), yte, num_classes=10)
    assert noise.accuracy < 0.25


def test_learn_prior_with_simclr_loss():
    splits = data.load("digits", seed=0)
    small = data.Splits(splits.train.subset(np.arange(128)), splits.val, splits.test)
    config = LearnPriorConfig(train=TrainConfig(epochs=6, **SOURCE_TRAIN), swag_epochs=3,
                              swag_learning_rate=1e-3, swag=SwagConfig(rank=2, every=1))
    classifier = models.create("small_cnn", 10, width=0.25, seed=0)
    prior, result = learn_prior(classifier, small, config, loss_fn=simclr_loss(0.2),
                                metadata={"source": {"dataset": "digits"}})
    assert prior.metadata["source"] == {"dataset": "digits", "method": "simclr"}
    assert 0.1 < prior.metadata["linear_probe_accuracy"] <= 1.0
    assert "source_accuracy" not in prior.metadata
    assert prior.metadata["architecture"] == models.model_config(classifier)
    assert isinstance(result.model, SimCLRModel)
    # the prior covers the supervised model's backbone exactly; the projector is left out
    sup_spec = ParamSpec.from_params(nnx.state(classifier, nnx.Param))
    assert prior.spec.paths == sup_spec.paths and prior.spec.shapes == sup_spec.shapes
    assert int(result.state.swag.count) == 6
    assert np.isfinite(float(prior.log_prob(prior.init_params(nnx.state(classifier, nnx.Param)))))
