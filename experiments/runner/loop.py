"""The loop: every cell of the config not yet in ``runs.jsonl``, then the report.

Cells are grouped by (prior, shots, seed): a group loads its prior and data split once,
and its methods share the tuned MAP runs and the no-prior runs. Each finished cell is
appended to ``runs.jsonl`` at once, so a kill loses at most the cell that was running.
"""
from __future__ import annotations

import time
from pathlib import Path

import bayes_transfer as bt
from bayes_transfer import data as btdata

from .cells import cell_key, grid, run_cell
from .report import report
from .store import RUNS, append_row, repair_rows, save_config, save_probs


def run(config: dict, out_dir) -> dict:
    """Run what is missing of ``config`` into ``out_dir``; return the summary."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(out, config)
    runs_path = out / RUNS
    done = {r["key"] for r in repair_rows(runs_path)}
    target = config["target"]
    rel = config.get("reliability", {})
    cells = grid(config)
    todo = [c for c in cells if cell_key(*c) not in done]
    print(f"{config['name']}: {len(cells)} cells, {len(cells) - len(todo)} done, "
          f"{len(todo)} to run -> {out}")
    bar = tqdm(total=len(todo), desc=config["name"], unit="cell")
    groups: dict = {}
    for cell in todo:
        groups.setdefault(cell[:3], []).append(cell[3])
    for (label, shots, seed), methods in groups.items():
        prior = bt.load_prior(config["priors"][label])
        within = config["tuning"]["validation"] == "within" and shots != "all"
        # 1 per class holds nothing out: only one-run methods run there (check_config)
        splits = btdata.load(target["dataset"], classes=target.get("classes"),
                             shots_per_class=None if shots == "all" else shots,
                             label_noise=target.get("label_noise", 0.0), seed=seed,
                             val_from_shots=within and shots != 1,
                             val_per_class=0 if within and shots == 1 else None)
        maps, caches = {}, {}
        for method in methods:
            bar.set_postfix_str(f"{label} shots={shots} seed={seed} {method}")
            t0 = time.perf_counter()
            row, probs = run_cell(prior, splits, method, config, seed, maps, caches)
            row.update(key=cell_key(label, shots, seed, method), prior=label, shots=shots,
                       seed=seed, method=method,
                       num_train=len(splits.train) + (len(splits.val) if row.get("refit")
                                                      else 0),
                       seconds=round(time.perf_counter() - t0, 1))
            append_row(runs_path, row)
            if rel and shots == rel.get("shots") and seed == rel.get("seed", 0):
                save_probs(out, label, method, probs, splits.test.labels)
            bar.update(1)
    bar.close()
    return report(config, out)
