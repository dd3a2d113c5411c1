"""Fuzzing the prior-artifact loader and the restricted ``.pt`` reader.

Every case is a mutated or truncated file (deterministic seeds). Each one must either
load or raise one of the toolkit's typed errors (a ``BayesTransferError`` subclass):
never another exception type, never a hang (each case runs under a time budget:
``SIGALRM`` where available, and a wall-clock assertion), never code from the file
(some cases plant a pickle payload that would create a marker file; the marker must
never appear). Loaded priors must give a finite log-density; loaded ``.pt`` files may
only hold containers, plain values and numpy arrays.

Counts (with torch installed): 360 artifact directories + 200 packed artifacts
(``.tar`` / ``.tar.gz``, through ``load_prior`` and ``unpack_artifact``) + 600
hand-written ``.pt`` files + 200 ``torch.save`` files = 1,360 cases; without torch
the last group is skipped (1,160 cases).
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayes_transfer import artifacts as A
from bayes_transfer import fsutil
from bayes_transfer.interop import torch_reader
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior

#: BAYES_TRANSFER_FUZZ_SCALE=10 runs ten times as many cases (other seeds), for a deeper search.
SCALE = max(1, int(os.environ.get("BAYES_TRANSFER_FUZZ_SCALE", "1")))
N_DIR, N_PACKED, N_PT_HAND, N_PT_TORCH = (n * SCALE for n in (360, 200, 600, 200))
#: A case that takes longer than this is a hang (cases take milliseconds; the whole file
#: runs in 15 s on 2 idle cores, 35 s with the machine shared at a load average of 6).
CASE_SECONDS = 20.0
# Orbax leaves asyncio tasks of failed restores behind; their "event loop is closed"
# complaints at garbage collection are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ============================================================================ harness
class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case (a BaseException: library code cannot swallow it)."""


@contextlib.contextmanager
def time_budget(seconds: float, what: str):
    alarm = hasattr(signal, "SIGALRM") and hasattr(signal, "setitimer")
    if alarm:
        def on_alarm(signum, frame):
            raise CaseTimeout(f"{what} ran for more than {seconds} s")
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - start
    if elapsed > seconds:
        raise CaseTimeout(f"{what} took {elapsed:.1f} s (budget {seconds} s)")


class Outcomes:
    """Runs cases, tallies outcomes, collects every violation (reported together)."""

    def __init__(self, marker: Path):
        self.marker = marker
        self.problems: list[str] = []
        self.counts: dict[str, int] = {}
        self.cases = 0

    def run(self, what: str, fn, check_result=None) -> object:
        self.cases += 1
        result = None
        try:
            with time_budget(CASE_SECONDS, what), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = fn()
                if check_result is not None:
                    check_result(result)
            outcome = "loaded"
        except BayesTransferError as e:
            outcome = type(e).__name__
            result = e
        except CaseTimeout as e:
            outcome = "HANG"
            self.problems.append(f"{what}: {e}")
        except AssertionError as e:
            outcome = "BAD RESULT"
            self.problems.append(f"{what}: {e}")
        except Exception as e:  # noqa: BLE001 - exactly what this test looks for
            outcome = f"UNTYPED {type(e).__name__}"
            self.problems.append(f"{what}: untyped {type(e).__name__}: {str(e)[:300]}")
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if self.marker.exists():
            self.problems.append(f"{what}: the planted pickle payload RAN")
            self.marker.unlink()
        return result

    def check(self, expected_cases: int) -> None:
        assert self.cases == expected_cases
        assert not self.problems, (f"{len(self.problems)} of {self.cases} cases misbehaved "
                                   f"(outcomes {self.counts}):\n" + "\n".join(self.problems[:40]))


