"""Hostile inputs: a prior for the wrong model, NaN/Inf and non-positive variances in
artifacts, K = 1 priors, extreme λ in float32, interrupted downloads.

Each case must end in the toolkit's typed error (naming what is wrong) or in finite
numbers. What tests/test_hub.py already covers for downloads (truncated body, wrong
Content-Length, Ctrl-C while unpacking, stalls, corrupt cache entries) is not repeated;
added here: Ctrl-C in the middle of the body, Ctrl-C after a complete unpack but before
the entry is renamed into place, and a download process killed with SIGKILL.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayes_transfer import artifacts as A
from bayes_transfer import hub
from bayes_transfer.artifacts import arrays as A_arrays
from bayes_transfer.hub import fetch as hub_fetch
from bayes_transfer.errors import OfflineModeError, PriorError, SpecMismatchError
from bayes_transfer.objectives import map_loss
from bayes_transfer.params import ParamSpec, flatten_with_paths, map_with_paths
from bayes_transfer.prior import Prior
from prior_server import serve


# ============================================================================ helpers
def sign(root: Path) -> None:
    """Recompute the file table and digest of an artifact directory (documented scheme)."""
    meta = json.loads((root / "metadata.json").read_text())
    meta["files"] = {p.relative_to(root).as_posix(): {"size": p.stat().st_size,
                                                      "sha256": hashlib.sha256(
                                                          p.read_bytes()).hexdigest()}
                     for p in sorted(root.rglob("*"))
                     if p.is_file() and p.name != "metadata.json"}
    meta["sha256"] = A.metadata_digest(meta)
    (root / "metadata.json").write_text(json.dumps(meta))


def with_arrays(path: Path, **arrays) -> Path:
    """Replace arrays of the artifact at ``path`` (written by Orbax, as the library does)
    and re-sign it: a consistent artifact whose values were never validated."""
    import orbax.checkpoint as ocp

    meta = json.loads((path / "metadata.json").read_text())
    current = {name: np.asarray(a) for name, a in
               A_arrays.read_arrays(path, meta).items()}       # shapes/dtypes as stored
    for name, value in arrays.items():
        current[name] = np.asarray(value, dtype=current[name].dtype).reshape(
            current[name].shape)
    shutil.rmtree(path / "arrays")
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save((path / "arrays").absolute(), args=ocp.args.StandardSave(current))
    sign(path)
    return path


def swag_like(d: int, rank: int, seed: int = 0):
    """SWAG-like magnitudes: var spread over 1e-9..1e-3, deviations ~1e-3, θ̄ ~ N(0, 0.05²)."""
    rng = np.random.default_rng(seed)
    var = np.exp(rng.uniform(np.log(1e-9), np.log(1e-3), d)).astype(np.float32)
    dev = (1e-3 * rng.normal(size=(rank, d))).astype(np.float32)
    mean = (0.05 * rng.normal(size=d)).astype(np.float32)
    return mean, var, dev


def model_params(arch: str = "cnn", width: int = 8, classes: int = 3, seed: int = 0) -> dict:
    """Parameter trees shaped like small models (numpy, float32): ``cnn`` (conv stages
    with batch norm) or ``resnet`` (a stem and one residual block)."""
    rng = np.random.default_rng(seed)

    def leaf(*shape):
        return (0.1 * rng.normal(size=shape)).astype(np.float32)

    def conv_bn(cin, cout):
        return {"conv": {"kernel": leaf(3, 3, cin, cout), "bias": leaf(cout)},
                "bn": {"scale": leaf(cout), "bias": leaf(cout)}}

    w = width
    if arch == "cnn":
        backbone = {"stage0": conv_bn(1, w), "stage1": conv_bn(w, 2 * w)}
    else:
        backbone = {"stem": conv_bn(1, w), "block0": {"a": conv_bn(w, w), "b": conv_bn(w, w)}}
    return {"backbone": backbone, "head": {"kernel": leaf(2 * w, classes), "bias": leaf(classes)}}


def assert_finite(x, what):
    leaves = jax.tree.leaves(x)
    bad = [i for i, leaf in enumerate(leaves) if not np.all(np.isfinite(np.asarray(leaf)))]
    assert not bad, f"{what}: {len(bad)} of {len(leaves)} leaves hold NaN or Inf"


# ============================================================================ wrong model
@pytest.fixture(scope="module")
def cnn_prior_path(tmp_path_factory):
    params = model_params()
    spec = ParamSpec.from_params(params)
    mean, var, dev = swag_like(spec.size, 3)
    prior = Prior.lowrank(spec, spec.ravel(params) + mean, var, dev, scale=10.0, floor=1e-8)
    return A.save_prior(prior, tmp_path_factory.mktemp("cnn") / "prior",
                        metadata={"architecture": {"arch": "cnn", "width": 8}})


def first_difference(spec: ParamSpec, params) -> str:
    """The first covered path that the parameters lack or hold with another shape."""
    found = flatten_with_paths(params)
    return next(p for p, s in zip(spec.paths, spec.shapes)
                if p not in found or tuple(found[p].shape) != s)


def test_prior_for_the_wrong_model_names_the_path(cnn_prior_path):
    good = model_params()
    prior = A.read_prior(cnn_prior_path, model_params=good)
    # same architecture, other width; another architecture altogether
    for params in (model_params(width=16), model_params("resnet")):
        path = repr(first_difference(prior.spec, params))
        with pytest.raises(SpecMismatchError) as info:
            A.read_prior(cnn_prior_path, model_params=params)
        assert path in str(info.value), str(info.value)
        with pytest.raises(SpecMismatchError, match=re.escape(path)):
            hub.load_prior(cnn_prior_path, model_params=params)
        with pytest.raises(SpecMismatchError, match=re.escape(path)):
            prior.init_params(params)
        # log p of the wrong model's parameters: refused, also while tracing under jit
        with pytest.raises(SpecMismatchError, match=re.escape(path)):
            prior.log_prob(params)
        with pytest.raises(SpecMismatchError, match=re.escape(path)):
            jax.jit(prior.log_prob)(params)
        with pytest.raises(SpecMismatchError, match=re.escape(path)):
            jax.grad(prior.log_prob)(params)

    # as many numbers in another layout (a kernel with input and output channels swapped)
    kernel = next(p for p, s in zip(prior.spec.paths, prior.spec.shapes)
                  if len(s) == 4 and s[2] != s[3])
    swapped = map_with_paths(lambda p, x: jnp.swapaxes(x, 2, 3) if p == kernel else x, good)
    with pytest.raises(SpecMismatchError, match=re.escape(repr(kernel))):
        prior.log_prob(swapped)
    # the head is not covered: another number of classes is fine
    other_head = model_params(classes=7)
    assert np.isfinite(float(A.read_prior(cnn_prior_path, model_params=other_head)
                             .log_prob(other_head)))
    # a flat vector of the wrong length
    with pytest.raises(PriorError, match=f"d={prior.dim}"):
        prior.log_prob(jnp.zeros(prior.dim + 1))


# ============================================================================ bad values
D = 40


@pytest.fixture(scope="module")
def small_artifacts(tmp_path_factory):
    """A saved low-rank (float32) and diagonal (bfloat16) prior over D parameters."""
    spec = ParamSpec(paths=("backbone/w",), shapes=((D,),), dtypes=("float32",))
    mean, var, dev = swag_like(D, 4, seed=1)
    root = tmp_path_factory.mktemp("small")
    return {
        "lowrank": A.save_prior(Prior.lowrank(spec, mean, var, dev, scale=1e3, floor=1e-9),
                                root / "lowrank"),
        "diag-bf16": A.save_prior(Prior.diagonal(spec, mean, var, scale=1e3)
                                  .astype(jnp.bfloat16), root / "diag"),
    }


BAD_VALUES = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("value", sorted(BAD_VALUES))
@pytest.mark.parametrize("base, array", [("lowrank", "mean"), ("lowrank", "var"),
                                         ("lowrank", "deviations"), ("diag-bf16", "mean"),
                                         ("diag-bf16", "var")])
def test_nan_or_inf_in_an_artifact_is_a_prior_error(small_artifacts, tmp_path, base, array,
                                                    value):
    path = shutil.copytree(small_artifacts[base], tmp_path / "p")
    meta = json.loads((path / "metadata.json").read_text())
    current = A_arrays.read_arrays(path, meta)[array].astype(np.float32)
    current.reshape(-1)[7] = BAD_VALUES[value]
    with_arrays(path, **{array: current})
    for verify in (True, False):       # the values are checked whether or not files are hashed
        with pytest.raises(PriorError, match="NaN or Inf"):
            A.read_prior(path, verify=verify)
    with pytest.raises(PriorError, match="NaN or Inf"):
        hub.load_prior(path)
    # a packed copy: refused on unpacking, and nothing is left at the destination
    packed = tmp_path / "p.tar.gz"
    _pack_unchecked(path, packed)
    with pytest.raises(PriorError, match="NaN or Inf"):
        A.read_prior(packed)
    with pytest.raises(PriorError, match="NaN or Inf"):
        A.unpack_artifact(packed, tmp_path / "out" / "p")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _pack_unchecked(root: Path, out: Path) -> None:
    """tar.gz of an artifact directory without pack_artifact's verification."""
    import tarfile
    with tarfile.open(out, "w:gz") as tar:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=p.relative_to(root).as_posix())


