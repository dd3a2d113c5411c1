"""``finetune --task segmentation`` and ``evaluate --task segmentation``.

The classification commands (:mod:`bayes_transfer.cli.finetune`, :mod:`bayes_transfer.cli.train`)
add these options to their parsers and hand segmentation runs to :func:`run_finetune` /
:func:`run_evaluate`::

    bayes-transfer finetune --task segmentation --prior fashion-mnist/small-cnn \\
        --dataset isbi --num-train 6 --method l2sp lowrank --steps 300 \\
        --overlays outputs/isbi.png --save-model outputs/isbi-model --out outputs/isbi.json
    bayes-transfer evaluate --task segmentation --model outputs/isbi-model/lowrank \\
        --dataset isbi --overlays outputs/isbi-eval.png

Segmentation uses ``--steps`` (optimizer steps, whatever the training-set size) and
``--images-per-batch`` rather than the classification ``--epochs`` / ``--batch-size``,
and ``--num-train`` (images, or scenes) rather than ``--shots``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from bayes_transfer import models
from bayes_transfer import segmentation as seg
from bayes_transfer.cli.common import classes, jsonable, write_report
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.hub import load_prior
from bayes_transfer.inference.map import DEFAULT_VARIANCES
from bayes_transfer.prior import METHODS

__all__ = ["add_evaluate_args", "add_finetune_args", "run_evaluate", "run_finetune"]

_DEFAULT_NUM_TRAIN = {"isbi": 6, "fashion_scenes": 20}
# option defaults that evaluate replaces with the saved model's data options
_EVAL_DEFAULTS = {"crop": 128, "crops_per_image": 4, "val": "strip"}
# defaults of the classification CLI's --dataset, never segmentation data
_CLASSIFICATION_DATASETS = ("fashion_mnist", "mnist_5k", "digits")


def _add(parser, *names, **kwargs):
    """``parser.add_argument`` unless one of ``names`` is already an option of it."""
    if any(n in parser._option_string_actions for n in names):
        return None
    return parser.add_argument(*names, **kwargs)


def _add_data_args(p, seed_default: int | None = 0) -> None:
    _add(p, "--task", default="classification", choices=["classification", "segmentation"],
         help="classification (default) or segmentation")
    _add(p, "--dataset", default=None,
         help="segmentation: isbi, fashion_scenes, or a folder with image/ and label/")
    _add(p, "--num-train", type=int, default=None,
         help="segmentation: training images (isbi, folders; default 6 / 4) or scenes "
              "(fashion_scenes; default 20)")
    _add(p, "--seed", type=int, default=seed_default,
         help="split / scene seed" + ("" if seed_default is not None else
                                      " (default: the saved model's)"))
    _add(p, "--data-dir", default=None, help="where prepared datasets live")
    _add(p, "--classes", default=None,
         help="fashion_scenes: garment classes to paste, e.g. '5-9' (mask 1..5)")
    _add(p, "--crop", type=int, default=128,
         help="segmentation: side of the random training crops (default 128)")
    _add(p, "--crops-per-image", type=int, default=4,
         help="segmentation: crops per image per step (default 4)")
    _add(p, "--val", default="strip", choices=["strip", "images"],
         help="isbi/folders: validation = bottom strip of the training images (default) "
              "or 4 other images")
    _add(p, "--num-test", type=int, default=None,
         help="test images (isbi: the last 6 sections) or test scenes (default 200)")
    _add(p, "--eval-batch-size", type=int, default=4, help="whole images per forward pass")


def add_finetune_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``finetune --task segmentation`` (only those ``p`` lacks are added)."""
    _add_data_args(p)
    _add(p, "--prior", required=True, help="prior name, path or URL")
    _add(p, "--method", nargs="+", default=["lowrank"],
         help=f"one or more of {', '.join(METHODS)}, or 'all'")
    _add(p, "--scale", default="auto", help="λ, or 'auto' (validation grid)")
    _add(p, "--steps", type=int, default=300,
         help="segmentation: optimizer steps per run (default 300)")
    _add(p, "--images-per-batch", type=int, default=4,
         help="segmentation: images per step (each gives --crops-per-image crops)")
    _add(p, "--lr", type=float, default=1e-3)
    _add(p, "--optimizer", default="adam", choices=["sgd", "adam", "adamw"])
    _add(p, "--head-decay", type=float, default=1e-4,
         help="weight decay of the head (segmentation: of the decoder)")
    _add(p, "--variances", default=None,
         help="effective prior variances of the λ grid, e.g. '1,100' (default: 1e-2..100)")
    _add(p, "--select-by", default=None,
         help="validation metric that chooses λ (segmentation: miou (default), nll, "
              "pixel_accuracy)")
    _add(p, "--out", default=None, help="write results JSON here")
    _add(p, "--overlays", default=None,
         help="write PNG overlays of test images, truth and prediction (one file per "
              "method: NAME-METHOD.png when several)")
    _add(p, "--save-model", default=None,
         help="save each fine-tuned model to DIR/METHOD (reload with evaluate --model)")
    return p