def evil_pickles(marker: Path) -> list[bytes]:
    """Pickles that create ``marker`` when loaded by the standard pickle module."""
    cmd = f"touch {marker}".encode()
    code = f"open({str(marker)!r}, 'w').close()".encode()
    return [
        # GLOBAL os.system + REDUCE (protocol 2)
        b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.",
        # STACK_GLOBAL builtins.exec + REDUCE (protocol 4)
        (b"\x80\x04\x8c\x08builtins\x94\x8c\x04exec\x94\x93X" + struct.pack("<I", len(code))
         + code + b"\x85R."),
    ]


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    root = tmp_path_factory.mktemp("marker")
    control = root / "control"
    import pickle
    for payload in evil_pickles(control):      # positive control: the payloads are live
        pickle.loads(payload)
        assert control.exists()
        control.unlink()
    return root / "pwned"


# ============================================================================ byte mutations
def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = len(data)
    op = rng.choice(["flip", "flip", "replace", "truncate", "truncate", "insert", "delete",
                     "duplicate", "zero", "append"])
    if n == 0 or op == "append":
        return data + rng.randbytes(rng.randint(1, 64)), "append"
    i = rng.randrange(n)
    if op == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            j = rng.randrange(n)
            out[j] ^= 1 << rng.randrange(8)
        return bytes(out), "flip"
    if op == "replace":
        k = rng.randint(1, 16)
        return data[:i] + rng.randbytes(k) + data[i + k:], f"replace@{i}"
    if op == "truncate":
        return data[:i], f"truncate@{i}"
    if op == "insert":
        return data[:i] + rng.randbytes(rng.randint(1, 32)) + data[i:], f"insert@{i}"
    if op == "delete":
        return data[:i] + data[i + rng.randint(1, 32):], f"delete@{i}"
    if op == "duplicate":
        k = rng.randint(1, 64)
        return data[:i + k] + data[i:], f"duplicate@{i}"
    return data[:i] + bytes(min(rng.randint(1, 64), n - i)) + data[i + 64:], f"zero@{i}"


# JSON values that break type, range or path assumptions.
HOSTILE_JSON = [None, True, False, 0, -1, 1, 2, 4, 50, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 400,
                -10 ** 400, 0.0, -0.0, 5e-324, 1e-45, 1e38, 1e308, -1e308, 0.5, "", "x",
                "float32", "bfloat16", "int8", "object", "lowrank", "flat", "diag",
                "../../etc/passwd", "/abs/path", "a\\b", "a\x00b", "ü\u202e", "([", ".*",
                [], {}, [0], [-1], [50], [[50]], [[4, 50]], [4, 50], [2 ** 62, 4], [1e3],
                ["backbone/w"], {"a": 1}, {"size": 1, "sha256": "0" * 64}, "0" * 64,
                {"shape": [50], "dtype": "float32"}, {"shape": [], "dtype": [1]},
                [[[[[[[[[[]]]]]]]]]]]


def _nodes(tree, out=None, parent=None, key=None):
    """(container, key) of every value in a JSON tree."""
    out = [] if out is None else out
    if parent is not None:
        out.append((parent, key))
    if isinstance(tree, dict):
        for k in list(tree):
            _nodes(tree[k], out, tree, k)
    elif isinstance(tree, list):
        for i in range(len(tree)):
            _nodes(tree[i], out, tree, i)
    return out


def mutate_json(doc, rng: random.Random) -> str:
    """Mutate a JSON tree in place; return a description."""
    nodes = _nodes(doc)
    parent, key = rng.choice(nodes)
    op = rng.random()
    if op < 0.7:
        value = rng.choice(HOSTILE_JSON)
        if rng.random() < 0.2:            # a value from elsewhere in the same document
            other_parent, other_key = rng.choice(nodes)
            value = copy.deepcopy(other_parent[other_key])
        parent[key] = copy.deepcopy(value)
        return f"set {key!r}={str(value)[:40]}"
    if op < 0.85:
        del parent[key]
        return f"delete {key!r}"
    if op < 0.95 and isinstance(parent, dict):
        new = rng.choice(["format_version", "sha256", "arrays/evil", "spec", "x", "files"])
        parent[new + ("" if rng.random() < 0.5 else "_")] = rng.choice(HOSTILE_JSON)
        return f"add {new!r}"
    if isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
        return f"append copy of {key!r}"
    return "no-op"


