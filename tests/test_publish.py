"""Packing and publishing priors: deterministic packed files, the published registry
entries (mirrors under the one publishing base URL), `priors publish`."""
from __future__ import annotations

import gzip
import os
import shutil
import tarfile

import pytest

from bayes_transfer import hub
from bayes_transfer.artifacts import read_metadata, read_prior
from bayes_transfer.artifacts.tar import created_epoch
from bayes_transfer.cli import main as cli_main

from prior_server import Toy, assert_same_prior


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
