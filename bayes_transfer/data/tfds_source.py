"""A tfds catalog dataset as image sources: ``tfds:NAME[/CONFIG][:VERSION]``.

Read through ``tfds.data_source`` from ``array_record`` files, without TensorFlow: the
records are read as raw ``tf.train.Example`` bytes and parsed here (the proto ships
with tfds), so an image stays encoded (PNG/JPEG) until a worker decodes it with PIL,
and the labels are read without decoding any image. They are cached beside the
prepared files (``bt_labels-SPLIT.npy``) so only the first opening reads every record.

Where the prepared data is looked for, in order: ``data_dir`` (else
``$BAYES_TRANSFER_DATA_DIR``, else ``~/.cache/bayes_transfer/tensorflow_datasets``), then
tfds' own data dir (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``); a download (tfds
prepares it as array_record) only when allowed (``download=True`` or
``$BAYES_TRANSFER_ALLOW_DOWNLOAD=1``). A dataset prepared on another machine and copied
into a data dir loads by name offline, even when this tfds does not know its builder.

Splits: ``train``; the test split is ``test``, else ``validation``; with both,
``validation`` is the validation split.
"""
from __future__ import annotations

from pathlib import Path

import os

import numpy as np

from bayes_transfer.data.data_dirs import no_gcs_config, quiet_tfds_warnings
from bayes_transfer.data.errors import DatasetFormatError, DatasetNotFoundError
from bayes_transfer.fsutil import atomic_write

PREFIX = "tfds:"
_CHUNK = 4096


def _example_pb2():
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2


def _feature_keys(info) -> tuple[str, str]:
    features = info.features
    if info.supervised_keys and len(info.supervised_keys) == 2:
        image, label = info.supervised_keys
        if isinstance(image, str) and isinstance(label, str):
            return image, label
    if "image" in features and "label" in features:
        return "image", "label"
    raise DatasetFormatError(f"tfds:{info.full_name} has no (image, label) pair of features "
                             f"(features: {', '.join(features.keys())}); only image "
                             f"classification datasets are supported")


def open_builder(spec: str, data_dirs, allow_download: bool):
    """The prepared tfds builder for ``spec`` (``NAME[/CONFIG][:VERSION]``), looked up in
    ``data_dirs`` in order; downloaded into the first one only if ``allow_download``."""
    import tensorflow_datasets as tfds

    tried = []
    for data_dir in data_dirs:
        try:
            with quiet_tfds_warnings():
                builder = tfds.builder(spec, data_dir=str(data_dir), file_format="array_record")
                if builder.is_prepared():
                    return builder
        except Exception as e:     # unknown name and nothing prepared: tfds says so
            tried.append(f"{data_dir}: {type(e).__name__}: {str(e).splitlines()[0]}")
            continue
        tried.append(f"{data_dir}: not prepared there")
    if allow_download:
        try:
            builder = tfds.builder(spec, data_dir=str(data_dirs[0]), file_format="array_record")
            builder.download_and_prepare(download_config=no_gcs_config())
        except Exception as e:     # network, a missing extra (TensorFlow), an unknown name
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if isinstance(e, ModuleNotFoundError):
                first += f" (`pip install {e.name}`)"
            raise DatasetNotFoundError(
                f"tfds could not download and prepare {spec!r} into {data_dirs[0]}: "
                f"{type(e).__name__}: {first}. Preparing runs tfds' own builder, which needs "
                f"the network and, for many datasets, TensorFlow (`pip install tensorflow`); "
                f"or prepare it elsewhere and copy the data dir here") from e
        return builder
    raise DatasetNotFoundError(
        f"tfds dataset {spec!r} is not prepared in any data dir. Tried:\n"
        + "".join(f"  - {t}\n" for t in tried)
        + "To fix: prepare it where the network allows (tfds build, or load it once with "
          "download allowed: --download / BAYES_TRANSFER_ALLOW_DOWNLOAD=1) and pass its data "
          "dir with --data-dir (or $BAYES_TRANSFER_DATA_DIR)")


