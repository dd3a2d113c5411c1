"""Fetching priors: URLs, the download cache, verified atomic downloads.

Downloads go to ``$BAYES_TRANSFER_CACHE`` (default ``~/.cache/bayes_transfer/priors``),
one unpacked artifact directory per entry, named by the pinned sha256 (or
``url-<hash of the URL>`` for an unpinned URL). A download streams into a hidden
scratch directory of the cache (an http(s) URL with ``urllib``, an ``hf://`` reference
with ``huggingface_hub``, :mod:`.hf`) and checks its size; the file is then unpacked
and verified (every file digest, then the pinned sha256) into a hidden temporary
directory that is moved into place only when all checks passed
(:func:`bayes_transfer.fsutil.atomic_write`). On any failure or interruption the
temporaries are removed, so the cache never holds a partial entry; those of a killed
process are deleted by the next download once they are a day old.

(This module is ``fetch``, not ``download``: ``bayes_transfer.hub.download`` is the
public function of :mod:`.api`.)
"""
from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from bayes_transfer.artifacts import read_metadata, unpack_artifact
from bayes_transfer.errors import (ArtifactError, ArtifactIntegrityError, ArtifactVersionError,
                                   ChecksumMismatchError, DownloadError, HubError)
from bayes_transfer.fsutil import atomic_write
from bayes_transfer.hub.hf import ENV_HF_OFFLINE, hf_download, hf_offline, is_hf, parse_hf

__all__ = ["ENV_CACHE", "ENV_OFFLINE", "DEFAULT_TIMEOUT", "OFFLINE_HINT", "default_cache_dir",
           "cache_path", "offline_mode", "offline_reason", "is_http", "is_remote", "is_file_url",
           "file_url_path", "url_key", "open_url", "download_any"]

ENV_CACHE = "BAYES_TRANSFER_CACHE"
ENV_OFFLINE = "BAYES_TRANSFER_OFFLINE"
#: Seconds a connection attempt or a single read may block before the download fails.
DEFAULT_TIMEOUT = 60.0
OFFLINE_HINT = ("offline mode is on (offline=True or BAYES_TRANSFER_OFFLINE=1), so nothing "
                "is downloaded")

_CHUNK = 1 << 20
_STALE_SECONDS = 24 * 3600
_DOWNLOAD_PREFIX = ".download-"
_PARTIAL = ".partial-"            # atomic_write's temporaries: .<name>.partial-<id>


# ====================================================================== places and modes
def default_cache_dir() -> Path:
    """``$BAYES_TRANSFER_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/bayes_transfer/priors``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bayes_transfer" / "priors"


def cache_path(cache_dir) -> Path:
    """``cache_dir`` as a path, or the default cache for None."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def offline_mode(offline: bool | None) -> bool:
    """``offline`` if given, else whether ``$BAYES_TRANSFER_OFFLINE`` is set to a true value."""
    if offline is not None:
        return bool(offline)
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def is_http(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme.lower() in ("http", "https")


def is_remote(s: str) -> bool:
    """Whether ``s`` is downloaded: an http(s) URL or an ``hf://`` reference."""
    return is_http(s) or is_hf(s)


def offline_reason(location: str, offline: bool) -> str | None:
    """Why ``location`` may not be downloaded now (a sentence), or None if it may:
    offline mode, or ``$HF_HUB_OFFLINE`` for an ``hf://`` reference."""
    if offline:
        return OFFLINE_HINT
    if is_hf(location) and hf_offline():
        return (f"{ENV_HF_OFFLINE} is set, so nothing is downloaded from the Hugging Face "
                f"Hub")
    return None


def is_file_url(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme.lower() == "file"


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise HubError(f"{url}: a file:// URL must name a local file (file:///path/to/prior"
                       f".tar.gz), not one on host {parts.netloc!r}")
    return Path(urllib.request.url2pathname(parts.path))


def url_key(url: str) -> str:
    """The cache name of something fetched from ``url`` without a pinned digest."""
    return "url-" + hashlib.sha256(url.encode("utf-8")).hexdigest()[:40]


# ====================================================================== downloading
def _version() -> str:
    try:
        return importlib.metadata.version("bayes_transfer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def open_url(url: str, timeout: float):
    """The open HTTP response for ``url``; DownloadError (with a hint) if it fails."""
    request = urllib.request.Request(url, headers={
        "User-Agent": f"bayes_transfer/{_version()} (urllib)",
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

    with open_url(url, timeout) as resp:
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
        name = child.name
        if not (name.startswith(_DOWNLOAD_PREFIX) or (name.startswith(".") and _PARTIAL in name)):
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
    """Download, unpack and verify ``url`` (http(s) or hf://) into ``cache/key``
    atomically; return that path."""
    if is_hf(url):
        parse_hf(url)                   # a malformed reference fails before any I/O
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HubError(f"cannot create the prior cache {cache} ({e}); set {ENV_CACHE} or pass "
                       f"cache_dir= to a writable directory") from None
    _remove_stale(cache)
    dest = cache / key
    # The packed file is scratch (read once, then deleted), in a hidden directory of the
    # cache that is removed whatever happens.
    scratch = Path(tempfile.mkdtemp(prefix=f"{_DOWNLOAD_PREFIX}{key[:20]}-", dir=cache))
    try:
        if is_hf(url):
            packed = hf_download(parse_hf(url), scratch, timeout=timeout)
            got = packed.stat().st_size
            if size is not None and got != size:
                raise DownloadError(
                    f"{url} is {got} bytes but the registry lists size {size}: it is not the "
                    f"registered file (or the registry entry is stale); nothing was kept")
        else:
            packed = scratch / "packed"
            with open(packed, "wb") as out:
                _fetch(url, out, size=size, timeout=timeout, progress=progress, label=label)
        try:
            with atomic_write(dest, directory=True, overwrite=False) as stage:
                _unpack_verified(packed, stage, url=url, expected=expected, label=label)
        except OSError:
            if not dest.is_dir():       # not a concurrent download that finished first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def _unpack_verified(packed: Path, stage: Path, *, url: str, expected: str | None,
                     label: str) -> None:
    """Unpack ``packed`` into the empty directory ``stage``, verified and pinned."""
    try:
        # unpack_artifact refuses unsafe members and verifies every file digest.
        unpacked = unpack_artifact(packed, stage, overwrite=True)
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
    actual = read_metadata(unpacked, verify=False)["sha256"]
    if expected is not None and actual != expected:
        raise ChecksumMismatchError(
            f"the artifact downloaded from {url} has sha256 {actual}, but {label!r} is "
            f"pinned to {expected}: it is not the registered artifact (it was replaced, "
            f"or the registry entry is stale); nothing was kept. If the new artifact is "
            f"intended, update the registry with `bayes-transfer priors register`")


def download_any(urls, *, key, expected, size, cache, timeout, progress, label) -> Path:
    """Try each URL or hf:// reference (the location, then the mirrors) until one gives a
    verified artifact in ``cache/key``; return that path."""
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
