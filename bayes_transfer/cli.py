"""The ``bayes-transfer`` command.

    bayes-transfer demo                      the main job on the embedded default
    bayes-transfer train --dataset fashion_mnist --arch small_cnn --out runs/fmnist
    bayes-transfer evaluate --model runs/fmnist --dataset fashion_mnist
    bayes-transfer learn-prior --dataset fashion_mnist --arch small_cnn --out priors/my-prior
    bayes-transfer finetune --prior priors/my-prior --dataset mnist_5k --shots 10 --method lowrank
    bayes-transfer suggest --prior priors/my-prior --dataset mnist_5k --shots 10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from bayes_transfer.errors import BayesTransferError


def _classes(text: str | None):
    from bayes_transfer.data.mixing import parse_classes

    return parse_classes(text)


def _add_data_args(p, default="fashion_mnist"):
    p.add_argument("--dataset", default=default,
                   help="fashion_mnist, mnist_5k or digits (default: %(default)s), or a "
                        "mix such as fashion_mnist:0-4+mnist_5k; with --task segmentation: "
                        "isbi, fashion_scenes or an image/label folder")
    p.add_argument("--classes", default=None,
                   help="keep only these classes, relabelled from 0: '0-4' or '5,6,7'")
    p.add_argument("--data-dir", default=None, help="where prepared datasets live")


def _add_train_args(p, epochs, lr, batch_size=128):
    p.add_argument("--arch", default="small_cnn", help="small_cnn, resnet20, resnet32, ...")
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-augment", action="store_true", help="no random shifts")
    p.add_argument("--flip", action="store_true", help="random horizontal flips too "
                   "(right for clothing, wrong for digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None,
                   help="periodic checkpoints; rerunning with the same dir resumes")


def _train_config(args, **overrides):
    from bayes_transfer.train import TrainConfig
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                       optimizer=args.optimizer, learning_rate=args.lr,
                       augment=not args.no_augment, flip=args.flip,
                       weight_decay=args.weight_decay, seed=args.seed,
                       checkpoint_dir=args.checkpoint_dir, **overrides)


def cmd_train(args):
    from bayes_transfer import data, models
    from bayes_transfer import metrics as btm
    from bayes_transfer.checkpoints import save_model
    from bayes_transfer.objectives import cross_entropy_loss
    from bayes_transfer.train import fit, predict

    splits = data.load(args.dataset, classes=_classes(args.classes), seed=args.seed,
                       data_dir=args.data_dir)
    model = models.create(args.arch, splits.train.num_classes,
                          in_channels=splits.train.images.shape[-1], seed=args.seed)
    result = fit(model, splits.train, cross_entropy_loss, _train_config(args))
    test = btm.classification_metrics(_softmax(predict(result, splits.test)), splits.test.labels)
    test = {k: float(v) for k, v in test.items()}
    print(json.dumps({"dataset": args.dataset, "test": test}, indent=2))
    if args.out:
        save_model(result, args.out, extra={"dataset": args.dataset, "test": test})
        print(f"saved the model to {args.out}")


def _primary() -> bool:
    """Whether this process writes the outputs: in a multi-process run
    (``python -m bayes_transfer.launch``) every process holds the same replicated
    result, and one copy on the shared file system is enough."""
    import jax
    return jax.process_index() == 0


def _write_json(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a partial file is never left)."""
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)
    print(f"wrote {path}")


def _softmax(logits):
    import jax
    import numpy as np
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def cmd_evaluate(args):
    if args.task == "segmentation":
        from bayes_transfer.cli_segmentation import run_segmentation_evaluate
        return run_segmentation_evaluate(args)
    from bayes_transfer import data
    from bayes_transfer import metrics as btm
    from bayes_transfer.checkpoints import load_model
    from bayes_transfer.train import predict

    model, info = load_model(args.model)
    splits = data.load(args.dataset, classes=_classes(args.classes), data_dir=args.data_dir)
    ds = getattr(splits, args.split)
    probs = _softmax(predict(model, ds))
    metrics = {k: float(v) for k, v in btm.classification_metrics(probs, ds.labels).items()}
    print(json.dumps({"model": args.model, "dataset": args.dataset, "split": args.split,
                      **metrics}, indent=2))
    if args.reliability:
        from bayes_transfer.plots import reliability_diagram
        reliability_diagram({args.model: (probs, ds.labels)}, args.reliability)
        print(f"wrote {args.reliability}")


