"""The prior hub's functions: load a published prior by name, path or URL, verified.

    from bayes_transfer import hub
    prior = hub.load_prior("fashion-mnist/small-cnn")          # a registered name
    prior = hub.load_prior("priors/my-prior")                  # an artifact directory
    prior = hub.load_prior("my-prior.tar.gz")                  # a packed artifact
    prior = hub.load_prior("https://example.org/p.tar.gz", sha256="3f1c...")   # a URL
    prior = hub.load_prior("hf://my-lab/my-prior@5e2d...")     # Hugging Face, a revision
    params = prior.init_params(nnx.state(model, nnx.Param))    # like pretrained weights

A ``ref`` is resolved in this order: an ``http://`` / ``https://`` URL of a packed
artifact or an ``hf://OWNER/REPO[@REVISION][/PATH]`` Hugging Face reference
(downloaded into the cache, :mod:`.fetch`, :mod:`.hf`); a ``file://`` URL or an existing
local path (an artifact directory or a ``.tar`` / ``.tar.gz`` file, loaded in place);
otherwise a name looked up in the registries (:mod:`.registry`). A cache hit makes no
network access; offline mode (``offline=True`` or ``BAYES_TRANSFER_OFFLINE=1``) never
touches the network. :func:`register_prior` (CLI: ``bayes-transfer priors register
PATH --name NAME --registry FILE``) fills an entry from an artifact.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import urllib.parse
import warnings
from pathlib import Path

from bayes_transfer.artifacts import read_metadata, read_prior, verify_artifact
from bayes_transfer.errors import (ArtifactError, ArtifactVersionError, ChecksumMismatchError,
                                   HubError, OfflineModeError, RegistryError)
from bayes_transfer.hub.fetch import (DEFAULT_TIMEOUT, ENV_OFFLINE, OFFLINE_HINT, cache_path,
                                      download_any, file_url_path, is_file_url, is_http,
                                      is_remote, offline_mode, offline_reason, url_key)
from bayes_transfer.hub.hf import ENV_HF_OFFLINE, is_hf, parse_hf
from bayes_transfer.hub.registry import (ENTRY_FIELDS, REGISTRY_FORMAT, REGISTRY_VERSION,
                                         Registry, RegistryEntry, load_registry,
                                         parse_registry, registry_json, relative_location,
                                         valid_name, writable_registry_file, write_registry)
from bayes_transfer.prior import Prior

__all__ = ["load_prior", "download", "verify", "list_priors", "status", "show",
           "register_prior"]


# ====================================================================== resolution
@dataclasses.dataclass
class _Resolved:
    path: Path                 # artifact directory or packed file
    expected: str | None       # sha256 to pin, if known
    cached: bool               # path is a cache entry (may be re-downloaded if corrupt)
    label: str                 # the name or URL, for messages
    entry: RegistryEntry | None = None


def _norm_sha(sha256) -> str | None:
    if sha256 is None:
        return None
    text = sha256.strip().lower() if isinstance(sha256, str) else ""
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise HubError(f"sha256 must be a 64-digit hex digest (an artifact's "
                       f"metadata['sha256']), got {sha256!r}")
    return text


def _resolve(ref, *, offline, cache_dir, registry, sha256, timeout, progress) -> _Resolved:
    expected = _norm_sha(sha256)
    offline = offline_mode(offline)
    cache = cache_path(cache_dir)
    if isinstance(ref, os.PathLike):
        return _Resolved(Path(ref).expanduser(), expected, False, os.fspath(ref))
    if not isinstance(ref, str) or not ref.strip():
        raise HubError(f"a prior ref is a registered name, a path or a URL; got {ref!r}")
    if is_remote(ref):
        if is_hf(ref):
            parse_hf(ref)                # malformed: a clear error before anything else
        key = expected or url_key(ref)
        hit = cache / key
        if hit.is_dir():
            return _Resolved(hit, expected, True, ref)
        reason = offline_reason(ref, offline)
        if reason:
            switch = ENV_OFFLINE if offline else ENV_HF_OFFLINE
            raise OfflineModeError(f"{reason}, and {ref} is not in the cache ({hit}); "
                                   f"download it once with network access, or unset {switch}")
        path = download_any([ref], key=key, expected=expected, size=None, cache=cache,
                            timeout=timeout, progress=progress, label=ref)
        return _Resolved(path, expected, True, ref)
    if is_file_url(ref):
        return _Resolved(file_url_path(ref), expected, False, ref)
    scheme = urllib.parse.urlsplit(ref).scheme
    if "://" in ref and len(scheme) > 1:
        raise HubError(f"unsupported URL scheme {scheme!r} in {ref!r}: use https://, http://, "
                       f"hf:// or file://")
    path = Path(ref).expanduser()
    if path.exists():
        return _Resolved(path, expected, False, ref)
    reg = load_registry(registry, offline=offline, cache_dir=cache_dir, timeout=timeout)
    entry = reg.get(ref, ref_is_path=True)
    return _resolve_entry(entry, reg, expected, offline=offline, cache=cache, timeout=timeout,
                          progress=progress)


def _resolve_entry(entry: RegistryEntry, reg: Registry, expected: str | None, *, offline,
                   cache, timeout, progress) -> _Resolved:
    source = entry.registry or reg.source
    if expected is not None and entry.sha256 is not None and expected != entry.sha256:
        raise ChecksumMismatchError(
            f"you asked for {entry.name!r} with sha256 {expected}, but the registry "
            f"{source} pins {entry.sha256}; drop the sha256 argument to get the "
            f"registered artifact, or use a registry that lists the one you want")
    expected = expected or entry.sha256
    local = [loc for loc in entry.locations if not is_remote(loc)]
    remote = [loc for loc in entry.locations if is_remote(loc)]
    for loc in local:
        path = file_url_path(loc) if is_file_url(loc) else Path(loc)
        if path.exists():
            return _Resolved(path, expected, False, entry.name, entry)
    if not remote:
        raise HubError(
            f"prior {entry.name!r} is registered at {', '.join(local)}, which does not exist "
            f"(not published yet, or the registry {source} was moved without its "
            f"artifacts); create the artifact there and run `bayes-transfer priors register "
            f"{local[0]} --name {entry.name}`")
    if expected is None:
        raise HubError(
            f"registry entry {entry.name!r} ({source}) pins no sha256, so a download "
            f"could not be verified; fill it with `bayes-transfer priors register "
            f"<packed file> --name {entry.name} --location {remote[0]}`, or pass sha256=")
    hit = cache / expected
    if hit.is_dir():
        return _Resolved(hit, expected, True, entry.name, entry)
    reachable = [loc for loc in remote if offline_reason(loc, offline) is None]
    if not reachable:
        switch = ENV_OFFLINE if offline else ENV_HF_OFFLINE
        raise OfflineModeError(
            f"{offline_reason(remote[0], offline)}, and prior {entry.name!r} is not in the "
            f"cache ({hit}); run `bayes-transfer priors download {entry.name}` once with "
            f"network access, or unset {switch}")
    path = download_any(reachable, key=expected, expected=expected, size=entry.size, cache=cache,
                        timeout=timeout, progress=progress, label=entry.name)
    return _Resolved(path, expected, True, entry.name, entry)


def _check_pin(res: _Resolved) -> None:
    """ChecksumMismatchError if a local artifact directory is not the pinned one."""
    if res.expected is None or not res.path.is_dir():
        return     # packed files: read_prior compares the digest after unpacking
    actual = read_metadata(res.path, verify=True)["sha256"]
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
        if offline_mode(offline):
            raise HubError(f"the cached copy of {res.label!r} at {res.path} is corrupt ({e}); "
                           f"{OFFLINE_HINT}: delete that directory and download it again "
                           f"with network access") from None
        warnings.warn(f"the cached copy of {res.label!r} at {res.path} is corrupt ({e}); "
                      f"downloading it again", stacklevel=3)
        shutil.rmtree(res.path, ignore_errors=True)
        res = _resolve(ref, **kwargs)
        _check_pin(res)
        return action(res)


# ====================================================================== public API
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
      registry: a registry file, URL or dict, or a list of them (default: the built-in
        registry, then those of ``$BAYES_TRANSFER_REGISTRY``).
      timeout: seconds a connection or a read may block before the download fails.
      progress: show a download progress bar (default: when stderr is a terminal).
      **load_kwargs: passed to :func:`bayes_transfer.artifacts.read_prior`
        (``model_params``, ``dtype``, ``verify``, ``sha256``: pin the artifact digest;
        for a name it must agree with the registry).

    Example::

        prior = load_prior("fashion-mnist/small-cnn", model_params=nnx.state(m, nnx.Param))
        params = prior.init_params(nnx.state(m, nnx.Param))
    """
    sha256 = load_kwargs.pop("sha256", None)

    def action(res: _Resolved) -> Prior:
        _warn_unpinned(res)
        return read_prior(res.path, sha256=res.expected, **load_kwargs)

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
    (:func:`bayes_transfer.artifacts.verify_artifact`), the sha256 pinned by the registry
    (a name whose entry pins none fails: it is not registered yet) and that the
    registry's ``architecture`` and ``source`` agree with the artifact's metadata.
    """
    def action(res: _Resolved) -> dict:
        if res.entry is not None and res.expected is None:
            raise RegistryError(
                f"registry entry {res.entry.name!r} pins no sha256 (a placeholder): its "
                f"artifact {res.path} cannot be verified as the published one; run "
                f"`bayes-transfer priors register {res.path} --name {res.entry.name}`")
        meta = verify_artifact(res.path, sha256=res.expected)
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
        if not is_remote(loc):
            path = file_url_path(loc) if is_file_url(loc) else Path(loc)
            if path.exists():
                return "local", path
    if any(is_remote(loc) for loc in entry.locations):
        if entry.sha256 is not None and (cache_path(cache_dir) / entry.sha256).is_dir():
            return "cached", cache_path(cache_dir) / entry.sha256
        return "remote", None
    return "missing", None


def show(name: str, *, registry=None, offline: bool | None = None, cache_dir=None,
         timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Everything the registry says about ``name``, where it is locally, and its model card.

    Keys: the entry's fields, ``name``, ``locations`` (resolved), ``registry`` (the one
    it comes from), ``status`` (``local``/``cached``/``remote``/``missing``), ``path``
    (local copy or None), ``pinned`` and ``model_card_text`` (the card's markdown when it
    is a local file).
    """
    reg = load_registry(registry, offline=offline, cache_dir=cache_dir, timeout=timeout)
    entry = reg.get(name)
    state, path = status(entry, cache_dir=cache_dir)
    card_text = None
    if entry.model_card and not is_http(entry.model_card):
        card = file_url_path(entry.model_card) if is_file_url(entry.model_card) \
            else Path(entry.model_card)
        if card.is_file():
            card_text = card.read_text(encoding="utf-8", errors="replace")
    return {**entry.to_dict(), "registry": entry.registry or reg.source, "status": state,
            "path": str(path) if path is not None else None, "pinned": entry.pinned,
            "model_card": entry.model_card, "model_card_text": card_text}


