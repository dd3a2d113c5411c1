"""``bayes_transfer.analysis.suggest`` against the runner's validation sweep, seed by seed.

    python experiments/suggest_check.py experiments/configs/bayes_mnist5k_10shot.json
    python experiments/suggest_check.py experiments/configs/nonbinary_fashion59.json --shots 10
    python experiments/suggest_check.py experiments/configs/source_fashion59.json   # every prior

For each seed of a runner config whose results exist (``experiments/run.py`` first),
``suggest`` measures the prior's features on the target's train + validation images
and proposes an effective prior variance and a re-initialisation depth; the script
fine-tunes once with those settings (the same budget as one sweep point) and prints,
beside it, what the sweep chose on validation for the same method and its test
metrics. With several priors or shots values it also reports how the measures
(normalised kNN accuracy, LogME) rank-correlate with the sweep's chosen variance and
with the prior's NLL gain over standard fine-tuning (Spearman, over every prior ×
shots × seed). Writes ``suggest.json`` into the runner's result directory; a rerun
reuses the fine-tuning results stored there for suggestions that did not change (same
seed, variance and re-initialisation: the run would be identical).
``experiments/suggest_calibrate.py`` reads these files to calibrate the rule.
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

from runner.cells import cell_key, finetune_config  # noqa: E402
from runner.config import load_config, parse_shots  # noqa: E402
from runner.store import read_rows  # noqa: E402

import bayes_transfer as bt  # noqa: E402
from bayes_transfer import data as btdata  # noqa: E402
from bayes_transfer.fsutil import write_text  # noqa: E402
from bayes_transfer.inference.map import finetune  # noqa: E402
from bayes_transfer.analysis.suggest import suggest  # noqa: E402


def _check(prior_label, prior, shots, seed, row, config, method, previous):
    target, tuning = config["target"], config["tuning"]
    splits = btdata.load(target["dataset"], classes=target.get("classes"),
                         shots_per_class=None if shots == "all" else shots, seed=seed)
    s = suggest(prior, splits, variances=tuple(tuning["variances"]), seed=seed)
    old = previous.get((prior_label, shots, seed), {}).get("suggested", {})
    if (old.get("variance"), old.get("reinit_top")) == (s.variance, s.reinit_top):
        test, val = old["test"], old["val"]
    else:
        fconf = finetune_config(tuning, row["learning_rate"], seed)
        model = bt.models.from_prior(prior, splits.train.num_classes, seed=seed)
        res = finetune(model, splits, prior, method, config=s.finetune_config(fconf))
        test, val = res.metrics, res.val_metrics
    mean_var = float(np.mean(np.asarray(prior.for_method(method).base_variance(), np.float64)))
    sweep_var = row["scale"] * mean_var if math.isfinite(row["scale"]) else math.inf
    return {"prior": prior_label, "shots": shots, "seed": seed, "measures": s.measures,
            "suggested": {"variance": s.variance, "reinit_top": s.reinit_top,
                          "test": test, "val": val},
            "sweep": {"variance": sweep_var, "test": row["test"], "val": row["val"]}}


def correlations(report: list[dict], rows: list[dict]) -> dict:
    """Spearman ρ (and p) of each measure with the sweep's variance and the NLL gain."""
    from scipy import stats

    standard = {r["key"]: r for r in rows if r["method"] == "standard"}
    out = {}
    for measure in ("knn_normalized", "logme", "gain"):
        xs = [e["measures"].get(measure, math.nan) for e in report]
        targets = {"sweep_variance": [e["sweep"]["variance"] for e in report]}
        gains = [standard.get(cell_key(e["prior"], e["shots"], e["seed"], "standard"))
                 for e in report]
        if all(g is not None for g in gains):
            targets["nll_gain_over_standard"] = [
                g["test"]["nll"] - e["sweep"]["test"]["nll"] for g, e in zip(gains, report)]
        for name, ys in targets.items():
            ok = [(x, y) for x, y in zip(xs, ys) if not math.isnan(x)]
            if len(ok) >= 4:
                rho, p = stats.spearmanr(*zip(*ok))
                out[f"{measure}~{name}"] = {"rho": float(rho), "p": float(p), "n": len(ok)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--method", default="lowrank", help="the prior method suggested for")
    p.add_argument("--shots", default=None,
                   help="comma-separated shots values (default: all of the config's)")
    p.add_argument("--prior", action="append", default=None,
                   help="prior label of the config (repeatable; default: every prior)")
    p.add_argument("--out", default=None, help="runner output directory (default: its own)")
    args = p.parse_args(argv)
    config = load_config(args.config)
    out = Path(args.out or ROOT / "experiments" / "results" / config["name"])
    rows = read_rows(out / "runs.jsonl")
    stored = out / "suggest.json"
    previous = {} if not stored.exists() else {      # an older file has no "entries"
        (e["prior"], e["shots"], e["seed"]): e
        for e in json.loads(stored.read_text()).get("entries", [])}
    shots_list = parse_shots(args.shots) or config["shots"]
    report = []
    for label in args.prior or list(config["priors"]):
        prior = bt.load_prior(config["priors"][label])
        for shots in shots_list:
            for seed in config["seeds"]:
                row = next((r for r in rows if r["key"] == cell_key(
                    label, shots, seed, args.method)), None)
                if row is None:
                    print(f"{label} shots={shots} seed={seed}: no runner result for "
                          f"{args.method} (run experiments/run.py first)")
                    continue
                e = _check(label, prior, shots, seed, row, config, args.method, previous)
                report.append(e)
                sug, sw = e["suggested"], e["sweep"]
                print(f"{label} shots={shots} seed={seed}: q={e['measures']['knn_normalized']:.3f} "
                      f"gain={e['measures'].get('gain', math.nan):+.3f} | suggest "
                      f"v={sug['variance']:g} reinit={sug['reinit_top']}: test error "
                      f"{sug['test']['error']:.4f} nll {sug['test']['nll']:.4f} | sweep "
                      f"v={sw['variance']:.3g}: test error {sw['test']['error']:.4f} "
                      f"nll {sw['test']['nll']:.4f}", flush=True)
    if not report:
        return 1
    groups: dict = {}
    for e in report:
        groups.setdefault((e["prior"], e["shots"]), []).append(e)
    summary = []
    for (label, shots), es in groups.items():
        d_err = [e["suggested"]["test"]["error"] - e["sweep"]["test"]["error"] for e in es]
        d_nll = [e["suggested"]["test"]["nll"] - e["sweep"]["test"]["nll"] for e in es]
        match = sum(math.isclose(e["suggested"]["variance"], e["sweep"]["variance"],
                                 rel_tol=1e-3) for e in es)
        summary.append({"prior": label, "shots": shots, "seeds": len(es), "matches": match,
                        "error_diff": float(np.mean(d_err)), "nll_diff": float(np.mean(d_nll))})
        print(f"{label} shots={shots}: suggest matched the sweep's variance on {match}/{len(es)} "
              f"seeds; suggest − sweep: test error {np.mean(d_err):+.4f}, "
              f"NLL {np.mean(d_nll):+.4f}")
    corr = correlations(report, rows)
    for name, c in corr.items():
        print(f"Spearman {name}: rho = {c['rho']:+.2f} (p = {c['p']:.2g}, n = {c['n']})")
    write_text(stored, json.dumps(
        {"config": args.config, "method": args.method, "summary": summary,
         "correlations": corr, "entries": report}, indent=2,
        default=float))
    print(f"wrote {out / 'suggest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
