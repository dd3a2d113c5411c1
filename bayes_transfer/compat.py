"""Old module paths, kept importable after the package was reorganised.

``import bayes_transfer.train`` (and ``from bayes_transfer.artifact import load_prior``)
keep working: each old name resolves, on first import, to the module that now holds its
code. New code imports the new paths; this map only serves existing user code.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old module name -> the module that replaced it
ALIASES: dict[str, str] = {
    "bayes_transfer.train": "bayes_transfer.training",
    "bayes_transfer.objectives": "bayes_transfer.training.objectives",
    "bayes_transfer.checkpoints": "bayes_transfer.training.checkpoints",
    "bayes_transfer.metrics": "bayes_transfer.evaluation.metrics",
    "bayes_transfer.plots": "bayes_transfer.evaluation.plots",
    "bayes_transfer.transferability": "bayes_transfer.analysis.transferability",
    "bayes_transfer.suggest": "bayes_transfer.analysis.suggest",
    "bayes_transfer.diagnostics": "bayes_transfer.analysis.diagnostics",
    "bayes_transfer.torch_reader": "bayes_transfer.interop.torch_reader",
    "bayes_transfer.torch_import": "bayes_transfer.interop.torch_prior",
    "bayes_transfer.artifact": "bayes_transfer.artifacts",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name in ALIASES:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(ALIASES[spec.name])   # the new module itself

    def exec_module(self, module):
        pass


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
