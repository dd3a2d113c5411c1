"""Hugging Face Hub references: ``hf://OWNER/REPO[@REVISION][/PATH]``.

A packed prior (``.tar.gz``) in a Hugging Face model repository, where the ecosystem
already publishes weights::

    hf://my-lab/fmnist-prior@3f1c0a...e9/prior.tar.gz   # pinned to a commit
    hf://my-lab/fmnist-prior                              # main, prior.tar.gz

``REVISION`` is a commit hash, branch or tag (default ``main``; a registry entry must
name one, and a commit hash is the real pin); ``PATH`` is the file in the repository
(default :data:`DEFAULT_FILENAME`). The transfer is ``huggingface_hub``'s
(``hf_hub_download``: its endpoint, ``HF_ENDPOINT``, token, proxies and resumption),
an optional dependency imported only when an ``hf://`` reference is used
(``pip install 'bayes_transfer[hf]'``). What it downloads lands in a scratch directory
that the caller (:mod:`.fetch`) unpacks, verifies against the pinned sha256 and then
deletes: the prior cache holds verified artifacts only, and a download that fails or
is interrupted leaves nothing behind. ``HF_HUB_OFFLINE=1`` (like
``BAYES_TRANSFER_OFFLINE=1``) means no request to the Hub at all.

This module needs nothing else of the package but its errors.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
from pathlib import Path, PurePosixPath

from bayes_transfer.errors import DownloadError, HubError, OfflineModeError

__all__ = ["HF_SCHEME", "DEFAULT_FILENAME", "ENV_HF_OFFLINE", "ENV_HF_ENDPOINT",
           "INSTALL_HINT", "HfRef", "is_hf", "parse_hf", "hf_offline", "hf_endpoint",
           "hf_download", "hf_token", "hf_upload"]

HF_SCHEME = "hf://"
#: The file of a reference that names none (``hf://OWNER/REPO``).
DEFAULT_FILENAME = "prior.tar.gz"
ENV_HF_OFFLINE = "HF_HUB_OFFLINE"
ENV_HF_ENDPOINT = "HF_ENDPOINT"
INSTALL_HINT = "pip install 'bayes_transfer[hf]'"

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REF = re.compile(rf"^hf://(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^/@\s]+))?(?:/(?P<path>.*))?$",
                  re.IGNORECASE)
_FORM = "hf://OWNER/REPO[@REVISION][/PATH], e.g. hf://my-lab/my-prior@main/prior.tar.gz"


@dataclasses.dataclass(frozen=True)
class HfRef:
    """A file in a Hugging Face model repository, at a revision (None: ``main``)."""

    repo_id: str
    revision: str | None
    filename: str

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_SCHEME}{self.repo_id}{rev}/{self.filename}"

    def at(self, revision: str) -> "HfRef":
        """The same file at ``revision``."""
        return dataclasses.replace(self, revision=revision)


def is_hf(ref) -> bool:
    """Whether ``ref`` is an ``hf://`` reference."""
    return isinstance(ref, str) and ref[:len(HF_SCHEME)].lower() == HF_SCHEME


def parse_hf(ref: str) -> HfRef:
    """The parts of ``hf://OWNER/REPO[@REVISION][/PATH]``; HubError if malformed."""
    match = _REF.match(ref.strip()) if isinstance(ref, str) else None
    if match is None:
        raise HubError(f"{ref!r} is not a Hugging Face reference: write {_FORM}")
    path = match["path"] or DEFAULT_FILENAME
    parts = PurePosixPath(path).parts
    if path.startswith("/") or path.endswith("/") or "//" in path \
            or any(p in (".", "..") for p in parts):
        raise HubError(f"{ref!r}: the file path {path!r} must be a relative path inside the "
                       f"repository (no empty, '.' or '..' parts); write {_FORM}")
    return HfRef(repo_id=match["repo"], revision=match["rev"], filename=path)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def hf_offline() -> bool:
    """Whether ``$HF_HUB_OFFLINE`` asks that the Hugging Face Hub not be contacted."""
    return _true(os.environ.get(ENV_HF_OFFLINE))


def hf_endpoint() -> str | None:
    """``$HF_ENDPOINT`` (read at each call), or None for huggingface_hub's default."""
    return os.environ.get(ENV_HF_ENDPOINT, "").strip().rstrip("/") or None


def _hub():
    """The ``huggingface_hub`` module, imported on first use."""
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(f"hf:// references need the huggingface_hub package, which is not "
                       f"installed: {INSTALL_HINT} (or pip install huggingface_hub)") from None
    return huggingface_hub


def _error_classes(hub) -> dict:
    """huggingface_hub's error classes by name (those this version has)."""
    names = ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError",
             "LocalEntryNotFoundError", "EntryNotFoundError", "OfflineModeIsEnabled",
             "HfHubHTTPError")
    found = {}
    for module in (getattr(hub, "errors", None), hub.utils):
        for name in names:
            cls = getattr(module, name, None) if module is not None else None
            if isinstance(cls, type) and name not in found:
                found[name] = cls
    return found


