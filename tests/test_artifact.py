"""Prior artifacts: exact round trips, integrity checks, atomic writes, safe unpacking."""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayes_transfer import artifacts as A
from bayes_transfer import fsutil
from bayes_transfer.artifacts import arrays as A_arrays
from bayes_transfer.artifacts import format as A_format
from bayes_transfer.artifacts import io as A_io
from bayes_transfer.errors import (ArtifactError, ArtifactIntegrityError, ArtifactVersionError,
                                   BayesTransferError, PriorError, SpecMismatchError)
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior

K = 5
USER_METADATA = {
    "architecture": {"arch": "small_cnn", "num_classes": 10, "in_channels": 1},
    "source": {"dataset": "fashion_mnist", "split": "train", "classes": list(range(10)),
               "method": "supervised"},
    "swag": {"K": K, "snapshots": 20, "every": 1, "start": 5,
             "lr": {"schedule": "constant", "value": 0.05}},
    "source_accuracy": 0.91,
    "recommended_scale": [0.1, 100.0],
}


def make_params(dense=10):
    """d = 36 + 4 + 10 = 50 covered parameters under backbone/, plus a head."""
    return {"backbone": {"conv": {"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.zeros((4,))},
                         "dense": {"bias": jnp.zeros((dense,))}},
            "head": {"kernel": jnp.zeros((10, 3)), "bias": jnp.zeros((3,))}}


SPEC = ParamSpec.from_params(make_params())
D = SPEC.size


@functools.lru_cache(maxsize=None)
def make_prior(kind="lowrank", dtype=jnp.float32) -> Prior:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    mean = jax.random.normal(k1, (D,))
    var = jnp.exp(jax.random.normal(k2, (D,)) - 2.0)
    if kind == "lowrank":
        prior = Prior.lowrank(SPEC, mean, var, 0.1 * jax.random.normal(k3, (K, D)), scale=2.5,
                              floor=1e-4)
    elif kind == "diag":
        prior = Prior.diagonal(SPEC, mean, var, scale=0.7)
    elif kind == "isotropic":          # L2: zero (scalar) mean, scalar variance
        prior = Prior.isotropic(SPEC, None, 0.3, scale=4.0, floor=1e-3)
    elif kind == "l2sp":
        prior = Prior.isotropic(SPEC, mean, 1.0, scale=0.05)
    elif kind == "flat":
        prior = Prior.flat(SPEC, mean)
    else:
        raise AssertionError(kind)
    return prior if dtype == jnp.float32 else prior.astype(dtype)


def bits(x):
    a = np.asarray(x)
    return a.dtype, a.shape, a.tobytes()


def saved(tmp_path, kind="diag", dtype=jnp.float32, name="prior"):
    # "diag" unless the kind matters: loading a low-rank prior compiles its Cholesky.
    prior = make_prior(kind, dtype)
    return prior, A.save_prior(prior, tmp_path / name, metadata=USER_METADATA)


def resign(path: Path, edit=None):
    """Rewrite metadata.json with fresh digests (after ``edit(meta)``): a 'valid' artifact."""
    meta = json.loads((path / "metadata.json").read_text())
    if edit:
        edit(meta)
    meta["files"] = A_format.hash_files(path)
    meta["sha256"] = A.metadata_digest(meta)
    (path / "metadata.json").write_text(json.dumps(meta))


def data_files(path: Path) -> list[Path]:
    """The tensorstore chunk files (under a ``d/`` folder) of an artifact."""
    return [p for p in (path / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"]


def largest_array_file(path: Path) -> Path:
    return max((p for p in (path / "arrays").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def assert_typed_or_loads(fn):
    """Either succeeds or raises one of our typed errors, never a raw library error."""
    try:
        fn()
    except BayesTransferError:
        pass


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind", ["lowrank", "diag", "isotropic", "l2sp", "flat"])
def test_round_trip_is_exact(tmp_path, kind, dtype):
    prior, path = saved(tmp_path, kind, dtype)
    loaded = A.read_prior(path)
    assert loaded.kind == prior.kind
    assert loaded.spec == prior.spec
    for name in ("mean", "var", "deviations"):
        a, b = getattr(prior, name), getattr(loaded, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert bits(a) == bits(b), name
    assert bits(loaded.scale) == bits(prior.scale)
    assert bits(loaded.floor) == bits(prior.floor)
    if kind == "isotropic":
        assert loaded.mean.shape == () and loaded.var.shape == ()
    meta = loaded.metadata
    assert meta == A.read_metadata(path)
    for key, value in USER_METADATA.items():
        assert meta[key] == value
    assert meta["format"] == "bayes_transfer.prior" and meta["format_version"] == 1
    assert meta["kind"] == kind if kind != "l2sp" else meta["kind"] == "isotropic"
    assert meta["rank"] == prior.rank and meta["dim"] == D
    assert meta["spec"] == SPEC.to_json()
    assert set(meta["library_versions"]) >= {"bayes_transfer", "jax", "flax", "optax", "orbax",
                                            "numpyro"}
    assert meta["library_versions"]["jax"] == jax.__version__
    assert meta["created"].endswith("Z")
    # log-density (and its gradient) are the original's
    theta = make_prior("lowrank").sample(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(loaded.log_prob(theta), prior.log_prob(theta))
    np.testing.assert_array_equal(jax.grad(loaded.log_prob)(theta),
                                  jax.grad(prior.log_prob)(theta))


def test_verify_read_metadata_and_pinned_digest(tmp_path):
    _, path = saved(tmp_path)
    meta = A.verify_artifact(path)
    assert A.verify_artifact(path, sha256=meta["sha256"]) == meta
    assert meta["sha256"] == A.metadata_digest(meta)
    with pytest.raises(ArtifactIntegrityError, match=meta["sha256"]):
        A.read_prior(path, sha256="0" * 64)
    shutil.rmtree(path / "arrays")           # read_metadata reads no array
    assert A.read_metadata(path) == meta


def test_dtype_cast_and_model_check(tmp_path):
    prior, path = saved(tmp_path, "lowrank", jnp.bfloat16)
    loaded = A.read_prior(path, dtype=jnp.float32, model_params=make_params())
    assert loaded.var.dtype == jnp.float32 and loaded.deviations.dtype == jnp.float32
    np.testing.assert_array_equal(loaded.var, prior.var.astype(jnp.float32))


def _orbax_restore(path: Path) -> dict:
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        return ckptr.restore((path / "arrays").absolute(), args=ocp.args.StandardRestore())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_arrays_are_read_into_aligned_memory_used_in_place(tmp_path, monkeypatch, dtype):
    """Each array is read (chunk by chunk) into 64-byte aligned memory that the loaded
    prior uses as is, without a copy, on the CPU; the values are Orbax's."""
    _, path = saved(tmp_path, "lowrank", dtype)
    read, real = {}, A_arrays.read_arrays
    monkeypatch.setattr(A_io, "read_arrays", lambda *a: read.update(real(*a)) or dict(read))
    loaded = A.read_prior(path)
    restored = _orbax_restore(path)
    assert set(read) == {"mean", "var", "deviations"}
    for name, array in read.items():
        assert array.ctypes.data % 64 == 0, name
        assert bits(array) == bits(restored[name]), name
        if jax.default_backend() == "cpu":
            assert getattr(loaded, name).unsafe_buffer_pointer() == array.ctypes.data, name


@pytest.mark.parametrize("layout", ["one chunk", "no ocdbt", "unknown"])
def test_other_array_layouts_load_the_same(tmp_path, monkeypatch, layout):
    """Artifacts written before the chunked save (one chunk per array), without Orbax's
    OCDBT, or that the aligned reader cannot read (Orbax's restore then) load the same."""
    import orbax.checkpoint as ocp

    prior, path = saved(tmp_path, "lowrank", jnp.bfloat16)
    want = {"": A.read_prior(path), "f32": A.read_prior(path, dtype=jnp.float32)}
    if layout == "unknown":
        def unreadable(*args):
            raise RuntimeError("not this layout")
        monkeypatch.setattr(A_arrays, "_read_arrays_aligned", unreadable)
    else:
        arrays = {k: np.asarray(v) for k, v in _orbax_restore(path).items()}
        shutil.rmtree(path / "arrays")
        handler = (ocp.StandardCheckpointHandler() if layout == "one chunk"
                   else ocp.PyTreeCheckpointHandler(use_ocdbt=False))
        args = (ocp.args.StandardSave(arrays) if layout == "one chunk"
                else ocp.args.PyTreeSave(arrays))
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save((path / "arrays").absolute(), args=args)
        resign(path)
        A_arrays._read_arrays_aligned(path / "arrays", A.read_metadata(path), None)   # no fallback
    got = {"": A.read_prior(path), "f32": A.read_prior(path, dtype=jnp.float32)}
    for key in want:
        for name in ("mean", "var", "deviations", "chol", "logdet"):
            assert bits(getattr(got[key], name)) == bits(getattr(want[key], name)), (key, name)


def test_resave_keeps_metadata_and_overwrite_rules(tmp_path):
    prior, path = saved(tmp_path)
    loaded = A.read_prior(path).rescale(10.0)
    with pytest.raises(ArtifactError, match="already exists"):
        A.save_prior(loaded, path)
    A.save_prior(loaded, path, metadata={"source_accuracy": 0.5}, overwrite=True)
    meta = A.read_metadata(path)
    assert meta["scale"] == 10.0 and meta["source_accuracy"] == 0.5
    assert meta["architecture"] == USER_METADATA["architecture"]
    assert sorted(os.listdir(tmp_path)) == ["prior"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a prior artifact"):
        A.save_prior(prior, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


@pytest.mark.parametrize("metadata", [{"sha256": "x"}, {"kind": "diag"},
                                      {"recommended_scale": [10, 1]},
                                      {"source_accuracy": 1.5}, {"architecture": "cnn"},
                                      {"source": {"dataset": object()}}])
def test_bad_user_metadata_is_refused(tmp_path, metadata):
    with pytest.raises(ArtifactError):
        A.save_prior(make_prior("diag"), tmp_path / "p", metadata=metadata)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------ integrity
def test_corrupted_array_byte(tmp_path):
    _, path = saved(tmp_path)
    target = largest_array_file(path)
    rel = target.relative_to(path).as_posix()
    expected = A.read_metadata(path)["files"][rel]["sha256"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError) as e:
        A.read_prior(path)
    msg = str(e.value)
    assert rel in msg and expected in msg and fsutil.sha256_file(target) in msg
    assert "download" in msg
    with pytest.raises(ArtifactIntegrityError):
        A.verify_artifact(path)
    assert_typed_or_loads(lambda: A.read_prior(path, verify=False))


def test_truncated_array_file(tmp_path):
    _, path = saved(tmp_path)
    target = largest_array_file(path)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    for verify in (True, False):
        with pytest.raises(ArtifactIntegrityError, match="truncated"):
            A.read_prior(path, verify=verify)


def test_unreadable_arrays_are_wrapped(tmp_path):
    # Even when the digests are made to match, a broken array file must end in a typed
    # error, not a tensorstore traceback.
    _, path = saved(tmp_path)
    for target in data_files(path):
        target.write_bytes(target.read_bytes()[:10])
    resign(path)
    with pytest.raises(ArtifactError, match="cannot read the arrays"):
        A.read_prior(path)


def test_missing_files(tmp_path):
    _, path = saved(tmp_path)
    (path / "metadata.json").unlink()
    with pytest.raises(ArtifactError, match="metadata.json") as e:
        A.read_prior(path)
    assert "arrays/" in str(e.value)          # says what a valid artifact contains
    _, path = saved(tmp_path, name="other")
    victim = largest_array_file(path)
    victim.unlink()
    with pytest.raises(ArtifactIntegrityError, match=victim.name):
        A.read_prior(path, verify=False)
    with pytest.raises(ArtifactError, match="does not exist"):
        A.read_prior(tmp_path / "nowhere")


@pytest.mark.parametrize("edit", [
    lambda m: m["spec"]["shapes"].__setitem__(0, [3, 3, 1, 5]),
    lambda m: m.__setitem__("kind", "isotropic"),
    lambda m: m.__setitem__("scale", 25.0),
    lambda m: m.__setitem__("floor", 0.5),
    lambda m: m["files"][sorted(m["files"])[0]].__setitem__("sha256", "0" * 64),
    lambda m: m["architecture"].__setitem__("num_classes", 100),
], ids=["spec-shape", "kind", "scale", "floor", "files-table", "architecture"])
def test_tampered_metadata_is_detected(tmp_path, edit):
    _, path = saved(tmp_path)
    meta = json.loads((path / "metadata.json").read_text())
    edit(meta)
    (path / "metadata.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(ArtifactIntegrityError, match="expected sha256"):
        A.read_prior(path)


def test_resigned_inconsistent_spec_is_still_refused(tmp_path):
    # With recomputed digests the edit is only caught by the shape checks.
    _, path = saved(tmp_path)
    def edit(meta):
        meta["spec"]["shapes"][2] = [11]
        meta["dim"] = 51

    resign(path, edit)
    with pytest.raises(ArtifactError, match="d=51"):
        A.read_prior(path)


def test_metadata_layout_does_not_matter(tmp_path):
    _, path = saved(tmp_path)
    meta = json.loads((path / "metadata.json").read_text())
    (path / "metadata.json").write_text(json.dumps(dict(reversed(list(meta.items())))))
    A.verify_artifact(path)


def test_newer_format_version(tmp_path):
    _, path = saved(tmp_path)
    meta = json.loads((path / "metadata.json").read_text())
    meta["format_version"] = 2
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactVersionError, match="upgrade bayes_transfer"):
        A.read_prior(path)
    with pytest.raises(ArtifactVersionError):
        A.read_metadata(path)


def test_nan_prior_is_refused(tmp_path):
    prior = make_prior("diag")
    bad = dataclasses.replace(prior, mean=prior.mean.at[3].set(jnp.nan))
    with pytest.raises(PriorError, match="NaN"):
        A.save_prior(bad, tmp_path / "p")
    assert not os.listdir(tmp_path)
    # An artifact with NaN written by someone else (digests valid) is refused on load.
    _, path = saved(tmp_path)
    shutil.rmtree(path / "arrays")
    arrays = A_arrays.prior_arrays(make_prior("diag"))
    arrays["mean"][3] = np.nan
    A_arrays.write_arrays(path / "arrays", arrays)
    resign(path)
    with pytest.raises(PriorError, match="NaN"):
        A.read_prior(path)


def test_mismatched_model(tmp_path):
    _, path = saved(tmp_path)
    with pytest.raises(SpecMismatchError) as e:
        A.read_prior(path, model_params=make_params(dense=12))
    msg = str(e.value)
    assert "backbone/dense/bias" in msg and "(10,)" in msg and "(12,)" in msg


def test_nnx_state_as_model_params(tmp_path):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, width, rngs):
            self.backbone = nnx.Linear(3, width, rngs=rngs)
            self.head = nnx.Linear(width, 2, rngs=rngs)

    state = nnx.state(Net(4, nnx.Rngs(0)), nnx.Param)
    spec = ParamSpec.from_params(state)
    prior = Prior.diagonal(spec, spec.ravel(state), jnp.ones((spec.size,)))
    path = A.save_prior(prior, tmp_path / "p")
    loaded = A.read_prior(path, model_params=state)
    assert loaded.spec == spec
    with pytest.raises(SpecMismatchError, match=r"backbone/bias.*\(4,\).*\(5,\)"):
        A.read_prior(path, model_params=nnx.state(Net(5, nnx.Rngs(0)), nnx.Param))


def test_pickle_in_artifact_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Payload())
    pickle.loads(payload)                     # the payload is live ...
    assert marker.exists()
    marker.unlink()
    _, path = saved(tmp_path)
    (path / "evil.pkl").write_bytes(payload)
    (path / "arrays" / "checkpoint").write_bytes(payload)   # Orbax's legacy file name
    for verify in (True, False):              # ... but a stray file is refused unread
        with pytest.raises(ArtifactIntegrityError, match="unexpected file"):
            A.read_prior(path, verify=verify)
    assert not marker.exists()


def test_links_inside_an_artifact_are_refused(tmp_path):
    _, path = saved(tmp_path)
    victim = largest_array_file(path)
    victim.unlink()
    victim.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArtifactIntegrityError, match="symbolic link"):
        A.read_prior(path, verify=False)


def test_non_standard_json_is_refused(tmp_path):
    _, path = saved(tmp_path)
    text = (path / "metadata.json").read_text()
    assert '"floor": 0.0' in text
    (path / "metadata.json").write_text(text.replace('"floor": 0.0', '"floor": NaN'))
    with pytest.raises(ArtifactError, match="not valid JSON"):
        A.read_metadata(path)


# ------------------------------------------------------------------ atomic writes
def test_crash_during_save_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    out = tmp_path / "out"
    monkeypatch.setattr(A_io, "write_metadata", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        A.save_prior(make_prior(), out / "p")
    assert os.listdir(out) == []


def test_crash_during_overwrite_keeps_previous(tmp_path, monkeypatch):
    old, path = saved(tmp_path)
    before = A.read_metadata(path)
    new = make_prior().rescale(99.0)
    monkeypatch.setattr(fsutil, "fsync_tree", lambda root: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        A.save_prior(new, path, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["prior"]
    assert A.verify_artifact(path) == before

    real_replace = fsutil._replace

    def fail_final_rename(src, dst, *a, **k):
        if ".partial-" in str(src) and Path(dst) == path:
            raise OSError("rename failed")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(fsutil, "_replace", fail_final_rename)
    with pytest.raises(OSError, match="rename failed"):
        A.save_prior(new, path, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["prior"]
    assert A.verify_artifact(path) == before
    A.save_prior(new, path, overwrite=True)
    assert float(A.read_prior(path).scale) == 99.0
    assert sorted(os.listdir(tmp_path)) == ["prior"]


# ------------------------------------------------------------------ pack / unpack
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_pack_unpack_round_trip(tmp_path, suffix):
    prior, path = saved(tmp_path)
    packed = A.pack_artifact(path, tmp_path / f"p{suffix}")
    again = A.pack_artifact(path, tmp_path / f"q{suffix}")
    assert packed.read_bytes() == again.read_bytes()          # reproducible
    dest = A.unpack_artifact(packed, tmp_path / "dl" / "prior")
    assert A.read_metadata(dest) == A.read_metadata(path)
    loaded = A.read_prior(dest)
    assert bits(loaded.var) == bits(prior.var)
    direct = A.read_prior(packed)                               # a packed file loads too
    assert bits(direct.mean) == bits(prior.mean)
    with pytest.raises(ArtifactError, match="already exists"):
        A.unpack_artifact(packed, dest)
    assert sorted(os.listdir(tmp_path / "dl")) == ["prior"]


def test_unpack_hand_made_tar_with_top_folder(tmp_path):
    prior, path = saved(tmp_path)
    packed = tmp_path / "hand.tar.gz"
    with tarfile.open(packed, "w:gz") as tar:
        tar.add(path, arcname="my-prior")
    dest = A.unpack_artifact(packed, tmp_path / "x")
    assert bits(A.read_prior(dest).var) == bits(prior.var)


def _add_bytes(tar, name, data=b"x", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("bad", ["dotdot", "absolute", "symlink", "hardlink", "device",
                                 "nested-dotdot"])
def test_malicious_tar_is_refused(tmp_path, bad):
    _, path = saved(tmp_path / "src")
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = tarfile.open(tmp_path / "evil.tar", "w")
    with evil:
        evil.add(path / "metadata.json", arcname="metadata.json")
        if bad == "dotdot":
            _add_bytes(evil, "../outside/evil")
        elif bad == "nested-dotdot":
            _add_bytes(evil, "arrays/../../outside/evil")
        elif bad == "absolute":
            _add_bytes(evil, str(outside / "evil"))
        elif bad == "symlink":
            info = tarfile.TarInfo("arrays")
            info.type, info.linkname = tarfile.SYMTYPE, str(outside)
            evil.addfile(info)
            _add_bytes(evil, "arrays/evil")
        elif bad == "hardlink":
            info = tarfile.TarInfo("evil")
            info.type, info.linkname = tarfile.LNKTYPE, str(outside / "target")
            evil.addfile(info)
        elif bad == "device":
            info = tarfile.TarInfo("evil")
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            evil.addfile(info)
    dl = tmp_path / "dl"
    with pytest.raises(ArtifactError, match="refusing"):
        A.unpack_artifact(tmp_path / "evil.tar", dl / "prior")
    assert os.listdir(outside) == []
    assert not (tmp_path / "evil").exists()
    assert not dl.exists() or os.listdir(dl) == []
    assert [p for p in tmp_path.rglob("evil") if p.name == "evil"] == []


def test_unpack_corrupt_download(tmp_path):
    _, path = saved(tmp_path)
    packed = A.pack_artifact(path, tmp_path / "p.tar.gz")
    data = packed.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError):
        A.unpack_artifact(tmp_path / "cut.tar.gz", tmp_path / "dl" / "a")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ArtifactError):
        A.unpack_artifact(tmp_path / "junk.tar", tmp_path / "dl" / "b")
    # a tar of a modified artifact is refused before it lands
    with tarfile.open(tmp_path / "mod.tar", "w") as tar:
        tar.add(path, arcname=".")
        _add_bytes(tar, "extra.txt")
    with pytest.raises(ArtifactIntegrityError, match="extra.txt"):
        A.unpack_artifact(tmp_path / "mod.tar", tmp_path / "dl" / "c")
    assert os.listdir(tmp_path / "dl") == []
