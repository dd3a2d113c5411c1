"""Prior registries: which priors exist under which names, where, pinned to which sha256.

A registry is a JSON file (or an http(s) URL of one, or a dict)::

    {"format": "bayes_transfer.registry", "format_version": 1,
     "priors": {
       "fashion-mnist/small-cnn": {
         "location": "priors/fashion-mnist-small-cnn",  # path relative to the registry, URL,
                                                         # or hf://OWNER/REPO@REVISION/PATH
         "locations": ["https://mirror/..."],      # optional mirrors, tried in order
         "sha256": "<metadata['sha256'] of the artifact>",   # null until registered
         "size": 123456,              # bytes of the packed file (URL locations)
         "architecture": {...}, "source": {...}, "method": "supervised+swag-lowrank",
         "license": "...", "recommended_scale": [lo, hi], "model_card": "card.md",
         "description": "...", "kind": "lowrank", "dim": 94000, "rank": 20}}}

``sha256`` is the artifact digest of :mod:`bayes_transfer.artifacts` (it covers the
metadata and, through its file table, every array file), so pinning it in the
registry pins the whole artifact.

The default registries are the one built into the package (:data:`BUILTIN_REGISTRY`,
package data listing the demo prior, which ships in the package too), then each
entry of ``$BAYES_TRANSFER_REGISTRY`` (paths or URLs separated by ``os.pathsep``).
Their entries are merged by name, a later registry overriding an earlier one (with a
warning when it overrides a built-in prior). ``registry=`` replaces the defaults with
one registry or a list of them, merged the same way. :func:`write_registry` writes a
user's registry file; the built-in one is never written by default.
"""
from __future__ import annotations

import dataclasses
import difflib
import http.client
import json
import os
import re
import urllib.parse
import warnings
from pathlib import Path
from typing import Mapping

from bayes_transfer.errors import (DownloadError, HubError, OfflineModeError, RegistryError,
                                   UnknownPriorError)
from bayes_transfer.fsutil import atomic_write, write_text
from bayes_transfer.hub.fetch import (DEFAULT_TIMEOUT, OFFLINE_HINT, cache_path, file_url_path,
                                      is_file_url, is_http, offline_mode, open_url, url_key)
from bayes_transfer.hub.hf import is_hf, parse_hf

__all__ = ["REGISTRY_FORMAT", "REGISTRY_VERSION", "BUILTIN_REGISTRY", "DEFAULT_REGISTRY",
           "ENV_REGISTRY", "PUBLISH_BASE_URL", "ENTRY_FIELDS", "RegistryEntry", "Registry",
           "valid_name", "published_url",
           "default_registries", "default_registry", "load_registry", "parse_registry",
           "registry_json", "writable_registry_file", "relative_location", "write_registry"]

REGISTRY_FORMAT = "bayes_transfer.registry"
REGISTRY_VERSION = 1
#: The registry shipped in the package (package data): the demo prior, offline.
BUILTIN_REGISTRY = Path(__file__).resolve().parent / "registry.json"
#: Old name of :data:`BUILTIN_REGISTRY` (it was the repository's ``priors/registry.json``).
DEFAULT_REGISTRY = BUILTIN_REGISTRY
ENV_REGISTRY = "BAYES_TRANSFER_REGISTRY"
#: Where the project publishes its packed priors until it has its public home: the one
#: place to change. A published prior is ``PUBLISH_BASE_URL + "<name>.tar.gz"``
#: (:func:`published_url`); ``bayes-transfer priors publish`` writes such locations.
PUBLISH_BASE_URL = "https://github.com/OWNER/bayes_transfer/releases/download/priors/"
#: The fields of an entry, in the order a registry file lists them.
ENTRY_FIELDS = ("location", "locations", "sha256", "size", "architecture", "source", "method",
                "license", "recommended_scale", "model_card", "description", "kind", "dim",
                "rank", "source_accuracy")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_MAX_REGISTRY_BYTES = 16 << 20
