"""Bayesian model averaging, posterior sample storage, downstream SWAG, NumPyro last layer."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bayes_transfer.data import ArrayDataset, Splits
from bayes_transfer.inference import (PosteriorConfig, PosteriorSamples, bma_predict,
                                      sample_posterior)
from bayes_transfer.training import refresh_batch_stats
from bayes_transfer.inference.numpyro_lastlayer import last_layer_nuts, last_layer_predict
from bayes_transfer.inference.sgld import SGLDConfig
from bayes_transfer.inference.swag_downstream import SwagDownstreamConfig
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.training import predict, split_model


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


class _TinySeg(nnx.Module):
    """Per-pixel logits (N, H, W, C) from a 1×1 convolution."""

    def __init__(self, num_classes=3, *, rngs):
        self.backbone = nnx.Conv(1, 4, (1, 1), rngs=rngs)
        self.head = nnx.Conv(4, num_classes, (1, 1), rngs=rngs)

    def __call__(self, x, *, train=False):
        return self.head(nnx.relu(self.backbone(x)))


def _dataset(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.uniform(0, 0.3, (n, 4, 4, 1)).astype(np.float32)
    images[np.arange(n), labels, 0, 0] += 0.7
    return ArrayDataset(images, labels, num_classes=3, name="synthetic")


def _perturbed(params, seed, scale=0.3):
    rng = np.random.default_rng(seed)   # numpy: no compile per leaf shape
    return jax.tree.map(lambda x: np.asarray(x) + scale * rng.normal(size=x.shape).astype(
        np.float32), params)


def _probs(graphdef, params, rest, data):
    logits = predict(nnx.merge(graphdef, params, rest), data, batch_size=7)
    return np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))


@pytest.fixture(scope="module")
def tiny():
    model = _Tiny(rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    # Non-trivial BatchNorm statistics, so a wrong rest would show.
    rest = jax.tree.map(lambda x: x + 0.2, rest)
    return graphdef, params, rest, _dataset(23)


def test_bma_of_identical_samples_is_the_single_model(tiny):
    graphdef, params, rest, data = tiny
    single = _probs(graphdef, params, rest, data)
    probs = bma_predict(graphdef, [params] * 3, rest, data, batch_size=10)
    assert probs.shape == (23, 3)
    np.testing.assert_allclose(probs, single, atol=1e-6)


def test_bma_of_two_samples_is_the_average_of_their_probs(tiny, tmp_path):
    graphdef, params, rest, data = tiny
    p1, p2, p3 = (_perturbed(params, s) for s in (1, 2, 3))
    r2 = jax.tree.map(lambda x: x * 1.5, rest)
    expected = 0.5 * (_probs(graphdef, p1, rest, data) + _probs(graphdef, p2, r2, data))
    assert np.abs(_probs(graphdef, p1, rest, data) - expected).max() > 1e-3   # they differ
    # A list with per-sample rest states.
    got = bma_predict(graphdef, [p1, p2], [rest, r2], data, batch_size=10)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Stacked samples (leading axis S) with stacked rest states.
    stack = lambda *t: jax.tree.map(lambda *x: jnp.stack(x), *t)   # noqa: E731
    got = bma_predict(graphdef, stack(p1, p2), stack(rest, r2), data, stacked_rest=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # PosteriorSamples spilled to disk, and a sample chunk that does not divide S.
    store = PosteriorSamples(tmp_path, max_in_memory=1)
    for p, r in [(p1, rest), (p2, r2), (p3, rest)]:
        store.append(p, r)
    assert len(store.files) == 2
    three = (expected * 2 + _probs(graphdef, p3, rest, data)) / 3
    got = bma_predict(graphdef, store, None, data, batch_size=5, sample_chunk=2)
    np.testing.assert_allclose(got, three, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_bma_on_segmentation_outputs():
    model = _TinySeg(rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5, 5, 1)).astype(np.float32)     # model-ready inputs
    p1, p2 = _perturbed(params, 1, 1.0), _perturbed(params, 2, 1.0)

    def member(p):
        return np.asarray(jax.nn.softmax(nnx.merge(graphdef, p, rest)(jnp.asarray(x)), -1))

    got = bma_predict(graphdef, [p1, p2], rest, x, batch_size=4)
    assert got.shape == (6, 5, 5, 3)
    np.testing.assert_allclose(got, 0.5 * (member(p1) + member(p2)), atol=1e-6)
    same = bma_predict(graphdef, [p1, p1], rest, x, batch_size=4)
    np.testing.assert_allclose(same, member(p1), atol=1e-6)


def test_refresh_batch_stats_matches_the_data(tiny):
    graphdef, params, rest, data = tiny
    stale = jax.tree.map(lambda x: x + 5.0, rest)
    fresh = refresh_batch_stats(graphdef, params, stale, data, num_batches=60, batch_size=23)
    # With the whole set as every batch, the running mean converges to its batch mean.
    model = nnx.merge(graphdef, params, rest)
    x = jnp.asarray(data.images.reshape(len(data), -1))
    h = model.backbone.dense(x)
    # Momentum 0.9: 60 batches leave 0.9⁶⁰ of the stale offset (up to 5 + |mean|).
    stale_mean = np.asarray(stale["backbone"]["bn"]["mean"][...])
    left = 0.9 ** 60 * np.abs(stale_mean - np.asarray(h.mean(0)))
    np.testing.assert_array_less(np.abs(np.asarray(fresh["backbone"]["bn"]["mean"][...])
                                        - np.asarray(h.mean(0))), left * 1.01 + 1e-5)


# --------------------------------------------------------------------------- front door
@pytest.fixture(scope="module")
def task():
    splits = Splits(_dataset(30, 0), _dataset(20, 1), _dataset(25, 2))
    model = _Tiny(rngs=nnx.Rngs(1))
    _, params, _ = split_model(model)
    spec = ParamSpec.from_params(params)
    rng = np.random.default_rng(0)
    var = jnp.asarray(rng.uniform(1e-3, 1e-2, spec.size), jnp.float32)
    dev = jnp.asarray(rng.normal(0, 0.03, (3, spec.size)), jnp.float32)
    return model, splits, Prior.lowrank(spec, spec.ravel(params), var, dev)


@pytest.mark.parametrize("method", ["sgld", "swag"])
def test_sample_posterior_end_to_end(task, method):
    model, splits, prior = task
    # start="prior" with a fixed λ skips MAP fine-tuning (tested in test_finetune.py):
    # this test covers sampling, storage, BMA and calibration, compiling little.
    config = PosteriorConfig(
        scale=10.0, start="prior",
        sgld=SGLDConfig(learning_rate=1e-2, cycle_steps=3, batch_size=10, progress=False),
        swag=SwagDownstreamConfig(epochs=3, every=2, rank=3, batch_size=10, progress=False,
                                  bn_batches=2),
        max_in_memory=2, eval_batch_size=5)
    result = sample_posterior(model, splits, prior, method=method, samples=3, config=config)
    samples, metrics = result
    assert len(samples) == 3 and result.scale == 10.0
    assert result.test_probs.shape == (25, 3)
    assert set(metrics) >= {"error", "nll", "ece", "brier"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert result.temperature > 0 and result.calibrated_metrics is not None
    heads = [np.asarray(p["head"]["kernel"][...]) for p, _ in samples]
    assert np.abs(heads[0] - heads[1]).max() > 1e-6              # distinct samples


def test_last_layer_nuts_learns_a_separable_head():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    feats = rng.normal(size=(60, 2)).astype(np.float32)
    feats[:, 0] += 2.0 * (2 * labels - 1)
    # The prior: a bayes_transfer Prior over the head's kernel and bias (as_numpyro()).
    head = {"head": {"bias": jnp.zeros(2), "kernel": jnp.zeros((2, 2))}}
    spec = ParamSpec.from_params(head, rule="^head/")
    prior = Prior.isotropic(spec, var=4.0)
    post = last_layer_nuts(feats, labels, prior, num_samples=150, num_warmup=150, seed=0)
    assert post["W"].shape == (150, 2, 2) and post["b"].shape == (150, 2)
    # Class 1 is to the right: its logit grows with feature 0.
    assert np.mean(post["W"][:, 0, 1] - post["W"][:, 0, 0]) > 1.0
    probs = last_layer_predict(post, feats)
    assert probs.shape == (60, 2) and (probs.argmax(-1) == labels).mean() > 0.9


def test_posterior_samples_roundtrip(tmp_path, tiny):
    graphdef, params, rest, _ = tiny
    store = PosteriorSamples(tmp_path / "s", max_in_memory=0)
    store.append(params, rest, step=7)
    p, r = store[0]
    assert store.steps == [7] and store.files[0].exists()
    jax.tree.map(np.testing.assert_array_equal, p, jax.device_get(params))
    jax.tree.map(np.testing.assert_array_equal, r, jax.device_get(rest))
    assert dataclasses.is_dataclass(PosteriorConfig())
