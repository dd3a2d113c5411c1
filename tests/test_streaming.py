"""Bring your own data: image folders and tfds datasets as sources, the grain pipeline,
natural-image transforms, few-shot sampling from labels, and every bad-data case.

Folders are written from real Fashion-MNIST images (skipped where the Debian package is
not installed). Worker processes take seconds to start on a busy machine, so only the
tests that are about workers use them.
"""
import argparse
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from bayes_transfer import data
from bayes_transfer.cli import main as cli_main
from bayes_transfer.cli.datasets import positive_int
from bayes_transfer.data.errors import DataOptionError, DatasetFormatError, DatasetNotFoundError
from bayes_transfer.data.image_folder import open_folder
from bayes_transfer.data.image_ops import InputSpec, random_resized_crop_box
from bayes_transfer.data.pipeline import GrainStream, batch_stream
from bayes_transfer.data.sources import ArraySource
from bayes_transfer.data.streamed import StreamedDataset
from image_folders import CLASSES, fashion_test_images, write_folder


@pytest.fixture(scope="module")
def fashion_images():
    return fashion_test_images()


@pytest.fixture
def folder(tmp_path, fashion_images):
    return write_folder(tmp_path / "clothes", fashion_images)


# ------------------------------------------------------------------ sources
def test_folder_source_classes_labels_without_decoding(folder, monkeypatch):
    (folder / "train" / "bag" / "README.txt").write_text("not an image")
    (folder / "train" / "notes.md").write_text("stray")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    parts = open_folder(folder)
    assert decoded == []                                   # nothing decoded to list labels
    train, test = parts["train"], parts["test"]
    assert train.class_names == test.class_names == CLASSES
    assert train.split == "train" and test.split == "val"  # val/ is the test split
    np.testing.assert_array_equal(np.bincount(train.labels), [12, 12, 12])
    assert train.skipped == 2 and "val" not in parts
    assert train.path(0).parent.name == "bag" and train.channels == 3
    ds = data.load(folder, image_size=16)
    assert len(ds.train) + len(ds.val) == 36 and len(ds.test) == 12
    assert any("skipped 2 files" in n for n in ds.notes)


def test_val_is_validation_when_test_exists(tmp_path, fashion_images):
    root = write_folder(tmp_path / "three", fashion_images, per_class=(8, 3, 5),
                        splits=("train", "val", "test"))
    splits = data.load(root, image_size=16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 9, 15)
    few = data.load(root, image_size=16, shots_per_class=2, val_per_class=3)
    assert isinstance(few.train, data.ArrayDataset) and len(few.val) == 9
    assert isinstance(few.test, StreamedDataset)


def test_few_shot_from_labels_alone_any_source(folder):
    source = open_folder(folder)["train"]
    ds = StreamedDataset.from_source(source, InputSpec(16))
    splits = data.split_dataset(ds, ds, shots_per_class=3, val_per_class=4, seed=5)
    tr, va = splits.train, splits.val
    assert not set(tr.indices) & set(va.indices)           # disjoint
    np.testing.assert_array_equal(np.bincount(tr.labels), [3, 3, 3])
    np.testing.assert_array_equal(np.bincount(va.labels), [4, 4, 4])
    again = data.split_dataset(ds, ds, shots_per_class=3, val_per_class=4, seed=5)
    np.testing.assert_array_equal(tr.indices, again.train.indices)
    arrays = ArraySource(np.zeros((9, 4, 4, 1), np.uint8), [0, 1, 2] * 3, 3)
    arr = StreamedDataset.from_source(arrays, InputSpec(4, channels=1))
    assert len(data.split_dataset(arr, arr, shots_per_class=1, val_per_class=2).train) == 3