# ============================================================================ artifacts
def make_model_params():
    """d = 36 + 4 + 10 = 50 covered parameters."""
    return {"backbone": {"conv": {"kernel": np.zeros((3, 3, 1, 4), np.float32),
                                  "bias": np.zeros((4,), np.float32)},
                         "dense": {"bias": np.zeros((10,), np.float32)}},
            "head": {"kernel": np.zeros((10, 3), np.float32)}}


SPEC = ParamSpec.from_params(make_model_params())
D = SPEC.size


def _base_priors() -> dict[str, Prior]:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    mean = jax.random.normal(k1, (D,))
    var = jnp.exp(jax.random.normal(k2, (D,)) - 3.0)
    return {
        "lowrank-f32": Prior.lowrank(SPEC, mean, var, 0.05 * jax.random.normal(k3, (4, D)),
                                     scale=3.0, floor=1e-5),
        "diag-bf16": Prior.diagonal(SPEC, mean, var, scale=0.5).astype(jnp.bfloat16),
        "l2-f32": Prior.isotropic(SPEC, None, 0.3, scale=2.0, floor=1e-3),
    }


def sign(root: Path, meta: dict | None = None, *, files: bool = True) -> None:
    """Recompute the file table (optional) and the digest: makes edits 'valid'."""
    meta = json.loads((root / "metadata.json").read_bytes()) if meta is None else meta
    if files:
        table = {}
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name != "metadata.json":
                data = p.read_bytes()
                table[p.relative_to(root).as_posix()] = {
                    "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta["files"] = table
    meta["sha256"] = A.metadata_digest(meta)
    (root / "metadata.json").write_text(json.dumps(meta))


def check_prior(prior) -> None:
    assert isinstance(prior, Prior), type(prior)
    theta = np.zeros(prior.dim, np.float32) + np.asarray(prior.mean, np.float32)
    lp = prior.log_prob(jnp.asarray(theta + 1e-3))
    assert bool(jnp.isfinite(lp)), f"loaded prior {prior!r} gives log_prob {lp}"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for name, prior in _base_priors().items():
        path = A.save_prior(prior, root / name, metadata={"source": {"dataset": "fuzz"}})
        check_prior(A.read_prior(path, model_params=make_model_params()))
        out[name] = path
    return out


def mutate_artifact_dir(root: Path, rng: random.Random, marker: Path) -> tuple[str, bool]:
    """Mutate the artifact at ``root``; return (description, whether it is still signed)."""
    array_files = sorted(p for p in (root / "arrays").rglob("*") if p.is_file())
    kind = rng.choices(["bytes", "json", "orbax-json", "members", "pickle", "metadata-bytes"],
                       weights=[34, 30, 10, 12, 6, 8])[0]
    signed = rng.random() < 0.75
    if kind == "bytes":
        f = rng.choice(array_files)
        data, what = mutate_bytes(f.read_bytes(), rng)
        f.write_bytes(data)
        desc = f"{what} in {f.relative_to(root)}"
    elif kind == "json":
        meta = json.loads((root / "metadata.json").read_bytes())
        desc = "metadata " + mutate_json(meta, rng)
        if rng.random() < 0.05:
            meta["x"] = "DEEP"       # nesting no JSON library round-trips: written as text
            text = json.dumps(meta).replace('"DEEP"', "[" * 5000 + "]" * 5000)
            (root / "metadata.json").write_text(text)
            return "metadata nested 5000 deep", False
        if signed:
            try:
                sign(root, meta, files=False)
            except BayesTransferError:        # not canonical JSON: write it unsigned
                signed = False
        if not signed:
            (root / "metadata.json").write_text(json.dumps(meta))
        return desc, signed
    elif kind == "orbax-json":
        f = rng.choice([p for p in array_files if p.name in ("_METADATA", "_CHECKPOINT_METADATA")])
        doc = json.loads(f.read_bytes())
        desc = f"{f.name} " + mutate_json(doc, rng)
        f.write_text(json.dumps(doc))
    elif kind == "members":
        op = rng.choice(["remove", "copy", "stray", "dir", "swap", "empty"])
        f = rng.choice(array_files)
        if op == "remove":
            f.unlink()
        elif op == "copy":        # a duplicate chunk under another name
            shutil.copy(f, f.with_name(f.name + "0"))
        elif op == "stray":
            (root / "arrays" / "d" / "extra").parent.mkdir(exist_ok=True)
            (root / "arrays" / "d" / "extra").write_bytes(rng.randbytes(100))
        elif op == "dir":          # a file replaced by a directory
            f.unlink()
            f.mkdir()
            (f / "x").write_bytes(b"x")
        elif op == "swap":
            g = rng.choice(array_files)
            a, b = f.read_bytes(), g.read_bytes()
            f.write_bytes(b)
            g.write_bytes(a)
        else:
            f.write_bytes(b"")
        desc = f"member {op} {f.relative_to(root)}"
    elif kind == "pickle":
        payload = rng.choice(evil_pickles(marker))
        where = rng.choice(["replace", "extra", "metadata"])
        if where == "metadata":
            (root / "metadata.json").write_bytes(payload)
            return "metadata.json replaced by a pickle payload", False
        f = rng.choice(array_files) if where == "replace" else root / "arrays" / "evil.pkl"
        f.write_bytes(payload)
        desc = f"pickle payload in {f.relative_to(root)}"
    else:
        data, what = mutate_bytes((root / "metadata.json").read_bytes(), rng)
        (root / "metadata.json").write_bytes(data)
        desc = f"metadata.json bytes {what}"
        try:
            meta = json.loads(data)
        except ValueError:
            return desc, False
        if signed and isinstance(meta, dict):
            try:
                sign(root, meta, files=False)
            except BayesTransferError:
                signed = False
        return desc, signed and isinstance(meta, dict)
    if signed:
        sign(root)
    return desc, signed


def same_artifact(root: Path, base: Path) -> bool:
    """Whether ``root`` holds the same metadata (parsed) and the same array files as ``base``."""
    def files(r):
        return {p.relative_to(r).as_posix(): p.read_bytes() for p in r.rglob("*")
                if p.is_file() and p.name != "metadata.json"}
    try:
        same_meta = (json.loads((root / "metadata.json").read_bytes())
                     == json.loads((base / "metadata.json").read_bytes()))
    except (ValueError, RecursionError, OSError):
        return False
    dirs = lambda r: sorted(p.relative_to(r).as_posix() for p in r.rglob("*"))  # noqa: E731
    return same_meta and files(root) == files(base) and dirs(root) == dirs(base)


def test_fuzz_artifact_directories(bases, marker, tmp_path):
    outcomes = Outcomes(marker)
    names = sorted(bases)
    digests = {n: json.loads((bases[n] / "metadata.json").read_bytes())["sha256"] for n in names}
    for i in range(N_DIR):
        rng = random.Random(f"artifact-dir-{i}")
        name = rng.choice(names)
        root = tmp_path / f"c{i}"
        shutil.copytree(bases[name], root)
        desc, signed = mutate_artifact_dir(root, rng, marker)
        unchanged = same_artifact(root, bases[name])
        verify = rng.random() < 0.8
        kwargs = {"verify": verify}
        if rng.random() < 0.3:
            kwargs["model_params"] = make_model_params()
        if rng.random() < 0.2:
            kwargs["sha256"] = digests[name]
        what = f"case {i} ({name}, {desc}, signed={signed}, {sorted(kwargs)}, verify={verify})"
        result = outcomes.run(what, lambda: A.read_prior(root, **kwargs), check_prior)
        if isinstance(result, Prior):
            if not signed and verify and not unchanged:
                outcomes.problems.append(f"{what}: an unsigned edit was not detected")
            if "sha256" in kwargs and result.metadata["sha256"] != kwargs["sha256"]:
                outcomes.problems.append(f"{what}: loaded although the pinned digest differs")
        elif unchanged:
            outcomes.problems.append(f"{what}: an unchanged artifact failed: {result}")
        shutil.rmtree(root, ignore_errors=True)
    outcomes.check(N_DIR)
    assert outcomes.counts.get("loaded", 0) > 0 and len(outcomes.counts) > 3, outcomes.counts


# ------------------------------------------------------------------ packed artifacts
def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], compress: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    return info, data


