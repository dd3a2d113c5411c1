"""Where prepared tfds data lives, whether downloads are allowed, and tfds' quiet mode."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

DATA_DIR_ENV = "BAYES_TRANSFER_DATA_DIR"
ALLOW_DOWNLOAD_ENV = "BAYES_TRANSFER_ALLOW_DOWNLOAD"
DEFAULT_DATA_DIR = "~/.cache/bayes_transfer/tensorflow_datasets"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    return default_data_dir() if data_dir is None else Path(data_dir).expanduser()


def download_allowed(download: bool) -> bool:
    return download or os.environ.get(ALLOW_DOWNLOAD_ENV, "").lower() in ("1", "true", "yes")


def no_gcs_config():
    """Download config that never looks for prepared data on Google Cloud Storage."""
    import tensorflow_datasets as tfds

    return tfds.download.DownloadConfig(try_download_gcs=False)


@contextlib.contextmanager
def quiet_tfds_warnings():
    """Hide tfds warnings about normal events (data not prepared yet, a per-folder config)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