# In a ':'-separated list, a URL keeps its own ':' (scheme, port): it runs to the next ':'
# after its host.
_URL_IN_LIST = re.compile(r"(?:https?|file)://[^/]*[^:]*", re.IGNORECASE)
_NO_WRITABLE = (f"register_prior needs a registry file of your own to write: pass registry= "
                f"(CLI: --registry PATH) or set {ENV_REGISTRY} to its path; the built-in "
                f"registry belongs to the installed package and is not edited")


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """One published prior. ``locations`` are resolved: absolute paths or URLs."""

    name: str
    locations: tuple[str, ...]
    sha256: str | None
    size: int | None = None
    architecture: dict | None = None
    source: dict | None = None
    method: str | None = None
    license: str | None = None
    recommended_scale: list | None = None
    model_card: str | None = None
    description: str | None = None
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    #: the registry this entry comes from
    registry: str | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def pinned(self) -> bool:
        """Whether the registry pins the artifact's sha256 (False for a placeholder)."""
        return self.sha256 is not None

    def to_dict(self) -> dict:
        """The entry as written in the registry, plus ``name`` and resolved ``locations``."""
        return {"name": self.name, **self.raw, "locations": list(self.locations)}


@dataclasses.dataclass(frozen=True)
class Registry:
    """A parsed registry (or several merged): ``entries`` by name; ``source`` says where
    it came from."""

    entries: dict[str, RegistryEntry]
    source: str
    path: Path | None = None       # the registry file, when it is one local file

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str, *, ref_is_path: bool = False) -> RegistryEntry:
        """The entry for ``name``; UnknownPriorError with close matches otherwise."""
        if name in self.entries:
            return self.entries[name]
        raise UnknownPriorError(_unknown_message(name, self, ref_is_path))

    def __contains__(self, name) -> bool:
        return name in self.entries

    @property
    def builtin(self) -> bool:
        """Whether this is the registry built into the package."""
        return self.path is not None and self.path.resolve() == BUILTIN_REGISTRY


def _unknown_message(name: str, reg: Registry, ref_is_path: bool) -> str:
    names = reg.names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if not close:   # also match on the last part: "small-cnn" -> "fashion-mnist/small-cnn"
        tail = {n.rsplit("/", 1)[-1]: n for n in names}
        close = [tail[t] for t in difflib.get_close_matches(name.rsplit("/", 1)[-1],
                                                            list(tail), n=3, cutoff=0.6)]
    msg = f"unknown prior {name!r}"
    if close:
        msg += f"; did you mean {' or '.join(repr(c) for c in close)}?"
    else:
        msg += "."
    if names:
        msg += f" Known priors (registry {reg.source}): {', '.join(names)}."
    else:
        msg += f" The registry {reg.source} lists no priors."
    msg += (" A ref can also be a local artifact directory, a .tar/.tar.gz file, an "
            "https://, http:// or file:// URL, or an hf://OWNER/REPO[@REVISION][/PATH] "
            "reference")
    if ref_is_path:
        msg += f"; no file or directory exists at {name!r} either"
    return msg + "."


def published_url(file_name: str, base: str | None = None) -> str:
    """The URL of the packed prior ``file_name`` under ``base`` (default
    :data:`PUBLISH_BASE_URL`)."""
    base = PUBLISH_BASE_URL if base is None else base
    if not is_http(base):
        raise RegistryError(f"the publishing base must be an https:// or http:// URL, got "
                            f"{base!r}")
    if not file_name or "/" in file_name:
        raise RegistryError(f"a published file name has no '/', got {file_name!r}")
    return base.rstrip("/") + "/" + urllib.parse.quote(file_name)


def valid_name(name) -> bool:
    """Whether ``name`` is a valid prior name (``'/'``-separated parts)."""
    return isinstance(name, str) and bool(_NAME.match(name))


# ====================================================================== the defaults
def _split_registry_list(value: str) -> list[str]:
    """The entries of an ``os.pathsep``-separated list of paths and URLs."""
    if os.pathsep != ":":
        return [p for p in value.split(os.pathsep) if p.strip()]
    out, i = [], 0
    while i < len(value):
        url = _URL_IN_LIST.match(value, i)
        end = url.end() if url else value.find(":", i)
        if end < 0:
            end = len(value)
        if value[i:end].strip():
            out.append(value[i:end])
        i = end + 1
    return out


def default_registries() -> list[str | Path]:
    """The registries read by default: the built-in one, then each entry of
    ``$BAYES_TRANSFER_REGISTRY`` (``os.pathsep``-separated paths or URLs)."""
    builtin = [BUILTIN_REGISTRY] if BUILTIN_REGISTRY.is_file() else []
    return builtin + _split_registry_list(os.environ.get(ENV_REGISTRY, ""))


def default_registry() -> str:
    """The registry that :func:`~bayes_transfer.hub.register_prior` edits when given
    none: the one ``$BAYES_TRANSFER_REGISTRY`` names (RegistryError if it names none or
    several)."""
    items = _split_registry_list(os.environ.get(ENV_REGISTRY, ""))
    if not items:
        raise RegistryError(_NO_WRITABLE)
    if len(items) > 1:
        raise RegistryError(f"{ENV_REGISTRY} names {len(items)} registries "
                            f"({', '.join(items)}); pass registry= (CLI: --registry) the one "
                            f"register_prior should edit")
    return items[0]


