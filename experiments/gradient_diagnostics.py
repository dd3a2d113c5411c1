"""Gradient diagnostics: how the likelihood and the prior pull during fine-tuning, SGD vs Adam.

    python experiments/gradient_diagnostics.py                 # seeds 0 1 2, v = 1 and 100

Fashion-MNIST prior → MNIST-5k, 10 examples per class. For each effective prior
variance v (λ = v / mean diag Σ₀) and each optimizer (SGD with momentum 0.9 and Adam,
both LR 1e-2 cosine, 40 epochs of batch 32, the fine-tuning default budget), fine-tune
from the prior mean under the learned low-rank prior and log, every ``--every`` epochs,
the cosine and the norm ratio ‖∇prior‖/‖∇likelihood‖ over the covered parameters
(``bayes_transfer.analysis.diagnostics``), also after Adam's per-coordinate scaling, with
validation NLL. Writes ``experiments/results/gradient_diagnostics.json`` and ``.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runner  # noqa: E402,F401  (the repository's prior registry: runner/__init__.py)

import bayes_transfer as bt  # noqa: E402
from bayes_transfer import data as btdata  # noqa: E402
from bayes_transfer.analysis.diagnostics import trace_gradients  # noqa: E402

KEYS = ("cosine", "ratio", "adam_cosine", "adam_ratio", "val_nll", "val_error")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prior", default="fashion-mnist/small-cnn")
    p.add_argument("--dataset", default="mnist_5k")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variances", default="1,100")
    p.add_argument("--every", type=int, default=5, help="epochs between diagnostics")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "gradient_diagnostics"))
    p.add_argument("--replot", action="store_true", help="redraw the figure from the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        report = json.loads(out.with_suffix(".json").read_text())
        variances = sorted({r["variance"] for r in report["runs"]})
        plot(report["runs"], variances, out.with_suffix(".png"))
        return 0
    t0 = time.perf_counter()
    prior = bt.load_prior(args.prior)
    variances = [float(v) for v in args.variances.split(",")]
    runs = []
    for seed in range(args.seeds):
        splits = btdata.load(args.dataset, shots_per_class=args.shots, seed=seed)
        for v in variances:
            model = bt.models.from_prior(prior, splits.train.num_classes, seed=seed)
            traces = trace_gradients(model, splits, prior, variance=v, every=args.every)
            for name, trace in traces.items():
                rec = {"seed": seed, "variance": v, "optimizer": name,
                       "epochs": trace.series("epoch").tolist(),
                       **{k: trace.series(k).tolist() for k in KEYS}}
                runs.append(rec)
                print(f"seed {seed} v={v:g} {name:4s}: " + " ".join(
                    f"{k}={rec[k][-1]:.3g}" for k in KEYS if not math.isnan(rec[k][-1])))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": "python experiments/gradient_diagnostics.py " + " ".join(argv or sys.argv[1:]),
         "prior": args.prior, "dataset": args.dataset, "shots": args.shots, "runs": runs,
         "seconds": time.perf_counter() - t0}, indent=2, default=float))
    plot(runs, variances, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


def plot(runs, variances, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("cosine", "cos(∇lik, ∇prior)"), ("ratio", "‖∇prior‖ / ‖∇lik‖ (log)"),
              ("val_nll", "validation NLL"))
    fig, axes = plt.subplots(len(variances), len(panels), figsize=(13, 3.4 * len(variances)),
                             squeeze=False)
    colors = {"sgd": "tab:blue", "adam": "tab:orange"}
    for row, v in enumerate(variances):
        for col, (key, title) in enumerate(panels):
            ax = axes[row][col]
            for name, color in colors.items():
                sel = [r for r in runs if r["variance"] == v and r["optimizer"] == name]
                if not sel:
                    continue
                x = np.array(sel[0]["epochs"])
                ys = np.array([r[key] for r in sel], dtype=float)
                if key == "ratio":   # 0 at the prior mean (epoch 0): nothing to show on a log axis
                    ys[ys <= 0] = np.nan
                with np.errstate(all="ignore"):
                    mean = np.nanmean(ys, axis=0)
                ax.plot(x, mean, color=color, marker="o", ms=3, label=name)
                if key == "ratio" and f"adam_{key}" in sel[0] and name == "adam":
                    ya = np.array([r["adam_ratio"] for r in sel], float)
                    ya[~(ya > 0)] = np.nan
                    with np.errstate(all="ignore"):
                        ya = np.nanmean(ya, axis=0)
                    ax.plot(x, ya, color=color, ls="--", label="adam, after scaling")
            if key == "ratio":
                ax.set_yscale("log")
            ax.set_title(f"v = {v:g}: {title}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Fine-tuning under the learned prior: mean over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
