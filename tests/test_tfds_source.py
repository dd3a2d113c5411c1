"""``tfds:NAME``: a dataset prepared into a data dir (array_record, PNG-encoded images, as
tfds writes catalog datasets) loads by name in a fresh process with the network off,
without TensorFlow and without the builder's code (tfds reads it from the files).

The dataset is real: Fashion-MNIST images (skipped where the Debian package is absent).
"""
import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from bayes_transfer import data
from bayes_transfer.data import local_sources
from bayes_transfer.data.errors import DatasetFormatError, DatasetNotFoundError

NAMES = ["tshirt", "trouser", "pullover"]


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _builder_class(name: str, splits: dict[str, int], images):
    class Clothes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, supervised_keys=("image", "label"),
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 1)),
                    "label": tfds.features.ClassLabel(names=NAMES)}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in splits.items()}

        def _generate_examples(self, split, n):
            x, y = images
            offset = 0 if split == "train" else 500
            for c in range(len(NAMES)):
                for i in np.flatnonzero(y == c)[offset:offset + n]:
                    # images stay encoded: tfds stores the PNG bytes as they are
                    yield f"{split}{i}", {"image": _png(x[i]), "label": c}

    Clothes.name = name
    return Clothes


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    try:
        directory = local_sources.locate_fashion_mnist()
    except local_sources.SourceMissing as e:
        pytest.skip(f"Fashion-MNIST not installed here: {e.reason}")
    images, labels = local_sources.read_fashion_mnist(directory, "test")
    data_dir = tmp_path_factory.mktemp("tfds")
    for name, splits in (("bt_test_clothes", {"train": 20, "test": 6}),
                         ("bt_test_train_only", {"train": 4})):
        _builder_class(name, splits, (images[..., 0], labels))(
            data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


OFFLINE = textwrap.dedent("""
    import json, socket, sys
    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")
    socket.socket.connect = socket.create_connection = socket.getaddrinfo = no_network
    from bayes_transfer import data
    from bayes_transfer.cli import main
    data_dir = sys.argv[1]
    splits = data.load("tfds:bt_test_clothes:1.0.0", data_dir=data_dir, image_size=12,
                       shots_per_class=3, val_per_class=2, seed=1)
    streamed = data.load("tfds:bt_test_clothes", data_dir=data_dir, image_size=12)
    batch = next(iter(data.batches(streamed.train, 16, seed=0, epoch=0)))
    rc = main(["suggest", "--prior", "fashion-mnist/small-cnn", "--dataset",
               "tfds:bt_test_clothes", "--data-dir", data_dir, "--shots", "3", "--workers", "0"])
    print(json.dumps({"rc": rc, "train": len(splits.train), "val": len(splits.val),
                      "test": len(splits.test), "classes": list(splits.class_names),
                      "in_memory": type(splits.train).__name__,
                      "batch": list(batch["image"].shape), "labels": batch["label"].tolist(),
                      "streamed": [len(streamed.train), len(streamed.val)]}))
""")


def test_prepared_tfds_dataset_loads_by_name_offline(prepared):
    proc = subprocess.run([sys.executable, "-c", OFFLINE, str(prepared)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0
    assert (got["train"], got["val"], got["test"]) == (9, 6, 18)
    assert got["classes"] == NAMES and got["in_memory"] == "ArrayDataset"
    assert got["batch"] == [16, 12, 12, 1] and set(got["labels"]) <= {0, 1, 2}
    assert got["streamed"] == [54, 6]          # a 10 % validation hold-out of the 60
    assert "λ for lowrank" in proc.stdout
    # labels were read once and cached beside the prepared files
    assert list(prepared.glob("bt_test_clothes/1.0.0/bt_labels-train.npy"))


def test_tfds_labels_match_the_records_and_errors_are_clear(prepared):
    splits = data.load("tfds:bt_test_clothes", data_dir=prepared, image_size=28,
                       in_memory=True)
    source = splits.test.source if hasattr(splits.test, "source") else None
    assert source is None                                   # in_memory: all decoded
    np.testing.assert_array_equal(np.bincount(splits.test.labels), [6, 6, 6])
    with pytest.raises(DatasetNotFoundError, match="not prepared in any data dir"):
        data.load("tfds:bt_no_such_dataset", data_dir=prepared)
    with pytest.raises(DatasetFormatError, match="neither a 'test' nor a 'validation'"):
        data.load("tfds:bt_test_train_only", data_dir=prepared)
