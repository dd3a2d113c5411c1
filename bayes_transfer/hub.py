"""The prior hub: load a published prior by name, path or URL, verified, in one line.

    import bayes_transfer.hub as hub
    prior = hub.load_prior("fashion-mnist/small-cnn")          # a registered name
    prior = hub.load_prior("priors/my-prior")                  # an artifact directory
    prior = hub.load_prior("my-prior.tar.gz")                  # a packed artifact
    prior = hub.load_prior("https://example.org/p.tar.gz", sha256="3f1c...")   # a URL
    params = prior.init_params(nnx.state(model, nnx.Param))    # like pretrained weights

A ``ref`` is resolved in this order: an ``http://`` / ``https://`` URL of a packed
artifact (downloaded into the cache); a ``file://`` URL or an existing local path (an
artifact directory or a ``.tar`` / ``.tar.gz`` file, loaded in place); otherwise a name
looked up in the registry.

Registry
--------
A JSON file (default: ``priors/registry.json`` of this repository; override with the
``BAYES_TRANSFER_REGISTRY`` environment variable or ``registry=``, a path, an http(s)
URL or a dict)::

    {"format": "bayes_transfer.registry", "format_version": 1,
     "priors": {
       "fashion-mnist/small-cnn": {
         "location": "fashion-mnist-small-cnn",    # path relative to the registry, or URL
         "locations": ["https://mirror/..."],      # optional mirrors, tried in order
         "sha256": "<metadata['sha256'] of the artifact>",   # null until registered
         "size": 123456,              # bytes of the packed file (URL locations)
         "architecture": {...}, "source": {...}, "method": "supervised+swag-lowrank",
         "license": "...", "recommended_scale": [lo, hi], "model_card": "card.md",
         "description": "...", "kind": "lowrank", "dim": 94000, "rank": 20}}}

``sha256`` is the artifact digest of :mod:`bayes_transfer.artifact` (it covers the
metadata and, through its file table, every array file), so pinning it in the
registry pins the whole artifact. :func:`register_prior` (CLI: ``bayes-transfer priors
register PATH --name NAME``) fills an entry from an artifact.

Cache
-----
Downloads go to ``$BAYES_TRANSFER_CACHE`` (default ``~/.cache/bayes_transfer/priors``),
one unpacked artifact directory per entry, named by the pinned sha256 (or
``url-<hash of the URL>`` for an unpinned URL). A download streams into a hidden
temporary file of the cache directory, checks its size, unpacks and verifies it
(every file digest, then the pinned sha256) in a hidden temporary directory, and only
then renames it into place; on any failure or interruption both temporaries are
removed, so the cache never holds a partial entry. A cache hit makes no network
access. Offline mode (``offline=True`` or ``BAYES_TRANSFER_OFFLINE=1``) never touches
the network.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Mapping

from bayes_transfer import artifact as _artifact
from bayes_transfer.errors import (ArtifactError, ArtifactIntegrityError, ArtifactVersionError,
                                   ChecksumMismatchError, DownloadError, HubError,
                                   OfflineModeError, RegistryError, UnknownPriorError)
from bayes_transfer.prior import Prior

__all__ = ["load_prior", "download", "verify", "list_priors", "show", "status",
           "register_prior", "load_registry", "default_registry", "Registry", "RegistryEntry",
           "default_cache_dir", "DEFAULT_REGISTRY", "REGISTRY_FORMAT", "REGISTRY_VERSION"]

REGISTRY_FORMAT = "bayes_transfer.registry"
REGISTRY_VERSION = 1
DEFAULT_REGISTRY = Path(__file__).resolve().parents[1] / "priors" / "registry.json"
ENV_REGISTRY = "BAYES_TRANSFER_REGISTRY"
ENV_CACHE = "BAYES_TRANSFER_CACHE"
ENV_OFFLINE = "BAYES_TRANSFER_OFFLINE"
#: Seconds a connection attempt or a single read may block before the download fails.
DEFAULT_TIMEOUT = 60.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_MAX_REGISTRY_BYTES = 16 << 20
_STALE_SECONDS = 24 * 3600
_TMP_PREFIXES = (".download-", ".unpack-")
_ENTRY_FIELDS = ("location", "locations", "sha256", "size", "architecture", "source", "method",
                 "license", "recommended_scale", "model_card", "description", "kind", "dim",
                 "rank", "source_accuracy")
_OFFLINE_HINT = ("offline mode is on (offline=True or BAYES_TRANSFER_OFFLINE=1), so nothing "
                 "is downloaded")


# ====================================================================== registry
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

    @property
    def pinned(self) -> bool:
        """Whether the registry pins the artifact's sha256 (False for a placeholder)."""
        return self.sha256 is not None

    def to_dict(self) -> dict:
        """The entry as written in the registry, plus ``name`` and resolved ``locations``."""
        return {"name": self.name, **self.raw, "locations": list(self.locations)}


