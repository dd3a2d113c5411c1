"""Posterior samples held on the host, spilling to ``.npz`` files beyond a limit."""
from __future__ import annotations

import collections.abc
import tempfile
from pathlib import Path

import jax
import numpy as np

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.fsutil import atomic_write


class PosteriorSamples(collections.abc.Sequence):
    """A sequence of posterior samples, each a ``(params, rest)`` pair of host arrays.

    The first ``max_in_memory`` samples (all, if None) stay in memory; later ones are
    written to ``directory`` as ``sample_00012.npz`` (the leaves, in tree order) and
    read back on access. ``rest`` is the non-parameter state (BatchNorm statistics)
    that goes with the sample, or None. ``steps`` records where each sample came from
    (a chain step, or the sample index); ``info`` is free-form metadata.

    Example::

        store = PosteriorSamples("runs/sgld", max_in_memory=4)
        store.append(params, rest)
        params, rest = store[0]
    """

    def __init__(self, directory=None, *, max_in_memory: int | None = None):
        if max_in_memory is not None and int(max_in_memory) < 0:
            raise BayesTransferError(f"max_in_memory must be >= 0, got {max_in_memory!r}")
        self.max_in_memory = None if max_in_memory is None else int(max_in_memory)
        self.directory = None if directory is None else Path(directory)
        self.steps: list[int] = []
        self.info: dict = {}
        self._memory: list[list[np.ndarray]] = []
        self._files: list[Path] = []
        self._treedef = None

    def append(self, params, rest=None, *, step: int | None = None) -> None:
        leaves, treedef = jax.tree.flatten(jax.device_get((params, rest)))
        leaves = [np.asarray(x) for x in leaves]
        if self._treedef is None:
            self._treedef = treedef
        elif treedef != self._treedef:
            raise BayesTransferError("a sample's structure differs from the first sample's")
        if self.max_in_memory is None or len(self._memory) < self.max_in_memory:
            self._memory.append(leaves)
        else:
            if self.directory is None:
                self.directory = Path(tempfile.mkdtemp(prefix="bayes_transfer_samples_"))
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"sample_{len(self):05d}.npz"
            with atomic_write(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, *leaves)
            self._files.append(path)
        self.steps.append(len(self) - 1 if step is None else int(step))

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    def _leaves(self, i: int) -> list[np.ndarray]:
        if i < len(self._memory):
            return self._memory[i]
        with np.load(self._files[i - len(self._memory)]) as f:
            return [f[f"arr_{j}"] for j in range(len(f.files))]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        return jax.tree.unflatten(self._treedef, self._leaves(i % len(self)))

    @property
    def files(self) -> list[Path]:
        """The ``.npz`` files of the samples kept on disk."""
        return list(self._files)

    def params(self) -> list:
        """All samples' parameters (loads the spilled ones)."""
        return [p for p, _ in self]

    def __repr__(self) -> str:
        return (f"PosteriorSamples(n={len(self)}, in_memory={len(self._memory)}, "
                f"on_disk={len(self._files)}, directory={self.directory})")
