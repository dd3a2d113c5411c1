"""``bayes_transfer.suggest`` against the runner's validation sweep, seed by seed.

    python experiments/suggest_check.py experiments/configs/bayes_mnist5k_10shot.json
    python experiments/suggest_check.py experiments/configs/nonbinary_fashion59.json --shots 10

For each seed of a runner config whose results exist (``experiments/run.py`` first),
``suggest`` measures the prior's features on the target's train + validation images
and proposes an effective prior variance and a re-initialisation depth; the script
fine-tunes once with those settings (the same budget as one sweep point) and prints,
beside it, what the sweep chose on validation for the same method and its test
metrics. Writes ``suggest.json`` into the runner's result directory.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT))

import run as runner  # noqa: E402

from bayes_transfer import data as btdata  # noqa: E402
from bayes_transfer.demo import model_for, resolve_prior  # noqa: E402
from bayes_transfer.inference.map import finetune  # noqa: E402
from bayes_transfer.suggest import suggest  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--method", default="lowrank", help="the prior method suggested for")
    p.add_argument("--shots", default=None, help="shots value (default: the config's first)")
    p.add_argument("--out", default=None, help="runner output directory (default: its own)")
    args = p.parse_args(argv)
    config = runner.load_config(args.config)
    out = Path(args.out or ROOT / "experiments" / "results" / config["name"])
    rows = runner.read_rows(out / "runs.jsonl")
    shots = config["shots"][0] if args.shots is None else (
        args.shots if args.shots == "all" else int(args.shots))
    label = next(iter(config["priors"]))
    prior = resolve_prior(config["priors"][label])
    tuning = config["tuning"]
    base = prior.for_method(args.method)
    mean_var = float(np.mean(np.asarray(base.base_variance(), np.float64)))
    report = []
    for seed in config["seeds"]:
        row = next((r for r in rows if r["key"] == runner.cell_key(label, shots, seed,
                                                                     args.method)), None)
        if row is None:
            print(f"seed {seed}: no runner result for {args.method} (run experiments/run.py)")
            continue
        target = config["target"]
        splits = btdata.load(target["dataset"], classes=target.get("classes"),
                             shots_per_class=None if shots == "all" else shots, seed=seed)
        s = suggest(prior, splits, variances=tuple(tuning["variances"]), seed=seed)
        fconf = runner.finetune_config(tuning, row["learning_rate"], len(splits.train), seed)
        res = finetune(model_for(prior, splits.train.num_classes, seed), splits, prior,
                       args.method, config=s.finetune_config(fconf))
        sweep_var = row["scale"] * mean_var if math.isfinite(row["scale"]) else math.inf
        entry = {"seed": seed, "measures": s.measures, "suggested": {
            "variance": s.variance, "reinit_top": s.reinit_top, "test": res.metrics,
            "val": res.val_metrics},
            "sweep": {"variance": sweep_var, "test": row["test"], "val": row["val"]}}
        report.append(entry)
        print(f"seed {seed}: q={s.score:.3f} gain={s.measures.get('gain', math.nan):+.3f} | "
              f"suggest v={s.variance:g} reinit={s.reinit_top}: test error "
              f"{res.metrics['error']:.4f} nll {res.metrics['nll']:.4f} | sweep v={sweep_var:.3g}: "
              f"test error {row['test']['error']:.4f} nll {row['test']['nll']:.4f}")
    if report:
        diff = [e["suggested"]["test"]["error"] - e["sweep"]["test"]["error"] for e in report]
        print(f"test error, suggest − sweep: mean {np.mean(diff):+.4f} over {len(diff)} seeds")
        (out / "suggest.json").write_text(json.dumps(
            {"config": args.config, "method": args.method, "shots": shots,
             "seeds": report}, indent=2, default=float))
        print(f"wrote {out / 'suggest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
