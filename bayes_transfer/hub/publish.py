"""Packing and publishing priors: one reproducible file, a registry entry, an upload.

    from bayes_transfer.hub import pack_prior, publish_prior
    packed = pack_prior("priors/my-prior")          # priors/my-prior.tar.gz
    packed.sha256, packed.file_sha256, packed.size  # artifact digest, file digest, bytes
    publish_prior("priors/my-prior", "me/my-prior", registry="my-registry.json",
                  to="hf://me/my-prior")            # pack, check the card, upload, register

The packed file is deterministic: the same artifact gives the same bytes, wherever it
lies and whatever its files' times, owners and modes (sorted members after
``metadata.json``, each with the artifact's creation time, owner 0, mode 0644; gzip
without a file name or time; see :mod:`bayes_transfer.artifacts.tar`).
CLI: ``bayes-transfer priors pack DIR [--out FILE]`` and ``bayes-transfer priors
publish DIR --name NAME [--registry FILE] [--to hf://OWNER/REPO]``.

:func:`publish_prior` never writes into the installed package, and uploads only when
asked (``to=``) and when huggingface_hub has a token; without ``to`` the entry's
location is ``PUBLISH_BASE_URL`` + the packed file's name (upload the file there).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from bayes_transfer.artifacts import pack_artifact, read_metadata
from bayes_transfer.errors import ArtifactError, HubError, RegistryError
from bayes_transfer.fsutil import sha256_file
from bayes_transfer.hub.api import register_prior
from bayes_transfer.hub.fetch import ENV_OFFLINE, is_file_url, is_remote, offline_mode
from bayes_transfer.hub.hf import (DEFAULT_FILENAME, ENV_HF_OFFLINE, hf_offline, hf_token,
                                   hf_upload, is_hf, parse_hf)
from bayes_transfer.hub.registry import (published_url, registry_json, valid_name,
                                         writable_registry_file)

__all__ = ["PackedArtifact", "Published", "pack_prior", "publish_prior", "packed_name"]

PACKED_SUFFIX = ".tar.gz"


@dataclasses.dataclass(frozen=True)
class PackedArtifact:
    """A packed prior: where it is, its bytes, and the two digests."""

    path: Path
    size: int            # bytes of the packed file
    file_sha256: str     # sha256 of the packed file's bytes
    sha256: str          # the artifact digest (metadata["sha256"]): what registries pin


def packed_name(artifact_dir) -> str:
    """The default packed file name of an artifact directory: ``<dir name>.tar.gz``."""
    name = Path(artifact_dir).expanduser().absolute().name
    if not name:
        raise ArtifactError(f"cannot name a packed file after {artifact_dir!r}; pass out=")
    return name + PACKED_SUFFIX


def pack_prior(artifact_dir, out=None, *, overwrite: bool = False) -> PackedArtifact:
    """Pack the artifact directory ``artifact_dir`` into one deterministic ``.tar.gz``.

    ``out`` defaults to ``<artifact_dir>.tar.gz`` beside the directory. The artifact is
    verified completely first; the file is written atomically. An existing ``out`` is
    an ArtifactError unless ``overwrite``.
    """
    src = Path(artifact_dir).expanduser()
    if not src.is_dir():
        raise ArtifactError(f"{src} is not an artifact directory: pack the directory that "
                            f"holds metadata.json and arrays/")
    target = Path(out).expanduser() if out is not None \
        else src.absolute().with_name(packed_name(src))
    path = pack_artifact(src, target, overwrite=overwrite)
    return PackedArtifact(path=path, size=path.stat().st_size, file_sha256=sha256_file(path),
                          sha256=read_metadata(src, verify=False)["sha256"])


# ====================================================================== publishing
@dataclasses.dataclass(frozen=True)
class Published:
    """What :func:`publish_prior` did."""

    name: str
    packed: PackedArtifact
    location: str            # where users download it from (URL or hf:// reference)
    registry: Path           # the registry file written
    uploaded: bool           # whether the packed file was uploaded (to=)
    model_card: Path


def _package_dir() -> Path:
    import bayes_transfer

    return Path(bayes_transfer.__file__).resolve().parent


def _refuse_package(path: Path, what: str) -> None:
    package = _package_dir()
    if Path(path).expanduser().resolve().is_relative_to(package):
        raise HubError(f"refusing to write the {what} {path} inside the installed package "
                       f"({package}): publishing writes your own files; pass a path outside "
                       f"it")


def _model_card(artifact_dir: Path, model_card) -> Path:
    card = Path(model_card).expanduser() if model_card is not None \
        else artifact_dir.absolute().with_name(artifact_dir.absolute().name + ".md")
    hint = (f"write a model card (markdown: what the prior was learned on and how, its "
            f"quality, license and intended use) at {card}" if model_card is None else
            "pass --model-card (model_card=) a markdown file")
    if not card.is_file():
        raise HubError(f"a published prior needs a model card, and there is no file {card}: "
                       f"{hint}")
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HubError(f"cannot read the model card {card} ({e}); {hint}") from None
    if not text.strip():
        raise HubError(f"the model card {card} is empty: {hint}")
    return card


def _kept_locations(reg_file: Path, name: str) -> list[str]:
    """The existing entry's local locations (absolute), to keep as first mirrors."""
    if not reg_file.is_file():
        return []
    raw = (registry_json(reg_file.read_bytes(), reg_file).get("priors") or {}).get(name) or {}
    locs = [raw.get("location")] + list(raw.get("locations") or [])
    return [str(reg_file.parent / loc) for loc in locs
            if isinstance(loc, str) and loc and not is_remote(loc) and not is_file_url(loc)
            and (reg_file.parent / loc).exists()]