# ------------------------------------------------------------------ transforms
def test_transforms_sizes_channels_and_normalisation(tmp_path, fashion_images):
    root = write_folder(tmp_path / "grey", fashion_images, rgb=False, fmt="JPEG")
    # mixed sizes: every image is resized to the model's input
    Image.new("L", (57, 13), 200).save(root / "train" / "coat" / "wide.jpeg")
    Image.new("L", (3, 5), 10).save(root / "train" / "coat" / "tiny.jpeg")
    grey = data.load(root, image_size=12)
    assert grey.train.image_shape == (12, 12, 1)           # the images' own channels
    rgb = data.load(root, image_size=12, channels=3)
    assert rgb.train.spec.mean == (0.485, 0.456, 0.406)    # ImageNet statistics for RGB
    b = next(iter(data.batches(rgb.train, 8, seed=0, epoch=0)))
    assert b["image"].shape == (8, 12, 12, 3) and b["image"].dtype == np.float32
    x = rgb.train.example(3)
    assert np.array_equal(x[..., 0], x[..., 1])            # grey -> RGB repeats the channel
    stream = batch_stream(rgb.train, 8, seed=0, augment=True, flip=True)
    it = stream.iterator(0, 4)
    shapes = {batch["image"].shape for batch in it}
    assert shapes == {(8, 12, 12, 3)}
    with pytest.raises(Exception, match="1 .grey. or 3 .RGB. channels"):
        InputSpec(12, channels=4)
    own = data.load(root, image_size=12, normalization="dataset")
    assert own.train.spec.mean != grey.train.spec.mean and len(own.train.spec.mean) == 1


def test_random_resized_crop_box_within_image_and_area():
    rng = np.random.default_rng(0)
    for w, h in [(224, 224), (500, 80), (3, 7), (1, 1)]:
        for _ in range(50):
            l, t, r, b = random_resized_crop_box(w, h, rng, (0.08, 1.0))
            assert 0 <= l < r <= w and 0 <= t < b <= h


# ------------------------------------------------------------------ the pipeline
def test_streamed_batches_equal_in_memory_batches(fashion_images):
    """Same order (default_rng([seed, epoch])), same normalisation: bit for bit."""
    images, labels = fashion_images
    mem = data.ArrayDataset(images[:50, :, :, None], labels[:50], 10, "fashion_mnist")
    mean, std = data.NORMALIZATION_STATS["fashion_mnist"]
    spec = InputSpec(28, channels=1, mean=(mean,), std=(std,))
    spec = InputSpec(28, 1, spec.mean, spec.std, eval_ratio=1.0)   # no crop: the image itself
    streamed = StreamedDataset.from_source(ArraySource.from_dataset(mem), spec)
    for epoch in (0, 1):
        a = list(data.batches(mem, 16, seed=3, epoch=epoch))
        b = list(data.batches(streamed, 16, seed=3, epoch=epoch))
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x["label"], y["label"])
            np.testing.assert_array_equal(x["image"], y["image"])


def test_batches_pure_in_step_same_with_workers_and_split_by_process(folder):
    ds = data.load(folder, image_size=16).train
    stream = GrainStream(ds, 8, seed=1, train=True)
    whole = list(stream.iterator(0, 6))
    tail = list(stream.iterator(4, 6))                      # resume at step 4
    for a, b in zip(whole[4:], tail):
        np.testing.assert_array_equal(a["image"], b["image"])
    with_worker = GrainStream(dataclasses.replace(ds, workers=1), 8, seed=1, train=True)
    it = with_worker.iterator(0, 6)
    try:
        for a, b in zip(whole, it):
            np.testing.assert_array_equal(a["image"], b["image"])
    finally:
        it.close()
    # Two processes: each reads its half of every global batch, in process order.
    halves = [GrainStream(ds, 8, seed=1, train=True, process_index=p, process_count=2)
              for p in (0, 1)]
    for step in range(6):
        parts = [h.loader(step) for h in halves]
        assert [len(p["label"]) for p in parts] == [4, 4]
        joined = np.concatenate([p["label"] for p in parts])
        np.testing.assert_array_equal(joined, whole[step]["label"])
    assert halves[0].process_local and not stream.process_local