# ====================================================================== loading
def load_registry(registry=None, *, offline: bool | None = None, cache_dir=None,
                  timeout: float = DEFAULT_TIMEOUT) -> Registry:
    """Parse a registry: a path, an http(s)/file URL, a dict, or a list of these (merged
    in order, a later entry overriding an earlier one of the same name); None for the
    defaults (:func:`default_registries`).

    A remote registry is fetched (and a copy kept in the cache for offline use).
    """
    if isinstance(registry, Registry):
        return registry
    if registry is None:
        sources = default_registries()
        if not sources:
            return Registry({}, f"{BUILTIN_REGISTRY} (not present)", None)
    elif isinstance(registry, (list, tuple)):
        sources = list(registry)
        if not sources:
            raise RegistryError("registry= is an empty list; give one or more registry "
                                "files, URLs or dicts")
    else:
        sources = [registry]
    regs = [_load_one(s, offline=offline, cache_dir=cache_dir, timeout=timeout)
            for s in sources]
    return regs[0] if len(regs) == 1 else _merge(regs)


def _load_one(registry, *, offline, cache_dir, timeout) -> Registry:
    if isinstance(registry, Registry):
        return registry
    if isinstance(registry, Mapping):
        return parse_registry(dict(registry), Path.cwd(), "<dict>", None)
    if not isinstance(registry, (str, os.PathLike)):
        raise RegistryError(f"registry must be a path, a URL or a dict (or a list of them), "
                            f"got {type(registry).__name__}")
    text = os.fspath(registry)
    if is_http(text):
        data = _fetch_registry(text, cache_path(cache_dir), offline_mode(offline), timeout)
        return parse_registry(registry_json(data, text), text, text, None)
    path = file_url_path(text) if is_file_url(text) else Path(text).expanduser()
    if not path.is_file():
        raise RegistryError(f"no registry file at {path}; pass registry= (or set "
                            f"{ENV_REGISTRY}) to a registry JSON file, URL or dict")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RegistryError(f"cannot read the registry {path}: {e}") from None
    path = path.absolute()
    return parse_registry(registry_json(data, path), path.parent, str(path), path)


def _merge(regs: list[Registry]) -> Registry:
    entries: dict[str, RegistryEntry] = {}
    origin: dict[str, Registry] = {}
    for reg in regs:
        for name, entry in reg.entries.items():
            if name in origin and origin[name].builtin and not reg.builtin:
                warnings.warn(f"registry {reg.source} overrides the built-in prior {name!r} "
                              f"of {origin[name].source}", stacklevel=3)
            entries[name], origin[name] = entry, reg
    return Registry(entries, " + ".join(r.source for r in regs), None)


