"""``train``, ``evaluate`` and ``learn-prior``: the source side."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from bayes_transfer import models
from bayes_transfer.artifacts import check_destination, save_prior
from bayes_transfer.cli import segmentation
from bayes_transfer.cli.common import (add_data_args, add_train_args, classes, is_primary,
                                       softmax, train_config)
from bayes_transfer.cli.datasets import (image_spec, input_of, is_streamed, load_splits,
                                         positive_int)
from bayes_transfer.evaluation import metrics as btm
from bayes_transfer.evaluation.plots import reliability_diagram
from bayes_transfer.learn import LearnPriorConfig, learn_prior
from bayes_transfer.ssl import simclr_loss
from bayes_transfer.swag import SwagConfig
from bayes_transfer.training import (cross_entropy_loss, fit, load_model, on_process_0, predict,
                                     save_model)


def _source_splits(args, **kwargs):
    """The source task's splits; random flips on for natural images unless --no-flip."""
    splits = load_splits(args, arch=args.arch, classes=classes(args.classes), **kwargs)
    if is_streamed(args) and not args.no_flip:
        args.flip = True
    return splits


def cmd_train(args) -> None:
    splits = _source_splits(args)
    model = models.create(args.arch, splits.train.num_classes,
                          in_channels=splits.train.image_shape[-1], seed=args.seed)
    result = fit(model, splits.train, cross_entropy_loss, train_config(args))
    test = btm.classification_metrics(softmax(predict(result, splits.test)), splits.test.labels)
    test = {k: float(v) for k, v in test.items()}
    print(json.dumps({"dataset": args.dataset, "test": test}, indent=2))
    if args.out:
        spec = image_spec(splits.train)
        save_model(result, args.out, extra={"dataset": args.dataset, "test": test,
                                            **({"input": spec} if spec else {})})
        print(f"saved the model to {args.out}")


def cmd_evaluate(args) -> None:
    if args.task == "segmentation":
        segmentation.run_evaluate(args)
        return
    model, info = load_model(args.model)
    splits = load_splits(args, spec=input_of(info.get("input")), channels=model.in_channels,
                         classes=classes(args.classes))
    ds = getattr(splits, args.split)
    probs = softmax(predict(model, ds))
    metrics = {k: float(v) for k, v in btm.classification_metrics(probs, ds.labels).items()}
    print(json.dumps({"model": args.model, "dataset": args.dataset, "split": args.split,
                      **metrics}, indent=2))
    if args.reliability:
        reliability_diagram({args.model: (probs, ds.labels)}, args.reliability)
        print(f"wrote {args.reliability}")


def cmd_learn_prior(args) -> None:
    if jax.process_count() > 1:
        # Several processes: say now, on every process, what save_prior would refuse
        # after training (an existing --out without --overwrite).
        check_destination(Path(args.out).expanduser().absolute(), args.overwrite)
    source_classes = classes(args.classes)
    splits = _source_splits(args, label_noise=args.label_noise,
                            shots_per_class=args.source_shots)
    model = models.create(args.arch, splits.train.num_classes,
                          in_channels=splits.train.image_shape[-1], seed=args.seed)
    train = train_config(args, desc="source")
    loss_kw = {}
    if args.objective == "simclr":  # SimCLR makes its own views: no extra random shifts
        train, loss_kw = dataclasses.replace(train, augment=False), {"loss_fn": simclr_loss()}
    config = LearnPriorConfig(
        train=train, swag_epochs=args.swag_epochs,
        swag_learning_rate=args.swag_lr, swag=SwagConfig(rank=args.rank, every=args.every))
    meta = {"architecture": models.model_config(model),
            "source": {"dataset": args.dataset,
                       "classes": list(source_classes) if source_classes else None,
                       "split": "train", "method": args.objective,
                       "label_noise": args.label_noise, "images": len(splits.train)}}
    if image_spec(splits.train):       # what fine-tuning must feed the model
        meta["source"]["input"] = image_spec(splits.train)
    prior, _ = learn_prior(model, splits, config, checkpoint_dir=args.checkpoint_dir,
                           metadata=meta, **loss_kw)
    if args.dtype == "bfloat16":
        prior = prior.astype(jnp.bfloat16)
    # With several processes every one holds the same replicated prior: process 0 writes
    # its own copy alone (save_prior never waits for the others), the others wait.
    on_process_0(lambda: save_prior(prior, args.out, overwrite=args.overwrite),
                 f"writing the prior artifact {args.out}")
    if is_primary():
        key = "linear_probe_accuracy" if args.objective == "simclr" else "source_accuracy"
        print(f"saved {prior} to {args.out}; {key.replace('_', ' ')} "
              f"{prior.metadata.get(key)}")


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="supervised training on a named dataset")
    add_data_args(p)
    add_train_args(p, epochs=3, lr=0.1)
    p.add_argument("--out", default=None, help="save the trained model to this directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, NLL, ECE and Brier of a saved model")
    p.add_argument("--model", required=True, help="directory written by `train --out`")
    add_data_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--reliability", default=None, help="write a reliability diagram PNG")
    p.add_argument("--task", default="classification", choices=["classification", "segmentation"])
    segmentation.add_evaluate_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("learn-prior", help="source training + SWAG → a prior artifact")
    add_data_args(p)
    add_train_args(p, epochs=4, lr=0.05)
    p.add_argument("--swag-epochs", type=float, default=2.0)
    p.add_argument("--swag-lr", type=float, default=0.01, help="constant LR while collecting")
    p.add_argument("--rank", type=int, default=20, help="K, deviations kept")
    p.add_argument("--every", type=int, default=50, help="steps between SWAG snapshots")
    p.add_argument("--objective", "--method", dest="objective", default="supervised",
                   choices=["supervised", "simclr"],
                   help="source objective: cross-entropy, or SimCLR's NT-Xent (τ=0.2, a "
                        "projection head outside the prior; reports a linear-probe "
                        "accuracy). --method is its old name")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="replace this fraction of source training labels by wrong ones "
                        "(source-quality studies)")
    p.add_argument("--source-shots", type=positive_int, default=None,
                   help="use only this many source images per class (source-size studies)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_learn_prior)
