"""Prior artifacts: publish and load a learned prior like pretrained weights.

An artifact is a directory::

    my-prior/
      metadata.json   JSON only (never pickle): format, kind, λ, ε, parameter spec,
                      provenance (architecture, source task, SWAG settings, ...), digests
      arrays/         an Orbax checkpoint (tensorstore) of the dict of numpy arrays
                      {"mean", "var"[, "deviations"]} in their stored dtype

and, for publishing at a URL, a single ``.tar`` / ``.tar.gz`` file of that directory
(:func:`pack_artifact` / :func:`unpack_artifact`).

Example::

    path = bt.save_prior(prior, "priors/fmnist-cnn", metadata={
        "architecture": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1},
        "source": {"dataset": "fashion_mnist", "split": "train", "method": "supervised"},
        "swag": {"K": 20, "snapshots": 40, "every": 1, "start": 10, "lr": "constant 0.05"},
        "source_accuracy": 0.91, "recommended_scale": [1e-1, 1e2]})
    prior = bt.load_prior(path, model_params=nnx.state(model, nnx.Param))
    prior.metadata["architecture"]      # {'arch': 'small_cnn', ...}

Checksum scheme (format version 1)
----------------------------------
* ``metadata["files"]`` maps the relative POSIX path of every regular file of the
  directory except ``metadata.json`` (i.e. everything Orbax wrote under ``arrays/``)
  to ``{"size": <bytes>, "sha256": <hex sha256 of the file's bytes>}``.
* ``metadata["sha256"]`` is the hex sha256 of the *canonical JSON* of the metadata
  dict with the ``sha256`` key removed, where canonical JSON is Python's
  ``json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
  allow_nan=False).encode("ascii")``. It is computed over the parsed values, so the
  layout of ``metadata.json`` (indentation, key order) does not matter.

So ``sha256`` is a single fingerprint of the whole artifact: it covers every field of
the metadata (kind, scale, floor, spec, provenance) and, through the ``files`` table,
the path, size and bytes of every array file. A registry (the hub) pins it and passes
it as ``load_prior(..., sha256=...)``. The digests detect corruption, truncation,
stray files and edits; they are not a signature: someone who rewrites the files and
recomputes the digests is only caught when the expected ``sha256`` comes from a
trusted registry.

Loading checks, in order: format and version (a newer version asks you to upgrade);
the metadata digest; that the directory holds exactly the listed files with the listed
sizes (always, it is cheap); each file's sha256 (``verify=True``); the restored arrays'
shapes and dtypes against the metadata and the spec; the values (``Prior.validate``:
NaN/Inf, non-positive variance → ``PriorError``); and, if given, the model's
parameters against the spec (``SpecMismatchError`` naming the first differing path).
Nothing in an artifact is unpickled or executed.

Writing is atomic: everything is written into a hidden temporary sibling
(``.<name>.partial-*``), fsynced, then renamed into place. Replacing an existing
artifact (``overwrite=True``) renames the old one aside (``.<name>.old-*``), renames the
new one in and then deletes the old one; a crash leaves either the old or the new
complete artifact at ``path`` (or, in the instant between the two renames, the old
one aside), never a partial one. A crash can leave a ``.partial-*`` sibling behind;
it is safe to delete.
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import stat
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer.errors import (ArtifactError, ArtifactIntegrityError, ArtifactVersionError,
                                   PriorError, SpecMismatchError)
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import KINDS, Prior

__all__ = ["save_prior", "load_prior", "read_metadata", "verify_artifact", "pack_artifact",
           "unpack_artifact", "FORMAT", "FORMAT_VERSION"]

FORMAT = "bayes_transfer.prior"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ARRAYS_DIR = "arrays"

#: Provenance keys a user passes in ``metadata`` (other non-reserved keys are kept as is).
USER_KEYS = ("architecture", "source", "swag", "source_accuracy", "recommended_scale")
#: Keys written by save_prior itself; a user cannot set them.
RESERVED_KEYS = ("format", "format_version", "kind", "scale", "floor", "dim", "rank", "spec",
                 "arrays", "files", "library_versions", "created", "sha256")
_LIBRARIES = {"bayes_transfer": "bayes_transfer", "jax": "jax", "jaxlib": "jaxlib",
              "flax": "flax", "optax": "optax", "orbax": "orbax-checkpoint",
              "numpyro": "numpyro", "numpy": "numpy"}
_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(jnp.bfloat16),
           "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
_MAX_METADATA_BYTES = 64 << 20
_CHUNK_BYTES = 64 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_LAYOUT = (f"A prior artifact is a directory holding {METADATA_FILE} (JSON: format, kind, "
           f"scale, parameter spec, sha256 digests) and {ARRAYS_DIR}/ (an Orbax checkpoint of "
           f"mean, var and deviations), as written by bayes_transfer.save_prior")


# ====================================================================== public API
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
    _check_destination(path, overwrite)
    if jax.process_count() > 1 and jax.process_index() != 0:
        # Orbax writes NumPy arrays from process 0 only: elsewhere it would leave an
        # artifact without its array files.
        raise ArtifactError(
            f"save_prior runs on process 0 of a multi-process run (this is process "
            f"{jax.process_index()} of {jax.process_count()}); the other processes hold the "
            f"same replicated prior and should wait at a barrier instead")
    prior = _process_local(prior)
    prior.validate()          # never publish NaN/Inf or a non-positive variance
    arrays = _prior_arrays(prior)
    meta = _build_metadata(prior, arrays, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_arrays(tmp / ARRAYS_DIR, arrays)
        meta["files"] = _hash_files(tmp)
        meta["sha256"] = metadata_digest(meta)
        _write_metadata(tmp, meta)
        _fsync_tree(tmp)
        _move_into_place(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_prior(path, *, verify: bool = True, model_params=None, dtype=None,
               sha256: str | None = None) -> Prior:
    """Load a prior artifact (a directory, or a packed ``.tar``/``.tar.gz`` file).

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
    artifact's metadata dict.
    """
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.name not in _DTYPES:
            raise PriorError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
    with _artifact_dir(path) as root:
        meta = read_metadata(root, verify=verify or sha256 is not None)
        _check_integrity(root, meta, verify=verify, expected=sha256)
        arrays = _read_arrays(root, meta, dtype)
    prior = _prior_from_arrays(meta, arrays)
    if model_params is not None:
        prior.spec.check(model_params)
    return prior


def verify_artifact(path, *, sha256: str | None = None) -> dict:
    """Check an artifact completely (digests, arrays, values); return its metadata.

    Raises ArtifactError / ArtifactIntegrityError / ArtifactVersionError / PriorError
    on any problem.
    """
    return load_prior(path, verify=True, sha256=sha256).metadata


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
                            f"artifact use unpack_artifact or load_prior). {_LAYOUT}.")
    file = root / METADATA_FILE
    if not file.is_file():
        raise ArtifactError(f"{root} has no {METADATA_FILE}. {_LAYOUT}. Was it fully "
                            f"downloaded or unpacked?")
    if file.stat().st_size > _MAX_METADATA_BYTES:
        raise ArtifactError(f"{file} is larger than {_MAX_METADATA_BYTES >> 20} MiB; it is "
                            f"not a prior artifact's metadata")
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{file} is not valid JSON ({e}); the artifact is corrupt: delete "
                            f"it and download it again") from None
    # Version first (a newer format may hash differently), then the digest (so an edit
    # is reported as such), then the structure.
    _check_format(meta, file)
    if verify:
        _check_metadata_digest(meta, file)
    _validate_metadata(meta, file)
    return meta


def pack_artifact(artifact_dir, out_file, *, overwrite: bool = False) -> Path:
    """Pack an artifact directory into one ``.tar`` or ``.tar.gz``/``.tgz`` file.

    The artifact is verified first. The file is reproducible (sorted members, fixed
    owner, mode and time, gzip without timestamp) and written atomically.
    """
    root = Path(artifact_dir).expanduser()
    meta = verify_artifact(root)
    out = Path(out_file).expanduser().absolute()
    compress = _compression(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ArtifactError(f"{out} already exists; pass overwrite=True to replace it")
        if not out.is_file():
            raise ArtifactError(f"refusing to overwrite {out}: it is not a regular file")
    mtime = _created_epoch(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress \
                else raw
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel in [METADATA_FILE] + sorted(meta["files"]):
                    info = tarfile.TarInfo(rel)
                    info.size = (root / rel).stat().st_size
                    info.mtime, info.mode, info.type = mtime, 0o644, tarfile.REGTYPE
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with open(root / rel, "rb") as f:
                        tar.addfile(info, f)
            if compress:
                stream.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
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
    _check_destination(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        _extract_safely(src, tmp)
        try:
            if verify:
                verify_artifact(tmp)
            else:
                read_metadata(tmp, verify=False)
        except ArtifactError as e:
            raise type(e)(f"{src} does not contain a valid prior artifact: {e}") from None
        _fsync_tree(tmp)
        _move_into_place(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def metadata_digest(meta: dict) -> str:
    """The artifact digest: sha256 of the canonical JSON of ``meta`` without ``sha256``."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    try:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                               allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"artifact metadata is not canonical JSON: {e}") from None
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


