"""Paired differences between two methods of a runner result, per prior and shots.

    python experiments/paired.py experiments/configs/source_fashion59.json lowrank standard --shots 10

Two methods run on the same seed see the same images and start alike, so the
per-seed difference A − B removes most of the seed-to-seed spread that makes the
unpaired intervals of ``summary.md`` overlap. Prints mean ± 95% t-interval of A − B
over the seeds where both ran, for test error, NLL and ECE; a difference whose
interval excludes 0 is marked with ``*``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from runner.cells import cell_key  # noqa: E402
from runner.config import load_config, parse_shots  # noqa: E402
from runner.report import interval  # noqa: E402
from runner.store import stored_rows  # noqa: E402

from bayes_transfer.errors import BayesTransferError  # noqa: E402

METRICS = ("error", "nll", "ece")


def paired(rows: list[dict], config: dict, a: str, b: str) -> list[dict]:
    """[{prior, shots, n, metric: (mean, sd, ci95, n)}] of A − B over common seeds."""
    by = {r["key"]: r for r in rows}
    out = []
    for label in config["priors"]:
        for shots in config["shots"]:
            pairs = [(by[ka], by[kb]) for seed in config["seeds"]
                     if (ka := cell_key(label, shots, seed, a)) in by
                     and (kb := cell_key(label, shots, seed, b)) in by]
            if not pairs:
                continue
            entry = {"prior": label, "shots": shots, "n": len(pairs)}
            for m in METRICS:
                entry[m] = interval([ra["test"][m] - rb["test"][m] for ra, rb in pairs])
            out.append(entry)
    return out


def format_paired(entries: list[dict], a: str, b: str) -> str:
    lines = [f"{a} − {b}, mean ± 95% t-interval over paired seeds (* : excludes 0)", "",
             "| prior | shots | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for e in entries:
        cells = []
        for m in METRICS:
            mean, _, ci, _ = e[m]
            star = "*" if ci == ci and abs(mean) > ci else ""
            cells.append(f"{mean:+.4f}" + ("" if ci != ci else f" ± {ci:.4f}") + star)
        lines.append(f"| {e['prior']} | {e['shots']} | {e['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("a", help="method A (A − B)")
    parser.add_argument("b", help="method B")
    parser.add_argument("--shots", default=None, help="comma-separated shots values")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1")
    parser.add_argument("--out", default=None, help="runner output directory")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, seeds=args.seeds, shots=parse_shots(args.shots),
                             methods=[args.a, args.b])
        out = Path(args.out or ROOT / "experiments" / "results" / config["name"])
        rows = stored_rows(out, "run experiments/run.py first, or pass --out")
        entries = paired(rows, config, args.a, args.b)
        if not entries:
            raise BayesTransferError(f"no seed has both {args.a!r} and {args.b!r} in {out}")
        print(format_paired(entries, args.a, args.b))
    except BayesTransferError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