@pytest.mark.parametrize("bad", [0.0, -0.0, -1e-3, -1e38, 1e-40],
                         ids=["zero", "negzero", "negative", "huge-negative", "subnormal"])
@pytest.mark.parametrize("base", ["lowrank", "diag-bf16"])
def test_non_positive_variance_in_an_artifact(small_artifacts, tmp_path, base, bad):
    path = shutil.copytree(small_artifacts[base], tmp_path / "p")
    meta = json.loads((path / "metadata.json").read_text())
    var = A_arrays.read_arrays(path, meta)["var"].astype(np.float32)
    var[3] = bad           # 1e-40 is subnormal: flushed to zero by XLA on CPU, so refused
    with_arrays(path, var=var)
    with pytest.raises(PriorError, match="variances must be positive"):
        A.read_prior(path)


def test_non_positive_variances_in_constructors():
    spec = ParamSpec(paths=("backbone/w",), shapes=((D,),), dtypes=("float32",))
    mean, var, dev = swag_like(D, 4)
    for v in (0.0, -1.0):
        with pytest.raises(PriorError, match="variances must be positive"):
            Prior.isotropic(spec, mean, v)
        bad = var.copy()
        bad[-1] = v
        with pytest.raises(PriorError, match="variances must be positive"):
            Prior.lowrank(spec, mean, bad, dev)
    # positive variances whose δ = λ·var/2 underflows float32 with ε = 0: every log p
    # would be NaN or inf, so the prior is refused when built (or rescaled) ...
    tiny = np.full(D, 1e-30, np.float32)
    with pytest.raises(PriorError, match="not representable in float32"):
        Prior.lowrank(spec, mean, tiny, dev, scale=1e-9)
    ok = Prior.lowrank(spec, mean, tiny, dev, scale=1.0)
    with pytest.raises(PriorError, match="use a floor"):
        ok.rescale(1e-9)
    # ... and a floor ε > 0 makes it usable
    floored = ok.rescale(1e-9, 1e-12)
    lp, g = jax.value_and_grad(floored.log_prob)(jnp.asarray(mean + 1e-3))
    assert np.isfinite(float(lp)) and np.all(np.isfinite(np.asarray(g)))


