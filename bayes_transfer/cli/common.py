"""What several commands share: data and training options, output helpers."""
from __future__ import annotations

import argparse
import math

import jax
import numpy as np

from bayes_transfer.cli.datasets import add_stream_args
from bayes_transfer.data.mixing import parse_classes
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.fsutil import write_json
from bayes_transfer.training import TrainConfig


def classes(text: str | None):
    """``--classes '0-4'`` / ``'5,6,7'`` as a tuple (None: all); a clear error otherwise."""
    try:
        return parse_classes(text)
    except ValueError as e:
        raise BayesTransferError(str(e)) from None


def add_data_args(p: argparse.ArgumentParser, default: str = "fashion_mnist") -> None:
    p.add_argument("--dataset", default=default,
                   help="fashion_mnist, mnist_5k or digits (default: %(default)s), a "
                        "mix such as fashion_mnist:0-4+mnist_5k, a folder DIR/train/CLASS/*.jpg "
                        "+ DIR/val/..., or tfds:NAME[/CONFIG][:VERSION]; with --task "
                        "segmentation: isbi, fashion_scenes or an image/label folder")
    p.add_argument("--classes", default=None,
                   help="keep only these classes, relabelled from 0: '0-4' or '5,6,7'")
    p.add_argument("--data-dir", default=None, help="where prepared datasets live")
    add_stream_args(p)


def add_train_args(p: argparse.ArgumentParser, epochs: float, lr: float,
                   batch_size: int = 128) -> None:
    p.add_argument("--arch", default="small_cnn", help="small_cnn, resnet20, resnet32, ...")
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--steps", type=int, default=None,
                   help="run this many optimizer steps instead of --epochs (learn-prior: "
                        "each phase), e.g. a quick check on a large dataset")
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


def train_config(args, **overrides) -> TrainConfig:
    """The ``TrainConfig`` that :func:`add_train_args`' options describe."""
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                       optimizer=args.optimizer, learning_rate=args.lr,
                       augment=not args.no_augment, flip=args.flip,
                       weight_decay=args.weight_decay, seed=args.seed,
                       checkpoint_dir=args.checkpoint_dir, steps=args.steps, **overrides)


def is_primary() -> bool:
    """Whether this process writes the outputs: in a multi-process run
    (``python -m bayes_transfer.launch``) every process holds the same replicated
    result, and one copy on the shared file system is enough."""
    return jax.process_index() == 0


def jsonable(x):
    """NaN/inf → None/str so the JSON is strict."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_report(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically and say so."""
    write_json(path, obj, default=float)
    print(f"wrote {path}")


def softmax(logits) -> np.ndarray:
    return np.asarray(jax.nn.softmax(logits, axis=-1))