# ====================================================================== writing
def _process_local(prior: Prior) -> Prior:
    """``prior`` with every array that spans other processes' devices replaced by this
    process's own copy (its first addressable shard), so that checking and writing it
    run no computation that the other processes would have to join. Unchanged (the
    same object) when every array is addressable, as in a one-process run."""
    leaves = jax.tree.leaves(prior)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return prior

    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if not x.is_fully_replicated:
            raise PriorError(
                f"save_prior got an array of shape {x.shape} sharded across processes "
                f"({x.sharding}); each process holds only part of it. Replicate it first "
                f"(jax.experimental.multihost_utils.process_allgather, or build the prior "
                f"from fit's replicated state)")
        return x.addressable_data(0)

    return jax.tree.map(local, prior)


def _prior_arrays(prior: Prior) -> dict[str, np.ndarray]:
    arrays = {"mean": prior.mean, "var": prior.var}
    if prior.deviations is not None:
        arrays["deviations"] = prior.deviations
    out = {}
    for name, x in arrays.items():
        if isinstance(x, jax.core.Tracer):
            raise PriorError("save_prior cannot be called inside a jitted or traced function")
        a = np.asarray(jax.device_get(x))
        if a.dtype.name not in _DTYPES:
            raise PriorError(f"prior {name} has dtype {a.dtype}; an artifact stores "
                             f"{', '.join(_DTYPES)} (use prior.astype(jnp.float32))")
        out[name] = np.array(a, order="C")   # (ascontiguousarray would make scalars 1-d)
    return out


