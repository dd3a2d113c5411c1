"""Fashion-MNIST scenes: a segmentation task made of real images, available offline.

Each scene is a ``canvas × canvas`` grey image (64×64 by default, background 0) on which
2–4 Fashion-MNIST objects (28×28) are pasted at random positions. A pixel of an object
is *on* when its value exceeds ``threshold``; only on pixels are pasted (later objects
cover earlier ones), and the mask is ``class + 1`` there, 0 (background) elsewhere. So
``mask > 0`` exactly where the image is an object's pixel, and the task is to name the
garment under each pixel.

Train and validation scenes are made from objects of Fashion-MNIST's *train* split
(disjoint objects), test scenes from its *test* split: no object is in both. Everything
is a pure function of the seed.

>>> splits = load_fashion_scenes(num_train=20, seed=0)  # doctest: +SKIP
>>> splits.train.images.shape, splits.train.masks.max()  # doctest: +SKIP
((20, 64, 64, 1), 10)
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from bayes_transfer.data.array_dataset import ArrayDataset, Splits
from bayes_transfer.data.seg_dataset import SegmentationDataset

SCENES_NAME = "fashion_scenes"
DEFAULT_THRESHOLD = 10       # of 0..255: Fashion-MNIST backgrounds are 0 with faint noise
_TEST_SEED = 10_007          # the test scenes are the same for every seed


class Placement(NamedTuple):
    """One pasted object: its index in the object set, its class id, its top-left corner."""

    index: int
    label: int
    y: int
    x: int


def make_scenes(objects: np.ndarray, labels: np.ndarray, num_scenes: int, *,
                seed: int | Sequence[int],
                canvas: int = 64, min_objects: int = 2, max_objects: int = 4,
                threshold: int = DEFAULT_THRESHOLD, return_layout: bool = False):
    """Paste random ``objects`` (``(M, h, w)`` or ``(M, h, w, 1)`` uint8) on blank canvases.

    Each scene draws ``min_objects..max_objects`` objects (without replacement within
    the scene) and places each at a uniform top-left corner with the object fully
    inside the canvas. Returns ``images`` ``(S, canvas, canvas, 1)`` uint8 and ``masks``
    ``(S, canvas, canvas)`` int32 with ``labels[i] + 1`` on object i's on pixels;
    with ``return_layout`` also a list (per scene) of :class:`Placement`, in paste order.
    The same ``seed`` (an int or a sequence of ints) gives the same scenes.
    """
    objects = np.asarray(objects)
    if objects.ndim == 4:
        objects = objects[..., 0]
    labels = np.asarray(labels, dtype=np.int64)
    m, h, w = objects.shape
    if objects.dtype != np.uint8:
        raise ValueError(f"objects must be uint8 images, got {objects.dtype}")
    if len(labels) != m:
        raise ValueError(f"{m} objects but {len(labels)} labels")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, "
                         f"{max_objects}")
    if max_objects > m:
        raise ValueError(f"{max_objects} objects per scene but only {m} objects to draw from")
    if canvas < max(h, w):
        raise ValueError(f"canvas {canvas} is smaller than the objects ({h}×{w})")
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 5])
    images = np.zeros((num_scenes, canvas, canvas, 1), np.uint8)
    masks = np.zeros((num_scenes, canvas, canvas), np.int32)
    layouts = []
    for s in range(num_scenes):
        k = int(rng.integers(min_objects, max_objects + 1))
        picks = rng.choice(m, size=k, replace=False)
        ys = rng.integers(0, canvas - h + 1, size=k)
        xs = rng.integers(0, canvas - w + 1, size=k)
        layout = []
        for i, y, x in zip(picks, ys, xs):
            obj = objects[i]
            on = obj > threshold
            images[s, y:y + h, x:x + w, 0][on] = obj[on]
            masks[s, y:y + h, x:x + w][on] = labels[i] + 1
            layout.append(Placement(int(i), int(labels[i]), int(y), int(x)))
        layouts.append(layout)
    return (images, masks, layouts) if return_layout else (images, masks)


def scenes_dataset(objects: ArrayDataset, num_scenes: int, *, seed: int | Sequence[int],
                   classes: Sequence[int] | None = None, **options) -> SegmentationDataset:
    """A :class:`SegmentationDataset` of scenes made from ``objects`` (an ArrayDataset).

    ``classes`` (original ids) keeps only those objects; they become mask values
    ``1..len(classes)`` in the given order.
    """
    images, labels = objects.images, objects.labels
    names = objects.class_names or tuple(str(c) for c in range(objects.num_classes))
    if classes is not None:
        classes = [int(c) for c in classes]
        table = np.full(objects.num_classes, -1, np.int64)
        table[classes] = np.arange(len(classes))
        keep = np.flatnonzero(table[labels] >= 0)
        images, labels = images[keep], table[labels[keep]]
        names = tuple(names[c] for c in classes)
    scene_images, scene_masks = make_scenes(images, labels, num_scenes, seed=seed, **options)
    return SegmentationDataset(scene_images, scene_masks, num_classes=len(names) + 1,
                               name=SCENES_NAME, class_names=("background",) + tuple(names),
                               normalization="fashion_mnist")


def load_fashion_scenes(num_train: int = 20, *, num_val: int = 20, num_test: int = 200,
                        seed: int = 0, classes: Sequence[int] | None = None,
                        canvas: int = 64, min_objects: int = 2, max_objects: int = 4,
                        threshold: int = DEFAULT_THRESHOLD, data_dir=None) -> Splits:
    """Train / val / test Fashion-MNIST scenes (see the module docstring).

    Train and val scenes paste objects of the Fashion-MNIST train split, drawn with
    ``seed`` from disjoint halves of it; test scenes paste test-split objects and are
    the same for every seed. ``classes=range(5, 10)`` keeps classes 5–9 (mask values
    1..5). Images are standardised with Fashion-MNIST's statistics, as the source task's
    were. Batched as whole scenes (they are small).
    """
    from bayes_transfer.data.loading import load_arrays

    train_objects, test_objects = load_arrays("fashion_mnist", data_dir=data_dir)
    order = np.random.default_rng([seed, 6]).permutation(len(train_objects))
    half = len(order) // 2
    options = dict(classes=classes, canvas=canvas, min_objects=min_objects,
                   max_objects=max_objects, threshold=threshold)
    return Splits(
        train=scenes_dataset(train_objects.subset(order[:half]), num_train, seed=(seed, 0),
                             **options),
        val=scenes_dataset(train_objects.subset(order[half:]), num_val, seed=(seed, 1),
                           **options),
        test=scenes_dataset(test_objects, num_test, seed=_TEST_SEED, **options))
