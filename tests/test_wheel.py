"""A pip user's first minutes: build the wheel, install it into a fresh virtual
environment and, from a directory outside the repository with the network off, list the
registered priors, load the demo prior by name and run the demo in its fast mode.

The virtual environment sees the system's site-packages (jax and the other dependencies
are installed there; downloading them again would take too long), which also hold this
repository as an editable install; the test checks that the package imported is the
wheel's copy in the virtual environment, not the repository. Slow (about a minute):
deselect with ``-m "not slow"``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What the wheel is built from (setuptools reads nothing else).
SOURCES = ("pyproject.toml", "README.md", "bayes_transfer")


def _run(cmd, *, cwd, env, timeout):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                                  f"{proc.stderr[-4000:]}")
    return proc.stdout


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the sources (building in the tree would write
    build/ and *.egg-info there while others work in it)."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-w", dist, "."]
    try:
        _run(cmd, cwd=src, env=env, timeout=300)
    except AssertionError:
        # no index for the isolated build environment: build with what is installed
        _run(cmd[:4] + ["--no-build-isolation"] + cmd[4:], cwd=src, env=env, timeout=300)
    wheels = sorted(dist.glob("bayes_transfer-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_works_offline_from_anywhere(tmp_path):
    wheel = _build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    work = tmp_path / "elsewhere"                       # a directory outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "BAYES_TRANSFER_REGISTRY", "VIRTUAL_ENV")
           and not k.startswith("PYTEST")}
    env.update(PYTHONNOUSERSITE="1", BAYES_TRANSFER_OFFLINE="1", HF_HUB_OFFLINE="1",
               BAYES_TRANSFER_CACHE=str(tmp_path / "cache"),
               BAYES_TRANSFER_DATA_DIR=str(tmp_path / "data"),
               MPLCONFIGDIR=str(tmp_path / "mpl"), PATH=f"{bin_dir}{os.pathsep}"
               f"{env.get('PATH', '')}")
    # pip comes from the system's site-packages and installs into the virtual environment
    _run([python, "-m", "pip", "install", "--quiet",
          "--disable-pip-version-check", "--no-deps", "--force-reinstall", "--no-index",
          wheel], cwd=work, env=env, timeout=300)

    # 1. the package imported is the wheel's copy, with its registry and demo prior
    info = json.loads(_run([python, "-c", (
        "import json, bayes_transfer as bt\n"
        "from bayes_transfer import hub\n"
        "print(json.dumps({'file': bt.__file__, 'registry': str(hub.BUILTIN_REGISTRY),\n"
        "                  'names': [e.name for e in hub.list_priors()]}))")],
        cwd=work, env=env, timeout=300).splitlines()[-1])
    package = Path(info["file"]).resolve().parent
    assert package.is_relative_to(env_dir.resolve()), \
        f"imported {package}, not the wheel installed in {env_dir}"
    assert not package.is_relative_to(ROOT)
    assert Path(info["registry"]).resolve().is_relative_to(package)
    assert "fashion-mnist/small-cnn" in info["names"]

    # 2. the command line lists the registered priors; the demo prior is the wheel's
    listed = _run([bin_dir / "bayes-transfer", "priors", "list"], cwd=work, env=env,
                  timeout=300)
    assert "fashion-mnist/small-cnn" in listed and "local" in listed
    rows = json.loads(_run([bin_dir / "bayes-transfer", "priors", "list", "--json"], cwd=work,
                           env=env, timeout=300))
    demo = [r for r in rows if r["name"] == "fashion-mnist/small-cnn"][0]
    assert demo["status"] == "local" and Path(demo["path"]).resolve().is_relative_to(package)

    # 3. the demo prior loads by name, offline, verified against its pin
    loaded = _run([python, "-c", (
        "import bayes_transfer as bt\n"
        "p = bt.load_prior('fashion-mnist/small-cnn')\n"
        "print(p.kind, p.dim, p.rank, p.metadata['sha256'])")], cwd=work, env=env,
        timeout=300).split()
    entry = json.loads((package / "hub" / "registry.json").read_text())["priors"][
        "fashion-mnist/small-cnn"]
    assert loaded == ["lowrank", str(entry["dim"]), str(entry["rank"]), entry["sha256"]]

    # 4. the demo, fast
    out = _run([bin_dir / "bayes-transfer", "demo", "--fast", "--out", work / "demo"],
               cwd=work, env=env, timeout=600)
    results = json.loads((work / "demo" / "results.json").read_text())
    assert sorted(results["table"]) == ["lowrank", "standard"], out
    for method, row in results["table"].items():
        assert 0.0 <= row["error"][0] < 0.9, (method, row)      # better than chance (0.9)
    assert (work / "demo" / "reliability.png").stat().st_size > 0
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