@dataclasses.dataclass(frozen=True)
class Registry:
    """A parsed registry: ``entries`` by name; ``source`` says where it came from."""

    entries: dict[str, RegistryEntry]
    source: str
    path: Path | None = None       # the registry file, when it is a local file

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str, *, ref_is_path: bool = False) -> RegistryEntry:
        """The entry for ``name``; UnknownPriorError with close matches otherwise."""
        if name in self.entries:
            return self.entries[name]
        raise UnknownPriorError(_unknown_message(name, self, ref_is_path))

    def __contains__(self, name) -> bool:
        return name in self.entries


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
    msg += (" A ref can also be a local artifact directory, a .tar/.tar.gz file, or an "
            "https://, http:// or file:// URL")
    if ref_is_path:
        msg += f"; no file or directory exists at {name!r} either"
    return msg + "."


def default_registry() -> str | Path:
    """``$BAYES_TRANSFER_REGISTRY`` if set, else this repository's ``priors/registry.json``."""
    return os.environ.get(ENV_REGISTRY) or DEFAULT_REGISTRY


def default_cache_dir() -> Path:
    """``$BAYES_TRANSFER_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/bayes_transfer/priors``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bayes_transfer" / "priors"


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def _is_http(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme.lower() in ("http", "https")


def _is_file_url(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme.lower() == "file"


def _file_url_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise HubError(f"{url}: a file:// URL must name a local file (file:///path/to/prior"
                       f".tar.gz), not one on host {parts.netloc!r}")
    return Path(urllib.request.url2pathname(parts.path))


def load_registry(registry=None, *, offline: bool | None = None, cache_dir=None,
                  timeout: float = DEFAULT_TIMEOUT) -> Registry:
    """Parse a registry: a path, an http(s)/file URL, a dict, or None for the default.

    A remote registry is fetched (and a copy kept in the cache for offline use).
    """
    if isinstance(registry, Registry):
        return registry
    if registry is None:
        registry = default_registry()
        if registry == DEFAULT_REGISTRY and not DEFAULT_REGISTRY.is_file():
            # bayes_transfer installed without this repository's priors/ folder.
            return Registry({}, f"{DEFAULT_REGISTRY} (not present)", None)
    if isinstance(registry, Mapping):
        return _parse_registry(dict(registry), Path.cwd(), "<dict>", None)
    if not isinstance(registry, (str, os.PathLike)):
        raise RegistryError(f"registry must be a path, a URL or a dict, got "
                            f"{type(registry).__name__}")
    text = os.fspath(registry)
    if _is_http(text):
        data = _fetch_registry(text, _cache(cache_dir), _offline(offline), timeout)
        return _parse_registry(_registry_json(data, text), text, text, None)
    path = _file_url_path(text) if _is_file_url(text) else Path(text).expanduser()
    if not path.is_file():
        raise RegistryError(f"no registry file at {path}; pass registry= (or set "
                            f"{ENV_REGISTRY}) to a registry JSON file, URL or dict")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RegistryError(f"cannot read the registry {path}: {e}") from None
    path = path.absolute()
    return _parse_registry(_registry_json(data, path), path.parent, str(path), path)


def _registry_json(data: bytes, where) -> dict:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RegistryError(f"the registry {where} is not valid JSON ({e}); fix or restore "
                            f"it") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"the registry {where} must hold a JSON object")
    return doc


def _parse_registry(doc: dict, base, source: str, path: Path | None) -> Registry:
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

    if not isinstance(name, str) or not _NAME.match(name):
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
        description=raw.get("description"), raw=dict(raw))


def _resolve_location(loc: str, base) -> str:
    scheme = urllib.parse.urlsplit(loc).scheme.lower()
    if scheme in ("http", "https", "file"):
        return loc
    if isinstance(base, str):                      # the registry itself is at a URL
        return urllib.parse.urljoin(base, loc)
    path = Path(loc).expanduser()
    return str(path if path.is_absolute() else Path(base) / path)


def _fetch_registry(url: str, cache: Path, offline: bool, timeout: float) -> bytes:
    copy = cache / "registries" / f"{_url_key(url)}.json"
    if offline:
        if copy.is_file():
            return copy.read_bytes()
        raise OfflineModeError(f"{_OFFLINE_HINT}, and the registry {url} has not been fetched "
                               f"before (no copy at {copy}); go online once, or pass a local "
                               f"registry file")
    try:
        with _open_url(url, timeout) as resp:
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
    _registry_json(data, url)                      # only cache what parses
    copy.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".download-registry-", dir=copy.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, copy)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return data


# ====================================================================== resolution
@dataclasses.dataclass
class _Resolved:
    path: Path                 # artifact directory or packed file
    expected: str | None       # sha256 to pin, if known
    cached: bool               # path is a cache entry (may be re-downloaded if corrupt)
    label: str                 # the name or URL, for messages
    entry: RegistryEntry | None = None


def _cache(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _url_key(url: str) -> str:
    return "url-" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:40]


def _norm_sha(sha256) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str) or not _SHA256_HEX.match(sha256.strip().lower()):
        raise HubError(f"sha256 must be a 64-digit hex digest (an artifact's "
                       f"metadata['sha256']), got {sha256!r}")
    return sha256.strip().lower()


def _resolve(ref, *, offline, cache_dir, registry, sha256, timeout, progress) -> _Resolved:
    expected = _norm_sha(sha256)
    offline = _offline(offline)
    cache = _cache(cache_dir)
    if isinstance(ref, os.PathLike):
        return _Resolved(Path(ref).expanduser(), expected, False, os.fspath(ref))
    if not isinstance(ref, str) or not ref.strip():
        raise HubError(f"a prior ref is a registered name, a path or a URL; got {ref!r}")
    if _is_http(ref):
        key = expected or _url_key(ref)
        hit = cache / key
        if hit.is_dir():
            return _Resolved(hit, expected, True, ref)
        if offline:
            raise OfflineModeError(f"{_OFFLINE_HINT}, and {ref} is not in the cache ({hit}); "
                                   f"download it once with network access, or unset "
                                   f"{ENV_OFFLINE}")
        path = _download_any([ref], key=key, expected=expected, size=None, cache=cache,
                             timeout=timeout, progress=progress, label=ref)
        return _Resolved(path, expected, True, ref)
    if _is_file_url(ref):
        return _Resolved(_file_url_path(ref), expected, False, ref)
    scheme = urllib.parse.urlsplit(ref).scheme
    if "://" in ref and len(scheme) > 1:
        raise HubError(f"unsupported URL scheme {scheme!r} in {ref!r}: use https://, http:// "
                       f"or file://")
    path = Path(ref).expanduser()
    if path.exists():
        return _Resolved(path, expected, False, ref)
    reg = load_registry(registry, offline=offline, cache_dir=cache_dir, timeout=timeout)
    entry = reg.get(ref, ref_is_path=True)
    return _resolve_entry(entry, reg, expected, offline=offline, cache=cache, timeout=timeout,
                          progress=progress)


def _resolve_entry(entry: RegistryEntry, reg: Registry, expected: str | None, *, offline,
                   cache, timeout, progress) -> _Resolved:
    if expected is not None and entry.sha256 is not None and expected != entry.sha256:
        raise ChecksumMismatchError(
            f"you asked for {entry.name!r} with sha256 {expected}, but the registry "
            f"{reg.source} pins {entry.sha256}; drop the sha256 argument to get the "
            f"registered artifact, or use a registry that lists the one you want")
    expected = expected or entry.sha256
    local = [loc for loc in entry.locations if not _is_http(loc)]
    remote = [loc for loc in entry.locations if _is_http(loc)]
    for loc in local:
        path = _file_url_path(loc) if _is_file_url(loc) else Path(loc)
        if path.exists():
            return _Resolved(path, expected, False, entry.name, entry)
    if not remote:
        raise HubError(
            f"prior {entry.name!r} is registered at {', '.join(local)}, which does not exist "
            f"(not published yet, or the registry {reg.source} was moved without its "
            f"artifacts); create the artifact there and run `bayes-transfer priors register "
            f"{local[0]} --name {entry.name}`")
    if expected is None:
        raise HubError(
            f"registry entry {entry.name!r} ({reg.source}) pins no sha256, so a download "
            f"could not be verified; fill it with `bayes-transfer priors register "
            f"<packed file> --name {entry.name} --location {remote[0]}`, or pass sha256=")
    hit = cache / expected
    if hit.is_dir():
        return _Resolved(hit, expected, True, entry.name, entry)
    if offline:
        raise OfflineModeError(
            f"{_OFFLINE_HINT}, and prior {entry.name!r} is not in the cache ({hit}); run "
            f"`bayes-transfer priors download {entry.name}` once with network access, or "
            f"unset {ENV_OFFLINE}")
    path = _download_any(remote, key=expected, expected=expected, size=entry.size, cache=cache,
                         timeout=timeout, progress=progress, label=entry.name)
    return _Resolved(path, expected, True, entry.name, entry)


# ====================================================================== downloading
def _open_url(url: str, timeout: float):
    from bayes_transfer import __version__

    request = urllib.request.Request(url, headers={
        "User-Agent": f"bayes_transfer/{__version__} (urllib)",
        "Accept-Encoding": "identity"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        hint = {404: "the file is not there: check the location in the registry (or the "
                     "URL), or try a mirror",
                403: "access is denied: the file may be private or the link expired",
                401: "the server wants credentials: the file may be private"}.get(
            e.code, "the server refused the request; try again later or use a mirror"
            if e.code >= 500 else "check the URL")
        raise DownloadError(f"HTTP error {e.code} ({e.reason}) downloading {url}: {hint}") \
            from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url} ({e.reason}); check the network connection "
                            f"and proxy settings, or work offline (BAYES_TRANSFER_OFFLINE=1) "
                            f"with a cached prior") from None
    except TimeoutError:
        raise DownloadError(f"connecting to {url} timed out after {timeout:g} s; try again, "
                            f"or pass a larger timeout=") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DownloadError(f"cannot download {url} ({type(e).__name__}: {e})") from None


def _fetch(url: str, out, *, size: int | None, timeout: float, progress, label: str) -> int:
    """Stream ``url`` into the open file ``out``; return the byte count, or DownloadError."""
    from tqdm.auto import tqdm

    with _open_url(url, timeout) as resp:
        header = resp.headers.get("Content-Length")
        announced = int(header) if header and header.strip().isdigit() else None
        if announced is not None and size is not None and announced != size:
            raise DownloadError(
                f"{url} announces {announced} bytes but the registry lists size {size}: it "
                f"serves a different file than the one registered (or the registry entry is "
                f"stale); nothing was kept")
        total = size if size is not None else announced
        received = 0
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"downloading {label}", leave=False,
                   disable=None if progress is None else not progress)
        try:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                if total is not None and received > total:
                    raise DownloadError(
                        f"{url} sent more than the expected {total} bytes; it is not the "
                        f"registered file; nothing was kept")
                out.write(chunk)
                bar.update(len(chunk))
        except TimeoutError:
            raise DownloadError(
                f"downloading {url} stalled: no data for {timeout:g} s after {received} of "
                f"{total if total is not None else '?'} bytes; nothing was kept; try again "
                f"(or pass a larger timeout=)") from None
        except (OSError, http.client.HTTPException) as e:
            raise DownloadError(
                f"downloading {url} failed after {received} of "
                f"{total if total is not None else '?'} bytes ({type(e).__name__}: {e}); "
                f"nothing was kept; try again") from None
        finally:
            bar.close()
    if total is not None and received != total:
        raise DownloadError(
            f"download of {url} is truncated: received {received} of {total} bytes (the "
            f"connection closed early); nothing was kept; try again")
    return received


def _remove_stale(cache: Path) -> None:
    """Delete temporaries of downloads that were killed (older than a day)."""
    now = time.time()
    try:
        children = list(cache.iterdir())
    except OSError:
        return
    for child in children:
        if not child.name.startswith(_TMP_PREFIXES):
            continue
        try:
            if now - child.lstat().st_mtime < _STALE_SECONDS:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
        except OSError:
            pass


def _download(url: str, *, key: str, expected: str | None, size: int | None, cache: Path,
              timeout: float, progress, label: str) -> Path:
    """Download, unpack and verify ``url`` into ``cache/key`` atomically; return that path."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HubError(f"cannot create the prior cache {cache} ({e}); set {ENV_CACHE} or pass "
                       f"cache_dir= to a writable directory") from None
    _remove_stale(cache)
    dest = cache / key
    fd, tmp_name = tempfile.mkstemp(prefix=f".download-{key[:20]}-", suffix=".partial",
                                    dir=cache)
    tmp, stage = Path(tmp_name), None
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out, size=size, timeout=timeout, progress=progress, label=label)
            out.flush()
            os.fsync(out.fileno())
        stage = Path(tempfile.mkdtemp(prefix=f".unpack-{key[:20]}-", dir=cache))
        try:
            # unpack_artifact refuses unsafe members and verifies every file digest.
            unpacked = _artifact.unpack_artifact(tmp, stage / "artifact")
        except ArtifactVersionError:
            raise
        except ArtifactIntegrityError as e:
            raise ChecksumMismatchError(
                f"the file downloaded from {url} is corrupt ({e}); nothing was kept; try "
                f"again or use a mirror") from None
        except ArtifactError as e:
            raise DownloadError(
                f"{url} did not serve a prior artifact ({e}); an HTML error page or a "
                f"truncated file looks like this; nothing was kept") from None
        actual = _artifact.read_metadata(unpacked, verify=False)["sha256"]
        if expected is not None and actual != expected:
            raise ChecksumMismatchError(
                f"the artifact downloaded from {url} has sha256 {actual}, but {label!r} is "
                f"pinned to {expected}: it is not the registered artifact (it was replaced, "
                f"or the registry entry is stale); nothing was kept. If the new artifact is "
                f"intended, update the registry with `bayes-transfer priors register`")
        try:
            os.rename(unpacked, dest)
        except OSError:
            if not dest.is_dir():       # not a concurrent download that finished first
                raise
        _artifact._fsync_dir(cache)
        return dest
    finally:
        tmp.unlink(missing_ok=True)
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _download_any(urls, *, key, expected, size, cache, timeout, progress, label) -> Path:
    """Try each URL (the location, then the mirrors) until one gives a verified artifact."""
    errors: list[HubError] = []
    for url in urls:
        try:
            return _download(url, key=key, expected=expected, size=size, cache=cache,
                             timeout=timeout, progress=progress, label=label)
        except (DownloadError, ChecksumMismatchError) as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    cls = ChecksumMismatchError if all(isinstance(e, ChecksumMismatchError) for e in errors) \
        else DownloadError
    raise cls(f"could not fetch {label!r} from any of its {len(urls)} locations:\n"
              + "\n".join(f"  - {e}" for e in errors))