def _explain(e: Exception, ref: HfRef, hub) -> HubError:
    """A HubError a user can act on, for what ``hf_hub_download`` raised."""
    cls = _error_classes(hub)
    where = hf_endpoint() or "https://huggingface.co"
    rev = ref.revision or "main"

    def isa(name):
        return name in cls and isinstance(e, cls[name])

    if isa("OfflineModeIsEnabled"):
        return OfflineModeError(f"huggingface_hub is in offline mode (HF_HUB_OFFLINE was set "
                                f"when it was imported), so {ref} cannot be downloaded; unset "
                                f"it and start a new Python process")
    if isa("GatedRepoError"):
        return DownloadError(f"{ref}: the repository {ref.repo_id} is gated: accept its "
                             f"conditions on {where}/{ref.repo_id} and log in (`hf auth "
                             f"login`, or set HF_TOKEN); nothing was kept")
    if isa("RepositoryNotFoundError"):
        return DownloadError(f"{ref}: no repository {ref.repo_id!r} on {where} (or it is "
                             f"private: log in with `hf auth login`, or set HF_TOKEN); check "
                             f"the reference in the registry; nothing was kept")
    if isa("RevisionNotFoundError"):
        return DownloadError(f"{ref}: the repository {ref.repo_id} has no revision {rev!r} "
                             f"(a commit hash, branch or tag); check the revision in the "
                             f"registry; nothing was kept")
    if isa("LocalEntryNotFoundError"):
        return DownloadError(f"cannot reach the Hugging Face Hub at {where} to download "
                             f"{ref} ({e.__class__.__name__}); check the network connection, "
                             f"proxy settings and HF_ENDPOINT, or work offline with a cached "
                             f"prior; nothing was kept")
    if isa("EntryNotFoundError"):
        return DownloadError(f"{ref}: there is no file {ref.filename!r} at revision {rev!r} "
                             f"of {ref.repo_id}; check the path in the reference; nothing was "
                             f"kept")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isa("HfHubHTTPError") and status is not None:
        return DownloadError(f"HTTP error {status} downloading {ref} from {where}: "
                             f"{str(e).splitlines()[0]}; try again later; nothing was kept")
    return DownloadError(f"downloading {ref} from {where} failed ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'}); the "
                         f"connection may have been cut: try again; nothing was kept")


def _version() -> str | None:
    try:
        return importlib.metadata.version("bayes_transfer")
    except importlib.metadata.PackageNotFoundError:
        return None


def hf_download(ref: HfRef, scratch: Path, *, timeout: float) -> Path:
    """Download the file ``ref`` with ``huggingface_hub`` into the directory ``scratch``
    (used as its cache, deleted by the caller); return the file's path.

    DownloadError (or OfflineModeError) with a hint on any failure: no such repository,
    revision or file, no connection, an interrupted transfer.
    """
    hub = _hub()
    try:
        path = hub.hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision or "main",
                                   cache_dir=str(scratch), endpoint=hf_endpoint(),
                                   etag_timeout=timeout, library_name="bayes_transfer",
                                   library_version=_version())
    except Exception as e:    # noqa: BLE001 - the HTTP client's errors vary by version
        raise _explain(e, ref, hub) from None
    return Path(path)


def hf_token() -> str | None:
    """The Hugging Face token ``huggingface_hub`` would use (``HF_TOKEN``, or the one
    ``hf auth login`` stored), or None."""
    return _hub().get_token()


def hf_upload(ref: HfRef, files: dict[str, Path], *, message: str,
              token: str | None = None) -> str:
    """Upload ``files`` (``{path in the repository: local file}``) to the model repository
    of ``ref`` in one commit, on its revision (default ``main``), creating the repository
    if needed; return the commit hash.

    HubError without a token (nothing is uploaded) or when the Hub refuses.
    """
    hub = _hub()
    token = token or hub.get_token()
    if not token:
        raise HubError(f"publishing to {HF_SCHEME}{ref.repo_id} needs a Hugging Face token with "
                       f"write access: run `hf auth login` (or `huggingface-cli login`), or "
                       f"set HF_TOKEN; nothing was uploaded or registered")
    api = hub.HfApi(endpoint=hf_endpoint(), token=token, library_name="bayes_transfer",
                    library_version=_version())
    try:
        api.create_repo(ref.repo_id, exist_ok=True)
        ops = [hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
               for name, path in files.items()]
        info = api.create_commit(ref.repo_id, ops, commit_message=message,
                                 revision=ref.revision)
    except Exception as e:    # noqa: BLE001 - the HTTP client's errors vary by version
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = ("the token cannot write to this repository: use a token with write access "
                "(`hf auth login`)" if status in (401, 403) else "check the repository and "
                "revision, and try again")
        raise HubError(f"uploading to {HF_SCHEME}{ref.repo_id} failed ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else status}); {hint}; nothing was "
                       f"registered") from None
    return info.oid
