"""The prior artifact format: layout, metadata schema, validation and digests.

An artifact is a directory::

    my-prior/
      metadata.json   JSON only (never pickle): format, kind, λ, ε, parameter spec,
                      provenance (architecture, source task, SWAG settings, ...), digests
      arrays/         an Orbax checkpoint (tensorstore) of the dict of numpy arrays
                      {"mean", "var"[, "deviations"]} in their stored dtype

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
it as ``read_prior(..., sha256=...)``. The digests detect corruption, truncation,
stray files and edits; they are not a signature: someone who rewrites the files and
recomputes the digests is only caught when the expected ``sha256`` comes from a
trusted registry.

This module knows the format only: building and checking the metadata, and the file
table. Reading and writing the arrays is :mod:`.arrays`, packing is :mod:`.tar`, the
public functions are in :mod:`.io`.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import re
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer.errors import (ArtifactError, ArtifactIntegrityError, ArtifactVersionError,
                                   SpecMismatchError)
from bayes_transfer.fsutil import sha256_file
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import KINDS, Prior

__all__ = ["FORMAT", "FORMAT_VERSION", "METADATA_FILE", "ARRAYS_DIR", "USER_KEYS",
           "RESERVED_KEYS", "DTYPES", "LAYOUT", "metadata_digest", "build_metadata",
           "write_metadata", "parse_metadata", "check_metadata", "safe_relpath",
           "hash_files", "check_integrity"]

FORMAT = "bayes_transfer.prior"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ARRAYS_DIR = "arrays"

#: Provenance keys a user passes in ``metadata`` (other non-reserved keys are kept as is).
USER_KEYS = ("architecture", "source", "swag", "source_accuracy", "recommended_scale")
#: Keys written by save_prior itself; a user cannot set them.
RESERVED_KEYS = ("format", "format_version", "kind", "scale", "floor", "dim", "rank", "spec",
                 "arrays", "files", "library_versions", "created", "sha256")
#: The dtypes an artifact may store, by name.
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(jnp.bfloat16),
          "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
#: One sentence describing the layout, for error messages.
LAYOUT = (f"A prior artifact is a directory holding {METADATA_FILE} (JSON: format, kind, "
          f"scale, parameter spec, sha256 digests) and {ARRAYS_DIR}/ (an Orbax checkpoint of "
          f"mean, var and deviations), as written by bayes_transfer.save_prior")

_LIBRARIES = {"bayes_transfer": "bayes_transfer", "jax": "jax", "jaxlib": "jaxlib",
              "flax": "flax", "optax": "optax", "orbax": "orbax-checkpoint",
              "numpyro": "numpyro", "numpy": "numpy"}
_MAX_METADATA_BYTES = 64 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


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


def build_metadata(prior: Prior, arrays: dict, metadata: dict | None) -> dict:
    """The metadata of ``prior`` stored as ``arrays``, with the user's provenance
    ``metadata`` checked and added (without ``files`` and ``sha256`` yet)."""
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


def write_metadata(directory: Path, meta: dict) -> None:
    """Write ``metadata.json`` into the (temporary, not yet published) ``directory``."""
    text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    with open(directory / METADATA_FILE, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# ====================================================================== reading & checks
def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def parse_metadata(file: Path) -> dict:
    """The parsed JSON of the metadata file ``file`` (size-limited, strict JSON), unchecked."""
    if file.stat().st_size > _MAX_METADATA_BYTES:
        raise ArtifactError(f"{file} is larger than {_MAX_METADATA_BYTES >> 20} MiB; it is "
                            f"not a prior artifact's metadata")
    try:
        return json.loads(file.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{file} is not valid JSON ({e}); the artifact is corrupt: delete "
                            f"it and download it again") from None


def check_metadata(meta, where, *, verify: bool = True) -> None:
    """Check parsed metadata: the format and version first (a newer format may hash
    differently), then the digest (``verify``; so an edit is reported as such), then the
    structure (kind, scale, spec, array shapes, file table)."""
    _check_format(meta, where)
    if verify:
        _check_metadata_digest(meta, where)
    _validate_metadata(meta, where)


def safe_relpath(name: str) -> str | None:
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
        raise ArtifactError(f"{where} must hold a JSON object; {LAYOUT}")
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
                or info["dtype"] not in DTYPES:
            raise bad(f"arrays[{name!r}] must give a shape and one of the dtypes "
                      f"{sorted(DTYPES)}, got {info!r}")
        if info.get("shape") not in allowed_shapes[name]:
            raise bad(f"arrays[{name!r}] has shape {info.get('shape')!r}; the spec covers "
                      f"d={d} parameters, so a {kind!r} prior's {name} must have shape "
                      f"{' or '.join(map(str, allowed_shapes[name]))}")
    files = meta["files"]
    if not isinstance(files, dict) or not files:
        raise bad("files must map each array file to its size and sha256")
    for rel, info in files.items():
        try:
            norm = safe_relpath(rel)
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


# ====================================================================== the file table
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


def hash_files(root: Path) -> dict:
    """The ``files`` table of the artifact directory ``root``: size and sha256 by path."""
    return {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
            for rel in _list_files(root)}


def check_integrity(root: Path, meta: dict, *, verify: bool, expected: str | None) -> None:
    """Check ``root`` against its metadata's file table: the pinned digest ``expected``,
    exactly the listed files with the listed sizes, and (``verify``) their sha256."""
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
            actual = sha256_file(root / rel)
            if actual != recorded[rel]["sha256"]:
                raise ArtifactIntegrityError(
                    f"{root}: {rel!r} does not match its checksum: expected sha256 "
                    f"{recorded[rel]['sha256']}, got {actual}; the file is corrupt: "
                    f"{redownload}")
