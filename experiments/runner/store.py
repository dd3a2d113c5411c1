"""The result directory: ``config.json``, ``runs.jsonl`` and the ``probs_*.npz`` files.

Every finished cell is one JSON row appended to ``runs.jsonl`` and flushed to disk, so a
rerun skips what is done; a line cut short by a kill is dropped and that cell reruns.
The other files are replaced whole, atomically (``bayes_transfer.fsutil``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bayes_transfer import BayesTransferError
from bayes_transfer.fsutil import atomic_write, write_text

RUNS = "runs.jsonl"


def save_config(out: Path, config: dict) -> None:
    """``out/config.json``: the (checked, overridden) config the results cover."""
    write_text(out / "config.json", json.dumps(config, indent=2))


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``runs.jsonl`` (none if it does not exist)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut short by a kill: that cell reruns
            continue
    return rows


def repair_rows(path: Path) -> list[dict]:
    """The finished rows; a line cut short by a kill is dropped (atomically), so that
    cell reruns and the next row starts on a line of its own."""
    rows = read_rows(path)
    if path.exists() and len(rows) != len(path.read_text().splitlines()):
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def stored_rows(out: Path, what_to_do: str) -> list[dict]:
    """The rows of ``out/runs.jsonl``; a clear error (ending in ``what_to_do``) if none."""
    path = Path(out) / RUNS
    if not path.exists():
        raise BayesTransferError(f"no results in {out} (no runs.jsonl): {what_to_do}")
    return read_rows(path)


def append_row(path: Path, row: dict) -> None:
    """Add one finished cell to ``runs.jsonl``, on disk when this returns."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_probs(out: Path, label: str, method: str, probs, labels) -> None:
    """The test probabilities of one cell, for the reliability diagram."""
    path = out / f"probs_{label}_{method.replace(':', '-')}.npz"
    # To a file object: given a name, savez would add ".npz" to the temporary's.
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, probs=probs, labels=labels)


def load_probs(out: Path) -> dict:
    """{``label_method``: (probs, labels)} of every ``probs_*.npz`` in ``out``."""
    curves = {}
    for f in sorted(out.glob("probs_*.npz")):
        with np.load(f) as z:
            curves[f.stem[len("probs_"):]] = (z["probs"], z["labels"])
    return curves