def cmd_learn_prior(args):
    import jax
    import jax.numpy as jnp

    from bayes_transfer import data, models
    from bayes_transfer.artifact import save_prior
    from bayes_transfer.learn import LearnPriorConfig, learn_prior
    from bayes_transfer.swag import SwagConfig
    from bayes_transfer.train import on_process_0

    if jax.process_count() > 1:
        # Several processes: say now, on every process, what save_prior would refuse
        # after training (an existing --out without --overwrite).
        from pathlib import Path

        from bayes_transfer.artifact import _check_destination
        _check_destination(Path(args.out).expanduser().absolute(), args.overwrite)
    classes = _classes(args.classes)
    splits = data.load(args.dataset, classes=classes, seed=args.seed, data_dir=args.data_dir,
                       label_noise=args.label_noise, shots_per_class=args.source_shots)
    model = models.create(args.arch, splits.train.num_classes,
                          in_channels=splits.train.images.shape[-1], seed=args.seed)
    train = _train_config(args, desc="source")
    loss_kw = {}
    if args.method == "simclr":  # SimCLR makes its own views: no extra random shifts
        from bayes_transfer.ssl import simclr_loss
        train, loss_kw = dataclasses.replace(train, augment=False), {"loss_fn": simclr_loss()}
    config = LearnPriorConfig(
        train=train, swag_epochs=args.swag_epochs,
        swag_learning_rate=args.swag_lr, swag=SwagConfig(rank=args.rank, every=args.every))
    meta = {"architecture": models.model_config(model),
            "source": {"dataset": args.dataset, "classes": list(classes) if classes else None,
                       "split": "train", "method": args.method,
                       "label_noise": args.label_noise, "images": len(splits.train)}}
    prior, _ = learn_prior(model, splits, config, checkpoint_dir=args.checkpoint_dir,
                           metadata=meta, **loss_kw)
    if args.dtype == "bfloat16":
        prior = prior.astype(jnp.bfloat16)
    # With several processes every one holds the same replicated prior: process 0 writes
    # its own copy alone (save_prior never waits for the others), the others wait.
    on_process_0(lambda: save_prior(prior, args.out, overwrite=args.overwrite),
                 f"writing the prior artifact {args.out}")
    if _primary():
        key = "linear_probe_accuracy" if args.method == "simclr" else "source_accuracy"
        print(f"saved {prior} to {args.out}; {key.replace('_', ' ')} "
              f"{prior.metadata.get(key)}")


def cmd_finetune(args):
    if args.task == "segmentation":
        from bayes_transfer.cli_segmentation import run_segmentation_finetune
        return run_segmentation_finetune(args)
    from bayes_transfer import data
    from bayes_transfer.demo import model_for, resolve_prior
    from bayes_transfer.inference.map import FinetuneConfig, finetune
    from bayes_transfer.prior import METHODS
    from bayes_transfer.train import TrainConfig

    prior = resolve_prior(args.prior)
    splits = data.load(args.dataset, shots_per_class=args.shots, classes=_classes(args.classes),
                       seed=args.seed, data_dir=args.data_dir)
    methods = METHODS if args.method == ["all"] else args.method
    config = FinetuneConfig(train=TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        learning_rate=args.lr, seed=args.seed, desc="finetune"), head_decay=args.head_decay,
        reinit_top=args.reinit_top)
    results, cache = [], {}
    scale = "auto" if args.scale == "auto" else float(args.scale)
    for method in methods:
        model = model_for(prior, splits.train.num_classes, args.seed)
        if method in ("sgld", "swag"):
            from bayes_transfer.inference.bma import PosteriorConfig, sample_posterior
            post = PosteriorConfig(prior_method=args.prior_method, scale=scale, map=config)
            res = sample_posterior(model, splits, prior, method, samples=args.samples,
                                   config=post, log=print)
            results.append({**res.summary(), "val": res.val_metrics,
                            "map": res.map_metrics, "calibrated": res.calibrated_metrics})
            print(f"{method:10s} BMA of {args.samples} samples, λ={res.scale:<9.3g} " + " ".join(
                f"{k}={res.metrics[k]:.4f}" for k in ("error", "nll", "ece", "brier")))
            continue
        res = finetune(model, splits, prior, method, scale=scale, config=config, cache=cache)
        results.append({**res.summary(), "val": res.val_metrics, "sweep": res.sweep})
        print(f"{method:10s} λ={res.scale:<9.3g} " + " ".join(
            f"{k}={res.metrics[k]:.4f}" for k in ("error", "nll", "ece", "brier")))
    if args.out and _primary():
        _write_json(args.out, {"prior": args.prior, "dataset": args.dataset,
                               "shots": args.shots, "seed": args.seed, "results": results})


def cmd_suggest(args):
    import shlex

    from bayes_transfer import data
    from bayes_transfer.demo import resolve_prior
    from bayes_transfer.suggest import suggest

    prior = resolve_prior(args.prior)
    splits = data.load(args.dataset, shots_per_class=args.shots, classes=_classes(args.classes),
                       seed=args.seed, data_dir=args.data_dir)
    s = suggest(prior, splits, seed=args.seed)
    scale = s.scale(prior, args.method)
    print(s.explain())
    command = ["bayes-transfer", "finetune", "--prior", args.prior, "--dataset", args.dataset,
               "--shots", str(args.shots), "--method", args.method, "--scale", f"{scale:.6g}",
               "--reinit-top", str(s.reinit_top), "--seed", str(args.seed)]
    if args.classes:
        command += ["--classes", args.classes]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    print(f"λ for {args.method}: {scale:.6g}. To fine-tune with it:\n  {shlex.join(command)}")
    if args.out and _primary():
        _write_json(args.out, {"prior": args.prior, "dataset": args.dataset,
                               "shots": args.shots, "seed": args.seed, "method": args.method,
                               "scale": scale, **s.as_dict(), "reasons": list(s.reasons),
                               "command": command})


