"""The experiment runner: priors × target × shots × seeds × methods, tuned alike, resumable.

    python experiments/run.py experiments/configs/bayes_mnist5k_10shot.json
    python experiments/run.py CONFIG.json --seeds 2 --shots 10 --out /tmp/try   # overrides
    python experiments/run.py CONFIG.json --seeds 3 --estimate   # how long, from past runs

A config is a JSON file (see ``experiments/configs/``)::

    {
      "name": "fewshot_mnist5k",
      "priors": {"fashion": "fashion-mnist/small-cnn"},      # label → name, path or URL
      "target": {"dataset": "mnist_5k", "classes": null},
      "shots": [1, 5, 10, 50, 100, "all"],                  # examples per class
      "seeds": 5,
      "methods": ["standard", "l2sp", "isotropic", "diag", "lowrank", "sgld:lowrank"],
      "tuning": {"learning_rates": [0.01], "variances": [1, 10, 100], "steps": 125,
                 "batch_size": 32, "select_by": "nll"},
      "posterior": {"samples": 10, "sgld": {...SGLDConfig fields}, "swag": {...}},
      "reliability": {"shots": 10, "seed": 0}
    }

Methods: a name of ``Prior.for_method`` (``standard, l2, l2sp, isotropic, diag,
lowrank``) is MAP fine-tuning; ``sgld:M`` and ``swag:M`` are the Bayesian model average
of SGLD / downstream-SWAG samples under prior M, started from M's MAP solution with its
λ. A config's ``"variants"`` name further MAP methods: ``{"lowrank-reinit1": {"method":
"lowrank", "reinit_top": 1}}``, any ``FinetuneConfig`` field (``reinit_top``,
``layer_lr``, ``layer_lr_decay``, ``l2``) on top of a base method (non-binary transfer).
The tuning budget is the same for every method: each learning rate × each effective
prior variance (plus the no-prior limit), ``steps`` optimizer steps each, chosen on the
validation split (``select_by``); the test split is read only for the chosen run. The
samplers take the MAP run's λ and learning-rate choice; their own settings are fixed in
the config (the same for every prior).

Every finished cell (prior, shots, seed, method) is appended to ``runs.jsonl`` in the
output directory and flushed, so a rerun skips what is done. At the end the runner writes
``summary.md`` (mean and 95% t-interval over seeds), ``summary.json``, the few-shot curve
``fewshot.png`` (when there is more than one shots value) and ``reliability.png``;
``summary.md`` ends with the wall time per cell and an estimate for the whole config.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bayes_transfer.errors import BayesTransferError  # noqa: E402
from bayes_transfer.prior import METHODS  # noqa: E402

SAMPLERS = ("sgld", "swag")
#: FinetuneConfig fields a variant may set (non-binary transfer).
VARIANT_KEYS = ("reinit_top", "layer_lr", "layer_lr_decay", "l2")
METRICS = ("error", "nll", "ece", "brier")
DEFAULT_TUNING = {"learning_rates": [1e-2], "variances": [1.0, 10.0, 100.0], "steps": 125,
                  "batch_size": 32, "select_by": "nll", "head_decay": 1e-4}


# --------------------------------------------------------------------------- config
def load_config(path, **overrides) -> dict:
    """Read and check a config; ``overrides`` (not None) replace top-level keys."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BayesTransferError(f"no config file at {path}; see experiments/configs/") from None
    except json.JSONDecodeError as e:
        raise BayesTransferError(f"config {path} is not valid JSON: {e}") from None
    config.update({k: v for k, v in overrides.items() if v is not None})
    return check_config(config, str(path))


def check_config(config: dict, where: str = "config") -> dict:
    for key in ("name", "priors", "target", "shots", "seeds", "methods"):
        if key not in config:
            raise BayesTransferError(f"{where}: missing key {key!r}")
    if not isinstance(config["priors"], dict) or not config["priors"]:
        raise BayesTransferError(f"{where}: 'priors' must map labels to prior names/paths")
    variants = config.setdefault("variants", {})
    for name, variant in variants.items():
        if variant.get("method") not in METHODS:
            raise BayesTransferError(f"{where}: variant {name!r} needs a 'method', one of "
                                     f"{METHODS}")
        unknown = set(variant) - {"method", *VARIANT_KEYS}
        if unknown:
            raise BayesTransferError(f"{where}: variant {name!r} has unknown keys "
                                     f"{sorted(unknown)}; use {', '.join(VARIANT_KEYS)}")
    for method in config["methods"]:
        sampler, _, base = method.rpartition(":")
        if sampler and base in variants:
            raise BayesTransferError(f"{where}: {method!r}: samplers run under a base prior "
                                     f"method ({METHODS}), not a variant")
        if (base not in METHODS and base not in variants) or (sampler and sampler not in SAMPLERS):
            raise BayesTransferError(
                f"{where}: unknown method {method!r}; use one of {METHODS}, or "
                f"'sgld:M' / 'swag:M' with M one of them")
    for shots in config["shots"]:
        if shots != "all" and not (isinstance(shots, int) and shots > 0):
            raise BayesTransferError(f"{where}: shots must be positive integers or 'all', "
                                     f"got {shots!r}")
    unknown = set(config.get("tuning", {})) - set(DEFAULT_TUNING)
    if unknown:
        raise BayesTransferError(f"{where}: unknown tuning keys {sorted(unknown)}; "
                                 f"known: {sorted(DEFAULT_TUNING)}")
    config["tuning"] = {**DEFAULT_TUNING, **config.get("tuning", {})}
    seeds = config["seeds"]
    config["seeds"] = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    return config


