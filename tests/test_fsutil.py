"""The one atomic write: the destination always holds the old or the new version."""
import json
import subprocess
import sys
import textwrap

import pytest

from bayes_transfer import fsutil
from bayes_transfer.fsutil import atomic_write, write_json, write_text


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name
                  or ".old-" in p.name)


def test_a_file_is_replaced_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_a_directory_is_replaced_whole(tmp_path, monkeypatch, exchange):
    if not exchange:   # the fallback for file systems without RENAME_EXCHANGE
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    dest = tmp_path / "artifact"
    with atomic_write(dest, directory=True) as tmp:
        (tmp / "old.txt").write_text("old")
    with atomic_write(dest, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_version(tmp_path):
    write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "f.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert (tmp_path / "f.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_a_failed_swap_restores_the_old_directory(tmp_path, monkeypatch):
    dest = tmp_path / "d"
    with atomic_write(dest, directory=True) as tmp:
        (tmp / "x").write_text("old")
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    real_replace = fsutil.os.replace

    def failing_replace(src, dst):
        if str(dst) == str(dest):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(dest, directory=True) as tmp:
            (tmp / "x").write_text("new")
    assert (dest / "x").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_overwrite_false_refuses_an_existing_destination(tmp_path):
    write_text(tmp_path / "f", "1")
    with pytest.raises(FileExistsError):
        with atomic_write(tmp_path / "f", overwrite=False) as tmp:
            tmp.write_text("2")
    assert (tmp_path / "f").read_text() == "1"
    with atomic_write(tmp_path / "g", overwrite=False) as tmp:
        tmp.write_text("3")
    assert (tmp_path / "g").read_text() == "3"


@pytest.mark.skipif(fsutil._LIBC is None, reason="renameat2 is Linux-only")
def test_a_reader_never_sees_the_directory_missing_or_mixed(tmp_path):
    """One process replaces a directory 300 times while this one reads it: every read
    finds the directory, with both files from the same version."""
    dest = tmp_path / "d"
    with atomic_write(dest, directory=True) as tmp:
        (tmp / "a").write_text("0")
        (tmp / "b").write_text("0")
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from bayes_transfer.fsutil import atomic_write
        for i in range(1, 301):
            with atomic_write({str(dest)!r}, directory=True) as tmp:
                (tmp / "a").write_text(str(i))
                (tmp / "b").write_text(str(i))
        """)])
    reads = 0
    while writer.poll() is None:
        try:
            a = (dest / "a").read_text()
            b = (dest / "b").read_text()
        except FileNotFoundError:
            # a file can vanish between our two reads (its version was replaced and
            # deleted); the directory itself must always be there
            assert dest.is_dir()
            continue
        reads += 1
        assert int(a) <= int(b)      # b is read after a: never from an older version
    assert writer.returncode == 0 and reads > 0
    assert (dest / "a").read_text() == "300" and _leftovers(tmp_path) == []
