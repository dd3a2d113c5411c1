"""Test-wide setup: data the package cannot find by itself is pointed to here."""
import os
from pathlib import Path

import pytest

# The ISBI-2012 membrane data lies beside the project, not in it (the package never
# looks outside itself): tell it where, when it is there.
ISBI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012-membrane"
if ISBI_DIR.is_dir():
    os.environ.setdefault("BAYES_TRANSFER_ISBI2012", str(ISBI_DIR))


@pytest.fixture(autouse=True)
def _package_registries_only(monkeypatch):
    """Each test starts from the package's own registry: a user's (or an experiment
    module's import-time) $BAYES_TRANSFER_REGISTRY must not leak into it."""
    monkeypatch.delenv("BAYES_TRANSFER_REGISTRY", raising=False)
