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
from bayes_transfer import errors as hub_errors
from bayes_transfer.cli import main as cli_main
from bayes_transfer.errors import HubError

from prior_server import FakeHub, Server, Toy, assert_same_prior, write_registry


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


# ====================================================================== publish
@pytest.fixture
def mine(toy, tmp_path):
    """A copy of the toy artifact at tmp/my-prior with its model card tmp/my-prior.md."""
    src = shutil.copytree(toy.dir, tmp_path / "my-prior")
    (tmp_path / "my-prior.md").write_text("# my prior\n\nLearned on toy data.\n")
    return src


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_publish_without_upload_registers_the_base_url(toy, mine, tmp_path, server, capsys):
    registry = tmp_path / "reg" / "registry.json"
    code = cli_main(["priors", "publish", str(mine), "--name", "me/my-prior", "--registry",
                     str(registry), "--base-url", server.base + "/dl/", "--license", "MIT"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    packed = tmp_path / "me-my-prior.tar.gz"                    # NAME, '/' as '-'
    assert packed.read_bytes() == toy.data
    assert "nothing was uploaded" in out and str(packed) in out
    raw = json.loads(registry.read_text())["priors"]["me/my-prior"]
    assert raw["location"] == server.base + "/dl/me-my-prior.tar.gz"
    assert (raw["sha256"], raw["size"], raw["license"]) == (toy.sha256, toy.size, "MIT")
    assert (registry.parent / raw["model_card"]).resolve() == (tmp_path / "my-prior.md").resolve()
    with pytest.raises(hub_errors.DownloadError, match="404"):          # not uploaded yet
        hub.load_prior("me/my-prior", registry=registry)
    server.routes["/dl/me-my-prior.tar.gz"] = packed.read_bytes()       # "upload" it
    assert_same_prior(hub.load_prior("me/my-prior", registry=registry), toy.prior)
    # by default the location is under the project's one publishing base
    done = hub.publish_prior(mine, "me/other", registry=registry, out=tmp_path / "o.tar.gz")
    assert done.location == hub.PUBLISH_BASE_URL + "o.tar.gz" and not done.uploaded
    assert hub.load_registry(registry).entries["me/other"].locations == (done.location,)


def test_publish_keeps_an_entrys_local_locations_first(toy, mine, tmp_path):
    registry = write_registry(tmp_path / "registry.json", {"me/my-prior": {
        "location": "my-prior", "locations": ["https://old.example/x.tar.gz"],
        "sha256": None}})
    done = hub.publish_prior(mine, "me/my-prior", registry=registry)
    raw = json.loads(registry.read_text())["priors"]["me/my-prior"]
    assert raw["location"] == "my-prior"                                # offline mirror
    assert raw["locations"] == [hub.PUBLISH_BASE_URL + "me-my-prior.tar.gz"] == [done.location]
    assert raw["sha256"] == toy.sha256
    assert hub.status(hub.load_registry(registry).entries["me/my-prior"])[0] == "local"


@pytest.mark.parametrize("card", [None, "", " \n\t\n"])
def test_publish_needs_a_model_card(toy, tmp_path, card, capsys):
    src = shutil.copytree(toy.dir, tmp_path / "p")
    if card is not None:
        (tmp_path / "p.md").write_text(card)
    registry = tmp_path / "registry.json"
    assert cli_main(["priors", "publish", str(src), "--name", "me/p", "--registry",
                     str(registry)]) == 2
    err = capsys.readouterr().err
    assert ("is empty" if card is not None else "needs a model card") in err
    assert str(tmp_path / "p.md") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"] + (["p.md"] if card is not None
                                                                  else [])
    with pytest.raises(HubError, match="no file .*nope.md"):
        hub.publish_prior(src, "me/p", registry=registry, model_card=tmp_path / "nope.md")


def test_publish_never_writes_into_the_package(mine, tmp_path):
    before = hub.BUILTIN_REGISTRY.read_bytes()
    with pytest.raises(HubError, match="inside the installed package"):
        hub.publish_prior(mine, "me/p", registry=hub.BUILTIN_REGISTRY)
    with pytest.raises(HubError, match="inside the installed package"):
        hub.publish_prior(mine, "me/p", registry=tmp_path / "r.json",
                          out=hub.BUILTIN_REGISTRY.parent / "p.tar.gz")
    assert hub.BUILTIN_REGISTRY.read_bytes() == before
    assert not (hub.BUILTIN_REGISTRY.parent / "p.tar.gz").exists()
    assert not (tmp_path / "r.json").exists()


def test_publish_to_a_web_server_is_not_an_upload_target(mine, tmp_path):
    with pytest.raises(HubError, match="takes an hf://OWNER/REPO"):
        hub.publish_prior(mine, "me/p", registry=tmp_path / "r.json",
                          to="https://example.org/p.tar.gz")


def test_publish_to_hf_needs_a_token(mine, tmp_path, monkeypatch, capsys):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", None)                 # must not be used
    registry = tmp_path / "r.json"
    assert cli_main(["priors", "publish", str(mine), "--name", "me/p", "--registry",
                     str(registry), "--to", "hf://me/p"]) == 2
    err = capsys.readouterr().err
    assert "needs a Hugging Face token" in err and "hf auth login" in err
    assert not registry.exists() and not (tmp_path / "me-p.tar.gz").exists()


def test_publish_to_hf_uploads_and_pins_the_commit(toy, mine, tmp_path, monkeypatch, server):
    """The upload goes through huggingface_hub.HfApi (replaced here by a stand-in that
    commits into the stand-in Hub); the download through the real hf_hub_download."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    fake = FakeHub(server)
    calls = []

    class FakeApi:
        def __init__(self, endpoint=None, token=None, **kwargs):
            calls.append(("init", endpoint, token))

        def create_repo(self, repo_id, exist_ok=False, **kwargs):
            calls.append(("create_repo", repo_id, exist_ok))

        def create_commit(self, repo_id, operations, commit_message, revision=None, **kw):
            files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
                     for op in operations}
            calls.append(("commit", repo_id, sorted(files), revision, commit_message))
            return type("CommitInfo", (), {"oid": fake.add(repo_id, files,
                                                           revision or "main")})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    registry = tmp_path / "r.json"
    done = hub.publish_prior(mine, "me/p", registry=registry, to="hf://me/toy-prior")
    commit = fake.repos["me/toy-prior"]["refs"]["main"]
    assert done.uploaded and done.location == f"hf://me/toy-prior@{commit}/prior.tar.gz"
    assert calls[0] == ("init", server.base, "hf_test_token")
    assert calls[1] == ("create_repo", "me/toy-prior", True)
    assert calls[2][:4] == ("commit", "me/toy-prior", ["README.md", "prior.tar.gz"], None)
    files = fake.repos["me/toy-prior"]["commits"][commit]
    assert files["prior.tar.gz"] == toy.data
    assert files["README.md"] == (tmp_path / "my-prior.md").read_bytes()
    entry = hub.load_registry(registry).entries["me/p"]
    assert entry.locations == (done.location,) and entry.sha256 == toy.sha256
    assert_same_prior(hub.load_prior("me/p", registry=registry), toy.prior)
    # another path in the repository: the card goes beside it
    done = hub.publish_prior(mine, "me/q", registry=registry, out=tmp_path / "q.tar.gz",
                             to="hf://me/toy-prior/priors/q.tar.gz")
    assert calls[-1][2] == ["priors/q.md", "priors/q.tar.gz"]
    assert done.location.endswith("/priors/q.tar.gz") and "@" in done.location


def test_publish_to_hf_refused_upload_registers_nothing(mine, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    class Refused(Exception):
        response = type("Response", (), {"status_code": 403})()

    class NoWriteApi:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            raise Refused("403 Forbidden: you cannot create a repository in this namespace")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoWriteApi)
    monkeypatch.setenv("HF_TOKEN", "hf_read_only")
    registry = tmp_path / "r.json"
    with pytest.raises(HubError, match="write access.*nothing was registered"):
        hub.publish_prior(mine, "me/p", registry=registry, to="hf://someone-else/p")
    assert not registry.exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                        # offline: no upload
    with pytest.raises(HubError, match="offline mode is on"):
        hub.publish_prior(mine, "me/p", registry=registry, to="hf://me/p")
    assert not registry.exists()
