"""hf:// references through huggingface_hub, against a stand-in for the Hugging Face Hub
on 127.0.0.1 (``HF_ENDPOINT``): pinned revisions, our digest on top, missing repository,
revision or file, interrupted downloads, offline modes."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("huggingface_hub")

from bayes_transfer import hub  # noqa: E402
from bayes_transfer.errors import (ChecksumMismatchError, DownloadError, HubError,  # noqa: E402
                                   OfflineModeError, RegistryError)
from bayes_transfer.hub.hf import parse_hf  # noqa: E402

from prior_server import FakeHub, Server, Toy, assert_same_prior, write_registry  # noqa: E402

NAME = "lab/toy"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Toy:
    return Toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Toy:
    return Toy(tmp_path_factory.mktemp("other"), seed=1)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    server = Server()
    for var in (hub.ENV_REGISTRY, hub.ENV_OFFLINE, "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.base)
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    yield FakeHub(server)
    server.close()


def entry(location, art: Toy, **over) -> dict:
    return {"location": location, "sha256": art.sha256, "size": art.size,
            "architecture": {"arch": "small_cnn", "num_classes": 3, "in_channels": 1},
            **over}


def cache_names(tmp_path) -> list[str]:
    cache = tmp_path / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ====================================================================== references
def test_parse_references():
    ref = parse_hf("hf://my-lab/fmnist.prior@abc123/sub/p.tar.gz")
    assert (ref.repo_id, ref.revision, ref.filename) == ("my-lab/fmnist.prior", "abc123",
                                                         "sub/p.tar.gz")
    ref = parse_hf("hf://my-lab/p")
    assert (ref.revision, ref.filename, str(ref)) == (None, "prior.tar.gz",
                                                      "hf://my-lab/p/prior.tar.gz")
    assert str(ref.at("c0ffee")) == "hf://my-lab/p@c0ffee/prior.tar.gz"
    for bad in ("hf://just-owner", "hf://a/b/../x.tar.gz", "hf://a/b@/x", "hf://-a/b",
                "hf://a/b//x.tar.gz"):
        with pytest.raises(HubError, match="hf://OWNER/REPO"):
            parse_hf(bad)


def test_registry_entries_must_pin_a_revision(toy, tmp_path):
    reg = write_registry(tmp_path / "r.json", {NAME: entry("hf://lab/toy/prior.tar.gz", toy)})
    with pytest.raises(RegistryError, match="names no revision: pin it"):
        hub.load_registry(reg)
    reg = write_registry(tmp_path / "r.json", {NAME: entry("hf://lab", toy)})
    with pytest.raises(RegistryError, match="not a Hugging Face reference"):
        hub.load_registry(reg)


# ====================================================================== downloads
def test_good_download_at_a_pinned_revision(fake, toy, other, tmp_path):
    first = fake.add("lab/toy", {"prior.tar.gz": toy.data, "README.md": b"# toy"})
    fake.add("lab/toy", {"prior.tar.gz": other.data})          # main moves on
    reg = write_registry(tmp_path / "r.json", {NAME: entry(f"hf://lab/toy@{first}", toy)})
    assert hub.status(hub.load_registry(reg).entries[NAME])[0] == "remote"
    prior = hub.load_prior(NAME, registry=reg)
    assert_same_prior(prior, toy.prior)                         # the pinned commit's file
    assert ("GET", f"/lab/toy/resolve/{first}/prior.tar.gz") in fake.file_requests
    assert cache_names(tmp_path) == [toy.sha256]               # nothing else is kept
    n = len(fake.server.requests)
    hub.load_prior(NAME, registry=reg)                          # a cache hit: no request
    assert len(fake.server.requests) == n
    # a direct reference to a branch, pinned by our digest
    latest = hub.load_prior("hf://lab/toy@main", sha256=other.sha256)
    assert_same_prior(latest, other.prior)


def test_wrong_digest_is_refused(fake, toy, other, tmp_path):
    commit = fake.add("lab/toy", {"prior.tar.gz": other.data})  # not the registered one
    reg = write_registry(tmp_path / "r.json",
                         {NAME: entry(f"hf://lab/toy@{commit}/prior.tar.gz", toy, size=None)})
    with pytest.raises(ChecksumMismatchError, match=f"pinned to {toy.sha256}"):
        hub.load_prior(NAME, registry=reg)
    assert cache_names(tmp_path) == []
    reg = write_registry(tmp_path / "r.json",                  # the registered size is wrong
                         {NAME: entry(f"hf://lab/toy@{commit}", other, size=other.size + 1)})
    with pytest.raises(DownloadError, match="registry lists size"):
        hub.load_prior(NAME, registry=reg)
    assert cache_names(tmp_path) == []


@pytest.mark.parametrize("ref,message", [
    ("hf://lab/toy@{missing}/prior.tar.gz", "has no revision"),
    ("hf://lab/toy@{commit}/other.tar.gz", "no file 'other.tar.gz'"),
    ("hf://lab/nothing@{commit}/prior.tar.gz", "no repository 'lab/nothing'"),
])
def test_missing_revision_file_or_repository(fake, toy, tmp_path, ref, message):
    commit = fake.add("lab/toy", {"prior.tar.gz": toy.data})
    ref = ref.format(commit=commit, missing="0" * 40)
    reg = write_registry(tmp_path / "r.json", {NAME: entry(ref, toy)})
    with pytest.raises(DownloadError, match=message):
        hub.load_prior(NAME, registry=reg)
    assert cache_names(tmp_path) == []


def test_interrupted_download_leaves_nothing(fake, toy, tmp_path):
    commit = fake.add("lab/toy", {"prior.tar.gz": toy.data})
    fake.cut_after, fake.after_cut = toy.size // 2, "fail"      # cut, then the server is gone
    reg = write_registry(tmp_path / "r.json", {NAME: entry(f"hf://lab/toy@{commit}", toy)})
    with pytest.raises(DownloadError, match="nothing was kept"):
        hub.load_prior(NAME, registry=reg)
    assert fake.cut_done
    assert cache_names(tmp_path) == []                          # no entry, no scratch files


def test_interrupted_download_is_retried_and_verified(fake, toy, tmp_path):
    commit = fake.add("lab/toy", {"prior.tar.gz": toy.data})
    fake.cut_after, fake.after_cut = toy.size // 3, "resume"
    reg = write_registry(tmp_path / "r.json", {NAME: entry(f"hf://lab/toy@{commit}", toy)})
    assert_same_prior(hub.load_prior(NAME, registry=reg), toy.prior)
    gets = [p for m, p, _ in fake.server.requests if m == "GET"]
    assert len(gets) == 2 and fake.cut_done                      # huggingface_hub retried
    assert cache_names(tmp_path) == [toy.sha256]


def test_mirrors_after_a_failing_hub_location(fake, toy, tmp_path):
    fake.server.routes["/mirror/p.tar.gz"] = toy.data
    reg = write_registry(tmp_path / "r.json", {NAME: entry(
        "hf://lab/gone@" + "1" * 40, toy, locations=[fake.server.base + "/mirror/p.tar.gz"])})
    assert_same_prior(hub.load_prior(NAME, registry=reg), toy.prior)


# ====================================================================== offline
@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", hub.ENV_OFFLINE])
def test_offline_with_a_warm_cache(fake, toy, tmp_path, monkeypatch, variable):
    commit = fake.add("lab/toy", {"prior.tar.gz": toy.data})
    reg = write_registry(tmp_path / "r.json", {NAME: entry(f"hf://lab/toy@{commit}", toy)})
    monkeypatch.setenv(variable, "1")
    with pytest.raises(OfflineModeError, match=f"unset {variable}"):      # cold cache
        hub.load_prior(NAME, registry=reg)
    assert fake.server.requests == [] and cache_names(tmp_path) == []
    monkeypatch.delenv(variable)
    hub.download(NAME, registry=reg)                                       # warm it
    n = len(fake.server.requests)
    monkeypatch.setenv(variable, "1")
    assert_same_prior(hub.load_prior(NAME, registry=reg), toy.prior)
    assert_same_prior(hub.load_prior(f"hf://lab/toy@{commit}", sha256=toy.sha256), toy.prior)
    assert len(fake.server.requests) == n                                  # no request at all


def test_hf_offline_still_uses_plain_mirrors(fake, toy, tmp_path, monkeypatch):
    fake.server.routes["/mirror/p.tar.gz"] = toy.data
    commit = fake.add("lab/toy", {"prior.tar.gz": toy.data})
    reg = write_registry(tmp_path / "r.json", {NAME: entry(
        f"hf://lab/toy@{commit}", toy, locations=[fake.server.base + "/mirror/p.tar.gz"])})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_prior(hub.load_prior(NAME, registry=reg), toy.prior)
    assert fake.file_requests == []                                        # the Hub untouched


# ====================================================================== the optional extra
def test_without_huggingface_hub_the_error_says_what_to_install(fake, toy, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)      # `import` raises
    with pytest.raises(HubError, match=r"pip install 'bayes_transfer\[hf\]'"):
        hub.load_prior("hf://lab/toy@main", sha256=toy.sha256)
    assert cache_names(tmp_path) == []


def test_huggingface_hub_is_imported_only_for_hf_references():
    code = ("import sys, bayes_transfer, bayes_transfer.hub, bayes_transfer.cli; "
            "assert 'huggingface_hub' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
