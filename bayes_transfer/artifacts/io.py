"""Prior artifacts: publish and read a learned prior like pretrained weights.

An artifact is a directory (``metadata.json`` and ``arrays/``, see :mod:`.format`)
and, for publishing at a URL, a single ``.tar`` / ``.tar.gz`` file of that directory
(:func:`pack_artifact` / :func:`unpack_artifact`).

Example::

    path = bt.save_prior(prior, "priors/fmnist-cnn", metadata={
        "architecture": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1},
        "source": {"dataset": "fashion_mnist", "split": "train", "method": "supervised"},
        "swag": {"K": 20, "snapshots": 40, "every": 1, "start": 10, "lr": "constant 0.05"},
        "source_accuracy": 0.91, "recommended_scale": [1e-1, 1e2]})
    prior = read_prior(path, model_params=nnx.state(model, nnx.Param))
    prior.metadata["architecture"]      # {'arch': 'small_cnn', ...}

Reading checks, in order: format and version (a newer version asks you to upgrade);
the metadata digest; that the directory holds exactly the listed files with the listed
sizes (always, it is cheap); each file's sha256 (``verify=True``); the restored arrays'
shapes and dtypes against the metadata and the spec; the values (``Prior.validate``:
NaN/Inf, non-positive variance → ``PriorError``); and, if given, the model's
parameters against the spec (``SpecMismatchError`` naming the first differing path).
Nothing in an artifact is unpickled or executed.

Writing is atomic (:func:`bayes_transfer.fsutil.atomic_write`): everything is written
into a hidden temporary sibling (``.<name>.partial-*``), fsynced, then moved into
place; replacing an existing artifact (``overwrite=True``) swaps the new one in, so a
crash leaves either the old or the new complete artifact at ``path``, never a partial
one. A crash can leave a ``.partial-*`` sibling behind; it is safe to delete.
"""
from __future__ import annotations

import contextlib
import errno
import json
import tempfile
from pathlib import Path

import jax
import numpy as np

from bayes_transfer.artifacts.arrays import (prior_arrays, prior_from_arrays, process_local,
                                             read_arrays, write_arrays)
from bayes_transfer.artifacts.format import (ARRAYS_DIR, DTYPES, FORMAT, LAYOUT, METADATA_FILE,
                                             build_metadata, check_integrity, check_metadata,
                                             hash_files, metadata_digest, parse_metadata,
                                             write_metadata)
from bayes_transfer.artifacts.tar import (compression, created_epoch, extract_safely,
                                          is_packed_name, write_tar)
from bayes_transfer.errors import ArtifactError, PriorError
from bayes_transfer.fsutil import atomic_write
from bayes_transfer.prior import Prior

__all__ = ["save_prior", "read_prior", "verify_artifact", "read_metadata", "pack_artifact",
           "unpack_artifact", "check_destination"]


def save_prior(prior: Prior, path, *, metadata: dict | None = None,
               overwrite: bool = False) -> Path:
    """Write ``prior`` as an artifact directory at ``path`` (atomically); return the path.

    ``metadata`` adds provenance under the known keys ``architecture`` (dict),
    ``source`` (dict: dataset, split/classes, method), ``swag`` (dict: K, snapshots,
    every, start, lr schedule), ``source_accuracy`` (in [0, 1]) and
    ``recommended_scale`` ([lo, hi]); other keys are kept as given (JSON values only).
    Metadata the prior already carries (e.g. it was loaded from an artifact) is kept,
    with ``metadata`` taking precedence. Library versions, the creation time and the
    digests are filled in automatically. Arrays keep their stored dtype.

    Multi-process runs (``jax.distributed``): call ``save_prior`` on process 0 alone;
    it writes without waiting for the other processes (they wait at a barrier if they
    need the file, as ``learn-prior`` does). A prior replicated over every process's
    devices is written from process 0's own copy; one sharded across processes must be
    gathered first.
    """
    if not isinstance(prior, Prior):
        raise TypeError(f"save_prior expects a Prior, got {type(prior).__name__}")
    path = Path(path).expanduser().absolute()
    check_destination(path, overwrite)
    if jax.process_count() > 1 and jax.process_index() != 0:
        # Orbax writes NumPy arrays from process 0 only: elsewhere it would leave an
        # artifact without its array files.
        raise ArtifactError(
            f"save_prior runs on process 0 of a multi-process run (this is process "
            f"{jax.process_index()} of {jax.process_count()}); the other processes hold the "
            f"same replicated prior and should wait at a barrier instead")
    prior = process_local(prior)
    prior.validate()          # never publish NaN/Inf or a non-positive variance
    arrays = prior_arrays(prior)
    meta = build_metadata(prior, arrays, metadata)
    with _new_artifact_dir(path, overwrite) as tmp:
        write_arrays(tmp / ARRAYS_DIR, arrays)
        meta["files"] = hash_files(tmp)
        meta["sha256"] = metadata_digest(meta)
        write_metadata(tmp, meta)
    return path


