"""Gradient diagnostics: cosine and norm ratio of the likelihood and prior gradients."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bayes_transfer import data, models
from bayes_transfer.analysis.diagnostics import gradient_diagnostics, trace_gradients
from bayes_transfer.params import ParamSpec, flatten_with_paths
from bayes_transfer.prior import Prior
from bayes_transfer.training import TrainConfig, split_model


@pytest.fixture(scope="module")
def splits():
    return data.load("digits", shots_per_class=5, seed=0)


@pytest.fixture(scope="module")
def prior():
    _, params, _ = split_model(models.create("small_cnn", 10, seed=1, width=0.25))
    spec = ParamSpec.from_params(params)
    rng = np.random.default_rng(0)
    mean = spec.ravel(params) + jnp.asarray(rng.normal(0, 1e-2, spec.size), jnp.float32)
    var = jnp.asarray(rng.uniform(1e-4, 1e-3, spec.size), jnp.float32)
    dev = jnp.asarray(rng.normal(0, 1e-2, (3, spec.size)), jnp.float32)
    return Prior.lowrank(spec, mean, var, dev, scale=30.0)


def _covered(grads):
    """The backbone leaves of a gradient tree as one vector (sorted paths)."""
    leaves = flatten_with_paths(grads)
    return np.concatenate([np.ravel(leaves[p]) for p in sorted(leaves)
                           if p.startswith("backbone/")]).astype(np.float64)


def test_cosine_and_ratio_equal_a_direct_computation(splits, prior):
    model = models.create("small_cnn", 10, seed=0, width=0.25)
    graphdef, params, rest = split_model(model)
    batches = [b for _, b in zip(range(2), data.batches(splits.train, 16, seed=0, epoch=0))]
    n = len(splits.train)

    def nll(p, batch):
        logits = nnx.merge(graphdef, p, rest, copy=True)(batch["image"], train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    grad_nll = jax.jit(jax.grad(nll))
    g_lik = np.mean([_covered(grad_nll(params, b)) for b in batches], 0)
    g_prior = _covered(jax.grad(lambda p: -prior.log_prob(p) / n)(params))
    cos = g_lik @ g_prior / (np.linalg.norm(g_lik) * np.linalg.norm(g_prior))
    ratio = np.linalg.norm(g_prior) / np.linalg.norm(g_lik)

    # An Adam state after one step with a known gradient g: ν̂ = g², so the
    # preconditioner is 1/(|g| + ε).
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.5) * (1 + jnp.arange(x.size).reshape(x.shape)
                                                        % 3), params)
    tx = optax.adam(1e-3)
    _, opt_state = tx.update(g, tx.init(params), params)
    pre = 1.0 / (np.abs(_covered(g)) + 1e-8)
    a, b = g_lik * pre, g_prior * pre

    out = gradient_diagnostics(model, batches, prior, n, opt_state=opt_state)
    np.testing.assert_allclose(out["cosine"], cos, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["ratio"], ratio, rtol=1e-4)
    np.testing.assert_allclose(out["lik_norm"], np.linalg.norm(g_lik), rtol=1e-4)
    np.testing.assert_allclose(out["prior_norm"], np.linalg.norm(g_prior), rtol=1e-4)
    np.testing.assert_allclose(out["adam_cosine"],
                               a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(out["adam_ratio"], np.linalg.norm(b) / np.linalg.norm(a),
                               rtol=1e-4)
    one = gradient_diagnostics(model, batches[0], prior, n)
    g1 = _covered(grad_nll(params, batches[0]))
    np.testing.assert_allclose(one["cosine"], g1 @ g_prior / (np.linalg.norm(g1)
                                                             * np.linalg.norm(g_prior)),
                               rtol=1e-4, atol=1e-6)
    assert "adam_ratio" not in one
    # the prior gradient scales as 1/λ
    weaker = gradient_diagnostics(model, batches, prior.rescale(300.0), n)
    np.testing.assert_allclose(weaker["ratio"], out["ratio"] / 10, rtol=1e-3)


def test_trace_gradients_logs_sgd_and_adam_along_training(splits, prior):
    model = models.create("small_cnn", 10, seed=0, width=0.25)
    base = TrainConfig(epochs=2, batch_size=25, optimizer="sgd", learning_rate=1e-2,
                       progress=False)
    traces = trace_gradients(model, splits, prior, method="lowrank", variance=1e-1,
                             optimizers={"sgd": base,
                                         "adam": dataclasses.replace(base, optimizer="adam")},
                             num_batches=2, diag_batch_size=25)
    assert set(traces) == {"sgd", "adam"}
    for name, trace in traces.items():
        assert [r["epoch"] for r in trace.records] == [0, 1, 2]
        # at the start θ is the prior mean: no prior gradient, no angle
        assert trace.records[0]["prior_norm"] == 0 and math.isnan(trace.records[0]["cosine"])
        assert np.all(np.isfinite(trace.series("cosine")[1:]))
        assert np.all(trace.series("ratio")[1:] > 0)
        assert np.all(np.isfinite(trace.series("val_nll")))
        assert math.isfinite(trace.records[-1]["loss"])
        assert ("adam_ratio" in trace.records[-1]) == (name == "adam")
    # the same start for both optimizers
    assert traces["sgd"].records[0]["lik_norm"] == pytest.approx(
        traces["adam"].records[0]["lik_norm"])
