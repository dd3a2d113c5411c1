"""The experiment runner: priors × target × shots × seeds × methods, tuned alike, resumable.

The command line behind ``python experiments/run.py CONFIG.json [options]``: run (or
resume) a config, or with ``--report-only`` / ``--estimate`` only read its results.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from bayes_transfer import BayesTransferError

from . import ROOT
from .config import load_config, parse_shots
from .loop import run
from .report import compute_time, format_compute, report
from .store import stored_rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a JSON config (experiments/configs/*.json)")
    parser.add_argument("--out", default=None,
                        help="output directory (default experiments/results/NAME)")
    parser.add_argument("--seeds", type=int, default=None, help="override: seeds 0..N-1")
    parser.add_argument("--shots", default=None,
                        help="override: comma-separated examples per class, e.g. 10,all")
    parser.add_argument("--methods", default=None, help="override: comma-separated methods")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild summary and figures from runs.jsonl, run nothing")
    parser.add_argument("--estimate", action="store_true",
                        help="print how long the (overridden) config takes, from the wall "
                             "times in runs.jsonl; write and run nothing")
    args = parser.parse_args(argv)
    try:
        methods = None if args.methods is None else args.methods.split(",")
        config = load_config(args.config, seeds=args.seeds, shots=parse_shots(args.shots),
                             methods=methods)
        out = Path(args.out or ROOT / "experiments" / "results" / config["name"])
        if args.report_only or args.estimate:
            rows = stored_rows(out, "run without --report-only / --estimate first, or "
                                    "pass --out")
            if args.estimate:
                print(format_compute(compute_time(rows, config)))
            else:
                report(config, out)
            return
        t0 = time.perf_counter()
        run(config, out)
        print(f"done in {time.perf_counter() - t0:.0f} s on {platform.node()}; "
              f"results in {out}")
    except BayesTransferError as e:
        raise SystemExit(f"error: {e}") from None