def cell_key(prior: str, shots, seed: int, method: str) -> str:
    return f"{prior}|{shots}|{seed}|{method}"


# --------------------------------------------------------------------------- one cell
def finetune_config(tuning: dict, lr: float, num_train: int, seed: int):
    from bayes_transfer.inference.map import FinetuneConfig
    from bayes_transfer.train import TrainConfig

    steps_per_epoch = math.ceil(num_train / tuning["batch_size"])
    train = TrainConfig(epochs=tuning["steps"] / steps_per_epoch,
                        batch_size=tuning["batch_size"], optimizer="adam", learning_rate=lr,
                        schedule="cosine", seed=seed, progress=False, desc="finetune")
    return FinetuneConfig(train=train, head_decay=tuning["head_decay"],
                          variances=tuple(tuning["variances"]), select_by=tuning["select_by"])


def tuned_map(prior, splits, method: str, tuning: dict, seed: int, caches: dict,
              variant: dict | None = None):
    """MAP fine-tuning with the shared budget: every lr × every λ, best on validation."""
    from bayes_transfer.demo import model_for
    from bayes_transfer.inference.map import HIGHER_IS_BETTER, finetune

    options = dict(variant or {})
    method = options.pop("method", method)
    # The no-prior run is shared only between methods that start alike.
    cache_key = tuple(sorted(options.items()))
    sign = -1.0 if tuning["select_by"] in HIGHER_IS_BETTER else 1.0
    best, trials = None, []
    for lr in tuning["learning_rates"]:
        model = model_for(prior, splits.train.num_classes, seed)
        config = dataclasses.replace(finetune_config(tuning, lr, len(splits.train), seed),
                                     **options)
        res = finetune(model, splits, prior, method, config=config,
                       cache=caches.setdefault((lr, cache_key), {}))
        value = sign * res.val_metrics[tuning["select_by"]]
        trials.append({"learning_rate": lr, "scale": res.scale, "val": res.val_metrics,
                       "sweep": res.sweep})
        if best is None or (math.isfinite(value) and value < best[0]):
            best = (value, lr, config, res)
    _, lr, config, res = best
    return res, lr, config, trials


def run_cell(prior, splits, method: str, config: dict, seed: int, maps: dict, caches: dict):
    """One method on one (prior, shots, seed): a result row and the test probabilities."""
    tuning = config["tuning"]
    sampler, _, base = method.rpartition(":")
    if base not in maps:
        maps[base] = tuned_map(prior, splits, base, tuning, seed, caches,
                               config["variants"].get(base))
    res, lr, map_config, trials = maps[base]
    row = {"learning_rate": lr, "scale": res.scale, "tuning": trials}
    if not sampler:
        return {**row, "test": res.metrics, "val": res.val_metrics}, res.test_probs

    from bayes_transfer.demo import model_for
    from bayes_transfer.inference.bma import PosteriorConfig, sample_posterior
    from bayes_transfer.inference.sgld import SGLDConfig
    from bayes_transfer.inference.swag_downstream import SwagDownstreamConfig

    post = config.get("posterior", {})
    sgld = SGLDConfig(**{"seed": seed, "progress": False, **post.get("sgld", {})})
    swag = SwagDownstreamConfig(**{"seed": seed, "progress": False, **post.get("swag", {})})
    pconf = PosteriorConfig(prior_method=base, scale="auto", map=map_config, sgld=sgld,
                            swag=swag)
    model = model_for(prior, splits.train.num_classes, seed)
    out = sample_posterior(model, splits, prior, sampler, samples=int(post.get("samples", 10)),
                           config=pconf, map_result=res)
    row.update(test=out.metrics, val=out.val_metrics, samples=len(out.samples),
               map_test=out.map_metrics, temperature=out.temperature,
               calibrated_test=out.calibrated_metrics)
    return row, out.test_probs


# --------------------------------------------------------------------------- the loop
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut short by a kill: that cell reruns
            continue
    return rows