def add_evaluate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``evaluate --task segmentation`` (only those ``p`` lacks are added)."""
    _add_data_args(p, seed_default=None)
    _add(p, "--model", required=True, help="directory written by finetune --save-model")
    _add(p, "--split", default="test", choices=["train", "val", "test"])
    _add(p, "--overlays", default=None, help="write PNG overlays here")
    _add(p, "--max-images", type=int, default=4, help="images in the overlay figure")
    _add(p, "--out", default=None, help="write metrics JSON here")
    return p


# ------------------------------------------------------------------------------ running

def _num_train(args) -> int:
    if getattr(args, "num_train", None):
        return args.num_train
    return _DEFAULT_NUM_TRAIN.get(args.dataset, 4)


def _load_splits(args, num_train: int):
    if not args.dataset:
        raise BayesTransferError("--task segmentation needs --dataset isbi, fashion_scenes or "
                                 "a folder with image/ and label/")
    options: dict = {"data_dir": args.data_dir}
    name = args.dataset
    if name in ("fashion_scenes", "fashion-scenes"):
        options["classes"] = classes(getattr(args, "classes", None))
        if args.num_test:
            options["num_test"] = args.num_test
    else:
        options.update(crop=args.crop, crops_per_image=args.crops_per_image, val=args.val)
        if args.num_test:
            options["num_test"] = args.num_test
    try:
        return seg.load_task(name, num_train, seed=args.seed, **options)
    except ValueError as e:      # impossible split sizes, bad crops: a user error
        raise BayesTransferError(str(e)) from e


def _data_options(args) -> dict:
    """The options that define the splits, saved with a model so evaluate rebuilds them."""
    return {k: getattr(args, k, None) for k in ("classes", "crop", "crops_per_image", "val",
                                                 "num_test")}


def _overlay_path(base: str, method: str, several: bool) -> str:
    if not several:
        return base
    p = Path(base)
    return str(p.with_name(f"{p.stem}-{method}{p.suffix or '.png'}"))


def run_finetune(args) -> dict:
    """``finetune --task segmentation``: every method in ``args.method``, λ by validation.

    Prints one line per method, and writes ``--out`` (JSON), ``--overlays`` (PNG) and
    ``--save-model`` (model directories) when given. Returns the JSON-able results.
    """
    prior = load_prior(args.prior)
    num_train = _num_train(args)
    splits = _load_splits(args, num_train)
    arch = prior.metadata.get("architecture", {})
    channels = splits.train.images.shape[-1]
    if arch and arch.get("in_channels", channels) != channels:
        raise BayesTransferError(f"the prior was learned on {arch['in_channels']}-channel "
                                 f"images; {args.dataset} has {channels}")
    methods = list(METHODS) if args.method in (["all"], "all") else list(args.method)
    variances = (tuple(float(v) for v in args.variances.split(","))
                 if getattr(args, "variances", None) else DEFAULT_VARIANCES)
    select_by = getattr(args, "select_by", None) or "miou"
    config, steps = seg.default_config(
        steps=args.steps, batch_size=args.images_per_batch, learning_rate=args.lr,
        decoder_decay=args.head_decay, variances=variances, select_by=select_by,
        seed=args.seed, progress=True)
    if args.optimizer != "adam":
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, optimizer=args.optimizer))
    scale = "auto" if str(args.scale) == "auto" else float(args.scale)
    print(f"prior: {prior}; data: {splits.train} / val {splits.val} / test {splits.test}")
    results, cache = [], {}
    model = models.from_prior(prior, splits.num_classes, seed=args.seed, segmentation=True)
    for method in methods:
        res = seg.finetune_segmentation(model, splits, prior, method, scale=scale,
                                        config=config, steps=steps, cache=cache,
                                        eval_batch_size=args.eval_batch_size)
        results.append({**res.summary(), "val": res.val_metrics, "sweep": res.sweep})
        print(f"{method:10s} λ={res.scale:<9.3g} " + " ".join(
            f"{k}={res.metrics[k]:.4f}" for k in ("miou", "pixel_accuracy", "nll", "ece")))
        if args.overlays:
            path = _overlay_path(args.overlays, method, len(methods) > 1)
            seg.save_overlays(splits.test, res.test_probs, path,
                              title=f"{args.dataset}, {num_train} training images, {method} "
                                    f"(λ={res.scale:.3g}): test mIoU "
                                    f"{res.metrics['miou']:.3f}")
            print(f"  wrote {path}")
        if getattr(args, "save_model", None):
            where = Path(args.save_model) / method
            seg.save_segmentation_model(res.result, where, extra=jsonable({
                "prior": args.prior, "dataset": args.dataset, "num_train": num_train,
                "seed": args.seed, "data": _data_options(args), "method": method,
                "scale": res.scale, "test": res.metrics}))
            print(f"  saved the model to {where}")
    report = {"task": "segmentation", "prior": args.prior, "dataset": args.dataset,
              "num_train": num_train, "seed": args.seed, "steps": steps,
              "results": jsonable(results)}
    if args.out:
        write_report(args.out, report)
    return report


def run_evaluate(args) -> dict:
    """``evaluate --task segmentation``: metrics of a saved model on a split, overlays.

    The data options the model was fine-tuned with (saved in its ``model.json``: classes,
    validation scheme, test size, seed) are reused unless given on the command line.
    """
    model, info = seg.load_segmentation_model(args.model)
    if args.dataset in (None, *_CLASSIFICATION_DATASETS) and info.get("dataset"):
        args.dataset = info["dataset"]          # the data the model was fine-tuned on
    if args.seed is None:
        args.seed = info.get("seed", 0)
    for key, value in info.get("data", {}).items():   # the model's splits unless overridden
        if getattr(args, key, None) in (None, _EVAL_DEFAULTS.get(key)):
            setattr(args, key, value)
    num_train = args.num_train or info.get("num_train") or _num_train(args)
    splits = _load_splits(args, num_train)
    ds = getattr(splits, args.split)
    if ds.num_classes != model.num_classes:
        raise BayesTransferError(
            f"the model predicts {model.num_classes} classes but {args.dataset} has "
            f"{ds.num_classes} here; pass the --classes it was fine-tuned with")
    metrics, probs = seg.evaluate_segmentation(model, ds, batch_size=args.eval_batch_size)
    report = {"model": args.model, "dataset": args.dataset, "split": args.split,
              **jsonable(metrics)}
    print(json.dumps(report, indent=2))
    if args.overlays:
        seg.save_overlays(ds, probs, args.overlays, max_images=args.max_images,
                          title=f"{args.model} on {args.dataset} {args.split}: mIoU "
                                f"{metrics['miou']:.3f}")
        print(f"wrote {args.overlays}")
    if args.out:
        write_report(args.out, report)
    return report