def publish_prior(artifact_dir, name: str, *, registry=None, to: str | None = None,
                  model_card=None, out=None, base_url: str | None = None,
                  license: str | None = None, description: str | None = None,
                  overwrite: bool = False) -> Published:
    """Pack the artifact ``artifact_dir``, check its model card, upload it if asked, and
    write its registry entry.

    Args:
      artifact_dir: the artifact directory.
      name: the registered name, e.g. ``"my-lab/fmnist-small-cnn"``.
      registry: your registry file (created if missing; default: the one
        ``$BAYES_TRANSFER_REGISTRY`` names). Never the installed package's.
      to: ``hf://OWNER/REPO[@BRANCH][/PATH]``: upload the packed file (and the model card,
        as ``README.md`` next to the default ``prior.tar.gz``) to that Hugging Face model
        repository in one commit; the entry pins that commit. Needs huggingface_hub and
        a token with write access. Without ``to`` nothing is uploaded and the location is
        ``base_url`` (default :data:`~bayes_transfer.hub.PUBLISH_BASE_URL`) + the packed
        file's name.
      model_card: a non-empty markdown file (default: ``<artifact_dir>.md`` beside it).
      out: the packed file (default: ``<name with '/' as '-'>.tar.gz`` beside the
        artifact directory).
      license, description: entry fields.
      overwrite: replace an existing packed file ``out``.

    Local locations of an existing entry are kept before the new one (offline mirrors).
    """
    if not valid_name(name):
        raise RegistryError(f"invalid prior name {name!r}: use '/'-separated parts of letters, "
                            f"digits, '.', '_' and '-', e.g. 'my-lab/fmnist-small-cnn'")
    src = Path(artifact_dir).expanduser()
    if not src.is_dir():
        raise ArtifactError(f"{src} is not an artifact directory: publish the directory that "
                            f"holds metadata.json and arrays/")
    reg_file = writable_registry_file(registry)
    _refuse_package(reg_file, "registry")
    card = _model_card(src, model_card)
    target = None
    if to is not None:
        if not is_hf(to):
            raise HubError(f"--to takes an hf://OWNER/REPO[@BRANCH][/PATH] reference, got "
                           f"{to!r}; to publish on a web server, leave --to out, upload the "
                           f"packed file yourself and pass --base-url")
        target = parse_hf(to)
        if offline_mode(None) or hf_offline():
            raise HubError(f"cannot upload to {to}: offline mode is on ({ENV_OFFLINE} or "
                           f"{ENV_HF_OFFLINE}); unset it, or publish without --to")
        if not hf_token():
            raise HubError(f"publishing to {to} needs a Hugging Face token with write "
                           f"access: run `hf auth login` (or `huggingface-cli login`), or set "
                           f"HF_TOKEN; nothing was packed, uploaded or registered")
    out = Path(out).expanduser() if out is not None \
        else src.absolute().with_name(name.replace("/", "-") + PACKED_SUFFIX)
    _refuse_package(out, "packed file")
    packed = pack_prior(src, out, overwrite=overwrite)
    if target is not None:
        card_name = "README.md" if target.filename == DEFAULT_FILENAME else \
            target.filename.removesuffix(PACKED_SUFFIX).removesuffix(".tar") + ".md"
        commit = hf_upload(target, {target.filename: packed.path, card_name: card},
                           message=f"Publish prior {name} (sha256 {packed.sha256[:16]})")
        location = str(target.at(commit))
    else:
        location = published_url(packed.path.name, base_url)
    register_prior(packed.path, name, registry=reg_file,
                   location=_kept_locations(reg_file, name) + [location], model_card=card,
                   license=license, description=description)
    return Published(name=name, packed=packed, location=location, registry=reg_file,
                     uploaded=target is not None, model_card=card)