def read_members(root: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    rels = ["metadata.json"] + sorted(p.relative_to(root).as_posix()
                                      for p in root.rglob("*")
                                      if p.is_file() and p.name != "metadata.json")
    return [file_member(rel, (root / rel).read_bytes()) for rel in rels]


def mutate_members(members, rng: random.Random, marker: Path, work: Path) -> str:
    """Structural edits of a packed artifact's member list (in place)."""
    op = rng.choice(["duplicate", "remove", "rename", "type", "top-folder", "top-folder-stray",
                     "content-signed", "content", "pickle", "directory-as-file"])
    k = rng.randrange(len(members))
    info, data = members[k]
    if op == "duplicate":
        members.insert(rng.randrange(len(members) + 1), file_member(info.name, data))
    elif op == "remove":
        del members[k]
    elif op == "rename":
        new = rng.choice(["../escape", "/etc/abs", "arrays/../../up", "a\\b", "./metadata.json",
                          "arrays//d", "C:/win", "arrays/./x", "", ".", "arrays/d/../../..",
                          info.name + "/sub", "x" * 300])
        members[k] = file_member(new, data)
    elif op == "type":
        t = rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE,
                        tarfile.DIRTYPE, b"V", b"Z"])
        bad = tarfile.TarInfo(info.name)
        bad.type, bad.linkname = t, rng.choice(["/etc/passwd", "../x", "metadata.json"])
        bad.mode = 0o644
        members[k] = (bad, None)
    elif op.startswith("top-folder"):     # packed by hand as `tar -cf x.tar my-prior/`
        members[:] = [file_member("my-prior/" + i.name, d) for i, d in members]
        if op.endswith("stray"):
            members.append(file_member("other/x", b"x"))
    elif op == "directory-as-file":
        members.append(file_member(info.name + "/child", b"x"))
    elif op in ("content", "content-signed"):
        tmp = work / "content"
        for i, d in members:
            (tmp / i.name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / i.name).write_bytes(d)
        target = rng.choice([i.name for i, _ in members if i.name != "metadata.json"])
        new, what = mutate_bytes((tmp / target).read_bytes(), rng)
        (tmp / target).write_bytes(new)
        if op == "content-signed":
            sign(tmp)
        members[:] = read_members(tmp)
        shutil.rmtree(tmp)
        return f"{op} {what} in {target}"
    else:
        members.append(file_member("arrays/evil.pkl", rng.choice(evil_pickles(marker))))
        return "pickle payload member"
    return f"{op} {info.name}"


