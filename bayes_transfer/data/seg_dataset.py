"""Segmentation datasets: images + per-pixel masks, batched as ``{"image", "mask"}``.

:class:`SegmentationDataset` is the segmentation counterpart of `ArrayDataset`: it
holds ``(N, H, W, C)`` images and ``(N, H, W)`` integer masks, and `batches` (the
training loop's batcher) asks it for each batch through :meth:`make_batch`. For
training it can cut random crops (optionally flipped, the same flip for image and
mask) several per image, in numpy, deterministically per ``(seed, epoch, batch)``;
``len(dataset)`` stays the number of *images*, the N of the prior term.

Loaders (all return `Splits` of SegmentationDatasets):

- :func:`load_isbi` — ISBI-2012 EM membranes (30 labelled 512×512 images), split by
  image: a fixed test block, ``num_train`` training images drawn per seed, and a
  validation set taken from the training images (a held-out strip, by default) so
  that a k-image task never uses more than k labelled images;
- :func:`load_segmentation_splits` — any ``DIR/image`` + ``DIR/label`` folder;
- :func:`bayes_transfer.data.scenes.load_fashion_scenes` — Fashion-MNIST scenes.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from bayes_transfer.data.array_dataset import Splits
from bayes_transfer.data.errors import DatasetNotFoundError
from bayes_transfer.data.normalization import NORMALIZATION_STATS, normalize

ISBI_NAME = "isbi2012_membrane"
ISBI_ENV = "BAYES_TRANSFER_ISBI2012"
ISBI_CLASS_NAMES = ("membrane", "cell")


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentationDataset:
    """Images and masks held in memory, with optional training crops.

    Attributes:
      images: ``(N, H, W, C)`` uint8 (0..255) or float32 in [0, 1].
      masks: ``(N, H, W)`` int32 class ids in ``0..num_classes-1`` (or ``ignore_index``).
      num_classes: classes per pixel, background included.
      name: where the data came from (``"isbi2012_membrane"``, ``"fashion_scenes"``...).
      class_names: a name per class id, or ``None``.
      ignore_index: mask value that marks unlabelled pixels (left out of loss and metrics).
      normalization: the `NORMALIZATION_STATS` entry used to standardise images
        (``None``: only scale to [0, 1]). Defaults to ``name`` when it has statistics.
      crop: ``(h, w)`` of the random training crops, or ``None`` for whole images.
      crops_per_image: crops cut from each image of a batch (a batch of B images
        gives ``B · crops_per_image`` crops).
      flip: random horizontal and vertical flips of the crops.
    """

    images: np.ndarray
    masks: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...] | None = None
    ignore_index: int | None = None
    normalization: str | None = "auto"
    crop: tuple[int, int] | None = None
    crops_per_image: int = 1
    flip: bool = False

    def __post_init__(self):
        images, masks = np.asarray(self.images), np.asarray(self.masks, dtype=np.int32)
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
        if images.dtype not in (np.uint8, np.float32):
            raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
        if masks.shape != images.shape[:3]:
            raise ValueError(f"masks must have shape {images.shape[:3]} (N, H, W of the "
                             f"images), got {masks.shape}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} "
                             f"classes")
        valid = masks if self.ignore_index is None else masks[masks != self.ignore_index]
        if valid.size and (valid.min() < 0 or valid.max() >= self.num_classes):
            raise ValueError(f"mask values must be in 0..{self.num_classes - 1} (or the "
                             f"ignore_index {self.ignore_index}); found {valid.min()}.."
                             f"{valid.max()}")
        norm = self.normalization
        if norm == "auto":
            norm = self.name if self.name in NORMALIZATION_STATS else None
        elif norm is not None and norm not in NORMALIZATION_STATS:
            raise ValueError(f"no normalisation statistics {norm!r}; known: "
                             f"{sorted(NORMALIZATION_STATS)}")
        crop = None if self.crop is None else _pair(self.crop)
        if crop is not None and (crop[0] > images.shape[1] or crop[1] > images.shape[2]):
            raise ValueError(f"crop {crop} is larger than the images {images.shape[1:3]}")
        if self.crops_per_image < 1:
            raise ValueError(f"crops_per_image must be >= 1, got {self.crops_per_image}")
        for field, value in (("images", images), ("masks", masks), ("normalization", norm),
                             ("crop", crop)):
            object.__setattr__(self, field, value)   # frozen: set the checked values once
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    # ---------------------------------------------------------------- container
    def __len__(self) -> int:
        return len(self.masks)

    @property
    def labels(self) -> np.ndarray:
        """The masks (the name generic code that reads ``dataset.labels`` expects)."""
        return self.masks

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> "SegmentationDataset":
        """The images at ``indices`` (a copy), same classes, metadata and crop settings."""
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(self, images=self.images[indices],
                                   masks=self.masks[indices])

    def with_crops(self, size: int | tuple[int, int] | None, *, per_image: int = 1,
                   flip: bool = False) -> "SegmentationDataset":
        """The same data, batched as random ``size`` crops (``None``: whole images)."""
        return dataclasses.replace(self, crop=size, crops_per_image=per_image, flip=flip)

    def whole(self) -> "SegmentationDataset":
        """The same data batched as whole images, unflipped (for evaluation)."""
        return self.with_crops(None)

    # ---------------------------------------------------------------- batches
    def normalized_images(self, indices=None) -> np.ndarray:
        images = self.images if indices is None else self.images[np.asarray(indices)]
        return normalize(images, self.normalization)

    def make_batch(self, indices, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``{"image": float32 NHWC normalised, "mask": int32 NHW}`` of ``indices``.

        Called by `batches` with a generator seeded by ``(seed, epoch, batch)``; with
        ``crop`` set, each image gives ``crops_per_image`` random crops.
        """
        indices = np.asarray(indices, dtype=np.int64)
        images, masks = self.images[indices], self.masks[indices]
        if self.crop is not None:
            images, masks = random_crops(images, masks, self.crop, self.crops_per_image,
                                         rng, flip=self.flip)
        return {"image": normalize(images, self.normalization), "mask": masks}

    def __repr__(self) -> str:  # the default would print the arrays
        crop = "" if self.crop is None else f", crop={self.crop}x{self.crops_per_image}"
        return (f"SegmentationDataset(name={self.name!r}, n={len(self)}, image_shape="
                f"{self.image_shape}, num_classes={self.num_classes}{crop})")


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def random_crops(images: np.ndarray, masks: np.ndarray, size, per_image: int,
                 rng: np.random.Generator, *, flip: bool = False):
    """``per_image`` random ``size`` crops of each image and the same crops of its mask.

    Returns arrays of ``len(images) · per_image`` crops, image-major. With ``flip``,
    each crop is mirrored horizontally and/or vertically (coin flips), image and mask
    alike.
    """
    ch, cw = _pair(size)
    n, h, w = masks.shape
    ys = rng.integers(0, h - ch + 1, size=(n, per_image))
    xs = rng.integers(0, w - cw + 1, size=(n, per_image))
    flips = rng.integers(0, 2, size=(n, per_image, 2)) if flip else np.zeros((n, per_image, 2),
                                                                             np.int64)
    out_x, out_m = [], []
    for i in range(n):
        for j in range(per_image):
            y, x = ys[i, j], xs[i, j]
            img, msk = images[i, y:y + ch, x:x + cw], masks[i, y:y + ch, x:x + cw]
            if flips[i, j, 0]:
                img, msk = img[:, ::-1], msk[:, ::-1]
            if flips[i, j, 1]:
                img, msk = img[::-1], msk[::-1]
            out_x.append(img)
            out_m.append(msk)
    return np.ascontiguousarray(np.stack(out_x)), np.ascontiguousarray(np.stack(out_m))