# ====================================================================== public API
def _check_pin(res: _Resolved) -> None:
    """ChecksumMismatchError if a local artifact directory is not the pinned one."""
    if res.expected is None or not res.path.is_dir():
        return     # packed files: artifact.load_prior compares the digest after unpacking
    actual = _artifact.read_metadata(res.path, verify=True)["sha256"]
    if actual != res.expected:
        where = "the cached copy" if res.cached else "the artifact"
        raise ChecksumMismatchError(
            f"{where} of {res.label!r} at {res.path} has sha256 {actual}, but it is pinned "
            f"to {res.expected}: the artifact changed after it was registered. Restore it, "
            f"or if the change is intended re-register it with `bayes-transfer priors "
            f"register {res.path} --name {res.label}`")


def _warn_unpinned(res: _Resolved) -> None:
    if res.entry is not None and res.expected is None:
        warnings.warn(
            f"registry entry {res.entry.name!r} pins no sha256 yet: loaded {res.path} "
            f"without checking that it is the published artifact; run `bayes-transfer priors "
            f"register {res.path} --name {res.entry.name}` to pin it", stacklevel=5)


def _with_cache_repair(ref, action, *, offline, cache_dir, registry, sha256, timeout,
                       progress):
    """Run ``action(resolved)``; a corrupt cache entry is deleted and downloaded again once."""
    kwargs = dict(offline=offline, cache_dir=cache_dir, registry=registry, sha256=sha256,
                  timeout=timeout, progress=progress)
    res = _resolve(ref, **kwargs)
    try:
        _check_pin(res)
        return action(res)
    except ArtifactError as e:
        if not res.cached or isinstance(e, ArtifactVersionError):
            raise
        if _offline(offline):
            raise HubError(f"the cached copy of {res.label!r} at {res.path} is corrupt ({e}); "
                           f"{_OFFLINE_HINT}: delete that directory and download it again "
                           f"with network access") from None
        warnings.warn(f"the cached copy of {res.label!r} at {res.path} is corrupt ({e}); "
                      f"downloading it again", stacklevel=3)
        shutil.rmtree(res.path, ignore_errors=True)
        res = _resolve(ref, **kwargs)
        _check_pin(res)
        return action(res)


