"""The main job on the embedded default: Fashion-MNIST prior → MNIST-5k, 10 shots per class.

Loads the published small-CNN Fashion-MNIST prior (it ships inside the package) and
fine-tunes on 10 MNIST-5k images per class with every method. The 10 are the whole
labelled budget: 8 train and 2 choose each method's configuration (the same number for
every method: 2 learning rates × 3 prior strengths and the no-prior limit, or × 4 weight
decays for standard fine-tuning), then the choice is retrained on all 10. It reports
test error / NLL / ECE with a reliability diagram. This is the protocol of the issue-20
study (RESULTS.md), which found it better than learning λ by the evidence up to 10
labels per class and no worse at 50. Run by ``bayes-transfer demo``
(:mod:`bayes_transfer.cli.demo`); ``bayes-transfer demo --fast`` is a smoke test of the
same pipeline (:data:`FAST_METHODS`, :data:`FAST_CONFIG`: two methods, one configuration
each, a few epochs; seconds, and its numbers mean little).
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from bayes_transfer import data as btdata
from bayes_transfer import models as btmodels
from bayes_transfer.evaluation.plots import reliability_diagram
from bayes_transfer.fsutil import write_json
from bayes_transfer.hub import load_prior
from bayes_transfer.inference.map import FinetuneConfig, finetune
from bayes_transfer.prior import METHODS

DEFAULT_PRIOR = "fashion-mnist/small-cnn"

#: The demo's budget, the same for every method: 2 learning rates × (3 prior strengths +
#: the no-prior limit, or 4 weight decays), 30 epochs, validation out of the shots and the
#: choice retrained on all of them; a grid end that validation picks extends by up to
#: two decades. `bayes-transfer demo --full-grid`: 5 strengths.
DEMO_CONFIG = dataclasses.replace(
    FinetuneConfig(), variances=(1.0, 10.0, 100.0), learning_rates=(1e-2, 1e-3), refit=True,
    max_extensions=2,
    train=dataclasses.replace(FinetuneConfig().train, epochs=30))
FULL_GRID_CONFIG = dataclasses.replace(DEMO_CONFIG, variances=FinetuneConfig().variances,
                                       train=FinetuneConfig().train)

#: `bayes-transfer demo --fast`: standard fine-tuning against the learned prior, one
#: configuration each (v = 10, learning rate 1e-2), 5 epochs: the pipeline in seconds.
FAST_METHODS = ("standard", "lowrank")
FAST_CONFIG = dataclasses.replace(
    DEMO_CONFIG, variances=(10.0,), include_no_prior=False, learning_rates=None,
    max_extensions=0,
    train=dataclasses.replace(DEMO_CONFIG.train, epochs=5))


def run_demo(prior_ref: str | None = None, *, target: str = "mnist_5k", shots: int = 10,
             seeds=(0,), methods=METHODS, out_dir: str = "outputs/demo",
             config: FinetuneConfig = DEMO_CONFIG) -> dict:
    t0 = time.perf_counter()
    prior = load_prior(prior_ref or DEFAULT_PRIOR)
    print(f"prior: {prior}  ({prior.metadata.get('source', {})})")
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    reliability = {}
    for seed in seeds:
        splits = btdata.load(target, shots_per_class=shots, seed=seed,
                             val_from_shots=config.refit)
        print(f"seed {seed}: {len(splits.train)} train / {len(splits.val)} val "
              f"({'out of' if config.refit else 'besides'} {shots} per class) / "
              f"{len(splits.test)} test images of {target}")
        cache: dict = {}
        train = dataclasses.replace(config.train, seed=seed)
        for method in methods:
            model = btmodels.from_prior(prior, splits.train.num_classes, seed=seed)
            res = finetune(model, splits, prior, method,
                           config=dataclasses.replace(config, train=train), cache=cache)
            rows[method].append({**res.summary(), "sweep": res.sweep})
            if seed == seeds[0]:
                reliability[method] = (res.test_probs, splits.test.labels)
            print(f"  {method:10s} λ={res.scale:<9.3g} lr={res.learning_rate:<6.3g} "
                  f"error={res.metrics['error']:.4f} nll={res.metrics['nll']:.4f} "
                  f"ece={res.metrics['ece']:.4f} ({res.budget} configurations)")
    table = summarize(rows)
    print()
    print(format_table(table, f"{target}, {shots} shots/class, seeds {list(seeds)}"))
    out = Path(out_dir)
    write_json(out / "results.json", {"table": table, "runs": rows})
    reliability_diagram(reliability, out / "reliability.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'reliability.png'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return table


def summarize(rows: dict[str, list[dict]]) -> dict:
    table = {}
    for method, runs in rows.items():
        entry = {}
        for key in ("error", "nll", "ece"):
            vals = np.array([r[key] for r in runs])
            entry[key] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan)
        entry["scales"] = [r["scale"] for r in runs]
        table[method] = entry
    return table


def format_table(table: dict, title: str) -> str:
    lines = [title, f"{'method':12s} {'test error':>16s} {'test NLL':>16s} {'ECE':>16s}"]
    for method, e in table.items():
        cells = []
        for key in ("error", "nll", "ece"):
            mean, sd = e[key]
            cells.append(f"{mean:.4f}" + ("" if math.isnan(sd) else f" ± {sd:.4f}"))
        lines.append(f"{method:12s} " + " ".join(f"{c:>16s}" for c in cells))
    return "\n".join(lines)
