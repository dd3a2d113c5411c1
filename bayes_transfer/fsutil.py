"""The one atomic write of the package: build beside the destination, fsync, swap in.

Every file or directory the toolkit writes (prior artifacts, registries, model
directories, downloads, JSON reports, figures) goes through :func:`atomic_write`, so a
crash leaves either the old or the new version at the destination, never a half-written
one and never neither:

* the new version is written to a temporary name in the destination's directory (same
  file system, so the final rename cannot copy), then fsynced;
* a file, or a directory that does not exist yet, is renamed into place;
* a directory that exists is swapped with the new one in one step (Linux
  ``renameat2(RENAME_EXCHANGE)``), then the old one is deleted. Where the kernel or file
  system cannot exchange, the old one is renamed aside first and restored on failure.

Example::

    with atomic_write("out/report.json") as tmp:
        tmp.write_text(json.dumps(report))
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write", "write_json", "write_text", "fsync_dir", "fsync_tree", "sha256_file"]

_RENAME_EXCHANGE = 2      # linux/fs.h
_AT_FDCWD = -100


def fsync_dir(directory) -> None:
    """Make a rename or creation inside ``directory`` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root) -> None:
    """fsync every file under ``root`` (or ``root`` itself if it is a file) and its dirs."""
    root = Path(root)
    if root.is_file():
        with open(root, "rb") as f:
            os.fsync(f.fileno())
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return lib if hasattr(lib, "renameat2") else None
    except OSError:
        return None


_LIBC = _libc()


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically; False where the system cannot."""
    if _LIBC is None:
        return False
    rc = _LIBC.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                         _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False          # file system without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, dest: Path) -> None:
    """Move the finished ``tmp`` to ``dest``, replacing what is there."""
    dest_is_dir = dest.is_dir() and not dest.is_symlink()
    if not dest_is_dir:
        os.replace(tmp, dest)          # atomic for files, and for a new directory
        return
    if _exchange(tmp, dest):
        _remove(tmp)                   # tmp now holds the old version
        return
    aside = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(dest, aside)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    _remove(aside)


@contextlib.contextmanager
def atomic_write(dest, *, directory: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``dest`` atomically.

    Args:
      dest: the file or directory to create or replace.
      directory: the temporary path is created as an empty directory (for a tree).
      overwrite: if False and ``dest`` exists, raise ``FileExistsError`` (checked again
        at the rename, so a destination created meanwhile is not replaced).

    On an exception nothing at ``dest`` changes and the temporary is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and (dest.exists() or dest.is_symlink()):
        raise FileExistsError(errno.EEXIST, "already exists", str(dest))
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:12]}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if overwrite:
            _replace(tmp, dest)
        elif directory:
            os.rename(tmp, dest)       # fails if dest appeared meanwhile (non-empty)
        else:
            os.link(tmp, dest)         # fails if dest appeared meanwhile
            tmp.unlink()
        fsync_dir(dest.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, obj, **kwargs) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (``json.dumps`` kwargs)."""
    return write_text(path, json.dumps(obj, **{"indent": 2, **kwargs}) + "\n")


def sha256_file(path, *, block: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes, read in blocks (any size of file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