def load_prior(ref, *, offline: bool | None = None, cache_dir=None, registry=None,
               timeout: float = DEFAULT_TIMEOUT, progress: bool | None = None,
               **load_kwargs) -> Prior:
    """Load a prior by registered name, local path or URL, checked against its sha256.

    Args:
      ref: a registered name (``"fashion-mnist/small-cnn"``), an artifact directory or
        packed ``.tar``/``.tar.gz`` file, or an ``https://``/``http://``/``file://`` URL
        of a packed artifact.
      offline: never access the network (default: ``$BAYES_TRANSFER_OFFLINE``).
      cache_dir: where downloads are kept (default: ``$BAYES_TRANSFER_CACHE`` or
        ``~/.cache/bayes_transfer/priors``).
      registry: a registry file, URL or dict (default: ``$BAYES_TRANSFER_REGISTRY`` or
        ``priors/registry.json``).
      timeout: seconds a connection or a read may block before the download fails.
      progress: show a download progress bar (default: when stderr is a terminal).
      **load_kwargs: passed to :func:`bayes_transfer.artifact.load_prior`
        (``model_params``, ``dtype``, ``verify``, ``sha256``: pin the artifact digest;
        for a name it must agree with the registry).

    Example::

        prior = load_prior("fashion-mnist/small-cnn", model_params=nnx.state(m, nnx.Param))
        params = prior.init_params(nnx.state(m, nnx.Param))
    """
    sha256 = load_kwargs.pop("sha256", None)

    def action(res: _Resolved) -> Prior:
        _warn_unpinned(res)
        return _artifact.load_prior(res.path, sha256=res.expected, **load_kwargs)

    return _with_cache_repair(ref, action, offline=offline, cache_dir=cache_dir,
                              registry=registry, sha256=sha256, timeout=timeout,
                              progress=progress)