# ============================================================================ K = 1
def dense_reference(theta, mean, var, dev, lam, eps):
    """log N(θ; μ, Σ) and ∇θ in float64 with Σ = λ(½diag(var) + ½D̂ᵀD̂/max(K−1, 1)) + εI."""
    theta, mean, var, dev = (np.asarray(a, np.float64) for a in (theta, mean, var, dev))
    k = dev.shape[0]
    cov = lam * (0.5 * np.diag(var) + 0.5 * dev.T @ dev / max(k - 1, 1)) + eps * np.eye(len(mean))
    r = theta - mean
    sol = np.linalg.solve(cov, r)
    sign_, logdet = np.linalg.slogdet(cov)
    assert sign_ > 0
    return -0.5 * (len(mean) * math.log(2 * math.pi) + logdet + r @ sol), -sol


@pytest.mark.parametrize("lam, eps", [(1.0, 0.0), (1e3, 1e-6), (1e-4, 1e-8)])
def test_rank_one_prior_matches_a_dense_reference(tmp_path, lam, eps):
    d = 30
    spec = ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float32",))
    rng = np.random.default_rng(5)
    mean = rng.normal(size=d).astype(np.float32)
    var = rng.uniform(0.1, 1.0, d).astype(np.float32)
    dev = (0.5 * rng.normal(size=(1, d))).astype(np.float32)
    theta = (mean + rng.normal(size=d) * np.sqrt(lam)).astype(np.float32)
    prior = Prior.lowrank(spec, mean, var, dev, scale=lam, floor=eps)
    assert prior.rank == 1 and prior.chol.shape == (1, 1)
    loaded = A.read_prior(A.save_prior(prior, tmp_path / "k1"))
    ref_lp, ref_g = dense_reference(theta, mean, var, dev, lam, eps)
    for p in (prior, loaded):
        lp, g = jax.jit(jax.value_and_grad(p.log_prob))(jnp.asarray(theta))
        assert np.isfinite(float(lp)) and np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(float(lp), ref_lp, rtol=2e-5, atol=1e-3)
        np.testing.assert_allclose(np.asarray(g), ref_g, rtol=2e-3,
                                   atol=2e-4 * np.abs(ref_g).max())
    # a zero deviation row (a SWAG run that never moved): the diagonal part alone
    flat_dev = Prior.lowrank(spec, mean, var, np.zeros((1, d), np.float32), scale=lam, floor=eps)
    ref_lp, _ = dense_reference(theta, mean, var, np.zeros((1, d)), lam, eps)
    np.testing.assert_allclose(float(flat_dev.log_prob(jnp.asarray(theta))), ref_lp, rtol=2e-5)
    # bfloat16 storage of a K = 1 prior: finite, and the density of the rounded arrays
    p16 = prior.astype(jnp.bfloat16)
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(np.float32))
               for a in (mean, var, dev)]
    ref_lp, _ = dense_reference(theta, *rounded, lam, eps)
    np.testing.assert_allclose(float(p16.log_prob(jnp.asarray(theta))), ref_lp, rtol=1e-4)


