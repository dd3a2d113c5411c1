"""Helpers of the publishing and Hugging Face tests: a small saved prior, and an HTTP
server on 127.0.0.1 (a thread, port 0) whose routes can misbehave on request."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import jax
import numpy as np

from bayes_transfer.artifacts import save_prior
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.hub import pack_prior

METADATA = {"architecture": {"arch": "small_cnn", "num_classes": 3, "in_channels": 1},
            "source": {"dataset": "toy", "split": "train", "method": "supervised"},
            "recommended_scale": [0.1, 10.0]}


def serve(handler):
    """Serve ``handler`` on 127.0.0.1 (a free port) in a daemon thread:
    (server, thread, base URL)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return httpd, thread, f"http://127.0.0.1:{httpd.server_address[1]}"


def toy_params():
    return {"backbone": {"conv": {"kernel": np.zeros((3, 3, 1, 2), np.float32),
                                  "bias": np.zeros((2,), np.float32)}},
            "head": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros((3,), np.float32)}}


class Toy:
    """A small low-rank prior saved as a directory (``dir``) and packed (``packed``)."""

    def __init__(self, root: Path, seed: int = 0):
        spec = ParamSpec.from_params(toy_params())
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
        d = spec.size
        self.prior = Prior.lowrank(spec, jax.random.normal(k1, (d,)),
                                   np.exp(jax.random.normal(k2, (d,)) - 2.0),
                                   0.1 * jax.random.normal(k3, (3, d)), scale=2.0 + seed,
                                   floor=1e-4)
        self.dir = save_prior(self.prior, root / f"toy-{seed}", metadata=METADATA)
        packed = pack_prior(self.dir)
        self.packed, self.size, self.sha256 = packed.path, packed.size, packed.sha256
        self.data = self.packed.read_bytes()
        self.file_sha256 = hashlib.sha256(self.data).hexdigest()


def assert_same_prior(a: Prior, b: Prior):
    assert (a.kind, a.spec) == (b.kind, b.spec)
    for name in ("mean", "var", "deviations", "scale", "floor"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


def write_registry(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps({"format": "bayes_transfer.registry", "format_version": 1,
                                "priors": entries}, indent=2))
    return path


class Server:
    """An HTTP server on 127.0.0.1. ``handler(request) -> bool`` functions in
    ``handlers`` are asked in order; the first that returns True has answered. Every
    request is logged in ``requests`` as ``(method, path, headers)``."""

    def __init__(self):
        self.handlers = []
        self.requests: list[tuple[str, str, dict]] = []
        self.routes: dict[str, bytes] = {}        # plain files: path -> body
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                server.requests.append((self.command, self.path, dict(self.headers)))
                for handler in server.handlers:
                    if handler(self):
                        return
                body = server.routes.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _handle  # noqa: N815

            def log_message(self, *args):
                pass

        self.httpd, self.thread, self.base = serve(Handler)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class FakeHub:
    """The part of the Hugging Face Hub that ``hf_hub_download`` uses, on a ``Server``:
    ``HEAD``/``GET {base}/{repo_id}/resolve/{revision}/{filename}`` with the headers it
    reads (``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``X-Error-Code`` on errors)
    and byte ranges (``Range: bytes=N-``, answered 206) for resumed downloads.

    ``add(repo_id, files, branch="main")`` makes a commit and returns its hash.
    ``cut_after``: the next GET of a file sends only that many bytes, then closes the
    connection; ``after_cut`` is then ``"resume"`` (later GETs are served) or
    ``"fail"`` (later requests get HTTP 500, a server that went away).
    """

    def __init__(self, server: Server):
        self.server = server
        self.repos: dict[str, dict] = {}
        self.cut_after: int | None = None
        self.after_cut = "fail"
        self.cut_done = False
        server.handlers.append(self._handle)

    def add(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        parent = repo["commits"].get(repo["refs"].get(branch), {})
        content = {**parent, **files}
        commit = hashlib.sha1(json.dumps([repo_id, len(repo["commits"]), sorted(
            (k, hashlib.sha256(v).hexdigest()) for k, v in content.items())]).encode()).hexdigest()
        repo["commits"][commit] = content
        repo["refs"][branch] = commit
        return commit

    @property
    def file_requests(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.server.requests if "/resolve/" in p]

    def _error(self, req, status: int, code: str | None, commit: str | None = None):
        req.send_response(status)
        if code:
            req.send_header("X-Error-Code", code)
        if commit:
            req.send_header("X-Repo-Commit", commit)
        req.send_header("Content-Length", "0")
        req.end_headers()
        return True

    def _handle(self, req) -> bool:
        from urllib.parse import unquote

        path = req.path.split("?", 1)[0]
        if "/resolve/" not in path:
            return False
        if self.cut_done and self.after_cut == "fail":
            return self._error(req, 500, None)
        repo_id, rest = path.lstrip("/").split("/resolve/", 1)
        revision, _, filename = rest.partition("/")
        revision, filename = unquote(revision), unquote(filename)
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(req, 404, "RepoNotFound")
        commit = repo["refs"].get(revision, revision)
        if commit not in repo["commits"]:
            return self._error(req, 404, "RevisionNotFound")
        body = repo["commits"][commit].get(filename)
        if body is None:
            return self._error(req, 404, "EntryNotFound", commit)
        start = 0
        rng = req.headers.get("Range")
        if rng and req.command == "GET":
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
        req.send_response(206 if start else 200)
        req.send_header("X-Repo-Commit", commit)
        req.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(body) - start))
        if start:
            req.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        req.end_headers()
        if req.command == "HEAD":
            return True
        if self.cut_after is not None and not self.cut_done:
            self.cut_done = True
            req.wfile.write(body[start:start + self.cut_after])
            req.wfile.flush()
            req.close_connection = True
            return True
        req.wfile.write(body[start:])
        return True