def download(ref, *, offline: bool | None = None, cache_dir=None, registry=None,
             sha256: str | None = None, timeout: float = DEFAULT_TIMEOUT,
             progress: bool | None = None) -> Path:
    """Make the prior ``ref`` available locally (downloading it if needed); return its path.

    For a name with a local location (or a path) this is the artifact itself; for a URL
    it is the verified, unpacked copy in the cache.
    """
    return _with_cache_repair(ref, lambda res: res.path, offline=offline, cache_dir=cache_dir,
                              registry=registry, sha256=sha256, timeout=timeout,
                              progress=progress)


def verify(ref, *, offline: bool | None = None, cache_dir=None, registry=None,
           sha256: str | None = None, timeout: float = DEFAULT_TIMEOUT,
           progress: bool | None = None) -> dict:
    """Check a prior completely; return its metadata.

    Downloads it if needed, then checks every file digest, the arrays and their values
    (:func:`bayes_transfer.artifact.verify_artifact`), the sha256 pinned by the registry
    (a name whose entry pins none fails: it is not registered yet) and that the
    registry's ``architecture`` and ``source`` agree with the artifact's metadata.
    """
    def action(res: _Resolved) -> dict:
        if res.entry is not None and res.expected is None:
            raise RegistryError(
                f"registry entry {res.entry.name!r} pins no sha256 (a placeholder): its "
                f"artifact {res.path} cannot be verified as the published one; run "
                f"`bayes-transfer priors register {res.path} --name {res.entry.name}`")
        meta = _artifact.verify_artifact(res.path, sha256=res.expected)
        if res.entry is not None:
            for key in ("architecture", "source"):
                listed = getattr(res.entry, key)
                if listed is not None and listed != meta.get(key):
                    raise RegistryError(
                        f"registry entry {res.entry.name!r} lists {key} {listed!r}, but the "
                        f"artifact has {meta.get(key)!r}; re-run `bayes-transfer priors "
                        f"register` to refresh the entry")
        return meta

    return _with_cache_repair(ref, action, offline=offline, cache_dir=cache_dir,
                              registry=registry, sha256=sha256, timeout=timeout,
                              progress=progress)