# ============================================================================ extreme λ
LAMBDAS = np.logspace(-8, 12, 11)


def test_lambda_sweep_through_map_loss_is_finite_in_float32():
    """MAP loss and its gradient, float32, λ = 1e-8 … 1e12, SWAG-like magnitudes."""
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)

    def dense(cin, cout):
        return {"kernel": (rng.normal(size=(cin, cout)) / np.sqrt(cin)).astype(np.float32),
                "bias": np.zeros(cout, np.float32)}

    params = {"backbone": {"dense0": dense(16, 32), "dense1": dense(32, 32)},
              "head": dense(32, 3)}
    rest = {}

    def apply(p, rest, x, train=False, method=None):    # the training loop's signature
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["backbone"]["dense0"]["kernel"]
                        + p["backbone"]["dense0"]["bias"])
        h = jax.nn.relu(h @ p["backbone"]["dense1"]["kernel"] + p["backbone"]["dense1"]["bias"])
        return h @ p["head"]["kernel"] + p["head"]["bias"], rest

    spec = ParamSpec.from_params(params)
    mean, var, dev = swag_like(spec.size, 20, seed=2)
    theta_bar = np.asarray(spec.ravel(params)) + mean
    base = Prior.lowrank(spec, theta_bar, var, dev, scale=1.0)
    loss_fn = map_loss(1000, head_decay=1e-4)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 4, 4, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 3, 8))}

    @jax.jit
    def value_and_grads(prior, p):
        def loss(p):
            return loss_fn(apply, p, rest, batch, jax.random.PRNGKey(0), prior)[0]
        return jax.value_and_grad(loss)(p)

    # parameters at the prior mean, one SWAG step away, and far away
    at_mean = spec.replace(params, jnp.asarray(theta_bar))
    near = spec.replace(params, jnp.asarray(theta_bar + 1e-3 * rng.normal(size=spec.size)))
    far = spec.replace(params, jnp.asarray(theta_bar + rng.normal(size=spec.size)))
    for kind in ("lowrank", "diag", "isotropic", "l2sp"):
        derived = base.for_method(kind)
        for lam in LAMBDAS:
            for eps in (0.0, 1e-8):
                prior = derived.rescale(float(lam), eps)
                for where, p in (("mean", at_mean), ("near", near), ("far", far)):
                    value, grads = value_and_grads(prior, p)
                    what = f"{kind} λ={lam:.0e} ε={eps} θ {where}"
                    assert value.dtype == jnp.float32, what
                    assert np.isfinite(float(value)), f"{what}: loss {value}"
                    assert_finite(grads, what)


