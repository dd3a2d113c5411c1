"""The prior hub: names, paths and URLs; verified, atomic, cached downloads; the CLI.

Artifacts are served by a local HTTP server on 127.0.0.1 (a thread, port 0) that can
misbehave on request: HTTP errors, short bodies, wrong Content-Length, stalls.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from bayes_transfer import hub
from bayes_transfer.artifacts import pack_artifact, save_prior
from bayes_transfer.hub import fetch as hub_fetch
from bayes_transfer.cli.priors import add_parsers as add_priors_parser
from bayes_transfer.errors import (ArtifactIntegrityError, BayesTransferError,
                                   ChecksumMismatchError, DownloadError, HubError,
                                   OfflineModeError, RegistryError, UnknownPriorError)
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from prior_server import METADATA, serve, toy_params as _params

NAME = "toy/lowrank"
#: the demo prior, in the registry built into the package
BUILTIN_NAME = "fashion-mnist/small-cnn"
#: the repository's registry of the other published priors (tests may read the repository)
REPO_REGISTRY = Path(__file__).resolve().parents[1] / "priors" / "registry.json"


# ====================================================================== fixtures


class Artifact:
    """One small low-rank prior, saved as a directory and packed as .tar.gz."""

    def __init__(self, root: Path, seed: int = 0, scale: float = 2.0):
        spec = ParamSpec.from_params(_params())
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
        d = spec.size
        self.prior = Prior.lowrank(spec, jax.random.normal(k1, (d,)),
                                   np.exp(jax.random.normal(k2, (d,)) - 2.0),
                                   0.1 * jax.random.normal(k3, (3, d)), scale=scale, floor=1e-4)
        self.dir = save_prior(self.prior, root / f"prior-{seed}", metadata=METADATA)
        self.packed = pack_artifact(self.dir, root / f"prior-{seed}.tar.gz")
        self.data = self.packed.read_bytes()
        self.size = len(self.data)
        self.sha256 = json.loads((self.dir / "metadata.json").read_text())["sha256"]


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Artifact:
    return Artifact(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def other(tmp_path_factory) -> Artifact:
    return Artifact(tmp_path_factory.mktemp("other"), seed=1, scale=5.0)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for var in (hub.ENV_REGISTRY, hub.ENV_OFFLINE, hub.ENV_CACHE):
        monkeypatch.delenv(var, raising=False)
    # Never touch the user's cache; never route 127.0.0.1 through a proxy.
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "default-cache"))
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


class Server:
    """``routes[path] = dict(body=..., status=200, length=None, send=None, stall=False)``.

    ``length`` overrides the Content-Length header (``-1``: none); ``send`` sends only
    that many body bytes and closes the connection; ``stall`` waits before the body.
    """

    def __init__(self):
        self.routes: dict[str, dict] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                body, status = route["body"], route.get("status", 200)
                if status != 200:
                    self.send_error(status)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                length = route.get("length", len(body))
                if length is not None and length >= 0:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                if route.get("stall"):
                    server.release.wait(10)          # bounded: teardown sets it
                    return
                send = route.get("send")
                self.wfile.write(body if send is None else body[:send])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd, self.thread, self.base = serve(Handler)

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def write_registry(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps({"format": hub.REGISTRY_FORMAT, "format_version": 1,
                                "priors": entries}, indent=2))
    return path


def url_entry(url, art: Artifact, **over) -> dict:
    return {"location": url, "sha256": art.sha256, "size": art.size,
            "architecture": METADATA["architecture"], "source": METADATA["source"],
            "method": "supervised+swag-lowrank", "license": "CC0-1.0",
            "recommended_scale": METADATA["recommended_scale"], "model_card": None, **over}


def cache_contents(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def assert_same_prior(a: Prior, b: Prior):
    assert (a.kind, a.spec) == (b.kind, b.spec)
    for name in ("mean", "var", "deviations", "scale", "floor"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


# ====================================================================== downloads
def test_download_by_name(art, server, tmp_path):
    server.routes["/p.tar.gz"] = {"body": art.data}
    reg = write_registry(tmp_path / "registry.json", {NAME: url_entry(server.url("/p.tar.gz"),
                                                                      art)})
    cache = tmp_path / "cache"
    prior = hub.load_prior(NAME, registry=reg, cache_dir=cache, model_params=_params())
    assert_same_prior(prior, art.prior)
    assert prior.metadata["sha256"] == art.sha256
    assert cache_contents(cache) == [art.sha256]          # one entry, no temporaries
    assert server.requests == ["/p.tar.gz"]
    # init_params works as with pretrained weights
    init = prior.init_params(_params())
    np.testing.assert_array_equal(prior.spec.ravel(init), np.asarray(art.prior.mean))
    np.testing.assert_array_equal(init["head"]["kernel"], 0.0)


def test_cache_hit_makes_no_request(art, server, tmp_path):
    server.routes["/p.tar.gz"] = {"body": art.data}
    reg = write_registry(tmp_path / "r.json", {NAME: url_entry(server.url("/p.tar.gz"), art)})
    cache = tmp_path / "cache"
    hub.load_prior(NAME, registry=reg, cache_dir=cache)
    assert len(server.requests) == 1
    prior = hub.load_prior(NAME, registry=reg, cache_dir=cache)
    assert_same_prior(prior, art.prior)
    assert hub.download(NAME, registry=reg, cache_dir=cache) == cache / art.sha256
    hub.load_prior(NAME, registry=reg, cache_dir=cache, offline=True)   # offline: cache ok
    assert len(server.requests) == 1


def test_wrong_sha256_in_registry(art, other, server, tmp_path):
    server.routes["/p.tar.gz"] = {"body": art.data}
    entry = url_entry(server.url("/p.tar.gz"), art, sha256=other.sha256)
    reg = write_registry(tmp_path / "r.json", {NAME: entry})
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError) as info:
        hub.load_prior(NAME, registry=reg, cache_dir=cache)
    msg = str(info.value)
    assert art.sha256 in msg and other.sha256 in msg and "register" in msg
    assert isinstance(info.value, ArtifactIntegrityError) and isinstance(info.value, HubError)
    assert cache_contents(cache) == []


@pytest.mark.parametrize("registry_size", [True, False], ids=["size-pinned", "header-only"])
def test_truncated_download(art, server, tmp_path, registry_size):
    # Content-Length announces the full file, the server closes after half of it.
    server.routes["/p.tar.gz"] = {"body": art.data, "send": art.size // 2}
    entry = url_entry(server.url("/p.tar.gz"), art,
                      **({} if registry_size else {"size": None}))
    reg = write_registry(tmp_path / "r.json", {NAME: entry})
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="truncated|failed after") as info:
        hub.load_prior(NAME, registry=reg, cache_dir=cache)
    assert server.url("/p.tar.gz") in str(info.value)
    assert cache_contents(cache) == []                     # no entry, no temp file


def test_wrong_content_length(art, server, tmp_path):
    server.routes["/p.tar.gz"] = {"body": art.data, "length": art.size + 10}
    reg = write_registry(tmp_path / "r.json", {NAME: url_entry(server.url("/p.tar.gz"), art)})
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=f"announces {art.size + 10} bytes.*size {art.size}"):
        hub.load_prior(NAME, registry=reg, cache_dir=cache)
    assert cache_contents(cache) == []


def test_body_longer_than_registered_size(art, server, tmp_path):
    server.routes["/p.tar.gz"] = {"body": art.data + b"junk", "length": -1}
    reg = write_registry(tmp_path / "r.json", {NAME: url_entry(server.url("/p.tar.gz"), art)})
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="more than the expected"):
        hub.load_prior(NAME, registry=reg, cache_dir=cache)
    assert cache_contents(cache) == []


def test_interrupted_download_leaves_nothing(art, server, tmp_path, monkeypatch):
    server.routes["/p.tar.gz"] = {"body": art.data}
    reg = write_registry(tmp_path / "r.json", {NAME: url_entry(server.url("/p.tar.gz"), art)})

    def interrupted(*args, **kwargs):      # Ctrl-C while unpacking the downloaded file
        raise KeyboardInterrupt

    monkeypatch.setattr(hub_fetch, "unpack_artifact", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.load_prior(NAME, registry=reg, cache_dir=tmp_path / "cache")
    assert cache_contents(tmp_path / "cache") == []


def test_http_404(art, server, tmp_path):
    url = server.url("/missing.tar.gz")
    reg = write_registry(tmp_path / "r.json", {NAME: url_entry(url, art)})
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        hub.load_prior(NAME, registry=reg, cache_dir=cache)
    assert "404" in str(info.value) and url in str(info.value)
    assert cache_contents(cache) == []


def test_http_500_and_html_instead_of_artifact(server, tmp_path):
    server.routes["/err"] = {"body": b"", "status": 503}
    with pytest.raises(DownloadError, match="503"):
        hub.load_prior(server.url("/err"), cache_dir=tmp_path / "cache")
    server.routes["/page"] = {"body": b"<html><body>Sign in</body></html>"}
    with pytest.raises(DownloadError, match="did not serve a prior artifact"):
        hub.load_prior(server.url("/page"), cache_dir=tmp_path / "cache")
    assert cache_contents(tmp_path / "cache") == []


def test_stalled_download_times_out(art, server, tmp_path):
    server.routes["/slow"] = {"body": art.data, "stall": True}
    with pytest.raises(DownloadError, match="stalled|timed out"):
        hub.load_prior(server.url("/slow"), cache_dir=tmp_path / "cache", timeout=0.3)
    assert cache_contents(tmp_path / "cache") == []


def test_mirror_used_when_location_fails(art, server, tmp_path):
    server.routes["/mirror.tar.gz"] = {"body": art.data}
    entry = url_entry(server.url("/gone.tar.gz"), art,
                      locations=[server.url("/mirror.tar.gz")])
    reg = write_registry(tmp_path / "r.json", {NAME: entry})
    prior = hub.load_prior(NAME, registry=reg, cache_dir=tmp_path / "cache")
    assert_same_prior(prior, art.prior)
    assert server.requests == ["/gone.tar.gz", "/mirror.tar.gz"]


def test_all_mirrors_fail_lists_each(art, server, tmp_path):
    entry = url_entry(server.url("/a"), art, locations=[server.url("/b")])
    reg = write_registry(tmp_path / "r.json", {NAME: entry})
    with pytest.raises(DownloadError) as info:
        hub.load_prior(NAME, registry=reg, cache_dir=tmp_path / "cache")
    assert server.url("/a") in str(info.value) and server.url("/b") in str(info.value)


def test_corrupt_cache_entry_is_downloaded_again(art, server, tmp_path):
    server.routes["/p.tar.gz"] = {"body": art.data}
    reg = write_registry(tmp_path / "r.json", {NAME: url_entry(server.url("/p.tar.gz"), art)})
    cache = tmp_path / "cache"
    path = hub.download(NAME, registry=reg, cache_dir=cache)
    victim = next(p for p in sorted(path.rglob("*")) if p.is_file() and p.name != "metadata.json")
    victim.write_bytes(b"\0" * victim.stat().st_size)       # same size, wrong bytes
    with pytest.raises(HubError, match="corrupt"):
        hub.load_prior(NAME, registry=reg, cache_dir=cache, offline=True)
    with pytest.warns(UserWarning, match="corrupt"):
        prior = hub.load_prior(NAME, registry=reg, cache_dir=cache)
    assert_same_prior(prior, art.prior)
    assert len(server.requests) == 2 and cache_contents(cache) == [art.sha256]


# ====================================================================== URLs and paths
def test_http_url_ref_cached_by_url_and_by_pin(art, server, tmp_path):
    server.routes["/p.tar.gz"] = {"body": art.data}
    cache = tmp_path / "cache"
    url = server.url("/p.tar.gz")
    assert_same_prior(hub.load_prior(url, cache_dir=cache), art.prior)
    hub.load_prior(url, cache_dir=cache)
    assert len(server.requests) == 1
    (entry,) = cache_contents(cache)
    assert entry.startswith("url-")
    hub.load_prior(url, cache_dir=cache, sha256=art.sha256.upper())
    assert cache_contents(cache) == sorted([entry, art.sha256])
    with pytest.raises(ChecksumMismatchError):
        hub.load_prior(url, cache_dir=tmp_path / "cache2", sha256="0" * 64)
    assert cache_contents(tmp_path / "cache2") == []


def test_file_url_and_local_paths(art, tmp_path):
    cache = tmp_path / "cache"
    refs = [art.dir, str(art.dir), str(art.packed), art.packed.as_uri(), art.dir.as_uri()]
    for ref in refs:
        prior = hub.load_prior(ref, cache_dir=cache, offline=True)
        assert_same_prior(prior, art.prior)
    assert not cache.exists()          # local refs are loaded in place, never cached
    assert hub.verify(str(art.packed), sha256=art.sha256)["sha256"] == art.sha256
    with pytest.raises(ArtifactIntegrityError):
        hub.load_prior(art.packed, sha256="0" * 64)


def test_registry_local_locations(art, other, tmp_path):
    shutil.copytree(art.dir, tmp_path / "reg" / "toy")
    shutil.copy(art.packed, tmp_path / "reg" / "toy.tar.gz")
    reg = write_registry(tmp_path / "reg" / "registry.json", {
        NAME: url_entry("toy", art, size=None),
        "toy/packed": url_entry("toy.tar.gz", art),
        "toy/stale": url_entry("toy", art, sha256=other.sha256),
        "toy/missing": url_entry("not-there", art)})
    assert_same_prior(hub.load_prior(NAME, registry=reg), art.prior)
    assert_same_prior(hub.load_prior("toy/packed", registry=reg, offline=True), art.prior)
    with pytest.raises(ChecksumMismatchError, match="changed after it was registered"):
        hub.load_prior("toy/stale", registry=reg)
    with pytest.raises(HubError, match="does not exist"):
        hub.load_prior("toy/missing", registry=reg)
    with pytest.raises(ChecksumMismatchError, match="pins"):
        hub.load_prior(NAME, registry=reg, sha256=other.sha256)


def test_unknown_name_lists_known_and_close_match(tmp_path, art):
    reg = {"fashion-mnist/small-cnn": url_entry("x", art), "cifar10/resnet20": url_entry("y", art)}
    with pytest.raises(UnknownPriorError) as info:
        hub.load_prior("fashion-mnist/small-cn", registry=reg)
    msg = str(info.value)
    assert "did you mean 'fashion-mnist/small-cnn'" in msg
    assert "cifar10/resnet20" in msg and "fashion-mnist/small-cnn" in msg
    assert isinstance(info.value, BayesTransferError)
    with pytest.raises(UnknownPriorError, match="did you mean 'cifar10/resnet20'"):
        hub.show("resnet20", registry=reg)
    with pytest.raises(UnknownPriorError, match="no file or directory"):
        hub.load_prior(str(tmp_path / "nope.tar.gz"), registry=reg)


# ====================================================================== offline mode
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_refuses_uncached_name(art, server, tmp_path, monkeypatch, how):
    server.routes["/p.tar.gz"] = {"body": art.data}
    reg = write_registry(tmp_path / "r.json", {NAME: url_entry(server.url("/p.tar.gz"), art)})
    kwargs = {"offline": True} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    with pytest.raises(OfflineModeError, match=f"priors download {NAME}"):
        hub.load_prior(NAME, registry=reg, cache_dir=tmp_path / "cache", **kwargs)
    with pytest.raises(OfflineModeError):
        hub.load_prior(server.url("/p.tar.gz"), cache_dir=tmp_path / "cache", **kwargs)
    assert server.requests == []
    assert cache_contents(tmp_path / "cache") == []


def test_remote_registry_with_relative_location(art, server, tmp_path):
    server.routes["/hub/registry.json"] = {"body": json.dumps(
        {"priors": {NAME: url_entry("files/p.tar.gz", art)}}).encode()}
    server.routes["/hub/files/p.tar.gz"] = {"body": art.data}
    cache = tmp_path / "cache"
    reg_url = server.url("/hub/registry.json")
    assert_same_prior(hub.load_prior(NAME, registry=reg_url, cache_dir=cache), art.prior)
    n = len(server.requests)
    # offline: the registry copy and the artifact come from the cache
    assert_same_prior(hub.load_prior(NAME, registry=reg_url, cache_dir=cache, offline=True),
                      art.prior)
    assert len(server.requests) == n
    assert [e.name for e in hub.list_priors(registry=reg_url, cache_dir=tmp_path / "c2",
                                            offline=False)] == [NAME]
    with pytest.raises(OfflineModeError):
        hub.list_priors(registry=reg_url, cache_dir=tmp_path / "c3", offline=True)


def test_env_registry_and_malformed_registry(art, tmp_path, monkeypatch):
    reg = write_registry(tmp_path / "r.json", {NAME: url_entry(str(art.dir), art, size=None)})
    monkeypatch.setenv(hub.ENV_REGISTRY, str(reg))
    # the built-in registry, then the user's
    assert [e.name for e in hub.list_priors()] == sorted([NAME, BUILTIN_NAME])
    assert_same_prior(hub.load_prior(NAME), art.prior)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        hub.list_priors(registry=bad)
    with pytest.raises(RegistryError, match="sha256"):
        hub.list_priors(registry={NAME: {"location": "x", "sha256": "abc"}})
    with pytest.raises(RegistryError, match="location"):
        hub.list_priors(registry={NAME: {"sha256": None}})


# ====================================================================== several registries
def test_several_registries_merge_in_order(art, other, server, tmp_path, monkeypatch):
    """Registries are merged by name, a later one overriding an earlier one; the defaults
    are the built-in registry, then each entry of $BAYES_TRANSFER_REGISTRY."""
    a = write_registry(tmp_path / "a.json", {NAME: url_entry(str(art.dir), art, size=None),
                                             "toy/a-only": url_entry(str(art.dir), art,
                                                                     size=None)})
    b = write_registry(tmp_path / "b.json", {NAME: url_entry(str(other.dir), other, size=None)})
    reg = hub.load_registry([a, b])
    assert reg.names() == sorted([NAME, "toy/a-only"])
    assert reg.entries[NAME].sha256 == other.sha256 and reg.entries[NAME].registry == str(b)
    assert_same_prior(hub.load_prior(NAME, registry=[a, b]), other.prior)
    assert_same_prior(hub.load_prior(NAME, registry=[b, a]), art.prior)
    assert_same_prior(hub.load_prior(NAME, registry=str(a)), art.prior)    # one: only it

    # the environment: paths and URLs (a URL keeps its ':'s) separated by os.pathsep
    server.routes["/r.json"] = {"body": json.dumps({"priors": {
        "toy/remote": url_entry(server.url("/o.tar.gz"), other)}}).encode()}
    server.routes["/o.tar.gz"] = {"body": other.data}
    monkeypatch.setenv(hub.ENV_REGISTRY, os.pathsep.join([str(a), server.url("/r.json"),
                                                          str(b)]))
    assert hub.default_registries() == [hub.BUILTIN_REGISTRY, str(a), server.url("/r.json"),
                                        str(b)]
    assert [e.name for e in hub.list_priors(cache_dir=tmp_path / "c")] == sorted(
        [BUILTIN_NAME, NAME, "toy/a-only", "toy/remote"])
    assert_same_prior(hub.load_prior(NAME, cache_dir=tmp_path / "c"), other.prior)
    assert_same_prior(hub.load_prior("toy/remote", cache_dir=tmp_path / "c"), other.prior)

    # a user registry overriding a built-in prior: a warning naming both registries
    c = write_registry(tmp_path / "c.json", {BUILTIN_NAME: url_entry(str(art.dir), art,
                                                                     size=None)})
    monkeypatch.setenv(hub.ENV_REGISTRY, str(c))
    with pytest.warns(UserWarning, match="overrides the built-in prior") as record:
        prior = hub.load_prior(BUILTIN_NAME)
    message = str(next(w.message for w in record if "built-in" in str(w.message)))
    assert str(c) in message and str(hub.BUILTIN_REGISTRY) in message
    assert_same_prior(prior, art.prior)
    with pytest.warns(UserWarning, match="overrides the built-in prior"):
        assert hub.show(BUILTIN_NAME)["registry"] == str(c)


def test_builtin_registry_resolves_the_demo_prior_offline(tmp_path, monkeypatch):
    """The demo prior ships inside the package: it loads by name with the network off
    and nothing in the cache."""
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    package = Path(hub.__file__).resolve().parents[1]              # bayes_transfer/
    assert hub.BUILTIN_REGISTRY.is_relative_to(package)
    entry = hub.load_registry().get(BUILTIN_NAME)
    assert entry.registry == str(hub.BUILTIN_REGISTRY) and entry.pinned
    path = Path(entry.locations[0])
    assert path.is_relative_to(package) and Path(entry.model_card).is_relative_to(package)
    assert hub.status(entry) == ("local", path)
    cache = tmp_path / "cache"
    prior = hub.load_prior(BUILTIN_NAME, cache_dir=cache)
    assert prior.metadata["sha256"] == entry.sha256 and prior.dim == entry.raw["dim"]
    assert not cache.exists()
    assert "Model card" in hub.show(BUILTIN_NAME)["model_card_text"]


def test_register_without_a_registry_is_a_clear_error(art, tmp_path, monkeypatch, capsys):
    """register_prior never writes into the installed package: without registry= (or
    --registry, or $BAYES_TRANSFER_REGISTRY) it says what to pass."""
    builtin = hub.BUILTIN_REGISTRY.read_bytes()
    with pytest.raises(RegistryError, match=r"registry=.*--registry.*BAYES_TRANSFER_REGISTRY"):
        hub.register_prior(art.dir, NAME)
    with pytest.raises(RegistryError, match="--registry"):
        run_cli(["priors", "register", str(art.dir), "--name", NAME], capsys)
    monkeypatch.setenv(hub.ENV_REGISTRY, os.pathsep.join([str(tmp_path / "a.json"),
                                                          str(tmp_path / "b.json")]))
    with pytest.raises(RegistryError, match="names 2 registries"):
        hub.register_prior(art.dir, NAME)
    assert hub.BUILTIN_REGISTRY.read_bytes() == builtin
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
    mine = tmp_path / "mine.json"            # one registry in the environment: that one
    monkeypatch.setenv(hub.ENV_REGISTRY, str(mine))
    assert hub.register_prior(art.dir, NAME).sha256 == art.sha256
    assert list(json.loads(mine.read_text())["priors"]) == [NAME]


# ====================================================================== registering
def test_register_fills_placeholder_then_loads(art, tmp_path):
    root = tmp_path / "priors"
    shutil.copytree(art.dir, root / "toy-lowrank")
    card = root / "toy.md"
    card.write_text("# Toy prior\n\nFor tests.\n")
    reg = write_registry(root / "registry.json", {NAME: {
        "location": "toy-lowrank", "sha256": None, "size": None, "license": "CC0-1.0",
        "model_card": None, "description": "a toy"}})
    with pytest.warns(UserWarning, match="pins no sha256"):
        hub.load_prior(NAME, registry=reg)
    with pytest.raises(RegistryError, match="register"):
        hub.verify(NAME, registry=reg)

    entry = hub.register_prior(root / "toy-lowrank", NAME, registry=reg, model_card=card)
    assert entry.sha256 == art.sha256 and entry.pinned
    raw = json.loads(reg.read_text())["priors"][NAME]
    assert raw["location"] == "toy-lowrank" and raw["model_card"] == "toy.md"
    assert raw["license"] == "CC0-1.0" and raw["description"] == "a toy"   # kept
    assert raw["architecture"] == METADATA["architecture"]
    assert raw["method"] == "supervised+swag-lowrank"
    assert raw["recommended_scale"] == [0.1, 10.0] and raw["rank"] == 3
    assert hub.verify(NAME, registry=reg)["sha256"] == art.sha256
    assert_same_prior(hub.load_prior(NAME, registry=reg), art.prior)
    info = hub.show(NAME, registry=reg)
    assert info["status"] == "local" and "# Toy prior" in info["model_card_text"]


def test_register_url_needs_packed_file(art, server, tmp_path):
    reg = tmp_path / "new" / "registry.json"                 # created on first register
    url = server.url("/p.tar.gz")
    with pytest.raises(RegistryError, match="pack"):
        hub.register_prior(art.dir, NAME, registry=reg, location=url)
    entry = hub.register_prior(art.packed, NAME, registry=reg, location=url)
    assert entry.size == art.size and entry.locations == (url,)
    server.routes["/p.tar.gz"] = {"body": art.data}
    assert_same_prior(hub.load_prior(NAME, registry=reg, cache_dir=tmp_path / "c"), art.prior)
    with pytest.raises(RegistryError, match="invalid prior name"):
        hub.register_prior(art.packed, "bad name", registry=reg)


# ====================================================================== CLI
def run_cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="bayes-transfer")
    add_priors_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)
    return capsys.readouterr().out


def test_cli(art, other, server, tmp_path, capsys):
    root = tmp_path / "priors"
    shutil.copytree(art.dir, root / "toy")
    reg = write_registry(root / "registry.json", {
        NAME: {"location": "toy", "sha256": None},
        "toy/remote": url_entry(server.url("/o.tar.gz"), other)})
    server.routes["/o.tar.gz"] = {"body": other.data}
    common = ["--registry", str(reg), "--cache-dir", str(tmp_path / "cache")]

    out = run_cli(["priors", "list", *common], capsys)
    assert NAME in out and "local, unpinned" in out and "toy/remote" in out and "remote" in out
    with pytest.raises(HubError, match="1 of 2"):
        run_cli(["priors", "verify", *common, "--no-progress"], capsys)
    assert "FAIL  toy/lowrank" in capsys.readouterr().out

    out = run_cli(["priors", "register", str(root / "toy"), "--name", NAME,
                   "--registry", str(reg)], capsys)
    assert art.sha256 in out
    out = run_cli(["priors", "verify", *common, "--no-progress"], capsys)
    assert f"ok    {NAME}" in out and "ok    toy/remote" in out
    out = run_cli(["priors", "verify", str(art.packed), *common], capsys)
    assert out.startswith("ok")

    out = run_cli(["priors", "download", "toy/remote", *common, "--no-progress"], capsys)
    assert str(tmp_path / "cache" / other.sha256) in out
    out = run_cli(["priors", "list", "--json", *common, "--offline"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["toy/remote"]["status"] == "cached" and rows[NAME]["status"] == "local"
    out = run_cli(["priors", "show", NAME, *common], capsys)
    assert "sha256" in out and art.sha256 in out
    with pytest.raises(UnknownPriorError):
        run_cli(["priors", "show", "toy/lowrnk", *common], capsys)


# ====================================================================== published priors
def _published():
    regs = [r for r in (hub.BUILTIN_REGISTRY, REPO_REGISTRY) if r.is_file()]
    return [pytest.param(reg, name, id=name)
            for reg in regs for name in hub.load_registry(reg).names()]


@pytest.mark.parametrize("registry,name", _published())
def test_published_prior(registry, name, tmp_path):
    """Each prior of the built-in registry and of the repository's priors/registry.json
    loads by name, verifies and fits its model."""
    from flax import nnx

    from bayes_transfer import models

    reg = hub.load_registry(registry)
    entry = reg.entries[name]
    state, _ = hub.status(entry)
    if state == "missing":
        pytest.skip(f"{name}: its artifact is not published yet ({', '.join(entry.locations)} "
                    f"does not exist); create it, then run `bayes-transfer priors register "
                    f"<path> --name {name}`")
    if state == "remote" and os.environ.get("BAYES_TRANSFER_TEST_DOWNLOADS") != "1":
        pytest.skip(f"{name} is only at {entry.locations[0]}; set "
                    f"BAYES_TRANSFER_TEST_DOWNLOADS=1 to download and check it")
    cache = None if state == "remote" else tmp_path / "unused-cache"
    meta = hub.verify(name, registry=registry, cache_dir=cache)
    assert meta["sha256"] == entry.sha256
    prior = hub.load_prior(name, registry=registry, cache_dir=cache, offline=True)
    model = models.create(**meta["architecture"])
    params = nnx.state(model, nnx.Param)
    prior.spec.check(params)
    prior.init_params(params)