def test_fuzz_packed_artifacts(bases, marker, tmp_path, monkeypatch):
    # fsync is not under test here and costs ~10 ms a file on this disk
    monkeypatch.setattr(fsutil, "fsync_tree", lambda root: None)
    monkeypatch.setattr(fsutil, "fsync_dir", lambda directory: None)
    outcomes = Outcomes(marker)
    names = sorted(bases)
    packed = {(n, c): tar_bytes(read_members(bases[n]), c) for n in names for c in (0, 1)}
    for i in range(N_PACKED):
        rng = random.Random(f"packed-{i}")
        name, compress = rng.choice(names), rng.random() < 0.5
        if rng.random() < 0.5:
            data, desc = mutate_bytes(packed[name, compress], rng)
        else:
            members = read_members(bases[name])
            desc = mutate_members(members, rng, marker, tmp_path / f"w{i}")
            data = tar_bytes(members, compress)
        file = tmp_path / f"c{i}.tar{'.gz' if compress else ''}"
        file.write_bytes(data)
        dest = tmp_path / f"u{i}" / "artifact"
        if rng.random() < 0.5:
            what = f"packed case {i} load_prior ({name}, gz={compress}, {desc})"
            outcomes.run(what, lambda: A.read_prior(file), check_prior)
        else:
            what = f"packed case {i} unpack_artifact ({name}, gz={compress}, {desc})"
            result = outcomes.run(what, lambda: A.unpack_artifact(file, dest))
            leftovers = sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() \
                else []
            if isinstance(result, Path):
                outcomes.run(what + " then load", lambda: A.read_prior(dest), check_prior)
                outcomes.cases -= 1
            elif leftovers:
                outcomes.problems.append(f"{what}: a failed unpack left {leftovers}")
        shutil.rmtree(dest.parent, ignore_errors=True)
        file.unlink()
    assert not (tmp_path.parent / "escape").exists() and not Path("/etc/abs").exists()
    outcomes.check(N_PACKED)
    assert outcomes.counts.get("loaded", 0) > 0, outcomes.counts