def test_lambda_sweep_direct_log_prob_at_scale():
    """log p, ∇θ and ∂/∂log λ on a flat vector of 100,000 parameters (K = 20), float32."""
    d = 100_000
    spec = ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float32",))
    mean, var, dev = swag_like(d, 20, seed=3)
    base = Prior.lowrank(spec, mean, var, dev)
    rng = np.random.default_rng(1)
    thetas = {"mean": jnp.asarray(mean),
              "near": jnp.asarray(mean + 1e-3 * rng.normal(size=d).astype(np.float32)),
              "far": jnp.asarray(mean + 0.1 * rng.normal(size=d).astype(np.float32))}
    value_and_grad = jax.jit(lambda p, x: jax.value_and_grad(p.log_prob)(x))

    @jax.jit
    def dlog_lambda(p, x, log_lam):      # λ is learnable: its gradient must be finite too
        return jax.grad(lambda s: p.rescale(jnp.exp(s)).log_prob(x))(log_lam)

    for lam in LAMBDAS:
        prior = base.rescale(float(lam))
        for where, theta in thetas.items():
            lp, g = value_and_grad(prior, theta)
            what = f"λ={lam:.0e} θ {where}"
            assert np.isfinite(float(lp)), f"{what}: log p {lp}"
            assert_finite(g, what)
            ds = dlog_lambda(prior, theta, jnp.float32(np.log(lam)))
            assert np.isfinite(float(ds)), f"{what}: d/dlogλ {ds}"


