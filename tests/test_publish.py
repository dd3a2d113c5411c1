"""Packing and publishing priors: deterministic packed files, the published registry
entries (mirrors under the one publishing base URL), `priors publish`."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from bayes_transfer import hub
from bayes_transfer.artifacts import read_metadata, read_prior
from bayes_transfer.artifacts.tar import created_epoch
from bayes_transfer.cli import main as cli_main

from prior_server import Server, Toy, assert_same_prior, write_registry


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Toy:
    return Toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in (hub.ENV_REGISTRY, hub.ENV_OFFLINE, "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


# ====================================================================== packing
def test_pack_gives_the_same_bytes_for_the_same_artifact(toy, tmp_path):
    first = hub.pack_prior(toy.dir, tmp_path / "a.tar.gz")
    again = hub.pack_prior(toy.dir, tmp_path / "b.tar.gz")
    assert first.path.read_bytes() == again.path.read_bytes() == toy.data
    # A copy elsewhere, with other file times and modes, packs to the same bytes.
    copy = shutil.copytree(toy.dir, tmp_path / "elsewhere" / "renamed-prior")
    for i, file in enumerate(sorted(p for p in copy.rglob("*") if p.is_file())):
        os.utime(file, (1_000_000_000 + i, 1_000_000_000 + 7 * i))
        file.chmod(0o600 if i % 2 else 0o664)
    moved = hub.pack_prior(copy, tmp_path / "c.tar.gz")
    assert moved.path.read_bytes() == toy.data
    assert (moved.file_sha256, moved.sha256, moved.size) == \
        (toy.file_sha256, toy.sha256, len(toy.data))


def test_packed_file_layout_is_fixed(toy):
    raw = toy.data
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] == 0          # gzip, no FNAME flag
    assert raw[4:8] == b"\0\0\0\0"                               # no time in the header
    meta = read_metadata(toy.dir)
    with tarfile.open(toy.packed) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == ["metadata.json"] + sorted(meta["files"])
    for m in members:
        assert m.isfile() and (m.mode, m.uid, m.gid, m.uname, m.gname) == (0o644, 0, 0, "", "")
        assert m.mtime == created_epoch(meta) > 0
    with gzip.open(toy.packed) as f:                            # one gzip member
        assert len(f.read()) % tarfile.RECORDSIZE == 0


def test_packed_artifact_reads_back_as_the_same_prior(toy, tmp_path):
    assert_same_prior(read_prior(toy.packed), toy.prior)
    assert read_prior(toy.packed, sha256=toy.sha256).metadata == read_metadata(toy.dir)
    assert_same_prior(hub.load_prior(toy.packed, sha256=toy.sha256), toy.prior)


def test_pack_cli(toy, tmp_path, capsys):
    src = shutil.copytree(toy.dir, tmp_path / "my-prior")
    assert cli_main(["priors", "pack", str(src)]) == 0
    out = capsys.readouterr().out
    packed = tmp_path / "my-prior.tar.gz"                       # default: DIR.tar.gz
    assert packed.read_bytes() == toy.data
    assert toy.sha256 in out and toy.file_sha256 in out
    assert cli_main(["priors", "pack", str(src)]) == 2          # no silent overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["priors", "pack", str(src), "--out", str(tmp_path / "x.tar.gz")]) == 0
    assert (tmp_path / "x.tar.gz").read_bytes() == toy.data
    assert cli_main(["priors", "pack", str(tmp_path / "nothing-here")]) == 2
    assert "not an artifact directory" in capsys.readouterr().err


# ====================================================================== published entries
REPO_REGISTRY = Path(__file__).resolve().parents[1] / "priors" / "registry.json"
NOTEBOOK_BUILD = Path(__file__).resolve().parents[1] / "notebooks" / "build.py"


@pytest.fixture(scope="module")
def repo_packed(tmp_path_factory):
    """{name: PackedArtifact} of the repository registry's priors, packed from their
    local directories (the first location)."""
    reg = hub.load_registry(REPO_REGISTRY)
    out = tmp_path_factory.mktemp("repo-packed")
    return {name: hub.pack_prior(e.locations[0], out / Path(e.locations[0]).with_suffix(
        ".tar.gz").name) for name, e in reg.entries.items()}


def test_publish_base_url_is_one_constant():
    assert hub.PUBLISH_BASE_URL.startswith("https://") and hub.PUBLISH_BASE_URL.endswith("/")
    assert hub.published_url("a-b.tar.gz") == hub.PUBLISH_BASE_URL + "a-b.tar.gz"
    assert hub.published_url("x.tar.gz", "http://127.0.0.1:9/p") == "http://127.0.0.1:9/p/x.tar.gz"
    # the notebooks' repository address and the publishing base move together
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_BUILD)
    if spec is None or not NOTEBOOK_BUILD.is_file():
        pytest.skip("no notebooks/build.py")
    text = NOTEBOOK_BUILD.read_text()
    repository = re.search(r'^REPOSITORY = "([^"]+)"', text, re.M).group(1)
    assert f"/{repository}/" in hub.PUBLISH_BASE_URL, \
        "PUBLISH_BASE_URL and notebooks/build.py's REPOSITORY name different homes"


def test_repository_priors_are_packed_files_under_the_publishing_base(repo_packed):
    reg = hub.load_registry(REPO_REGISTRY)
    assert len(reg.entries) >= 2
    for name, entry in reg.entries.items():
        local, *mirrors = entry.locations
        assert Path(local).is_dir() and Path(local).parent == REPO_REGISTRY.parent, name
        urls = [m for m in mirrors if m.startswith(("https://", "http://", "hf://"))]
        assert urls, f"{name} has no download location"
        published = [u for u in urls if u.startswith(hub.PUBLISH_BASE_URL)]
        assert published == [hub.published_url(Path(local).name + ".tar.gz")], name
        packed = repo_packed[name]
        # the pins are what the hub checks: the artifact digest, and the packed size
        assert entry.sha256 == packed.sha256 == read_metadata(local)["sha256"], name
        assert entry.size == packed.size, f"{name}: re-pack and update 'size'"


def test_repository_priors_download_from_their_mirror(repo_packed, tmp_path):
    """Without the local directories (a pip user), each prior is fetched from its URL on
    first use, verified and cached; then it loads offline."""
    server = Server()
    try:
        doc = json.loads(REPO_REGISTRY.read_text())
        for name, raw in doc["priors"].items():
            url = [u for u in raw["locations"] if u.startswith(hub.PUBLISH_BASE_URL)][0]
            path = "/releases/" + url[len(hub.PUBLISH_BASE_URL):]
            server.routes[path] = repo_packed[name].path.read_bytes()
            raw["location"] = "not-here/" + raw["location"]           # no local copy
            raw["locations"] = [server.base + "/missing/x.tar.gz", server.base + path]
            raw["model_card"] = None
        registry = write_registry(tmp_path / "registry.json", doc["priors"])
        cache = tmp_path / "cache"
        for name in doc["priors"]:
            state, _ = hub.status(hub.load_registry(registry).entries[name], cache_dir=cache)
            assert state == "remote"
            prior = hub.load_prior(name, registry=registry, cache_dir=cache)
            local = read_prior(REPO_REGISTRY.parent / doc["priors"][name]["location"][9:])
            assert_same_prior(prior, local)
        gets = [r for r in server.requests if r[0] == "GET"]
        assert len(gets) == 2 * len(doc["priors"])         # the dead mirror, then the good one
        assert sorted(p.name for p in cache.iterdir()) == \
            sorted(e["sha256"] for e in doc["priors"].values())
        for name in doc["priors"]:                          # warm cache: no network at all
            hub.load_prior(name, registry=registry, cache_dir=cache, offline=True)
        assert len(server.requests) == len(gets)
    finally:
        server.close()