# ============================================================================ .pt files
def _op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _op_tuple(parts) -> bytes:
    return b"(" + b"".join(parts) + b"t"


def _op_tensor(key, numel, offset, shape, stride, storage="FloatStorage") -> bytes:
    pid = _op_tuple([_op_str("storage"), b"ctorch\n" + storage.encode() + b"\n", _op_str(key),
                     _op_str("cpu"), _op_int(numel)])
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q" + _op_int(offset)
            + _op_tuple(_op_int(s) for s in shape) + _op_tuple(_op_int(s) for s in stride)
            + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")


def _state_dict_pickle(entries: dict[str, bytes], metadata: bool = True) -> bytes:
    body = b"".join(_op_str(k) + v for k, v in entries.items())
    out = b"\x80\x02ccollections\nOrderedDict\n)R(" + body + b"u"
    if metadata:      # torch sets _metadata on state dicts through BUILD
        out += b"}" + _op_str("_metadata") + b"ccollections\nOrderedDict\n)Rsb"
    return out + b"."


def write_zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # duplicate names are on purpose
        with zipfile.ZipFile(buf, "w") as z:
            for name, data, method in entries:
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = method
                z.writestr(info, data)
    return buf.getvalue()


def handmade_pt_files() -> dict[str, list[tuple[str, bytes, int]]]:
    """torch.save-like archives as member lists: (name, bytes, compression)."""
    S = zipfile.ZIP_STORED
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    b = rng.normal(size=(4,)).astype(np.float32)

    def archive(pkl, storages, root="archive", byteorder=b"little"):
        return ([(f"{root}/data.pkl", pkl, S), (f"{root}/byteorder", byteorder, S)]
                + [(f"{root}/data/{k}", v, S) for k, v in storages.items()]
                + [(f"{root}/version", b"3\n", S)])

    shared = np.arange(24, dtype=np.float32)
    bf = np.array([1.5, -2.0, 3.25, 0.0], dtype=jnp.bfloat16)
    return {
        "state-dict": archive(_state_dict_pickle({
            "conv.weight": _op_tensor("0", 48, 0, (4, 3, 2, 2), (12, 4, 2, 1)),
            "conv.bias": _op_tensor("1", 4, 0, (4,), (1,)),
            "steps": _op_tensor("2", 1, 0, (), (), "LongStorage")}),
            {"0": w.tobytes(), "1": b.tobytes(), "2": np.int64(7).tobytes()}),
        "views": archive(_state_dict_pickle({
            "t": _op_tensor("0", 24, 2, (3, 4), (1, 3)),
            "v": _op_tensor("0", 24, 4, (2, 5), (5, 1)),
            "e": _op_tensor("0", 24, 0, (0, 3), (3, 1))}, metadata=False),
            {"0": shared.tobytes()}),
        "bigendian-bf16": archive(_state_dict_pickle({
            "x": _op_tensor("0", 4, 0, (4,), (1,), "BFloat16Storage"),
            "y": _op_tensor("1", 2, 0, (2,), (1,), "DoubleStorage")}),
            {"0": bf.view(np.uint16).astype(">u2").tobytes(),
             "1": np.array([1.0, -7.5], ">f8").tobytes()}, byteorder=b"big"),
        "tensor": archive(b"\x80\x02" + _op_tensor("0", 6, 0, (2, 3), (3, 1)) + b".",
                          {"0": np.ones(6, np.float32).tobytes()}, root="mean"),
    }