def cmd_demo(args):
    from bayes_transfer.demo import DEMO_CONFIG, run_demo
    from bayes_transfer.inference.map import FinetuneConfig

    config = FinetuneConfig() if args.full_grid else DEMO_CONFIG
    run_demo(args.prior, target=args.dataset, shots=args.shots, seeds=tuple(range(args.seeds)),
             methods=tuple(args.methods.split(",")), out_dir=args.out, config=config)


def build_parser() -> argparse.ArgumentParser:
    from bayes_transfer.prior import METHODS

    parser = argparse.ArgumentParser(
        prog="bayes-transfer",
        description="Bayesian transfer learning with learned priors: learn a SWAG prior on "
                    "a source task, publish it, fine-tune under it.",
        epilog="Start with `bayes-transfer demo`. Each command has --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="Fashion-MNIST prior → MNIST-5k few-shot, all methods")
    p.add_argument("--prior", default=None, help="prior name, path or URL "
                   "(default: the published fashion-mnist/small-cnn)")
    p.add_argument("--dataset", default="mnist_5k")
    p.add_argument("--shots", type=int, default=10, help="training examples per class")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--full-grid", action="store_true",
                   help="5 prior strengths (v = 0.01..100) and 40 epochs per run instead of "
                        "3 (v = 1, 10, 100) and 30")
    p.add_argument("--out", default="outputs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="supervised training on a named dataset")
    _add_data_args(p)
    _add_train_args(p, epochs=3, lr=0.1)
    p.add_argument("--out", default=None, help="save the trained model to this directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, NLL, ECE and Brier of a saved model")
    p.add_argument("--model", required=True, help="directory written by `train --out`")
    _add_data_args(p)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--reliability", default=None, help="write a reliability diagram PNG")
    p.add_argument("--task", default="classification", choices=["classification", "segmentation"])
    from bayes_transfer.cli_segmentation import add_segmentation_eval_args
    add_segmentation_eval_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("learn-prior", help="source training + SWAG → a prior artifact")
    _add_data_args(p)
    _add_train_args(p, epochs=4, lr=0.05)
    p.add_argument("--swag-epochs", type=float, default=2.0)
    p.add_argument("--swag-lr", type=float, default=0.01, help="constant LR while collecting")
    p.add_argument("--rank", type=int, default=20, help="K, deviations kept")
    p.add_argument("--every", type=int, default=50, help="steps between SWAG snapshots")
    p.add_argument("--method", default="supervised", choices=["supervised", "simclr"],
                   help="source objective: cross-entropy, or SimCLR's NT-Xent (τ=0.2, a "
                        "projection head outside the prior; reports a linear-probe accuracy)")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="replace this fraction of source training labels by wrong ones "
                        "(source-quality studies)")
    p.add_argument("--source-shots", type=int, default=None,
                   help="use only this many source images per class (source-size studies)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_learn_prior)

    p = sub.add_parser("finetune", help="fine-tune under a prior (λ chosen on validation)")
    p.add_argument("--prior", required=True, help="prior name, path or URL")
    _add_data_args(p, default="mnist_5k")
    p.add_argument("--shots", type=int, default=10, help="examples per class (default 10)")
    p.add_argument("--method", nargs="+", default=["lowrank"],
                   help=f"one or more of {', '.join(METHODS)} (MAP), sgld or swag "
                        f"(samples + model averaging), or 'all' (every MAP method)")
    p.add_argument("--samples", type=int, default=10,
                   help="posterior samples for sgld/swag (default 10)")
    p.add_argument("--prior-method", default="lowrank", choices=METHODS,
                   help="the prior sgld/swag sample under (default lowrank)")
    p.add_argument("--scale", default="auto", help="λ, or 'auto' (validation grid)")
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", default="adam", choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--head-decay", type=float, default=1e-4)
    p.add_argument("--reinit-top", type=int, default=0,
                   help="re-initialise the top k backbone blocks (outside the prior)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--task", default="classification", choices=["classification", "segmentation"],
                   help="segmentation: --dataset isbi, fashion_scenes or an image/label folder")
    from bayes_transfer.cli_segmentation import add_segmentation_args
    add_segmentation_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("suggest", help="propose λ and re-initialisation from a "
                       "transferability measure, before fine-tuning")
    p.add_argument("--prior", required=True, help="prior name, path or URL")
    _add_data_args(p, default="mnist_5k")
    p.add_argument("--shots", type=int, default=10, help="examples per class (default 10)")
    p.add_argument("--method", default="lowrank", choices=METHODS,
                   help="the prior the λ is for (default lowrank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the suggestion as JSON here")
    p.set_defaults(func=cmd_suggest)

    from bayes_transfer.cli_priors import add_priors_parser
    add_priors_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BayesTransferError as e:
        print(f"bayes-transfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with the same --checkpoint-dir to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
