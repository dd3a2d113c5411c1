"""`load_segmentation_folder`: image/label folders → arrays, through the folder tfds builder."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from bayes_transfer.data.loading import no_gcs_config, quiet_tfds_warnings, resolve_data_dir


def load_segmentation_folder(path: str | Path, *, label_values: Mapping[int, int] | None = None,
                             data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W, C)`` uint8 and masks ``(N, H, W)`` int32 from ``path``.

    ``path`` holds ``image/<name>.png`` and ``label/<name>.png`` with matching
    names (see `bayes_transfer.data.folder_builder`). Label pixel values become
    class ids through ``label_values`` (``{pixel value: class id}``), or by rank
    among the sorted distinct values (ISBI-2012: 0 → 0 membrane, 255 → 1 cell).
    Pairs come in natural file-name order (``2.png`` before ``10.png``). The
    first call prepares tfds data in the data dir; later calls read it (a
    folder whose files change gets a new hash, so it is prepared again).

    >>> images, masks = load_segmentation_folder(
    ...     "data/isbi2012-membrane")  # doctest: +SKIP
    >>> images.shape, masks.shape  # doctest: +SKIP
    ((30, 512, 512, 1), (30, 512, 512))
    """
    from bayes_transfer.data.folder_builder import BtImageLabelFolders, folder_config
    from bayes_transfer.data.tfds_reading import read_split

    config = folder_config(path, label_values)  # validates the layout first
    with quiet_tfds_warnings():
        builder = BtImageLabelFolders(config=config, data_dir=str(resolve_data_dir(data_dir)),
                                      file_format="array_record")
        prepared = builder.is_prepared()
    if not prepared:
        builder.download_and_prepare(download_config=no_gcs_config())
    arrays = read_split(builder, "train")
    return arrays["image"], arrays["mask"].astype(np.int32)
