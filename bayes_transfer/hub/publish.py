"""Packing and publishing priors: one reproducible file, a registry entry, an upload.

    from bayes_transfer.hub import pack_prior
    packed = pack_prior("priors/my-prior")          # priors/my-prior.tar.gz
    packed.sha256, packed.file_sha256, packed.size  # artifact digest, file digest, bytes

The packed file is deterministic: the same artifact gives the same bytes, wherever it
lies and whatever its files' times, owners and modes (sorted members after
``metadata.json``, each with the artifact's creation time, owner 0, mode 0644; gzip
without a file name or time; see :mod:`bayes_transfer.artifacts.tar`).
CLI: ``bayes-transfer priors pack DIR [--out FILE]``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from bayes_transfer.artifacts import pack_artifact, read_metadata
from bayes_transfer.errors import ArtifactError

__all__ = ["PackedArtifact", "pack_prior", "packed_name", "file_sha256"]

PACKED_SUFFIX = ".tar.gz"


@dataclasses.dataclass(frozen=True)
class PackedArtifact:
    """A packed prior: where it is, its bytes, and the two digests."""

    path: Path
    size: int            # bytes of the packed file
    file_sha256: str     # sha256 of the packed file's bytes
    sha256: str          # the artifact digest (metadata["sha256"]): what registries pin


def file_sha256(path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packed_name(artifact_dir) -> str:
    """The default packed file name of an artifact directory: ``<dir name>.tar.gz``."""
    name = Path(artifact_dir).expanduser().absolute().name
    if not name:
        raise ArtifactError(f"cannot name a packed file after {artifact_dir!r}; pass out=")
    return name + PACKED_SUFFIX


def pack_prior(artifact_dir, out=None, *, overwrite: bool = False) -> PackedArtifact:
    """Pack the artifact directory ``artifact_dir`` into one deterministic ``.tar.gz``.

    ``out`` defaults to ``<artifact_dir>.tar.gz`` beside the directory. The artifact is
    verified completely first; the file is written atomically. An existing ``out`` is
    an ArtifactError unless ``overwrite``.
    """
    src = Path(artifact_dir).expanduser()
    if not src.is_dir():
        raise ArtifactError(f"{src} is not an artifact directory: pack the directory that "
                            f"holds metadata.json and arrays/")
    target = Path(out).expanduser() if out is not None \
        else src.absolute().with_name(packed_name(src))
    path = pack_artifact(src, target, overwrite=overwrite)
    return PackedArtifact(path=path, size=path.stat().st_size, file_sha256=file_sha256(path),
                          sha256=read_metadata(src, verify=False)["sha256"])