def list_priors(*, registry=None, offline: bool | None = None, cache_dir=None,
                timeout: float = DEFAULT_TIMEOUT) -> list[RegistryEntry]:
    """The registered priors, sorted by name (``[e.name for e in list_priors()]``)."""
    reg = load_registry(registry, offline=offline, cache_dir=cache_dir, timeout=timeout)
    return [reg.entries[n] for n in reg.names()]


def status(entry: RegistryEntry, *, cache_dir=None) -> tuple[str, Path | None]:
    """(state, local path): ``local`` / ``cached`` / ``remote`` / ``missing``; no network."""
    for loc in entry.locations:
        if not _is_http(loc):
            path = _file_url_path(loc) if _is_file_url(loc) else Path(loc)
            if path.exists():
                return "local", path
    if any(_is_http(loc) for loc in entry.locations):
        if entry.sha256 is not None and (_cache(cache_dir) / entry.sha256).is_dir():
            return "cached", _cache(cache_dir) / entry.sha256
        return "remote", None
    return "missing", None


def show(name: str, *, registry=None, offline: bool | None = None, cache_dir=None,
         timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Everything the registry says about ``name``, where it is locally, and its model card.

    Keys: the entry's fields, ``name``, ``locations`` (resolved), ``status``
    (``local``/``cached``/``remote``/``missing``), ``path`` (local copy or None),
    ``pinned`` and ``model_card_text`` (the card's markdown when it is a local file).
    """
    reg = load_registry(registry, offline=offline, cache_dir=cache_dir, timeout=timeout)
    entry = reg.get(name)
    state, path = status(entry, cache_dir=cache_dir)
    card_text = None
    if entry.model_card and not _is_http(entry.model_card):
        card = _file_url_path(entry.model_card) if _is_file_url(entry.model_card) \
            else Path(entry.model_card)
        if card.is_file():
            card_text = card.read_text(encoding="utf-8", errors="replace")
    return {**entry.to_dict(), "registry": reg.source, "status": state,
            "path": str(path) if path is not None else None, "pinned": entry.pinned,
            "model_card": entry.model_card, "model_card_text": card_text}


# ====================================================================== registering
def _local_registry_file(registry) -> Path:
    if registry is None:
        registry = default_registry()
    if isinstance(registry, (Mapping, Registry)) or _is_http(os.fspath(registry)):
        raise RegistryError("register_prior writes a local registry file; pass registry= a "
                            "path (a URL or a dict cannot be edited)")
    text = os.fspath(registry)
    return (_file_url_path(text) if _is_file_url(text) else Path(text)).expanduser().absolute()


def _relative_location(path: Path, base: Path) -> str:
    path = path.expanduser().absolute()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _method(meta: dict) -> str:
    source_method = (meta.get("source") or {}).get("method")
    kind = f"swag-{meta['kind']}" if meta["kind"] in ("lowrank", "diag") else meta["kind"]
    return f"{source_method}+{kind}" if source_method else kind


def register_prior(path, name: str, *, registry=None, location=None, model_card=None,
                   license: str | None = None, description: str | None = None,
                   method: str | None = None) -> RegistryEntry:
    """Add or update the registry entry ``name`` from the artifact at ``path``.

    The artifact (a directory or a packed file) is verified completely; the entry gets
    its sha256, architecture, source, method, recommended_scale, kind, dim and rank from
    the artifact's metadata. Fields of an existing entry that the metadata does not give
    (license, model_card, description, mirrors) are kept unless passed.

    Args:
      path: the artifact (directory or ``.tar``/``.tar.gz``).
      name: the registered name, e.g. ``"fashion-mnist/small-cnn"``.
      registry: the registry file to edit (default: ``$BAYES_TRANSFER_REGISTRY`` or this
        repository's ``priors/registry.json``); created if missing.
      location: where users fetch it: a path (stored relative to the registry when it
        lies below it) or a URL, or a list (the first is the location, the rest mirrors).
        Default: ``path`` (relative to the registry when possible). A URL must serve a
        packed file: register the packed file you uploaded (its size is recorded).
      model_card: a markdown file (stored relative to the registry) or URL.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(f"invalid prior name {name!r}: use '/'-separated parts of letters, "
                            f"digits, '.', '_' and '-', e.g. 'fashion-mnist/small-cnn'")
    reg_file = _local_registry_file(registry)
    base = reg_file.parent
    artifact_path = Path(path).expanduser()
    meta = _artifact.verify_artifact(artifact_path)
    packed = artifact_path.is_file()
    if location is None:
        locations = [_relative_location(artifact_path, base)]
    else:
        locations = [location] if isinstance(location, (str, os.PathLike)) else list(location)
        locations = [loc if _is_http(os.fspath(loc)) or _is_file_url(os.fspath(loc))
                     else _relative_location(Path(loc), base) for loc in map(os.fspath, locations)]
    if any(_is_http(loc) for loc in locations) and not packed:
        raise RegistryError(
            f"a URL location serves a packed artifact, but {artifact_path} is a directory: "
            f"pack it (bayes_transfer.artifact.pack_artifact(dir, 'prior.tar.gz')), upload "
            f"the packed file and register that file")
    if reg_file.exists():
        doc = _registry_json(reg_file.read_bytes(), reg_file)
        _parse_registry(doc, base, str(reg_file), reg_file)        # refuse to edit a bad one
    else:
        doc = {}
    doc.setdefault("format", REGISTRY_FORMAT)
    doc.setdefault("format_version", REGISTRY_VERSION)
    priors = doc.setdefault("priors", {})
    old = dict(priors.get(name) or {})
    if location is None and old.get("locations"):     # keep the mirrors
        locations += [loc for loc in old["locations"] if loc not in locations]
    entry = {k: v for k, v in old.items() if k not in ("location", "locations")}
    entry["location"] = locations[0]
    if len(locations) > 1:
        entry["locations"] = locations[1:]
    entry.update({
        "sha256": meta["sha256"],
        "size": artifact_path.stat().st_size if packed else None,
        "architecture": meta.get("architecture"),
        "source": meta.get("source"),
        "method": method or _method(meta),
        "recommended_scale": meta.get("recommended_scale"),
        "kind": meta["kind"], "dim": meta["dim"], "rank": meta["rank"],
    })
    if "source_accuracy" in meta:
        entry["source_accuracy"] = meta["source_accuracy"]
    if license is not None:
        entry["license"] = license
    entry.setdefault("license", None)
    if description is not None:
        entry["description"] = description
    if model_card is not None:
        card = os.fspath(model_card)
        if not (_is_http(card) or _is_file_url(card)):
            if not Path(card).expanduser().is_file():
                raise RegistryError(f"model card {card} is not a file")
            card = _relative_location(Path(card), base)
        entry["model_card"] = card
    entry.setdefault("model_card", None)
    priors[name] = {k: entry[k] for k in _ENTRY_FIELDS if k in entry} | \
        {k: v for k, v in entry.items() if k not in _ENTRY_FIELDS}
    doc["priors"] = dict(sorted(priors.items()))
    parsed = _parse_registry(doc, base, str(reg_file), reg_file)   # what we write must parse
    _write_registry(reg_file, doc)
    return parsed.entries[name]


def _write_registry(file: Path, doc: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.partial-", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
