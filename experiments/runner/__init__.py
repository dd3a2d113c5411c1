"""The experiment runner (``python experiments/run.py CONFIG.json``), one job a module:

* ``config``: the JSON config, its checks and the command-line overrides;
* ``cells``: the grid of cells (prior, shots, seed, method) and running one cell;
* ``store``: the result directory (``runs.jsonl`` appended cell by cell, resumable);
* ``report``: statistics, ``summary.md`` / ``summary.json``, figures, compute time;
* ``loop``: every missing cell, then the report;
* ``cli``: the command line.

Importing this package also makes the repository importable, its prior registry the
default and the ISBI-2012 data beside it findable, for every experiment script (they
import it first).
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# The experiments' priors (all but the demo prior) are registered in the repository, not
# in the package's built-in registry.
os.environ.setdefault("BAYES_TRANSFER_REGISTRY", str(ROOT / "priors" / "registry.json"))
# Real data that cannot be installed from a registry lies beside the project, if at all.
_ISBI = ROOT.parent / "shared" / "data" / "isbi2012-membrane"
if _ISBI.is_dir():
    os.environ.setdefault("BAYES_TRANSFER_ISBI2012", str(_ISBI))

# The front door (``runner.run``, ``runner.main``, ...); the modules hold the rest.
from .cells import cell_key, grid  # noqa: E402
from .cli import main  # noqa: E402
from .config import check_config, load_config, parse_shots  # noqa: E402
from .loop import run  # noqa: E402
from .report import compute_time, format_compute, interval, summarize  # noqa: E402
from .store import read_rows, stored_rows  # noqa: E402

__all__ = ["ROOT", "cell_key", "check_config", "compute_time", "format_compute", "grid",
           "interval", "load_config", "main", "parse_shots", "read_rows", "run",
           "stored_rows", "summarize"]