# ============================================================================ downloads
class _Server:
    """Serves ``body`` at /full; at /half sends half of it, then hangs until closed."""

    def __init__(self, body: bytes):
        self.release = threading.Event()
        self.half_sent = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path == "/half":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.half_sent.set()
                    server.release.wait(60)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd, self.thread, self.base = serve(Handler)

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(small_artifacts, tmp_path, monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    monkeypatch.delenv(hub.ENV_OFFLINE, raising=False)
    packed = A.pack_artifact(small_artifacts["lowrank"], tmp_path / "p.tar.gz")
    sha = json.loads((small_artifacts["lowrank"] / "metadata.json").read_text())["sha256"]
    server = _Server(packed.read_bytes())
    yield server, sha
    server.close()


def cache_names(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_ctrl_c_in_the_middle_of_the_body_leaves_nothing(served, tmp_path, monkeypatch):
    server, sha = served
    cache = tmp_path / "cache"
    real_fetch = hub_fetch._fetch

    class Interrupting:        # the download's file: Ctrl-C after the first chunk arrived
        def __init__(self, out):
            self.out, self.writes = out, 0

        def write(self, chunk):
            self.writes += 1
            if self.writes == 2:
                raise KeyboardInterrupt
            return self.out.write(chunk)

    monkeypatch.setattr(hub_fetch, "_CHUNK", 512)
    monkeypatch.setattr(hub_fetch, "_fetch",
                        lambda url, out, **kw: real_fetch(url, Interrupting(out), **kw))
    with pytest.raises(KeyboardInterrupt):
        hub.load_prior(server.base + "/full", cache_dir=cache, sha256=sha)
    assert cache_names(cache) == []
    monkeypatch.setattr(hub_fetch, "_fetch", real_fetch)
    assert hub.load_prior(server.base + "/full", cache_dir=cache, sha256=sha).dim == D
    assert cache_names(cache) == [sha]


def test_ctrl_c_after_unpacking_before_the_rename_leaves_nothing(served, tmp_path, monkeypatch):
    server, sha = served
    cache = tmp_path / "cache"
    real_unpack = A.unpack_artifact
    unpacked = []

    def unpack_then_interrupt(*args, **kwargs):
        unpacked.append(real_unpack(*args, **kwargs))   # complete and verified ...
        raise KeyboardInterrupt                         # ... but not renamed into place

    monkeypatch.setattr(hub_fetch, "unpack_artifact", unpack_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        hub.load_prior(server.base + "/full", cache_dir=cache, sha256=sha)
    assert unpacked and not unpacked[0].exists()
    assert cache_names(cache) == []
    with pytest.raises(OfflineModeError):
        hub.load_prior(server.base + "/full", cache_dir=cache, sha256=sha, offline=True)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_download_killed_with_sigkill_leaves_no_entry(tmp_path, monkeypatch, request):
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    monkeypatch.delenv(hub.ENV_OFFLINE, raising=False)
    # ~160 KB of incompressible arrays, so that half the body is well on disk before the kill
    d = 20_000
    spec = ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float32",))
    mean, var, _ = swag_like(d, 1, seed=4)
    art = A.save_prior(Prior.diagonal(spec, mean, var), tmp_path / "big")
    sha = json.loads((art / "metadata.json").read_text())["sha256"]
    server = _Server(A.pack_artifact(art, tmp_path / "big.tar.gz").read_bytes())
    request.addfinalizer(server.close)
    cache = tmp_path / "cache"
    url = server.base + "/half"
    code = textwrap.dedent(f"""
        import bayes_transfer.hub as hub
        import bayes_transfer.hub.fetch as hub_fetch
        hub_fetch._CHUNK = 4096    # small reads: what arrives is written as it arrives
        hub.load_prior({url!r}, cache_dir={str(cache)!r}, sha256={sha!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert server.half_sent.wait(120), "the child never started downloading"
        deadline, partial = time.monotonic() + 60, []   # until part of the body is on disk
        while not partial and time.monotonic() < deadline:
            time.sleep(0.05)
            partial = [p for p in cache.glob(".download-*") if p.stat().st_size > 0]
        assert partial, cache_names(cache)
        proc.send_signal(signal.SIGKILL)      # no finally clause, no cleanup runs
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.release.set()
    left = cache_names(cache)
    assert left and all(n.startswith(".download-") for n in left), left   # only a temporary
    assert sha not in left
    # the killed download is not mistaken for a cached prior ...
    with pytest.raises(OfflineModeError):
        hub.load_prior(server.base + "/full", cache_dir=cache, sha256=sha, offline=True)
    # ... a new download succeeds next to the fresh temporary (it may be a live download) ...
    prior = hub.load_prior(server.base + "/full", cache_dir=cache, sha256=sha)
    assert prior.metadata["sha256"] == sha and sha in cache_names(cache)
    A.verify_artifact(cache / sha, sha256=sha)
    # ... and once it is older than a day, the next download deletes it
    old = time.time() - 2 * 24 * 3600
    for name in left:
        os.utime(cache / name, (old, old))
    shutil.rmtree(cache / sha)
    hub.load_prior(server.base + "/full", cache_dir=cache, sha256=sha)
    assert cache_names(cache) == [sha]