# ====================================================================== registering
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
      registry: the registry file to edit; created if missing. Default: the one
        ``$BAYES_TRANSFER_REGISTRY`` names; with neither, RegistryError (the built-in
        registry belongs to the installed package and is not edited).
      location: where users fetch it: a path (stored relative to the registry when it
        lies below it) or a URL, or a list (the first is the location, the rest mirrors).
        Default: ``path`` (relative to the registry when possible). A URL must serve a
        packed file: register the packed file you uploaded (its size is recorded).
      model_card: a markdown file (stored relative to the registry) or URL.
    """
    if not valid_name(name):
        raise RegistryError(f"invalid prior name {name!r}: use '/'-separated parts of letters, "
                            f"digits, '.', '_' and '-', e.g. 'fashion-mnist/small-cnn'")
    reg_file = writable_registry_file(registry)
    base = reg_file.parent
    artifact_path = Path(path).expanduser()
    meta = verify_artifact(artifact_path)
    packed = artifact_path.is_file()
    if location is None:
        locations = [relative_location(artifact_path, base)]
    else:
        locations = [location] if isinstance(location, (str, os.PathLike)) else list(location)
        locations = [loc if is_remote(loc) or is_file_url(loc)
                     else relative_location(Path(loc), base) for loc in map(os.fspath, locations)]
    if any(is_remote(loc) for loc in locations) and not packed:
        raise RegistryError(
            f"a URL location serves a packed artifact, but {artifact_path} is a directory: "
            f"pack it (bayes_transfer.artifacts.pack_artifact(dir, 'prior.tar.gz')), upload "
            f"the packed file and register that file")
    if reg_file.exists():
        doc = registry_json(reg_file.read_bytes(), reg_file)
        parse_registry(doc, base, str(reg_file), reg_file)        # refuse to edit a bad one
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
        if not (is_http(card) or is_file_url(card)):
            if not Path(card).expanduser().is_file():
                raise RegistryError(f"model card {card} is not a file")
            card = relative_location(Path(card), base)
        entry["model_card"] = card
    entry.setdefault("model_card", None)
    priors[name] = {k: entry[k] for k in ENTRY_FIELDS if k in entry} | \
        {k: v for k, v in entry.items() if k not in ENTRY_FIELDS}
    doc["priors"] = dict(sorted(priors.items()))
    parsed = parse_registry(doc, base, str(reg_file), reg_file)   # what we write must parse
    write_registry(reg_file, doc)
    return parsed.entries[name]