def torch_pt_files() -> dict[str, bytes]:
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch.save "
                                                "part of the fuzz test needs it")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    out = {}
    for name, obj in {"state-dict": model.state_dict(),
                      "tensor": torch.linspace(0, 1, 40).reshape(5, 8)[:, ::2],
                      "nested": {"mean": torch.randn(30), "var": torch.rand(30).half(),
                                 "steps": [1, 2.5, "x", None]}}.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        out[name] = buf.getvalue()
    return out


def zip_entries(data: bytes) -> list[tuple[str, bytes, int]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i), i.compress_type) for i in z.infolist()]


def _header_offsets(data: bytes, signature: bytes) -> list[int]:
    out, i = [], data.find(signature)
    while i >= 0:
        out.append(i)
        i = data.find(signature, i + 1)
    return out


def mutate_zip_headers(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Edit a field of a central-directory or local file header."""
    central = rng.random() < 0.6
    offsets = _header_offsets(data, b"PK\x01\x02" if central else b"PK\x03\x04")
    if not offsets:
        return data, "no header"
    pos = rng.choice(offsets)
    fields = ({"flags": (8, 2), "method": (10, 2), "crc": (16, 4), "csize": (20, 4),
               "usize": (24, 4), "namelen": (28, 2), "extralen": (30, 2), "offset": (42, 4)}
              if central else
              {"flags": (6, 2), "method": (8, 2), "crc": (14, 4), "csize": (18, 4),
               "usize": (22, 4), "namelen": (26, 2), "extralen": (28, 2)})
    field = rng.choice(sorted(fields))
    at, size = fields[field]
    if field == "flags":
        value = rng.choice([0x1, 0x8, 0x40, 0x800, 0x2000, 0x20, 0xFFFF])
    elif field == "method":
        value = rng.choice([8, 9, 12, 14, 93, 95, 98, 99, 0xFFFF])
    else:
        value = rng.choice([0, 1, 2 ** (8 * size) - 1, rng.randrange(2 ** (8 * size))])
    fmt = "<H" if size == 2 else "<I"
    out = data[:pos + at] + struct.pack(fmt, value) + data[pos + at + size:]
    return out, f"{'central' if central else 'local'} {field}={value:#x}"


def mutate_pt(entries: list[tuple[str, bytes, int]], rng: random.Random,
              marker: Path) -> tuple[bytes, str]:
    entries = list(entries)
    kind = rng.choices(["file-bytes", "pickle-bytes", "storage", "members", "compression",
                        "headers", "payload"], weights=[25, 25, 10, 12, 8, 12, 8])[0]
    if kind == "file-bytes":
        return mutate_bytes(write_zip(entries), rng)
    pkl = next(i for i, e in enumerate(entries) if e[0].endswith("/data.pkl"))
    if kind == "pickle-bytes":            # a corrupt pickle inside a valid zip (CRC ok)
        name, data, method = entries[pkl]
        new, what = mutate_bytes(data, rng)
        entries[pkl] = (name, new, method)
        return write_zip(entries), f"data.pkl {what}"
    if kind == "storage":
        k = rng.choice([i for i, e in enumerate(entries) if "/data/" in e[0]] or [pkl])
        name, data, method = entries[k]
        new, what = mutate_bytes(data, rng)
        entries[k] = (name, new, method)
        return write_zip(entries), f"{name} {what}"
    if kind == "members":
        op = rng.choice(["remove", "duplicate", "rename", "extra", "reorder"])
        k = rng.randrange(len(entries))
        name, data, method = entries[k]
        if op == "remove":
            del entries[k]
        elif op == "duplicate":
            entries.insert(rng.randrange(len(entries) + 1),
                           (name, rng.choice([data, data[:len(data) // 2], b""]), method))
        elif op == "rename":
            new = rng.choice(["other/data.pkl", "../x", "/abs", name.split("/")[0] + "/data/99",
                              name.split("/")[0] + "/code/x", name + "x", "a\\b", ""])
            entries[k] = (new, data, method)
        elif op == "extra":
            entries.append((rng.choice([name.split("/")[0] + "/extra", "x/y"]),
                            rng.randbytes(50), method))
        else:
            rng.shuffle(entries)
        return write_zip(entries), f"member {op} {name}"
    if kind == "compression":
        k = rng.randrange(len(entries))
        name, data, _ = entries[k]
        method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
        entries[k] = (name, data, method)
        out = write_zip(entries)
        if rng.random() < 0.5:
            out, what = mutate_bytes(out, rng)
            return out, f"{name} compressed with {method}, then {what}"
        return out, f"{name} compressed with {method}"
    if kind == "headers":
        return mutate_zip_headers(write_zip(entries), rng)
    payloads = evil_pickles(marker)
    name, data, method = entries[pkl]
    if rng.random() < 0.5:
        entries[pkl] = (name, rng.choice(payloads), method)
        return write_zip(entries), "data.pkl replaced by a payload"
    # splice the payload's REDUCE into a valid pickle (before its STOP)
    evil = rng.choice(payloads)
    body = evil[2:-1]                 # without the PROTO header and the STOP
    entries[pkl] = (name, data[:-1] + body + b"0.", method)   # POP the result, keep the dict
    return write_zip(entries), "payload spliced into data.pkl"


def _check_loaded(obj, depth=0) -> None:
    assert depth < 200, "result nests absurdly deep"
    if isinstance(obj, np.ndarray):
        assert obj.nbytes <= 1 << 20, f"an array of {obj.nbytes} bytes from a tiny file"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_loaded(k, depth + 1)
            _check_loaded(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_loaded(v, depth + 1)
    else:
        assert isinstance(obj, (str, bytes, int, float, complex, bool, type(None))), type(obj)


def _fuzz_pt(bases: dict[str, list], n: int, prefix: str, marker: Path, tmp_path: Path):
    outcomes = Outcomes(marker)
    names = sorted(bases)
    for name in names:       # the unmutated files load
        path = tmp_path / f"{name}.pt"
        path.write_bytes(write_zip(bases[name]))
        _check_loaded(torch_reader.load(path))
    for i in range(n):
        rng = random.Random(f"{prefix}-{i}")
        name = rng.choice(names)
        data, desc = mutate_pt(bases[name], rng, marker)
        path = tmp_path / f"c{i}.pt"
        path.write_bytes(data)
        outcomes.run(f"{prefix} case {i} ({name}, {desc})", lambda: torch_reader.load(path),
                     _check_loaded)
        path.unlink()
    outcomes.check(n)
    assert outcomes.counts.get("loaded", 0) > 0 and len(outcomes.counts) > 2, outcomes.counts
    return outcomes


def test_fuzz_torch_reader_handmade(marker, tmp_path):
    outcomes = _fuzz_pt(handmade_pt_files(), N_PT_HAND, "pt-hand", marker, tmp_path)
    assert outcomes.counts.get("UnsafePickleError", 0) > 0


def test_fuzz_torch_reader_torch_written(marker, tmp_path):
    files = {name: zip_entries(data) for name, data in torch_pt_files().items()}
    _fuzz_pt(files, N_PT_TORCH, "pt-torch", marker, tmp_path)
