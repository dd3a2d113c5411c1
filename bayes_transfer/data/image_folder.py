"""An ImageNet-layout folder as image sources: ``DIR/train/CLASS/*.jpg`` and ``DIR/val/...``.

Layout::

    DIR/train/CLASS_A/xxx.jpg      (.jpg, .jpeg or .png, any case; any image size)
    DIR/train/CLASS_B/yyy.png
    DIR/val/CLASS_A/zzz.jpg        the test split, unless DIR/test/ exists:
    DIR/test/...                   then val/ is the validation split and test/ the test

Class ids come from the sorted names of the ``train/`` class folders (the names are
kept as ``class_names``); ``val/`` and ``test/`` may lack a class but may not add one.
Nothing is decoded when a folder is opened: labels come from the folder names.

What is checked, with an error naming the folder or file:

* ``DIR`` missing or not a folder; no ``train/``; neither ``val/`` nor ``test/`` (a
  missing split); a ``train/`` class folder without images (an empty class); an
  evaluation class folder whose class ``train/`` does not have;
* files that are not .jpg/.jpeg/.png (a README, ``.DS_Store``) and stray files beside
  the class folders are skipped, counted in ``skipped`` and reported by ``load``.

Images may have any (mixed) sizes: every image is resized to the model's input.
Corrupt or truncated images are found when decoded (an error naming the file) or, with
``skip_bad_images``, by a check that decodes everything first (`find_unreadable`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from bayes_transfer.data.errors import DatasetFormatError, DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def expected_layout(path) -> str:
    return (f"expected an ImageNet-layout folder:\n  {path}/train/<class>/<image>.jpg|.jpeg|.png"
            f"\n  {path}/val/<class>/<image>   (the test split; with {path}/test/ as well, "
            f"val/ is the validation split)")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _channels(file: Path) -> int:
    """1 if ``file`` is a grey image, else 3 (reads the header only)."""
    try:
        with Image.open(file) as im:
            return 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except Exception:      # a bad first file is reported, naming it, when decoded
        return 3


def _scan_class(directory: Path) -> tuple[list[str], int]:
    names, skipped = [], 0
    with os.scandir(directory) as entries:
        for e in entries:
            if _is_image(e.name) and e.is_file():
                names.append(e.name)
            else:
                skipped += 1
    return sorted(names), skipped


class FolderSource:
    """One split (``train``, ``val`` or ``test``) of an ImageNet-layout folder.

    File names are held as one byte string and offsets (a few tens of bytes a file),
    so a million-image split pickles quickly to grain's worker processes.
    """

    def __init__(self, root: Path, split: str, class_names: tuple[str, ...],
                 per_class: list[list[str]], skipped: int):
        self.root, self.split = Path(root), split
        self.class_names = tuple(class_names)
        self.num_classes = len(class_names)
        self.name = self.root.name
        self.skipped = skipped
        counts = [len(n) for n in per_class]
        self.labels = np.repeat(np.arange(len(per_class), dtype=np.int32), counts)
        encoded = [n.encode("utf-8", "surrogateescape") for names in per_class for n in names]
        self._blob = b"".join(encoded)
        self._offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self.channels = 3       # set by `scan` from the first image
        digest = hashlib.sha256(repr((str(self.root), split, self.class_names, counts)).encode())
        digest.update(self._blob)
        self.fingerprint = f"folder:{self.root}/{split}:{len(self.labels)}:{digest.hexdigest()[:16]}"

    @classmethod
    def scan(cls, root, split: str, class_names: tuple[str, ...] | None = None) -> "FolderSource":
        """List ``root/split`` (``class_names``: the train classes, for val/test)."""
        root = Path(root)
        base = root / split
        entries = sorted(os.scandir(base), key=lambda e: e.name)
        dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        skipped = len(entries) - len(dirs)
        if class_names is None:
            if not dirs:
                raise DatasetFormatError(f"{base} has no class folders; {expected_layout(root)}")
            class_names = tuple(dirs)
        else:
            extra = sorted(set(dirs) - set(class_names))
            if extra:
                raise DatasetFormatError(
                    f"{base} has class folders that {root / 'train'} does not: "
                    f"{', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}; every class "
                    f"must be in train/ (class ids come from its folder names)")
        per_class = []
        for name in class_names:
            if name not in dirs:
                per_class.append([])
                continue
            files, skip = _scan_class(base / name)
            skipped += skip
            if not files and split == "train":
                raise DatasetFormatError(
                    f"class folder {base / name} has no images ({', '.join(IMAGE_EXTENSIONS)})"
                    f"; add images or remove the folder (class ids come from the folders)")
            per_class.append(files)
        source = cls(root, split, class_names, per_class, skipped)
        if len(source) == 0:
            raise DatasetFormatError(f"{base} has no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                                     f"its class folders; {expected_layout(root)}")
        source.channels = _channels(source.path(0))
        return source

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        i = int(i)
        name = self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8", "surrogateescape")
        return self.root / self.split / self.class_names[self.labels[i]] / name

    def __getitem__(self, i: int) -> bytes:
        return self.path(i).read_bytes()

    def describe(self, i: int) -> str:
        return str(self.path(i))

    def __repr__(self) -> str:
        return (f"FolderSource({str(self.root / self.split)!r}, n={len(self)}, "
                f"classes={self.num_classes})")


def open_folder(path) -> dict[str, FolderSource]:
    """``{"train", "test"[, "val"]}`` sources of an ImageNet-layout folder (see the module
    docstring for the layout and what is checked)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset folder {root} does not exist or is not a "
                                   f"directory; {expected_layout(root)}")
    if not (root / "train").is_dir():
        raise DatasetFormatError(f"{root} has no train/ folder (a missing split); "
                                 f"{expected_layout(root)}")
    has_val, has_test = (root / "val").is_dir(), (root / "test").is_dir()
    if not (has_val or has_test):
        raise DatasetFormatError(f"{root} has train/ but neither val/ nor test/ (a missing "
                                 f"split: the test images go in val/); {expected_layout(root)}")
    train = FolderSource.scan(root, "train")
    out = {"train": train}
    if has_test:
        out["test"] = FolderSource.scan(root, "test", train.class_names)
        if has_val:
            out["val"] = FolderSource.scan(root, "val", train.class_names)
    else:
        out["test"] = FolderSource.scan(root, "val", train.class_names)
    return out
