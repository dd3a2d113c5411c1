"""Reader for the idx format of the (Fashion-)MNIST files, optionally gzipped.

Layout (big-endian): two zero bytes, a dtype code, the number of dimensions n,
then n uint32 sizes, then the raw values. Only dtype 0x08 (uint8) is used by
(Fashion-)MNIST and only that is accepted.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from bayes_transfer.data.errors import DatasetFormatError

_UINT8 = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Return the array stored in an idx file (``.gz`` is decompressed).

    Raises `DatasetFormatError` naming the file if it is truncated, not gzip,
    or has a bad magic number.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DatasetFormatError(f"cannot read idx file {path}: {e}. Reinstall or "
                                 f"re-download it.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UINT8 or raw[3] == 0:
        raise DatasetFormatError(
            f"{path} is not a uint8 idx file (magic bytes {raw[:4].hex() or 'missing'}, "
            f"expected 0000 08 0n). The file is corrupt or not an (Fashion-)MNIST file.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DatasetFormatError(
            f"{path} is truncated or padded: header says shape {dims} "
            f"({header + int(np.prod(dims))} bytes) but the file has {len(raw)} bytes.")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)