def _json_default(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, (tuple, set, frozenset)):
        return list(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _normalize_user_metadata(metadata: dict) -> dict:
    if not isinstance(metadata, dict):
        raise ArtifactError(f"metadata must be a dict, got {type(metadata).__name__}")
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise ArtifactError(f"metadata keys must be strings, got {key!r}")
        if key in RESERVED_KEYS:
            raise ArtifactError(f"metadata key {key!r} is written by save_prior itself; "
                                f"reserved keys: {', '.join(RESERVED_KEYS)}")
        try:
            value = json.loads(json.dumps(value, default=_json_default, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"metadata[{key!r}] must be plain JSON data (dicts, lists, "
                                f"strings, finite numbers): {e}") from None
        out[key] = value
    for key in ("architecture", "source", "swag"):
        if key in out and not isinstance(out[key], dict):
            raise ArtifactError(f"metadata[{key!r}] must be a dict, got {out[key]!r}")
    if "source_accuracy" in out:
        acc = out["source_accuracy"]
        if not _is_number(acc) or not 0.0 <= acc <= 1.0:
            raise ArtifactError(f"metadata['source_accuracy'] must be a number in [0, 1], "
                                f"got {acc!r}")
    if "recommended_scale" in out:
        rs = out["recommended_scale"]
        if (not isinstance(rs, list) or len(rs) != 2 or not all(map(_is_number, rs))
                or not 0 < rs[0] <= rs[1]):
            raise ArtifactError(f"metadata['recommended_scale'] must be [lo, hi] with "
                                f"0 < lo <= hi, got {rs!r}")
        out["recommended_scale"] = [float(v) for v in rs]
    return out


def _is_number(x) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:      # a JSON integer beyond the float range (e.g. 10**400)
        return False


def _library_versions() -> dict:
    versions = {}
    for key, dist in _LIBRARIES.items():
        try:
            versions[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[key] = None
    return versions


def _build_metadata(prior: Prior, arrays: dict, metadata: dict | None) -> dict:
    carried = {k: v for k, v in prior.metadata.items() if k not in RESERVED_KEYS}
    user = _normalize_user_metadata({**carried, **(metadata or {})})
    scale = float(prior.scale)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": prior.kind,
        "scale": None if prior.kind == "flat" else scale,
        "floor": float(prior.floor),
        "dim": prior.dim,
        "rank": prior.rank,
        "spec": prior.spec.to_json(),
        "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.name}
                   for name, a in arrays.items()},
        **user,
        "library_versions": _library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return meta


def _write_arrays(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    import orbax.checkpoint as ocp

    # A plain (synchronous) Checkpointer: save returns once the files are written. Chunks
    # of at most 64 MiB: restoring decodes chunk by chunk, so loading needs the arrays plus
    # a few chunks instead of twice the (K, d) factor (one chunk per array before).
    save_args = {name: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES) for name in arrays}
    if jax.process_count() == 1:
        handler, options = ocp.StandardCheckpointHandler(), {}
    else:
        # Several jax.distributed processes: process 0 (save_prior checked) writes its
        # NumPy copies alone. With orbax's defaults its barriers would wait for every
        # process; with process 0 the only active one the write is local, and the files
        # are those of a one-process save (ocdbt.process_0/ included).
        mp = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
        handler = ocp.StandardCheckpointHandler(multiprocessing_options=mp)
        options = {"multiprocessing_options": mp}
    with ocp.Checkpointer(handler, **options) as ckptr:
        ckptr.save(directory, args=ocp.args.StandardSave(arrays, save_args=save_args))


def _write_metadata(directory: Path, meta: dict) -> None:
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    with open(directory / METADATA_FILE, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:        # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _looks_like_artifact(path: Path) -> bool:
    try:
        meta = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _check_destination(path: Path, overwrite: bool) -> None:
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


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` directory to ``path`` (replacing it if ``overwrite``)."""
    if overwrite and (path.exists() or path.is_symlink()):
        aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(path, aside)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.rename(aside, path)
            raise
        _fsync_dir(path.parent)
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise ArtifactError(f"cannot move the new artifact into {path}: {e} (was it created "
                            f"meanwhile? pass overwrite=True to replace it)") from None
    _fsync_dir(path.parent)


# ====================================================================== reading & checks
def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def _safe_relpath(name: str) -> str | None:
    """Normalised relative POSIX path, or None for the root; ArtifactError if unsafe."""
    if not isinstance(name, str) or "\x00" in name or "\\" in name:
        raise ArtifactError(f"unsafe path {name!r}: NUL or backslash")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ArtifactError(f"unsafe path {name!r}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArtifactError(f"unsafe path {name!r}: '..' is not allowed")
    return "/".join(parts) or None


def _check_format(meta, where) -> None:
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where} must hold a JSON object; {_LAYOUT}")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{where} is not a bayes_transfer prior artifact (format="
                            f"{meta.get('format')!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{where} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactVersionError(
            f"{where} was written in artifact format version {version}, but this "
            f"bayes_transfer reads versions up to {FORMAT_VERSION}; upgrade bayes_transfer "
            f"(pip install -U bayes_transfer) to load it")


def _check_metadata_digest(meta: dict, where) -> None:
    recorded = meta.get("sha256")
    if not isinstance(recorded, str) or not _SHA256_HEX.match(recorded):
        raise ArtifactError(f"{where} has no valid sha256 field (got {recorded!r}); the "
                            f"artifact is malformed: delete it and download it again")
    actual = metadata_digest(meta)
    if actual != recorded:
        raise ArtifactIntegrityError(
            f"{where} does not match its digest: expected sha256 {recorded}, computed "
            f"{actual}. It was edited or corrupted after the artifact was written (kind, "
            f"scale, spec and all other fields are protected); delete the artifact and "
            f"download (or unpack) it again, or re-save the prior with save_prior to "
            f"change its metadata")


def _validate_metadata(meta, where) -> None:
    _check_format(meta, where)
    required = ("kind", "scale", "floor", "dim", "rank", "spec", "arrays", "files", "sha256")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ArtifactError(f"{where} lacks the field(s) {', '.join(missing)}; the artifact "
                            f"is malformed: delete it and download it again")

    def bad(msg):
        return ArtifactError(f"{where}: {msg}; the artifact is malformed")

    kind = meta["kind"]
    if kind not in KINDS:
        raise bad(f"unknown prior kind {kind!r} (expected one of {KINDS})")
    scale, floor = meta["scale"], meta["floor"]
    if kind == "flat" and scale is not None:
        raise bad("a flat prior's scale must be null")
    if kind != "flat" and (not _is_number(scale) or scale <= 0):
        raise bad(f"scale must be a positive number, got {scale!r}")
    if not _is_number(floor) or floor < 0:
        raise bad(f"floor must be a number >= 0, got {floor!r}")
    try:
        spec = ParamSpec.from_json(meta["spec"])
    except SpecMismatchError as e:
        raise bad(str(e)) from None
    d, rank = meta["dim"], meta["rank"]
    if not isinstance(d, int) or isinstance(d, bool) or d != spec.size:
        raise bad(f"dim {d!r} differs from the spec's size {spec.size}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 \
            or (kind == "lowrank") != (rank > 0):
        raise bad(f"rank {rank!r} does not fit kind {kind!r}")
    arrays = meta["arrays"]
    names = {"mean", "var"} | ({"deviations"} if kind == "lowrank" else set())
    if not isinstance(arrays, dict) or set(arrays) != names:
        raise bad(f"arrays must describe exactly {sorted(names)}, got "
                  f"{sorted(arrays) if isinstance(arrays, dict) else arrays!r}")
    allowed_shapes = {"mean": ([], [d]), "deviations": ([rank, d],),
                      "var": {"isotropic": ([],), "flat": ([], [d])}.get(kind, ([d],))}
    for name, info in arrays.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                or info["dtype"] not in _DTYPES:
            raise bad(f"arrays[{name!r}] must give a shape and one of the dtypes "
                      f"{sorted(_DTYPES)}, got {info!r}")
        if info.get("shape") not in allowed_shapes[name]:
            raise bad(f"arrays[{name!r}] has shape {info.get('shape')!r}; the spec covers "
                      f"d={d} parameters, so a {kind!r} prior's {name} must have shape "
                      f"{' or '.join(map(str, allowed_shapes[name]))}")
    files = meta["files"]
    if not isinstance(files, dict) or not files:
        raise bad("files must map each array file to its size and sha256")
    for rel, info in files.items():
        try:
            norm = _safe_relpath(rel)
        except ArtifactError as e:
            raise bad(f"files lists {e}") from None
        if norm != rel or rel == METADATA_FILE:
            raise bad(f"files lists an invalid path {rel!r}")
        if (not isinstance(info, dict) or not isinstance(info.get("size"), int)
                or info["size"] < 0 or not isinstance(info.get("sha256"), str)
                or not _SHA256_HEX.match(info["sha256"])):
            raise bad(f"files[{rel!r}] must be {{'size': bytes, 'sha256': hex}}, got {info!r}")
    if not isinstance(meta["sha256"], str) or not _SHA256_HEX.match(meta["sha256"]):
        raise bad(f"sha256 must be a 64-digit hex digest, got {meta['sha256']!r}")


def _list_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``root`` except metadata.json."""
    def fail(err):
        raise ArtifactError(f"cannot read the artifact directory {root}: {err}")

    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                raise ArtifactIntegrityError(f"{root}: {rel!r} is a symbolic link; an artifact "
                                             f"holds only regular files")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ArtifactIntegrityError(f"{root}: {rel!r} is not a regular file")
            if rel != METADATA_FILE:
                out.append(rel)
    return sorted(out, key=lambda s: s.encode("utf-8"))


def _file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_files(root: Path) -> dict:
    return {rel: {"size": (root / rel).stat().st_size, "sha256": _file_sha256(root / rel)}
            for rel in _list_files(root)}


def _check_integrity(root: Path, meta: dict, *, verify: bool, expected: str | None) -> None:
    redownload = "delete the artifact and download (or unpack) it again"
    if expected is not None and expected.lower() != meta["sha256"]:
        raise ArtifactIntegrityError(
            f"artifact {root} has sha256 {meta['sha256']}, expected {expected.lower()}: it is "
            f"not the artifact the registry lists; {redownload}")
    recorded = meta["files"]
    present = _list_files(root)
    missing = sorted(set(recorded) - set(present))
    if missing:
        raise ArtifactIntegrityError(
            f"{root}: file {missing[0]!r} listed in {METADATA_FILE} is missing "
            f"({len(missing)} missing); the artifact is incomplete: {redownload}")
    unexpected = sorted(set(present) - set(recorded))
    if unexpected:
        raise ArtifactIntegrityError(
            f"{root}: unexpected file {unexpected[0]!r} that {METADATA_FILE} does not list; "
            f"artifacts must not be modified after they are written: remove it, or "
            f"{redownload}")
    for rel in sorted(recorded, key=lambda s: s.encode("utf-8")):
        size = (root / rel).stat().st_size
        if size != recorded[rel]["size"]:
            raise ArtifactIntegrityError(
                f"{root}: {rel!r} has {size} bytes, {METADATA_FILE} records "
                f"{recorded[rel]['size']}: the file is truncated or corrupt; {redownload}")
    if verify:
        for rel in sorted(recorded, key=lambda s: s.encode("utf-8")):
            actual = _file_sha256(root / rel)
            if actual != recorded[rel]["sha256"]:
                raise ArtifactIntegrityError(
                    f"{root}: {rel!r} does not match its checksum: expected sha256 "
                    f"{recorded[rel]['sha256']}, got {actual}; the file is corrupt: "
                    f"{redownload}")


def _read_arrays(root: Path, meta: dict, dtype=None) -> dict[str, np.ndarray]:
    """The stored arrays as NumPy arrays (cast to ``dtype`` if given), checked against
    the metadata. Read chunk by chunk into 64-byte aligned memory, which ``jax.device_put``
    on the CPU then uses as is; artifacts this reader does not understand go through
    Orbax's restore (the arrays, then a copy on ``device_put``)."""
    import orbax.checkpoint as ocp

    directory = (root / ARRAYS_DIR).absolute()
    if not directory.is_dir():
        raise ArtifactError(f"{root} has no {ARRAYS_DIR}/ directory. {_LAYOUT}.")
    try:
        return _read_arrays_aligned(directory, meta, dtype)
    except Exception:     # another layout, or damaged: Orbax reads it or says what is wrong
        pass
    try:
        # No target: Orbax rebuilds the dict from its JSON tree metadata and returns
        # numpy arrays in their saved dtypes. Nothing is unpickled.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            tree = ckptr.restore(directory, args=ocp.args.StandardRestore())
    except Exception as e:  # orbax / tensorstore raise many types; report one
        summary = " ".join(str(e).split())[:400]
        raise ArtifactError(
            f"cannot read the arrays of the artifact {root} ({type(e).__name__}: {summary}); "
            f"the array files are truncated or corrupt: delete the artifact and download it "
            f"again") from e
    expected = meta["arrays"]
    if not isinstance(tree, dict) or set(tree) != set(expected):
        raise ArtifactError(f"{root}/{ARRAYS_DIR} holds "
                            f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}"
                            f", {METADATA_FILE} describes {sorted(expected)}; the artifact is "
                            f"malformed")
    out = {}
    for name, info in expected.items():
        a = np.asarray(tree[name])
        if list(a.shape) != info["shape"] or a.dtype.name != info["dtype"]:
            raise ArtifactError(
                f"{root}: array {name!r} was restored with shape {list(a.shape)} "
                f"{a.dtype.name}, {METADATA_FILE} records {info['shape']} {info['dtype']}; "
                f"the artifact is malformed")
        out[name] = a if dtype is None else a.astype(dtype)
    return out


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on an ``align``-byte boundary
    (XLA:CPU aliases such host memory instead of copying it)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _read_arrays_aligned(directory: Path, meta: dict, dtype) -> dict[str, np.ndarray]:
    """Read each array of an Orbax (0.12) checkpoint with TensorStore directly.

    Only JSON (Orbax's ``_METADATA`` and the zarr headers) and the compressed chunks are
    read. TensorStore fills each array a stored chunk at a time (at most 64 MiB with
    ``save_prior``'s chunking; two at once), so loading needs the arrays plus two chunks,
    where Orbax's restore returns arrays that ``device_put`` then has to copy (they are
    16-byte aligned).
    """
    import tensorstore as ts

    layout = json.loads((directory / "_METADATA").read_text(encoding="utf-8"))
    driver = "zarr3" if layout.get("use_zarr3") else "zarr"
    # No cache, and two chunks in flight: the memory in flight must not grow with the cores.
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                          "data_copy_concurrency": {"limit": 2},
                          "file_io_concurrency": {"limit": 2}})
    out = {}
    for name, info in meta["arrays"].items():
        kvstore = ({"driver": "ocdbt", "base": directory.as_uri(), "path": name}
                   if layout.get("use_ocdbt")
                   else {"driver": "file", "path": str(directory / name)})
        store = ts.open({"driver": driver, "kvstore": kvstore, "open": True}, read=True,
                        context=context).result()
        shape = tuple(store.shape)
        if (list(shape) != info["shape"]
                or np.dtype(store.dtype.numpy_dtype).name != info["dtype"]):
            raise ArtifactError(f"array {name!r} does not match {METADATA_FILE}")
        target = np.dtype(_DTYPES[info["dtype"]] if dtype is None else dtype)
        if target != store.dtype.numpy_dtype:
            store = ts.cast(store, target)
        array = _aligned_empty(shape, target)
        ts.array(array, copy=False, write=True).write(store).result()
        out[name] = array
    return out


def _prior_from_arrays(meta: dict, arrays: dict) -> Prior:
    spec = ParamSpec.from_json(meta["spec"])
    # Hand each array to JAX once, in place: a Prior holding NumPy arrays would pass its
    # (K, d) factor to the device again on every jitted call. XLA:CPU uses 64-byte aligned
    # host memory as is (_read_arrays_aligned's) and copies other memory (Orbax's), in
    # which case the host copy is freed as soon as the device copy exists.
    for name in sorted(arrays, key=lambda k: -arrays[k].nbytes):
        arrays[name] = jax.device_put(arrays[name])
    scale = math.inf if meta["kind"] == "flat" else meta["scale"]
    # Prior.from_arrays validates (NaN/Inf, variance > 0, shapes) and caches the Cholesky factor.
    prior = Prior.from_arrays(spec, arrays["mean"], arrays["var"], arrays.get("deviations"),
                         scale, meta["floor"], meta["kind"])
    return prior.with_metadata(meta)


@contextlib.contextmanager
def _artifact_dir(path):
    """Yield an artifact directory for ``path``: itself, or a packed file unpacked."""
    p = Path(path).expanduser()
    if p.is_file() and _is_packed_name(p):
        with tempfile.TemporaryDirectory(prefix="bayes_transfer-artifact-") as td:
            yield unpack_artifact(p, Path(td) / "artifact", verify=False)
        return
    yield p


# ====================================================================== packing
def _is_packed_name(p: Path) -> bool:
    return p.name.endswith((".tar", ".tar.gz", ".tgz"))


def _compression(out: Path) -> bool:
    if out.name.endswith((".tar.gz", ".tgz")):
        return True
    if out.name.endswith(".tar"):
        return False
    raise ArtifactError(f"{out}: a packed artifact is named *.tar, *.tar.gz or *.tgz")


def _created_epoch(meta: dict) -> int:
    try:
        created = datetime.datetime.strptime(meta.get("created", ""), "%Y-%m-%dT%H:%M:%SZ")
        return int(created.replace(tzinfo=datetime.timezone.utc).timestamp())
    except (TypeError, ValueError):
        return 0


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
            rel = _safe_relpath(m.name)
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


def _extract_safely(src: Path, dest: Path) -> None:
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
