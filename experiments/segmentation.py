"""Segmentation under a learned prior: standard fine-tuning vs L2-SP vs the SWAG prior.

Tasks: ISBI-2012 membranes with 2, 6 and 24 training images (test: the last 6 sections;
validation: the bottom strip of the training images), and few-shot Fashion-MNIST scenes
(10 training scenes; 200 test scenes of test-split garments). Encoder: the small CNN the
prior covers, started at the prior mean; light U-Net decoder. For each task, size and
seed, every method gets the same steps and the same grid of effective prior variances,
λ chosen on validation mIoU (the no-prior run is shared: it is "standard").

    python experiments/segmentation.py                      # the study (32 min measured on
                                                            # 2 CPU cores shared with other jobs)
    python experiments/segmentation.py --prior mine=/path/to/prior --quick   # smoke run

Writes ``experiments/results/segmentation.json`` (config, every run, the table) and
``experiments/results/segmentation.md`` (mean ± sd of test mIoU over seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runner  # noqa: E402,F401  (the repository's prior registry: runner/__init__.py)

import bayes_transfer as bt  # noqa: E402
from bayes_transfer import segmentation as seg  # noqa: E402
from bayes_transfer.data.errors import DatasetNotFoundError  # noqa: E402

RESULTS = ROOT / "experiments" / "results"

# Configs are plain Python (big_vision style).
CONFIG = {
    # Each prior gets every method (standard fine-tuning and L2-SP start from, and pull
    # toward, that prior's mean, so they differ per prior too).
    "priors": {"supervised": "fashion-mnist/small-cnn",
               "simclr": "fashion-mnist/small-cnn-simclr"},
    "methods": ("standard", "l2sp", "lowrank"),
    "seeds": (0, 1, 2),
    "tasks": (
        # (name, training images / scenes, data options)
        ("isbi", 2, {"crop": 64, "crops_per_image": 4}),
        ("isbi", 6, {"crop": 64, "crops_per_image": 4}),
        ("isbi", 24, {"crop": 64, "crops_per_image": 4}),
        ("fashion_scenes", 10, {"num_val": 20, "num_test": 200}),
    ),
    "steps": 100,
    "images_per_batch": 2,
    "learning_rate": 2e-3,
    "decoder_channels": 16,
    "decoder_decay": 1e-4,
    # Effective prior variances, plus the no-prior run. With N = 2..24 images against
    # d ≈ 130k covered parameters, v ≤ 1e-2 already freezes the encoder (pilot on ISBI-2:
    # val mIoU identical for v = 1e-5..1e-2), so the grid starts at 1.
    "variances": (1.0, 100.0),
    "select_by": "miou",
    "eval_batch_size": 6,
}

QUICK = dict(CONFIG, seeds=(0,), steps=20,
             tasks=(("isbi", 2, {"crop": 64, "crops_per_image": 2}),
                    ("fashion_scenes", 4, {"num_val": 4, "num_test": 8})))


def run_cell(prior, task, num_train, options, seed, cfg) -> dict:
    splits = seg.load_task(task, num_train, seed=seed, **options)
    finetune_cfg, steps = seg.default_config(
        steps=cfg["steps"], batch_size=cfg["images_per_batch"],
        learning_rate=cfg["learning_rate"], decoder_decay=cfg["decoder_decay"],
        variances=cfg["variances"], select_by=cfg["select_by"], seed=seed)
    model = seg.model_from_prior(prior, splits.num_classes, seed=seed,
                                 decoder_channels=cfg["decoder_channels"])
    cache, out = {}, {}
    for method in cfg["methods"]:
        t = time.perf_counter()
        res = seg.finetune_segmentation(model, splits, prior, method, config=finetune_cfg,
                                        steps=steps, cache=cache,
                                        eval_batch_size=cfg["eval_batch_size"])
        out[method] = {"scale": res.scale, "test": res.metrics, "val": res.val_metrics,
                       "sweep": res.sweep, "seconds": time.perf_counter() - t,
                       "test_probs": res.test_probs}
        print(f"  {task}-{num_train} seed {seed} {method:9s} λ={res.scale:<9.3g} "
              f"test mIoU={res.metrics['miou']:.4f} pixel acc={res.metrics['pixel_accuracy']:.4f} "
              f"NLL={res.metrics['nll']:.4f} ECE={res.metrics['ece']:.4f} "
              f"({out[method]['seconds']:.0f}s)", flush=True)
    return {"splits": splits, "runs": out}


def summarize(rows: list[dict], methods) -> dict:
    table: dict = {}
    for row in rows:
        key = f"{row['task']}-{row['num_train']}"
        for method in methods:
            table.setdefault(key, {}).setdefault(method, []).append(
                row["runs"][method]["test"]["miou"])
    return {key: {m: {"mean": float(np.mean(v)),
                      "sd": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
                      "n": len(v), "values": [float(x) for x in v]}
                  for m, v in per.items()} for key, per in table.items()}


def markdown(tables: dict, methods, priors: dict, cfg: dict) -> str:
    names = {"standard": "standard fine-tuning", "l2sp": "L2-SP", "lowrank": "learned prior "
             "(SWAG low-rank)"}
    lines = [f"Test mIoU, mean ± sd over seeds {list(cfg['seeds'])} ({cfg['steps']} steps, "
             f"λ by validation {cfg['select_by']}). Priors: "
             + ", ".join(f"{label} = `{ref}`" for label, ref in priors.items()), "",
             "| task | prior | " + " | ".join(names.get(m, m) for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    keys = list(dict.fromkeys(k for table in tables.values() for k in table))
    for key in keys:
        for label, table in tables.items():
            if key not in table:
                continue
            cells = []
            for m in methods:
                e = table[key][m]
                sd = "" if math.isnan(e["sd"]) else f" ± {e['sd']:.3f}"
                cells.append(f"{e['mean']:.3f}{sd}")
            lines.append(f"| {key} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else "inf"
    return x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prior", action="append", default=None, metavar="LABEL=REF",
                        help="a prior (name, path or URL) under a label; repeat for several "
                             "(default: the published supervised and SimCLR small-CNN priors)")
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (smoke)")
    parser.add_argument("--out", default=str(RESULTS / "segmentation"),
                        help="output stem (.json and .md are added)")
    parser.add_argument("--overlays", action="store_true",
                        help="also write test overlays of seed 0 (learned prior) as PNGs")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else CONFIG
    refs = cfg["priors"]
    if args.prior:
        refs = dict(p.split("=", 1) if "=" in p else (p, p) for p in args.prior)
    t0 = time.perf_counter()
    rows, tables, prior_info = [], {}, {}
    for label, ref in refs.items():
        prior = bt.load_prior(ref)
        meta = prior.metadata
        prior_info[label] = {"ref": ref, "kind": prior.kind, "dim": prior.dim,
                             "rank": prior.rank, "metadata": meta}
        print(f"prior {label} = {ref}: {prior}; source {meta.get('source')}")
        prior_rows = []
        for task, num_train, options in cfg["tasks"]:
            for seed in cfg["seeds"]:
                try:
                    cell = run_cell(prior, task, num_train, options, seed, cfg)
                except DatasetNotFoundError as e:
                    print(f"skipping {task}: {e}")
                    break
                prior_rows.append({"prior": label, "task": task, "num_train": num_train,
                                   "seed": seed, "runs": cell["runs"]})
                if args.overlays and seed == cfg["seeds"][0] and "lowrank" in cell["runs"]:
                    run = cell["runs"]["lowrank"]
                    path = Path(args.out).parent / f"segmentation-{label}-{task}-{num_train}.png"
                    seg.save_overlays(cell["splits"].test, run["test_probs"], path,
                                      max_images=3, window=192, dpi=100,
                                      title=f"{task}, {num_train} training images, {label} "
                                            f"prior: test mIoU {run['test']['miou']:.3f}")
                for run in cell["runs"].values():
                    run.pop("test_probs")
        tables[label] = summarize(prior_rows, cfg["methods"])
        rows += prior_rows
    md = markdown(tables, cfg["methods"], refs, cfg)
    print()
    print(md)
    seconds = time.perf_counter() - t0
    report = {"config": _jsonable(cfg), "priors": prior_info, "table": tables, "runs": rows,
              "seconds": seconds,
              "machine": {"python": platform.python_version(), "cpu": platform.processor(),
                          "node": platform.machine()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(_jsonable(report), indent=2))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
