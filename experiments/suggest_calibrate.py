"""Calibrate ``bayes_transfer.analysis.suggest.rule`` on stored validation choices, check it on
held-out ones.

    python experiments/suggest_calibrate.py \\
        --calibrate experiments/results/source_fashion59 \\
                    experiments/results/fewshot_fashion59_curve \\
        --holdout experiments/results/fewshot_mnist5k

Reads the ``suggest.json`` that ``experiments/suggest_check.py`` wrote into each runner
result directory: for every prior × shots × seed cell, the transferability measures
taken before fine-tuning and the variance the runner's sweep chose *on validation*.
No test metric is read, so calibrating here never uses the test split. For each
parameter setting of the gain rule (and, for reference, the q rule's offsets and every
constant choice) it prints how often the rule picks the sweep's variance and the mean
|log₁₀ v − log₁₀ v_sweep| ("no prior" counts as a decade above the grid's weakest). The
setting with the smallest mean distance on the calibration cells is reported against
the held-out cells. Runs in seconds: nothing is fine-tuned (``suggest_check.py`` does
that, for test metrics).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bayes_transfer.errors import BayesTransferError  # noqa: E402
from bayes_transfer.analysis.suggest import rule  # noqa: E402

STRONGEST = (0.1, 1.0, 10.0)
FULL_GAIN = (0.05, 0.1, 0.2)
GAIN_PER_DECADE = (0.0125, 0.025, 0.05)
Q_OFFSETS = (0, 1, 2)


def load_cells(result_dir: Path) -> tuple[list[dict], list[float]]:
    """(cells, variance grid) from ``result_dir/suggest.json``."""
    path = Path(result_dir) / "suggest.json"
    if not path.exists():
        raise BayesTransferError(
            f"{path} does not exist: run experiments/suggest_check.py on that config first")
    stored = json.loads(path.read_text())
    config = json.loads((Path(result_dir) / "config.json").read_text())
    return stored["entries"], [float(v) for v in config["tuning"]["variances"]]


def score(picks, chosen, grid) -> dict:
    top = 10 * max(grid)
    return {"matches": sum(math.isclose(min(p, top), min(c, top), rel_tol=1e-3)
                           for p, c in zip(picks, chosen)),
            "n": len(chosen),
            "mean_abs_log10": float(np.mean([abs(math.log10(min(p, top)) -
                                                 math.log10(min(c, top)))
                                             for p, c in zip(picks, chosen)]))}


def candidates(grid):
    """(name, pick(measures) -> variance) for every rule the script compares."""
    for s, f, g in itertools.product(STRONGEST, FULL_GAIN, GAIN_PER_DECADE):
        yield (f"gain: strongest={s:g} full_gain={f:g} gain_per_decade={g:g}",
               lambda m, s=s, f=f, g=g: rule(m, grid, strongest=s, full_gain=f,
                                             gain_per_decade=g)[0])
    for o in Q_OFFSETS:
        yield (f"q (no baseline): offset={o}",
               lambda m, o=o: rule({k: v for k, v in m.items() if k != "gain"}, grid,
                                   offset=o)[0])
    for o in Q_OFFSETS:      # the rule before the gain mapping: q, weakest prior if gain <= 0
        yield (f"q, weakest if gain <= 0 (previous rule): offset={o}",
               lambda m, o=o: rule(m if m.get("gain", 1.0) <= 0 else
                                   {k: v for k, v in m.items() if k != "gain"}, grid,
                                   offset=o)[0])
    for v in [*grid, math.inf]:
        yield f"constant v={v:g}", lambda m, v=v: v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibrate", nargs="+", required=True, help="runner result directories")
    p.add_argument("--holdout", nargs="+", default=[], help="runner result directories")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" /
                                        "suggest_calibration.json"))
    args = p.parse_args(argv)
    sets = {}
    grids = set()
    for role in ("calibrate", "holdout"):
        cells = []
        for d in getattr(args, role):
            entries, grid = load_cells(Path(d))
            cells += entries
            grids.add(tuple(grid))
        sets[role] = cells
    if len(grids) != 1:
        raise BayesTransferError(f"the result directories use different variance grids "
                                 f"{sorted(grids)}; calibrate on one grid at a time")
    grid = list(grids.pop())
    rows = []
    for name, pick in candidates(grid):
        row = {"rule": name}
        for role, cells in sets.items():
            if cells:
                row[role] = score([pick(e["measures"]) for e in cells],
                                  [e["sweep"]["variance"] for e in cells], grid)
        rows.append(row)
    gain_rows = [r for r in rows if r["rule"].startswith("gain")]
    best = min(gain_rows, key=lambda r: (r["calibrate"]["mean_abs_log10"],
                                         -r["calibrate"]["matches"]))
    print(f"{len(sets['calibrate'])} calibration cells, {len(sets['holdout'])} held out; "
          f"grid {grid}")
    print(f"{'rule':58s} {'calibration':>20s} {'held out':>20s}")
    for r in rows:
        cols = [f"{r[k]['matches']:>3d}/{r[k]['n']:<3d} |Δ|={r[k]['mean_abs_log10']:.2f}"
                if k in r else "" for k in ("calibrate", "holdout")]
        mark = "  <- best on calibration" if r is best else ""
        print(f"{r['rule']:58s} {cols[0]:>20s} {cols[1]:>20s}{mark}")
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"calibrate": args.calibrate, "holdout": args.holdout,
                               "grid": grid, "best": best["rule"], "rows": rows}, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