def repair_rows(path: Path) -> list[dict]:
    """The finished rows; a line cut short by a kill is dropped (atomically), so that
    cell reruns and the next row starts on a line of its own."""
    rows = read_rows(path)
    if path.exists() and len(rows) != len(path.read_text().splitlines()):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    return rows


def stored_rows(out: Path, what_to_do: str) -> list[dict]:
    """The rows of ``out/runs.jsonl``; a clear error (ending in ``what_to_do``) if none."""
    path = Path(out) / "runs.jsonl"
    if not path.exists():
        raise BayesTransferError(f"no results in {out} (no runs.jsonl): {what_to_do}")
    return read_rows(path)


def parse_shots(text: str | None):
    """'1,5,all' -> [1, 5, 'all'] (None stays None: the config's own)."""
    return None if text is None else [s if s == "all" else int(s) for s in text.split(",")]


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run(config: dict, out_dir) -> dict:
    from tqdm.auto import tqdm

    from bayes_transfer import data as btdata
    from bayes_transfer.demo import resolve_prior

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    runs_path = out / "runs.jsonl"
    done = {r["key"] for r in repair_rows(runs_path)}
    target = config["target"]
    rel = config.get("reliability", {})
    cells = [(p, s, seed, m) for p in config["priors"] for s in config["shots"]
             for seed in config["seeds"] for m in config["methods"]]
    todo = [c for c in cells if cell_key(*c) not in done]
    print(f"{config['name']}: {len(cells)} cells, {len(cells) - len(todo)} done, "
          f"{len(todo)} to run -> {out}")
    bar = tqdm(total=len(todo), desc=config["name"], unit="cell")
    groups: dict = {}
    for cell in todo:
        groups.setdefault(cell[:3], []).append(cell[3])
    for (label, shots, seed), methods in groups.items():
        prior = resolve_prior(config["priors"][label])
        splits = btdata.load(target["dataset"], classes=target.get("classes"),
                             shots_per_class=None if shots == "all" else shots,
                             label_noise=target.get("label_noise", 0.0), seed=seed)
        maps, caches = {}, {}
        for method in methods:
            bar.set_postfix_str(f"{label} shots={shots} seed={seed} {method}")
            t0 = time.perf_counter()
            row, probs = run_cell(prior, splits, method, config, seed, maps, caches)
            row.update(key=cell_key(label, shots, seed, method), prior=label, shots=shots,
                       seed=seed, method=method, num_train=len(splits.train),
                       seconds=round(time.perf_counter() - t0, 1))
            append_row(runs_path, row)
            if rel and shots == rel.get("shots") and seed == rel.get("seed", 0):
                np.savez_compressed(out / f"probs_{label}_{method.replace(':', '-')}.npz",
                                    probs=probs, labels=splits.test.labels)
            bar.update(1)
    bar.close()
    return report(config, out)