def split_names(builder) -> dict[str, str]:
    """``{"train", "test"[, "val"]}`` → the builder's split names."""
    splits = set(builder.info.splits.keys())
    name = f"tfds:{builder.info.full_name}"
    if "train" not in splits:
        raise DatasetFormatError(f"{name} has no 'train' split (it has {sorted(splits)})")
    out = {"train": "train"}
    if "test" in splits:
        out["test"] = "test"
        if "validation" in splits:
            out["val"] = "validation"
    elif "validation" in splits:
        out["test"] = "validation"
    else:
        raise DatasetFormatError(f"{name} has neither a 'test' nor a 'validation' split (a "
                                 f"missing split; it has {sorted(splits)})")
    return out


class TfdsSource:
    """One split of a prepared tfds dataset (see the module docstring)."""

    def __init__(self, builder, split: str):
        import tensorflow_datasets as tfds

        info = builder.info
        self.spec = f"{info.full_name}"
        self.split = split
        self.data_dir = str(builder.data_dir)      # the prepared version's own folder
        self.name = info.name
        self.image_key, self.label_key = _feature_keys(info)
        image, label = info.features[self.image_key], info.features[self.label_key]
        if not isinstance(label, tfds.features.ClassLabel):
            raise DatasetFormatError(f"tfds:{self.spec}: feature {self.label_key!r} is not a "
                                     f"ClassLabel")
        self.num_classes = label.num_classes
        self.class_names = tuple(label.names)
        shape = tuple(image.shape)
        self.channels = 1 if shape and shape[-1] == 1 else 3
        self._encoded = isinstance(image, tfds.features.Image)
        if not self._encoded and (any(d is None for d in shape) or image.np_dtype != np.uint8):
            raise DatasetFormatError(f"tfds:{self.spec}: image feature {self.image_key!r} is "
                                     f"{image!r}; need an Image or a fixed-shape uint8 Tensor")
        self._shape = shape
        self._records = None
        self.labels = self._read_labels(builder)
        self.fingerprint = f"tfds:{self.spec}[{split}]:{len(self.labels)}"

    # Pickled to workers without the open files; each worker reopens them.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_records"}

    def __setstate__(self, state):
        self.__dict__.update(state, _records=None)

    def _source(self, builder=None):
        if self._records is None:
            import tensorflow_datasets as tfds

            # The prepared files alone (no builder code, no network): what
            # tfds.data_source(name, data_dir=..., download=False) reads.
            builder = builder or tfds.builder_from_directory(self.data_dir)
            self._records = builder.as_data_source(
                split=self.split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        return self._records

    def _parse(self, record: bytes):
        return _example_pb2().Example.FromString(record).features.feature

    def _read_labels(self, builder) -> np.ndarray:
        cache = Path(builder.data_dir) / f"bt_labels-{self.split}.npy"
        n = builder.info.splits[self.split].num_examples
        if cache.is_file():
            labels = np.load(cache)
            if len(labels) == n:
                return labels.astype(np.int32)
        source = self._source(builder)
        labels = np.empty(len(source), np.int32)
        for start in range(0, len(source), _CHUNK):
            stop = min(start + _CHUNK, len(source))
            for i, record in enumerate(source.__getitems__(range(start, stop)), start):
                labels[i] = self._parse(record)[self.label_key].int64_list.value[0]
        try:
            with atomic_write(cache) as tmp, open(tmp, "wb") as f:
                np.save(f, labels)
        except OSError:        # a read-only data dir: read the labels again next time
            pass
        return labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        feature = self._parse(self._source()[int(i)])[self.image_key]
        data = feature.bytes_list.value
        if self._encoded:
            return bytes(data[0])
        if data:
            return np.frombuffer(data[0], np.uint8).reshape(self._shape)
        return np.asarray(feature.int64_list.value, np.uint8).reshape(self._shape)

    def describe(self, i: int) -> str:
        return f"tfds:{self.spec}[{self.split}][{int(i)}] (in {self.data_dir})"

    def __repr__(self) -> str:
        return f"TfdsSource('tfds:{self.spec}', split={self.split!r}, n={len(self)})"


def is_tfds(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def tfds_default_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()