def test_fit_trains_on_a_streamed_folder(folder):
    from bayes_transfer import models
    from bayes_transfer.training import TrainConfig, cross_entropy_loss, fit, predict

    splits = data.load(folder, image_size=16)
    model = models.create("small_cnn", 3, in_channels=3, width=0.25)
    config = TrainConfig(epochs=2, batch_size=8, learning_rate=0.05, augment=True, flip=True,
                         progress=False)
    result = fit(model, splits.train, cross_entropy_loss, config)
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["loss"])
    assert predict(result, splits.test).shape == (12, 3)


# ------------------------------------------------------------------ bad data, bad options
def _corrupt(folder):
    bad = folder / "train" / "coat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good = folder / "train" / "boot" / "cut.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, format="JPEG")
    good.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])      # truncated
    return bad, good


def test_corrupt_and_truncated_images_named_or_skipped(folder):
    _corrupt(folder)
    everything = StreamedDataset.from_source(open_folder(folder)["train"], InputSpec(16))
    with pytest.raises(DatasetFormatError, match="broken.jpg|cut.jpg") as e:
        list(data.batches(everything, 64, seed=0, epoch=0))
    assert "--skip-bad-images" in str(e.value)
    skipped = data.load(folder, image_size=16, skip_bad_images=True)
    note = next(n for n in skipped.notes if "unreadable" in n)
    assert "skipped 2 unreadable images" in note and "broken.jpg" in note and "cut.jpg" in note
    assert len(skipped.train) + len(skipped.val) == 36
    list(data.batches(skipped.train, 64, seed=0, epoch=0))


def test_a_bad_image_in_a_worker_is_a_clear_error_in_the_training_process(folder):
    _corrupt(folder)
    ds = StreamedDataset.from_source(open_folder(folder)["train"], InputSpec(16), workers=1)
    it = GrainStream(ds, len(ds), seed=0, train=True).iterator(0, 1)
    try:
        with pytest.raises(DatasetFormatError, match=r"cannot read image .*(broken|cut)\.jpg"):
            next(it)
    finally:
        it.close()


def test_layout_errors_name_the_folder(tmp_path, fashion_images):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        data.load(tmp_path / "nowhere")
    root = write_folder(tmp_path / "a", fashion_images, splits=("train",))
    with pytest.raises(DatasetFormatError, match="neither val/ nor test/"):   # missing split
        data.load(root)
    (root / "train" / "empty_class").mkdir()
    (root / "val").mkdir()
    with pytest.raises(DatasetFormatError, match="empty_class has no images"):
        data.load(root)
    (root / "train" / "empty_class").rmdir()
    (root / "val" / "penguin").mkdir()
    with pytest.raises(DatasetFormatError, match="penguin"):
        data.load(root)
    with pytest.raises(DatasetFormatError, match="no train/"):
        data.load(root / "val")


def test_more_shots_than_a_class_has_and_negative_shots(folder):
    with pytest.raises(DataOptionError, match=r"class 'bag' \(id 0\) of clothes has only 12"):
        data.load(folder, shots_per_class=5, val_per_class=10)
    with pytest.raises(DataOptionError, match="shots_per_class must be >= 1"):
        data.load(folder, shots_per_class=-1)
    with pytest.raises(DataOptionError, match="has only"):
        data.load("digits", shots_per_class=200)
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1"):
        positive_int("-3")


def test_cli_bad_data_and_options_are_one_line_errors(folder, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "--prior", "fashion-mnist/small-cnn", "--shots", "-3"])
    assert e.value.code == 2
    assert "argument --shots: must be >= 1, got -3" in capsys.readouterr().err
    _corrupt(folder)
    rc = cli_main(["train", "--dataset", str(folder), "--epochs", "1", "--image-size", "16",
                   "--workers", "0", "--batch-size", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "bayes-transfer: error: cannot read image " in err and ".jpg" in err
    rc = cli_main(["suggest", "--prior", "fashion-mnist/small-cnn", "--dataset", str(folder),
                   "--shots", "30"])
    err = capsys.readouterr().err
    assert rc == 2 and "has only" in err and "Traceback" not in err
