"""Packed artifacts: an artifact directory as one ``.tar`` / ``.tar.gz`` file.

Packing is reproducible (sorted members, fixed owner, mode and time, gzip without a
timestamp), so the same artifact gives the same bytes. Unpacking accepts only regular
files and directories with relative paths inside the destination: absolute paths,
``..``, links, devices and fifos are refused with ArtifactError before anything is
written. The public functions, which verify the artifact and write atomically, are
:func:`bayes_transfer.artifacts.pack_artifact` and ``unpack_artifact``.
"""
from __future__ import annotations

import datetime
import gzip
import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from bayes_transfer.artifacts.format import METADATA_FILE, safe_relpath
from bayes_transfer.errors import ArtifactError

__all__ = ["is_packed_name", "compression", "created_epoch", "write_tar", "extract_safely"]


def is_packed_name(p: Path) -> bool:
    """Whether ``p`` is named like a packed artifact (``.tar``, ``.tar.gz``, ``.tgz``)."""
    return p.name.endswith((".tar", ".tar.gz", ".tgz"))


def compression(out: Path) -> bool:
    """Whether the packed file ``out`` is gzip-compressed, by its name."""
    if out.name.endswith((".tar.gz", ".tgz")):
        return True
    if out.name.endswith(".tar"):
        return False
    raise ArtifactError(f"{out}: a packed artifact is named *.tar, *.tar.gz or *.tgz")


def created_epoch(meta: dict) -> int:
    """The artifact's creation time (seconds since the epoch), the members' fixed time."""
    try:
        created = datetime.datetime.strptime(meta.get("created", ""), "%Y-%m-%dT%H:%M:%SZ")
        return int(created.replace(tzinfo=datetime.timezone.utc).timestamp())
    except (TypeError, ValueError):
        return 0


def write_tar(raw: BinaryIO, root: Path, members: list[str], *, mtime: int,
              compress: bool) -> None:
    """Write the files ``members`` (relative POSIX paths under ``root``, in this order)
    as a reproducible tar into the open binary file ``raw``."""
    stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in members:
            info = tarfile.TarInfo(rel)
            info.size = (root / rel).stat().st_size
            info.mtime, info.mode, info.type = mtime, 0o644, tarfile.REGTYPE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(root / rel, "rb") as f:
                tar.addfile(info, f)
    if compress:
        stream.close()


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "a symbolic link"
    if m.islnk():
        return "a hard link"
    if m.ischr() or m.isblk():
        return "a device"
    if m.isfifo():
        return "a fifo"
    return f"an unsupported member (type {m.type!r})"


def _safe_members(tar: tarfile.TarFile, src: Path, dest: Path) -> list[tuple[Any, str]]:
    """(member, relative path) pairs after all safety checks; raise before writing."""
    checked = []
    for m in tar.getmembers():
        if not (m.isfile() or m.isdir()):
            raise ArtifactError(f"{src}: refusing member {m.name!r}: it is {_member_kind(m)}; "
                                f"a prior artifact holds only regular files and directories")
        try:
            rel = safe_relpath(m.name)
        except ArtifactError as e:
            raise ArtifactError(f"{src}: refusing member: {e}") from None
        if hasattr(tarfile, "data_filter"):   # Python >= 3.11.4: a second opinion
            try:
                tarfile.data_filter(m, str(dest))
            except tarfile.FilterError as e:
                raise ArtifactError(f"{src}: refusing member {m.name!r}: {e}") from None
        if rel is not None:
            checked.append((m, rel))
    rels = [rel for _, rel in checked]
    if METADATA_FILE not in rels:
        # Packed by hand as `tar -cf x.tar my-prior/`: strip the single top-level folder.
        tops = {PurePosixPath(r).parts[0] for r in rels}
        if len(tops) == 1 and f"{next(iter(tops))}/{METADATA_FILE}" in rels:
            top = next(iter(tops))
            checked = [(m, r[len(top) + 1:]) for m, r in checked if r != top]
            rels = [r for _, r in checked]
    seen = set()
    for rel in rels:
        if rel in seen:
            raise ArtifactError(f"{src}: member {rel!r} appears twice; refusing an ambiguous "
                                f"archive")
        seen.add(rel)
    files = {rel for m, rel in checked if m.isfile()}
    for rel in rels:   # a file used as a folder of another member
        for parent in PurePosixPath(rel).parents:
            if str(parent) in files:
                raise ArtifactError(f"{src}: member {rel!r} lies under the file {str(parent)!r}")
    return checked


def extract_safely(src: Path, dest: Path) -> None:
    """Extract the packed artifact ``src`` into the existing empty directory ``dest``.

    Every member is checked before anything is written; a tar whose files all sit under
    one top-level folder is extracted without that folder. Nothing is verified here.
    """
    try:
        tar = tarfile.open(src, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArtifactError(f"{src} is not a readable .tar/.tar.gz file ({e}); the download is "
                            f"corrupt or incomplete: download it again") from None
    try:
        with tar:
            for m, rel in _safe_members(tar, src, dest):
                target = dest.joinpath(*rel.split("/"))
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                fobj = tar.extractfile(m)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                with fobj, os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                    shutil.copyfileobj(fobj, out)
    except ArtifactError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArtifactError(f"cannot unpack {src} ({type(e).__name__}: {e}); the file is corrupt "
                            f"or incomplete: download it again") from None