def report(config: dict, out: Path) -> dict:
    """Summary (JSON and Markdown), figures and the config they cover, from runs.jsonl."""
    rows = read_rows(out / "runs.jsonl")
    summary = summarize(rows, config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = format_summary(summary, config) + format_compute(compute_time(rows, config))
    (out / "summary.md").write_text(text)
    figures(summary, config, out)
    print(text)
    return summary


# --------------------------------------------------------------------------- reporting
def interval(values) -> tuple[float, float, float, int]:
    """(mean, sd, half-width of the 95% t-interval, n) of per-seed values."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n = len(v)
    if n < 2:
        return float(v.mean()), math.nan, math.nan, n
    sd = float(v.std(ddof=1))
    return float(v.mean()), sd, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)), n


def summarize(rows: list[dict], config: dict) -> dict:
    """{prior: {method: {shots: {metric: (mean, sd, ci95, n)}}}} plus the chosen λ."""
    keys = {cell_key(p, s, seed, m) for p in config["priors"] for s in config["shots"]
            for seed in config["seeds"] for m in config["methods"]}
    rows = [r for r in rows if r["key"] in keys]
    table: dict = {}
    for label in config["priors"]:
        for method in config["methods"]:
            for shots in config["shots"]:
                sel = [r for r in rows if (r["prior"], r["method"], r["shots"])
                       == (label, method, shots)]
                if not sel:
                    continue
                entry = {m: interval([r["test"][m] for r in sel]) for m in METRICS}
                entry["scales"] = [r["scale"] for r in sel]
                entry["learning_rates"] = [r["learning_rate"] for r in sel]
                table.setdefault(label, {}).setdefault(method, {})[str(shots)] = entry
    return table


def _cell(stat) -> str:
    mean, sd, ci, n = stat
    return f"{mean:.4f}" if math.isnan(ci) else f"{mean:.4f} ± {ci:.4f}"


def format_summary(summary: dict, config: dict) -> str:
    lines = [f"# {config['name']}", "",
             f"Target {config['target']}; seeds {config['seeds']}; mean ± 95% t-interval "
             f"over seeds of test metrics; every method tuned on validation "
             f"({config['tuning']['select_by']}) over the same grid.", ""]
    for label, methods in summary.items():
        lines.append(f"## prior `{label}` = {config['priors'][label]}")
        for metric in ("error", "nll", "ece"):
            lines += ["", f"test {metric}:", "",
                      "| method | " + " | ".join(f"{s} shots" for s in config["shots"]) + " |",
                      "|---|" + "---|" * len(config["shots"])]
            for method, by_shots in methods.items():
                cells = [_cell(by_shots[str(s)][metric]) if str(s) in by_shots else "–"
                         for s in config["shots"]]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def compute_time(rows: list[dict], config: dict) -> dict:
    """Wall seconds per cell by method × shots, and the whole config's estimated total.

    A missing cell is estimated by the mean of its (method, shots) group over the
    priors and seeds that ran; ``estimate_hours`` is None while a group has no run.
    """
    by_key = {r["key"]: r for r in rows}
    groups: dict = {}
    missing = []
    for p in config["priors"]:
        for s in config["shots"]:
            for seed in config["seeds"]:
                for m in config["methods"]:
                    row = by_key.get(cell_key(p, s, seed, m))
                    if row:
                        groups.setdefault(m, {}).setdefault(str(s), []).append(row["seconds"])
                    else:
                        missing.append((m, str(s)))
    means = {m: {s: float(np.mean(v)) for s, v in by.items()} for m, by in groups.items()}
    done_s = sum(sum(v) for by in groups.values() for v in by.values())
    known = all(s in means.get(m, {}) for m, s in missing)
    done = sum(len(v) for by in groups.values() for v in by.values())
    return {"cells": done + len(missing), "done": done,
            "done_hours": done_s / 3600,
            "estimate_hours": ((done_s + sum(means[m][s] for m, s in missing)) / 3600
                               if known else None),
            "seconds_per_cell": means}


def format_compute(compute: dict) -> str:
    est = compute["estimate_hours"]
    lines = ["## compute", "",
             f"{compute['done']} of {compute['cells']} cells ran, {compute['done_hours']:.2f} h "
             f"of wall time (`seconds` in runs.jsonl: one process's time per cell, on the "
             f"machine and load it ran under); the whole config: "
             + (f"≈ {est:.2f} h in one process." if est is not None
                else "not estimable yet (a method × shots group has no run)."), ""]
    per = compute["seconds_per_cell"]
    shots = sorted({s for by in per.values() for s in by},
                   key=lambda s: (s == "all", int(s) if s != "all" else 0))
    if per:
        lines += ["mean seconds per cell:", "",
                  "| method | " + " | ".join(f"{s} shots" for s in shots) + " |",
                  "|---|" + "---|" * len(shots)]
        lines += [f"| {m} | " + " | ".join(f"{by[s]:.0f}" if s in by else "–" for s in shots)
                  + " |" for m, by in per.items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def figures(summary: dict, config: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = config["shots"]
    if len(shots) > 1:
        numeric = [s for s in shots if s != "all"]
        xs = {s: (s if s != "all" else (max(numeric) * 4 if numeric else 1)) for s in shots}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for label, methods in summary.items():
            for method, by in methods.items():
                pts = [(xs[s], by[str(s)]) for s in shots if str(s) in by]
                for ax, metric in zip(axes, ("error", "nll")):
                    x = [p[0] for p in pts]
                    m = np.array([p[1][metric][0] for p in pts])
                    ci = np.nan_to_num(np.array([p[1][metric][2] for p in pts]))
                    name = method if len(summary) == 1 else f"{label}/{method}"
                    ax.plot(x, m, marker="o", label=name)
                    ax.fill_between(x, m - ci, m + ci, alpha=0.15)
        for ax, metric in zip(axes, ("test error", "test NLL")):
            ax.set_xscale("log")
            ax.set_xticks([xs[s] for s in shots], [str(s) for s in shots])
            ax.set_xlabel("training examples per class")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{config['name']}: mean and 95% interval over {len(config['seeds'])} seeds")
        fig.tight_layout()
        fig.savefig(out / "fewshot.png", dpi=120)
        plt.close(fig)
    files = sorted(out.glob("probs_*.npz"))
    if files:
        from bayes_transfer.plots import reliability_diagram
        curves = {}
        for f in files:
            with np.load(f) as z:
                curves[f.stem[len("probs_"):]] = (z["probs"], z["labels"])
        reliability_diagram(curves, out / "reliability.png")


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


if __name__ == "__main__":
    main()
