"""Datasets beyond the built-ins: an image folder (a path) or ``tfds:NAME[/CONFIG][:VERSION]``.

`open_parts` opens the splits as `StreamedDataset` s (nothing decoded; labels from
folder names or tfds records), with the model's `InputSpec`; `bayes_transfer.data.load`
splits them like any dataset and keeps few-shot sets in memory.

What is reported rather than raised is returned as notes (``Splits.notes``, printed by
the command line): files skipped in the folder scan (not .jpg/.jpeg/.png) and, with
``skip_bad_images``, every image that does not decode (found by decoding all of them
once, then left out).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bayes_transfer.data.data_dirs import download_allowed, resolve_data_dir
from bayes_transfer.data.errors import DatasetFormatError
from bayes_transfer.data.image_folder import open_folder
from bayes_transfer.data.image_ops import InputSpec
from bayes_transfer.data.pipeline import decode_all, find_unreadable
from bayes_transfer.data.streamed import StreamedDataset
from bayes_transfer.data.tfds_source import (PREFIX, TfdsSource, is_tfds, open_builder,
                                             split_names, tfds_default_dir)

#: Images decoded to estimate a dataset's own normalisation (``normalization="dataset"``).
STATS_SAMPLE = 1000
DEFAULT_IMAGE_SIZE = 224


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a folder (has a path separator, starts with ``.`` or
    ``~``, or is an existing directory) rather than a dataset name."""
    return (os.sep in name or "/" in name or name.startswith((".", "~"))
            or Path(name).expanduser().is_dir())


def is_external(name) -> bool:
    """Whether `open_parts` (not the built-in loader) handles ``name``."""
    return isinstance(name, (str, os.PathLike)) and (
        is_tfds(str(name)) or isinstance(name, os.PathLike) or looks_like_path(str(name)))


def _sources(name, data_dir, download: bool) -> dict:
    if is_tfds(str(name)):
        spec = str(name)[len(PREFIX):]
        dirs = [resolve_data_dir(data_dir)]
        if tfds_default_dir() not in dirs:
            dirs.append(tfds_default_dir())
        builder = open_builder(spec, dirs, download_allowed(download))
        return {part: TfdsSource(builder, split) for part, split in split_names(builder).items()}
    return open_folder(name)


def dataset_stats(dataset: StreamedDataset, n: int = STATS_SAMPLE, seed: int = 0):
    """Per-channel ``(mean, std)`` of pixel values in [0, 1] over up to ``n`` images of
    ``dataset`` (evaluation transform), a fixed random sample."""
    take = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    images = decode_all(dataset.subset(take)).astype(np.float64) / 255.0
    axes = tuple(range(images.ndim - 1))
    return tuple(images.mean(axes).tolist()), tuple(np.maximum(images.std(axes), 1e-3).tolist())


def open_parts(name, *, input_spec: InputSpec | None = None, image_size: int | None = None,
               channels: int | None = None, normalization="imagenet", data_dir=None,
               download: bool = False, workers: int = 0,
               skip_bad_images: bool = False) -> tuple[dict[str, StreamedDataset], list[str]]:
    """``({"train", "test"[, "val"]}: StreamedDataset, notes)`` of a folder or tfds name.

    ``input_spec`` fixes the model's input; otherwise ``image_size`` (default 224),
    ``channels`` (default: the images' own, 1 or 3) and ``normalization``:
    ``"imagenet"`` (ImageNet's statistics), ``"dataset"`` (estimated on 1,000 training
    images) or ``(mean, std)``.
    """
    sources = _sources(name, data_dir, download)
    notes = []
    skipped = sum(getattr(s, "skipped", 0) for s in sources.values())
    if skipped:
        notes.append(f"skipped {skipped} files in {name} that are not .jpg/.jpeg/.png images "
                     f"(or stray files beside the class folders)")
    if input_spec is None:
        size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
        chans = sources["train"].channels if channels is None else channels
        mean = std = None
        if isinstance(normalization, (tuple, list)):
            mean, std = normalization
        elif normalization not in ("imagenet", "dataset"):
            raise DatasetFormatError(f"normalization must be 'imagenet', 'dataset' or (mean, "
                                     f"std), got {normalization!r}")
        input_spec = InputSpec(size, chans, mean, std)
        if normalization == "dataset":
            probe = StreamedDataset.from_source(sources["train"], input_spec, workers=workers)
            mean, std = dataset_stats(probe)
            input_spec = InputSpec(size, chans, mean, std)
    parts = {part: StreamedDataset.from_source(source, input_spec, workers=workers)
             for part, source in sources.items()}
    if skip_bad_images:
        for part, ds in list(parts.items()):
            bad = find_unreadable(ds)
            if bad:
                keep = np.setdiff1d(np.arange(len(ds)), [i for i, _ in bad])
                parts[part] = ds.subset(keep)
                listed = "; ".join(msg for _, msg in bad[:5])
                notes.append(f"skipped {len(bad)} unreadable images of the {part} split: "
                             f"{listed}{' …' if len(bad) > 5 else ''}")
    return parts, notes
