"""From ``runs.jsonl`` to the report: statistics, ``summary.md`` / ``summary.json``,
the figures and the compute time (spent, and estimated for the whole config).

``summary.md`` gives the mean and 95% t-interval over seeds of each test metric;
``fewshot.png`` is the few-shot curve (when there is more than one shots value) and
``reliability.png`` the reliability diagram of the cells named by the config's
``"reliability"``. ``summary.md`` ends with the wall time per cell and an estimate for
the whole config.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bayes_transfer.fsutil import atomic_write, write_text

from .cells import cell_key, grid
from .store import RUNS, load_probs, read_rows, save_config

METRICS = ("error", "nll", "ece", "brier")


def report(config: dict, out: Path) -> dict:
    """Summary (JSON and Markdown), figures and the config they cover, from runs.jsonl."""
    rows = read_rows(out / RUNS)
    summary = summarize(rows, config)
    save_config(out, config)
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    text = (format_summary(summary, config) + format_budget(rows, config)
            + format_compute(compute_time(rows, config)))
    write_text(out / "summary.md", text)
    figures(summary, config, out)
    print(text)
    return summary


# --------------------------------------------------------------------------- statistics
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
    keys = {cell_key(*cell) for cell in grid(config)}
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


def format_budget(rows: list[dict], config: dict) -> str:
    """Each method's tuning budget and compute per cell (mean over priors and seeds):
    configurations trained to choose, their optimizer steps (a shared no-prior run counts
    for every method that saw it), wall seconds, and the chosen λ's effective variance."""
    keys = {cell_key(*cell) for cell in grid(config)}
    rows = [r for r in rows if r["key"] in keys and "budget" in r]
    if not rows:
        return ""
    lines = ["## budget and compute per cell", "",
             "| method | shots | configurations | optimizer steps | seconds | chosen v "
             "(per seed) |", "|---|---|---|---|---|---|"]
    for method in config["methods"]:
        for shots in config["shots"]:
            sel = [r for r in rows if (r["method"], r["shots"]) == (method, shots)]
            if not sel:
                continue
            chosen = ", ".join(_variance(r) for r in sorted(sel, key=lambda r: r["seed"]))
            lines.append(f"| {method} | {shots} | {np.mean([r['budget'] for r in sel]):.0f} | "
                         f"{np.mean([r['steps'] for r in sel]):.0f} | "
                         f"{np.mean([r['seconds'] for r in sel]):.0f} | {chosen} |")
    return "\n".join(lines) + "\n\n"


def _variance(row: dict) -> str:
    """The chosen (or, one-run variants, learned) effective variance v of a row ("none":
    no prior; "wd=…": standard)."""
    sweep = [s for t in row.get("tuning", []) for s in t.get("sweep", [])]
    match = [s for s in sweep if s.get("scale") == row["scale"]
             and s.get("learning_rate", row["learning_rate"]) == row["learning_rate"]]
    if not match or not math.isfinite(match[0]["variance"]):
        wd = row.get("weight_decay") or 0
        return f"wd={wd:g}" if wd else "none"
    return f"{match[0]['variance']:.2g}"


# --------------------------------------------------------------------------- compute time
def compute_time(rows: list[dict], config: dict) -> dict:
    """Wall seconds per cell by method × shots, and the whole config's estimated total.

    A missing cell is estimated by the mean of its (method, shots) group over the
    priors and seeds that ran; ``estimate_hours`` is None while a group has no run.
    """
    by_key = {r["key"]: r for r in rows}
    groups: dict = {}
    missing = []
    for cell in grid(config):
        method, shots = cell[3], str(cell[1])
        row = by_key.get(cell_key(*cell))
        if row:
            groups.setdefault(method, {}).setdefault(shots, []).append(row["seconds"])
        else:
            missing.append((method, shots))
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


# --------------------------------------------------------------------------- figures
def figures(summary: dict, config: dict, out: Path) -> None:
    """``fewshot.png`` (more than one shots value) and ``reliability.png`` (if any
    ``probs_*.npz``)."""
    import matplotlib
    matplotlib.use("Agg")

    if len(config["shots"]) > 1:
        fewshot_figure(summary, config, out / "fewshot.png")
    curves = load_probs(out)
    if curves:
        from bayes_transfer.evaluation.plots import reliability_diagram
        reliability_diagram(curves, out / "reliability.png")


#: By a variant's ("scale", per-block DE-ELBO); any other variant dash-dot-dotted.
LINE_STYLES = {("evidence", False): "--", ("de-elbo", False): ":", ("de-elbo", True): "-."}


def fewshot_figure(summary: dict, config: dict, path: Path) -> None:
    """Test error and NLL against examples per class ("all" drawn at 4× the largest)."""
    import matplotlib.pyplot as plt

    shots = config["shots"]
    numeric = [s for s in shots if s != "all"]
    xs = {s: (s if s != "all" else (max(numeric) * 4 if numeric else 1)) for s in shots}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # One colour per prior (a variant takes its base method's), one line style per way
    # of choosing λ: the validation grid solid, the evidence dashed, the DE-ELBO dotted
    # (per block: dash-dotted).
    variants = config.get("variants", {})
    base = {m: variants.get(m, {}).get("method", m) for ms in summary.values() for m in ms}
    colours = {b: f"C{i % 10}" for i, b in enumerate(dict.fromkeys(base.values()))}
    for label, methods in summary.items():
        for method, by in methods.items():
            style = "-" if method not in variants else LINE_STYLES.get(
                (variants[method].get("scale"),
                 variants[method].get("elbo", {}).get("per_block", False)), (0, (5, 1, 1, 1)))
            pts = [(xs[s], by[str(s)]) for s in shots if str(s) in by]
            for ax, metric in zip(axes, ("error", "nll")):
                x = [p[0] for p in pts]
                m = np.array([p[1][metric][0] for p in pts])
                ci = np.nan_to_num(np.array([p[1][metric][2] for p in pts]))
                name = method if len(summary) == 1 else f"{label}/{method}"
                ax.plot(x, m, marker="o", label=name, linestyle=style,
                        color=colours[base[method]])
                ax.fill_between(x, m - ci, m + ci, alpha=0.1, color=colours[base[method]])
    for ax, metric in zip(axes, ("test error", "test NLL")):
        ax.set_xscale("log")
        ax.minorticks_off()      # only the sizes that ran are labelled
        ax.set_xticks([xs[s] for s in shots], [str(s) for s in shots])
        within = config.get("tuning", {}).get("validation") == "within"
        ax.set_xlabel(f"{'labelled' if within else 'training'} examples per class")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{config['name']}: mean and 95% interval over {len(config['seeds'])} seeds")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