# -------------------------------------------------------------------------------- ISBI

def isbi_path(path: str | Path | None = None) -> Path:
    """Where the ISBI-2012 folder is: ``path``, else ``$BAYES_TRANSFER_ISBI2012``.
    Raises `DatasetNotFoundError`."""
    candidates = ([Path(path)] if path is not None else
                  [Path(os.environ[ISBI_ENV])] if os.environ.get(ISBI_ENV) else [])
    for c in candidates:
        c = c.expanduser()
        if (c / "image").is_dir() and (c / "label").is_dir():
            return c
    raise DatasetNotFoundError(
        "ISBI-2012 membrane data not found; looked in: "
        + (", ".join(str(c) for c in candidates) or f"nothing (no path= and no ${ISBI_ENV})")
        + f". It is a folder with image/0.png..29.png and label/0.png..29.png (512×512, "
          f"labels 0 = membrane, 255 = cell). Pass path=, or set ${ISBI_ENV} to it.")


def split_by_image(n: int, num_train: int, *, num_test: int, seed: int,
                   num_val: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) image indices of a stack of ``n`` images.

    The test set is the last ``num_test`` images (a contiguous block: neighbouring
    sections of a stack are alike, so a random test set would leak), whatever the
    seed. The rest is permuted with ``seed``; the first ``num_train`` are the training
    images (so for one seed a smaller training set is a prefix of a larger one), the
    next ``num_val`` the validation images.
    """
    pool = n - num_test
    if num_test < 1 or pool < 1:
        raise ValueError(f"num_test must be in 1..{n - 1}, got {num_test}")
    if num_train < 1 or num_train + num_val > pool:
        raise ValueError(f"{num_train} training + {num_val} validation images do not fit in "
                         f"the {pool} images outside the test block")
    order = np.random.default_rng([seed, 3]).permutation(pool)
    return (np.sort(order[:num_train]), np.sort(order[num_train:num_train + num_val]),
            np.arange(pool, n))


def segmentation_splits(images, masks, num_train: int, *, name: str, num_classes: int | None = None,
                        class_names=None, num_test: int, seed: int = 0, val: str = "strip",
                        num_val: int = 4, val_fraction: float = 0.25, crop=128,
                        crops_per_image: int = 4, flip: bool = True,
                        ignore_index: int | None = None) -> Splits:
    """Split an image stack by image into train / val / test `SegmentationDataset` s.

    ``val="strip"`` (default): validation is the bottom ``val_fraction`` of the rows of
    each *training* image, and training crops come from the rows above it, so a task
    with k labelled images uses exactly k images (and λ is chosen on pixels never
    trained on). ``val="images"``: ``num_val`` other images of the pool. Training sets
    are batched as random crops (see :class:`SegmentationDataset`); val and test as
    whole images.
    """
    images, masks = np.asarray(images), np.asarray(masks, dtype=np.int32)
    if num_classes is None:
        valid = masks if ignore_index is None else masks[masks != ignore_index]
        num_classes = int(valid.max()) + 1
    if val not in ("strip", "images"):
        raise ValueError(f"val must be 'strip' or 'images', got {val!r}")
    tr, va, te = split_by_image(len(images), num_train, num_test=num_test, seed=seed,
                                num_val=num_val if val == "images" else 0)

    def ds(idx, rows=slice(None), training=False):
        d = SegmentationDataset(images[idx][:, rows], masks[idx][:, rows], num_classes, name,
                                class_names=class_names, ignore_index=ignore_index)
        if training and crop is not None:   # never larger than the (strip-cut) images
            ch, cw = _pair(crop)
            d = d.with_crops((min(ch, d.images.shape[1]), min(cw, d.images.shape[2])),
                             per_image=crops_per_image, flip=flip)
        return d

    if val == "strip":
        h = images.shape[1]
        cut = h - max(1, int(round(val_fraction * h)))
        train, valid_ds = ds(tr, slice(0, cut), True), ds(tr, slice(cut, None))
    else:
        train, valid_ds = ds(tr, training=True), ds(va)
    return Splits(train=train, val=valid_ds, test=ds(te))


def load_isbi(num_train: int = 24, *, seed: int = 0, num_test: int = 6, path=None,
              data_dir=None, **split_options) -> Splits:
    """ISBI-2012 membrane segmentation (2 classes: 0 membrane, 1 cell), split by image.

    Test: the last ``num_test`` sections (images 24–29 by default) for every seed.
    Train: ``num_train`` of the other 24 (2, 6, 24 ...), drawn with ``seed``.
    Validation, crops: see :func:`segmentation_splits` (defaults: the bottom quarter
    strip of each training image; 4 random 128×128 flipped crops per image per step).

    >>> splits = load_isbi(6, seed=0)  # doctest: +SKIP
    >>> splits.train, splits.test  # doctest: +SKIP
    """
    from bayes_transfer.data.segmentation import load_segmentation_folder

    images, masks = load_segmentation_folder(isbi_path(path), data_dir=data_dir)
    return segmentation_splits(images, masks, num_train, name=ISBI_NAME, num_classes=2,
                               class_names=ISBI_CLASS_NAMES, num_test=num_test, seed=seed,
                               **split_options)


def load_segmentation_splits(path, num_train: int, *, seed: int = 0, num_test: int | None = None,
                             label_values=None, data_dir=None, **split_options) -> Splits:
    """Any ``DIR/image`` + ``DIR/label`` PNG folder (see `load_segmentation_folder`), split
    by image like :func:`load_isbi`; ``num_test`` defaults to a fifth of the images."""
    from bayes_transfer.data.segmentation import load_segmentation_folder

    images, masks = load_segmentation_folder(path, label_values=label_values, data_dir=data_dir)
    if num_test is None:
        num_test = max(1, len(images) // 5)
    name = Path(path).name
    if name == "isbi2012-membrane":
        name = ISBI_NAME
    split_options.setdefault("crop", min(128, images.shape[1], images.shape[2]))
    return segmentation_splits(images, masks, num_train, name=name, num_test=num_test,
                               seed=seed, **split_options)
