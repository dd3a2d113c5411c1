"""``--dataset`` for every command: a built-in name, ``tfds:NAME`` or a folder, and the
options of streamed data (image size, workers, normalisation, unreadable images).

The model's input is decided once here: ``train``/``learn-prior`` build the model for
the data (``--image-size``, default 224 for the torchvision ResNets and 32 otherwise;
the images' own channels), and record it (``model.json`` / the prior's
``source.input``); ``finetune``/``suggest``/``evaluate`` give the data the input the
prior or model was trained on (its size, channels and normalisation).
"""
from __future__ import annotations

import argparse
import os

from bayes_transfer import data
from bayes_transfer.data.array_dataset import with_channels
from bayes_transfer.data.open_dataset import is_external
from bayes_transfer.errors import BayesTransferError

#: The input size each architecture was designed for (others: SMALL_IMAGE_SIZE).
IMAGE_SIZES = {"resnet18": 224, "resnet50": 224}
SMALL_IMAGE_SIZE = 32


def default_workers() -> int:
    """Worker processes for decoding: one core is left to the training process."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum`` (a usage error, not a traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


#: ``--shots -3`` is a usage error, not a traceback
positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """Options that matter for a folder or a tfds dataset (ignored for the built-ins)."""
    g = p.add_argument_group("folders and tfds datasets")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="model input size (default: the prior's or model's; for a new model "
                        f"224 for {', '.join(IMAGE_SIZES)}, else {SMALL_IMAGE_SIZE})")
    g.add_argument("--workers", type=non_negative_int, default=default_workers(),
                   help="processes decoding and augmenting images (0: the training process; "
                        "default %(default)s)")
    g.add_argument("--normalize", default="imagenet", choices=["imagenet", "dataset"],
                   help="per-channel statistics: ImageNet's (default) or estimated on 1,000 "
                        "training images")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="decode every image once first and leave out (and list) those that "
                        "fail; by default an unreadable image stops with its file name")
    g.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flips in training (on by default for folders "
                        "and tfds datasets, with random-resized crops)")
    g.add_argument("--download", action="store_true",
                   help="allow tfds to download and prepare a tfds: dataset (needs internet)")


def is_streamed(args) -> bool:
    return is_external(args.dataset)


#: The image size of each built-in dataset (a prior learned on one takes that input).
BUILTIN_SIZES = {"fashion_mnist": 28, "mnist_5k": 28, "digits": 8}


def input_of(info: dict | None, source: dict | None = None,
             channels: int = 1) -> data.InputSpec | None:
    """The ``InputSpec`` stored with a prior (``source.input``) or a model (``input``);
    for a prior learned on a built-in dataset (no stored input), that dataset's size and
    statistics, so your images reach the network as its source images did."""
    if info:
        return data.InputSpec.from_dict(info)
    name = (source or {}).get("dataset")
    if name in BUILTIN_SIZES and name in data.NORMALIZATION_STATS:
        mean, std = data.NORMALIZATION_STATS[name]
        return data.InputSpec(BUILTIN_SIZES[name], channels, (mean,), (std,))
    return None


def load_splits(args, *, arch: str | None = None, spec: data.InputSpec | None = None,
                channels: int | None = None, **kwargs) -> data.Splits:
    """``data.load`` with the command's options; prints what was skipped.

    ``spec``: the input of an existing prior or model (wins over ``--image-size``);
    ``channels``: the channels a built-in dataset must be converted to (a prior's)."""
    seed = getattr(args, "seed", None)         # evaluate's --seed defaults to None
    common = dict(seed=0 if seed is None else seed, data_dir=args.data_dir, **kwargs)
    if not is_streamed(args):
        splits = data.load(args.dataset, **common)
        if channels is not None:
            splits = data.Splits(*(with_channels(getattr(splits, p), channels)
                                   for p in ("train", "val", "test")))
        return splits
    if spec is not None and args.image_size is not None and args.image_size != spec.size:
        spec = data.InputSpec(args.image_size, spec.channels, spec.mean, spec.std)
    size = args.image_size or IMAGE_SIZES.get(arch, SMALL_IMAGE_SIZE)
    splits = data.load(args.dataset, input_spec=spec, image_size=size, channels=channels,
                       normalization=args.normalize, workers=args.workers,
                       skip_bad_images=args.skip_bad_images, download=args.download, **common)
    for note in splits.notes:
        print(f"note: {note}")
    return splits


def image_spec(dataset) -> dict | None:
    """The input spec of a (streamed or decoded) dataset, to store with what it trains."""
    spec = getattr(dataset, "spec", None)
    if spec is not None:
        return spec.as_dict()
    normalization = getattr(dataset, "normalization", None)
    if normalization is None:
        return None
    h, w, c = dataset.image_shape
    return {"size": h, "channels": c, "mean": list(normalization[0]),
            "std": list(normalization[1])}


def check_channels(splits, channels: int) -> None:
    have = splits.train.image_shape[-1]
    if have != channels:
        raise BayesTransferError(f"the data has {have}-channel images but the model takes "
                                 f"{channels}")