def read_prior(path, *, verify: bool = True, model_params=None, dtype=None,
               sha256: str | None = None) -> Prior:
    """Read a prior artifact (a directory, or a packed ``.tar``/``.tar.gz`` file).

    Args:
      path: the artifact directory (or packed file).
      verify: hash every file against the recorded sha256 digests (the file list and
        sizes are always checked; ``verify=False`` only skips hashing).
      model_params: a parameter tree or ``nnx.State``; if given, checked against the
        prior's spec (``SpecMismatchError`` names the first differing path).
      dtype: cast the stored arrays, e.g. ``jnp.float32`` for a bfloat16 artifact.
      sha256: the expected artifact digest (from a trusted registry); checked against
        ``metadata["sha256"]``.

    Returns the Prior with the stored kind, scale and floor; ``prior.metadata`` is the
    artifact's metadata dict. (To load a prior by registered name or URL, use
    :func:`bayes_transfer.load_prior`.)
    """
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.name not in DTYPES:
            raise PriorError(f"dtype must be one of {sorted(DTYPES)}, got {dtype}")
    with _artifact_dir(path) as root:
        meta = read_metadata(root, verify=verify or sha256 is not None)
        check_integrity(root, meta, verify=verify, expected=sha256)
        arrays = read_arrays(root, meta, dtype)
    prior = prior_from_arrays(meta, arrays)
    if model_params is not None:
        prior.spec.check(model_params)
    return prior


def verify_artifact(path, *, sha256: str | None = None) -> dict:
    """Check an artifact completely (digests, arrays, values); return its metadata.

    Raises ArtifactError / ArtifactIntegrityError / ArtifactVersionError / PriorError
    on any problem.
    """
    return read_prior(path, verify=True, sha256=sha256).metadata


def read_metadata(path, *, verify: bool = True) -> dict:
    """The artifact's metadata (``metadata.json``), checked; no array is read.

    Checks the format and version, the metadata digest (``verify=True``) and the
    structure (kind, scale, spec, array shapes, file table).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise ArtifactError(f"no prior artifact at {root}: the path does not exist")
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory (for a packed .tar/.tar.gz "
                            f"artifact use unpack_artifact or read_prior). {LAYOUT}.")
    file = root / METADATA_FILE
    if not file.is_file():
        raise ArtifactError(f"{root} has no {METADATA_FILE}. {LAYOUT}. Was it fully "
                            f"downloaded or unpacked?")
    meta = parse_metadata(file)
    check_metadata(meta, file, verify=verify)
    return meta


def pack_artifact(artifact_dir, out_file, *, overwrite: bool = False) -> Path:
    """Pack an artifact directory into one ``.tar`` or ``.tar.gz``/``.tgz`` file.

    The artifact is verified first. The file is reproducible (sorted members, fixed
    owner, mode and time, gzip without timestamp) and written atomically.
    """
    root = Path(artifact_dir).expanduser()
    meta = verify_artifact(root)
    out = Path(out_file).expanduser().absolute()
    compress = compression(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ArtifactError(f"{out} already exists; pass overwrite=True to replace it")
        if not out.is_file():
            raise ArtifactError(f"refusing to overwrite {out}: it is not a regular file")
    members = [METADATA_FILE] + sorted(meta["files"])
    with atomic_write(out, overwrite=overwrite) as tmp, open(tmp, "wb") as raw:
        write_tar(raw, root, members, mtime=created_epoch(meta), compress=compress)
    return out


def unpack_artifact(file, dest_dir, *, overwrite: bool = False, verify: bool = True) -> Path:
    """Unpack a packed artifact into the directory ``dest_dir`` (atomically); return it.

    Only regular files and directories with relative paths inside the destination are
    accepted: absolute paths, ``..``, links, devices and fifos are refused with
    ArtifactError before anything is written. A tar whose files all sit under one
    top-level folder is unpacked without that folder. The result is verified
    (``verify_artifact``) before it is moved into place.
    """
    src = Path(file).expanduser()
    if not src.is_file():
        raise ArtifactError(f"no packed artifact at {src}: not an existing file")
    dest = Path(dest_dir).expanduser().absolute()
    check_destination(dest, overwrite)
    with _new_artifact_dir(dest, overwrite) as tmp:
        extract_safely(src, tmp)
        try:
            if verify:
                verify_artifact(tmp)
            else:
                read_metadata(tmp, verify=False)
        except ArtifactError as e:
            raise type(e)(f"{src} does not contain a valid prior artifact: {e}") from None
    return dest


def check_destination(path: Path, overwrite: bool) -> None:
    """ArtifactError unless an artifact may be written at ``path``: nothing is there, or
    (``overwrite``) an artifact or an empty directory."""
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise ArtifactError(f"{path} already exists; pass overwrite=True to replace it")
    if not path.is_dir():
        raise ArtifactError(f"refusing to overwrite {path}: it is not a directory")
    if any(path.iterdir()) and not _looks_like_artifact(path):
        raise ArtifactError(f"refusing to overwrite {path}: it is a non-empty directory that "
                            f"is not a prior artifact (no bayes_transfer {METADATA_FILE}); "
                            f"remove it yourself if that is what you want")


def _looks_like_artifact(path: Path) -> bool:
    try:
        meta = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _new_artifact_dir(path: Path, overwrite: bool):
    """``atomic_write`` of the artifact directory ``path``: yield an empty temporary
    directory to fill; a destination created meanwhile is an ArtifactError."""
    written = False
    try:
        with atomic_write(path, directory=True, overwrite=overwrite) as tmp:
            yield tmp
            written = True
    except OSError as e:
        if not written or overwrite or e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise ArtifactError(f"cannot move the new artifact into {path}: {e} (was it created "
                            f"meanwhile? pass overwrite=True to replace it)") from None


@contextlib.contextmanager
def _artifact_dir(path):
    """Yield an artifact directory for ``path``: itself, or a packed file unpacked."""
    p = Path(path).expanduser()
    if p.is_file() and is_packed_name(p):
        with tempfile.TemporaryDirectory(prefix="bayes_transfer-artifact-") as td:
            yield unpack_artifact(p, Path(td) / "artifact", verify=False)
        return
    yield p