def registry_json(data: bytes, where) -> dict:
    """The JSON object of a registry file's bytes; RegistryError if it is not one."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RegistryError(f"the registry {where} is not valid JSON ({e}); fix or restore "
                            f"it") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"the registry {where} must hold a JSON object")
    return doc


def parse_registry(doc: dict, base, source: str, path: Path | None) -> Registry:
    """The Registry of the JSON object ``doc``; relative locations resolve against
    ``base`` (a directory, or the URL of a remote registry)."""
    if "format" in doc or "priors" in doc:
        if doc.get("format", REGISTRY_FORMAT) != REGISTRY_FORMAT:
            raise RegistryError(f"{source} is not a bayes_transfer registry (format="
                                f"{doc.get('format')!r}, expected {REGISTRY_FORMAT!r})")
        version = doc.get("format_version", REGISTRY_VERSION)
        if not isinstance(version, int) or version > REGISTRY_VERSION:
            raise RegistryError(f"{source} has registry format_version {version!r}; this "
                                f"bayes_transfer reads version {REGISTRY_VERSION}: upgrade it")
        priors = doc.get("priors", {})
        if not isinstance(priors, dict):
            raise RegistryError(f"{source}: 'priors' must map names to entries")
    else:                                # a plain {name: entry} mapping
        priors = doc
    entries = {name: _parse_entry(name, raw, base, source) for name, raw in priors.items()}
    return Registry(entries, source, path)


def _parse_entry(name, raw, base, source) -> RegistryEntry:
    def bad(msg):
        return RegistryError(f"registry {source}, entry {name!r}: {msg}")

    if not valid_name(name):
        raise bad("a name is one or more '/'-separated parts of letters, digits, '.', '_' "
                  "and '-' (e.g. 'fashion-mnist/small-cnn')")
    if not isinstance(raw, dict):
        raise bad("must be a JSON object")
    locs = []
    if raw.get("location") is not None:
        locs.append(raw["location"])
    extra = raw.get("locations") or []
    if not isinstance(extra, list):
        raise bad("'locations' must be a list of paths or URLs")
    locs += [loc for loc in extra if loc not in locs]
    if not locs or not all(isinstance(loc, str) and loc for loc in locs):
        raise bad("needs a 'location' (a path relative to the registry, or a URL)")
    for loc in filter(is_hf, locs):
        try:
            ref = parse_hf(loc)
        except HubError as e:
            raise bad(str(e)) from None
        if ref.revision is None:
            raise bad(f"{loc!r} names no revision: pin it to the commit that holds the file "
                      f"(hf://{ref.repo_id}@<commit hash>/{ref.filename})")
    sha = raw.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256_HEX.match(sha.lower())):
        raise bad(f"'sha256' must be the artifact's 64-digit hex digest or null, got {sha!r}")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise bad(f"'size' must be a number of bytes, got {size!r}")
    for key in ("architecture", "source"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise bad(f"{key!r} must be a JSON object")
    card = raw.get("model_card")
    if card is not None and not isinstance(card, str):
        raise bad("'model_card' must be a path or URL")
    return RegistryEntry(
        name=name, locations=tuple(_resolve_location(loc, base) for loc in locs),
        sha256=sha.lower() if sha else None, size=size, architecture=raw.get("architecture"),
        source=raw.get("source"), method=raw.get("method"), license=raw.get("license"),
        recommended_scale=raw.get("recommended_scale"),
        model_card=_resolve_location(card, base) if card else None,
        description=raw.get("description"), raw=dict(raw), registry=source)


def _resolve_location(loc: str, base) -> str:
    scheme = urllib.parse.urlsplit(loc).scheme.lower()
    if scheme in ("http", "https", "file") or is_hf(loc):
        return loc
    if isinstance(base, str):                      # the registry itself is at a URL
        return urllib.parse.urljoin(base, loc)
    path = Path(loc).expanduser()
    return str(path if path.is_absolute() else Path(base) / path)


def _fetch_registry(url: str, cache: Path, offline: bool, timeout: float) -> bytes:
    copy = cache / "registries" / f"{url_key(url)}.json"
    if offline:
        if copy.is_file():
            return copy.read_bytes()
        raise OfflineModeError(f"{OFFLINE_HINT}, and the registry {url} has not been fetched "
                               f"before (no copy at {copy}); go online once, or pass a local "
                               f"registry file")
    try:
        with open_url(url, timeout) as resp:
            data = resp.read(_MAX_REGISTRY_BYTES + 1)
    except DownloadError:
        if copy.is_file():
            warnings.warn(f"cannot fetch the registry {url}; using the copy fetched earlier "
                          f"({copy})", stacklevel=3)
            return copy.read_bytes()
        raise
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"reading the registry {url} failed ({e}); try again") from None
    if len(data) > _MAX_REGISTRY_BYTES:
        raise RegistryError(f"{url} is larger than {_MAX_REGISTRY_BYTES >> 20} MiB; it is not "
                            f"a prior registry")
    registry_json(data, url)                      # only cache what parses
    with atomic_write(copy) as tmp:
        tmp.write_bytes(data)
    return data


# ====================================================================== writing
def writable_registry_file(registry) -> Path:
    """The local registry file that ``registry`` (None: :func:`default_registry`) names,
    for writing; RegistryError for a URL, a dict or a list."""
    if registry is None:
        registry = default_registry()
    if isinstance(registry, (Mapping, Registry, list, tuple)) \
            or not isinstance(registry, (str, os.PathLike)) or is_http(os.fspath(registry)):
        raise RegistryError("register_prior writes a local registry file; pass registry= a "
                            "path (a URL, a dict or a list cannot be edited)")
    text = os.fspath(registry)
    return (file_url_path(text) if is_file_url(text) else Path(text)).expanduser().absolute()


def relative_location(path: Path, base: Path) -> str:
    """``path`` relative to the directory ``base`` when it lies below it, else absolute."""
    path = path.expanduser().absolute()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def write_registry(file: Path, doc: dict) -> None:
    """Write the registry ``doc`` to ``file`` atomically."""
    write_text(file, json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
