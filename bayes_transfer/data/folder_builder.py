"""tfds builder for segmentation data laid out as ``DIR/image/*`` and ``DIR/label/*``.

Layout: every image ``DIR/image/<name>.<ext>`` has a label image
``DIR/label/<name>.<ext'>`` with the same stem (extensions png, tif, tiff, bmp).
All images must have the same size. Images are read as 8-bit grey (mode L), or
RGB when the first image is RGB/RGBA. Label images are single-channel; their
pixel values become class ids either through ``label_values`` (a mapping
``{pixel value: class id}``) or, by default, by rank among the sorted distinct
values of all label images (ISBI-2012: 0 → 0 membrane, 255 → 1 cell interior).

Since one builder serves any folder, each folder gets its own BuilderConfig,
named ``<folder name>_<12 hex digits>`` where the digits are a sha256 of the file
names, file contents and label mapping. Different folders (or a folder whose
files changed) never share prepared data in the data dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from bayes_transfer.data.errors import DatasetFormatError, DatasetNotFoundError

_EXTENSIONS = {".png", ".tif", ".tiff", ".bmp"}


def expected_layout(path) -> str:
    return (f"expected layout:\n  {path}/image/<name>.png   (input images)\n"
            f"  {path}/label/<name>.png   (label images, same file names, one class per "
            f"pixel value)")


def _natural_key(name: str):
    # "2.png" before "10.png"
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _list(directory: Path) -> dict[str, Path]:
    files = [p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in _EXTENSIONS]
    return {p.stem: p for p in sorted(files, key=lambda p: _natural_key(p.name))}


def find_pairs(path: str | Path) -> list[tuple[Path, Path]]:
    """``(image, label)`` file pairs in natural name order; clear errors if the layout is wrong."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"segmentation folder {path} does not exist or is not a directory; "
            f"{expected_layout(path)}")
    for sub in ("image", "label"):
        if not (path / sub).is_dir():
            raise DatasetNotFoundError(
                f"segmentation folder {path} has no '{sub}/' subfolder; {expected_layout(path)}")
    images, labels = _list(path / "image"), _list(path / "label")
    if not images:
        raise DatasetNotFoundError(f"no image files ({', '.join(sorted(_EXTENSIONS))}) in "
                                   f"{path / 'image'}; {expected_layout(path)}")
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        raise DatasetFormatError(
            f"in {path}, these names have an image without a label or a label without an "
            f"image: {', '.join(unmatched[:10])}{' …' if len(unmatched) > 10 else ''}; "
            f"{expected_layout(path)}")
    return [(images[name], labels[name]) for name in images]


def _open(file: Path, mode: str | None = None) -> np.ndarray:
    try:
        with Image.open(file) as im:
            return np.asarray(im if mode is None else im.convert(mode))
    except OSError as e:  # includes PIL.UnidentifiedImageError
        raise DatasetFormatError(f"cannot read image {file}: {e}") from e


def _read_image(file: Path, mode: str) -> np.ndarray:
    return _open(file, mode)


def _read_label(file: Path) -> np.ndarray:
    label = _open(file)
    if label.ndim != 2:
        raise DatasetFormatError(f"label image {file} has {label.shape[-1]} channels; "
                                 f"label images must be single-channel (one value per class)")
    return label


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """One segmentation folder: where it is and how label pixel values map to classes."""

    folder: str = ""
    label_values: tuple[int, ...] = ()  # label_values[class_id] = pixel value
    image_shape: tuple[int, int, int] = (0, 0, 1)


def folder_config(path: str | Path, label_values: Mapping[int, int] | None = None) -> FolderConfig:
    """Inspect a folder (layout, sizes, label values) and name its config by a content hash."""
    pairs = find_pairs(path)
    path = Path(path).expanduser().resolve()
    digest = hashlib.sha256()
    for image_file, label_file in pairs:
        for f in (image_file, label_file):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    first = _open(pairs[0][0])
    mode = "RGB" if first.ndim == 3 and first.shape[2] in (3, 4) else "L"
    height, width = first.shape[:2]
    if label_values is None:
        values = sorted(set().union(*(np.unique(_read_label(lf)).tolist() for _, lf in pairs)))
    else:
        ids = sorted(label_values.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"label_values must map pixel values to class ids 0..K-1 "
                             f"(each once), got {dict(label_values)}")
        values = sorted(label_values, key=label_values.get)
    if len(values) > 256:
        raise DatasetFormatError(f"label images in {path} have {len(values)} distinct values; "
                                 f"at most 256 classes are supported")
    digest.update(json.dumps([mode, values]).encode())
    slug = re.sub(r"[^a-z0-9]+", "_", path.name.lower()).strip("_") or "folder"
    return FolderConfig(
        name=f"{slug}_{digest.hexdigest()[:12]}",
        description=f"Segmentation pairs from {path} (label pixel values {values} -> 0..K-1)",
        folder=str(path),
        label_values=tuple(int(v) for v in values),
        image_shape=(height, width, 3 if mode == "RGB" else 1),
    )


class BtImageLabelFolders(tfds.core.GeneratorBasedBuilder):
    """Segmentation pairs from any ``image/`` + ``label/`` folder (see module docstring).

    One split, ``train``, holds every pair in natural file-name order (``index``
    feature); split it by image yourself. Example::

        config = folder_config("/path/to/isbi2012-membrane")
        b = BtImageLabelFolders(config=config, data_dir=..., file_format="array_record")
        b.download_and_prepare()
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # tfds looks for checksum files next to a packaged builder's module through
    # `importlib_resources`, which tfds does not depend on (ModuleNotFoundError
    # without it). These builders download nothing, so there is nothing to find.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        config: FolderConfig = self.builder_config
        h, w, c = config.image_shape
        return tfds.core.DatasetInfo(
            builder=self,
            description=config.description,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(h, w, c), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "mask": tfds.features.Tensor(shape=(h, w), dtype=np.uint8,
                                             encoding=tfds.features.Encoding.BYTES),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(find_pairs(self.builder_config.folder))}

    def _generate_examples(self, pairs):
        config: FolderConfig = self.builder_config
        h, w, c = config.image_shape
        mode = "RGB" if c == 3 else "L"
        lookup = np.full(max(config.label_values) + 1, -1, np.int32)
        lookup[list(config.label_values)] = np.arange(len(config.label_values))
        for i, (image_file, label_file) in enumerate(pairs):
            image, label = _read_image(image_file, mode), _read_label(label_file)
            for file, array in ((image_file, image), (label_file, label)):
                if array.shape[:2] != (h, w):
                    raise DatasetFormatError(
                        f"{file} is {array.shape[1]}×{array.shape[0]} but the first image is "
                        f"{w}×{h}; all images and labels must have one size")
            unknown = set(np.unique(label).tolist()) - set(config.label_values)
            if unknown:
                raise DatasetFormatError(f"{label_file} has pixel values {sorted(unknown)} "
                                         f"outside the label mapping {config.label_values}")
            yield i, {"image": image.reshape(h, w, c), "mask": lookup[label].astype(np.uint8),
                      "index": i}
