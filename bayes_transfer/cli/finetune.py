"""``finetune`` and ``suggest``: the downstream side."""
from __future__ import annotations

import argparse
import shlex

from bayes_transfer import BayesTransferError, models
from bayes_transfer.analysis.suggest import suggest
from bayes_transfer.cli import segmentation
from bayes_transfer.cli.common import add_data_args, classes, is_primary, write_report
from bayes_transfer.cli.datasets import input_of, load_splits, positive_int
from bayes_transfer.hub import load_prior
from bayes_transfer.inference.elbo import ElboConfig
from bayes_transfer.inference.map import CHOSEN_SCALES, FinetuneConfig, finetune
from bayes_transfer.inference.posterior import PosteriorConfig, sample_posterior
from bayes_transfer.prior import METHODS
from bayes_transfer.training import TrainConfig

SAMPLERS = ("sgld", "swag")


def _number(scale: str) -> float:
    try:
        return float(scale)
    except ValueError:
        raise BayesTransferError(f"--scale {scale!r}: give a number (λ) or one of "
                                 f"{', '.join(CHOSEN_SCALES)}") from None


def _line(name: str, metrics: dict, keys=("error", "nll", "ece", "brier")) -> str:
    return name + " " + " ".join(f"{k}={metrics[k]:.4f}" for k in keys)


def _target_splits(args, prior):
    """The few-shot target task, fed to the model as the prior's source was: its input
    size, channels and normalisation (a built-in dataset: its channels)."""
    channels = models.prior_architecture(prior).get("in_channels", 1)
    source = prior.metadata.get("source") or {}
    spec = input_of(source.get("input"), source, channels)
    return load_splits(args, spec=spec, channels=channels, shots_per_class=args.shots,
                       classes=classes(args.classes),
                       val_from_shots=bool(getattr(args, "val_from_shots", False)))


def cmd_finetune(args) -> None:
    if args.task == "segmentation":
        segmentation.run_finetune(args)
        return
    prior = load_prior(args.prior)
    methods = args.method
    if args.method == ["all"]:
        # every MAP method this prior has the arrays for, each tuned alike (the demo's
        # protocol, the best for its compute in RESULTS.md's issue-20 study)
        methods = [m for m in METHODS if m != "lowrank" or prior.kind == "lowrank"]
        args.learning_rates = args.learning_rates or [args.lr, args.lr / 10]
        args.val_from_shots = args.val_from_shots is not False
    splits = _target_splits(args, prior)
    config = FinetuneConfig(train=TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        learning_rate=args.lr, seed=args.seed, desc="finetune"), head_decay=args.head_decay,
        reinit_top=args.reinit_top, learning_rates=args.learning_rates,
        weight_decays=args.weight_decays, max_extensions=args.extend_grid,
        refit=bool(args.val_from_shots), elbo=ElboConfig(per_block=args.per_block))
    results, cache = [], {}
    scale = args.scale if args.scale in CHOSEN_SCALES else _number(args.scale)
    for method in methods:
        model = models.from_prior(prior, splits.train.num_classes, seed=args.seed)
        if method in SAMPLERS:
            post = PosteriorConfig(prior_method=args.prior_method, scale=scale, map=config)
            res = sample_posterior(model, splits, prior, method, samples=args.samples,
                                   config=post, log=print)
            results.append({**res.summary(), "val": res.val_metrics,
                            "map": res.map_metrics, "calibrated": res.calibrated_metrics})
            print(_line(f"{method:10s} BMA of {args.samples} samples, λ={res.scale:<9.3g}",
                        res.metrics))
            continue
        res = finetune(model, splits, prior, method, scale=scale, config=config, cache=cache)
        results.append({**res.summary(), "val": res.val_metrics, "sweep": res.sweep,
                        "evidence_trace": res.evidence_trace, "budget": res.budget,
                        "steps": res.steps, "seconds": res.seconds,
                        "learning_rate": res.learning_rate, "weight_decay": res.weight_decay,
                        "grid_extended": res.grid_extended, "grid_clipped": res.grid_clipped})
        print(_line(f"{method:10s} λ={res.scale:<9.3g}", res.metrics)
              + f" ({res.budget} configurations, {res.steps} steps, {res.seconds:.0f} s"
              + (f", lr={res.learning_rate:g}" if args.learning_rates else "")
              + (f", wd={res.weight_decay:g}" if args.weight_decays and method == "standard"
                 else "") + ")")
        if res.grid_extended:
            key, name = (("variance", "v = ") if "variance" in res.grid_extended[0]
                         else ("weight_decay", "weight decay "))
            added = name + ", ".join(f"{e[key]:g}" for e in res.grid_extended)
            print(f"{'':10s} validation chose an end of the grid: extended it to {added}"
                  + (f"; still at the end after {args.extend_grid} decades (raise "
                     f"--extend-grid)" if res.grid_clipped else ""))
        elif res.grid_clipped:
            print(f"{'':10s} validation chose an end of the grid (--extend-grid N tries "
                  f"N decades further)")
        trace = res.evidence_trace
        if trace and scale == "evidence":
            path = " → ".join(f"{t['variance']:.3g}" for t in trace[:-1])
            print(f"{'':10s} evidence: v = λ·mean diag Σ₀ went {path} (at the end the "
                  f"evidence's optimum is v={trace[-1]['variance']:.3g})")
        elif trace:
            shown = trace[:-1][::max(1, len(trace) // 6)] + trace[-1:]
            path = " → ".join(f"{t['variance']:.3g}" for t in shown)
            print(f"{'':10s} de-elbo: v = λ*·mean diag Σ₀ went {path}; q's σ = "
                  f"{trace[-1]['std']:.3g}")
            for block, v in trace[-1].get("block_variances", {}).items():
                print(f"{'':10s}   block {block}: v = {v:.3g}")
    if args.out and is_primary():
        write_report(args.out, {"prior": args.prior, "dataset": args.dataset,
                                "shots": args.shots, "seed": args.seed, "results": results})


def cmd_suggest(args) -> None:
    prior = load_prior(args.prior)
    splits = _target_splits(args, prior)
    s = suggest(prior, splits, seed=args.seed)
    scale = s.scale(prior, args.method)
    print(s.explain())
    command = ["bayes-transfer", "finetune", "--prior", args.prior, "--dataset", args.dataset,
               "--shots", str(args.shots), "--method", args.method, "--scale", f"{scale:.6g}",
               "--reinit-top", str(s.reinit_top), "--seed", str(args.seed)]
    if args.classes:
        command += ["--classes", args.classes]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    print(f"λ for {args.method}: {scale:.6g}. To fine-tune with it:\n  {shlex.join(command)}")
    if args.out and is_primary():
        write_report(args.out, {"prior": args.prior, "dataset": args.dataset,
                                "shots": args.shots, "seed": args.seed, "method": args.method,
                                "scale": scale, **s.as_dict(), "reasons": list(s.reasons),
                                "command": command})


def add_parsers(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune under a prior (λ chosen on validation)")
    p.add_argument("--prior", required=True, help="prior name, path or URL")
    add_data_args(p, default="mnist_5k")
    p.add_argument("--shots", type=positive_int, default=10,
                   help="examples per class (default 10)")
    p.add_argument("--method", nargs="+", default=["lowrank"],
                   help=f"one or more of {', '.join(METHODS)} (MAP), sgld or swag "
                        f"(samples + model averaging), or 'all' (every MAP method, each "
                        f"tuned alike: learning rates --lr and --lr/10 unless "
                        f"--learning-rates, validation out of the shots unless "
                        f"--no-val-from-shots)")
    p.add_argument("--samples", type=int, default=10,
                   help="posterior samples for sgld/swag (default 10)")
    p.add_argument("--prior-method", default="lowrank", choices=METHODS,
                   help="the prior sgld/swag sample under (default lowrank)")
    p.add_argument("--scale", default="auto",
                   help="λ, 'auto' (validation grid), or learned with the weights in one run "
                        "on the training set: 'evidence' (the Laplace evidence) or 'de-elbo' "
                        "(the data-emphasized ELBO)")
    p.add_argument("--per-block", action="store_true",
                   help="with --scale de-elbo: learn one prior scale per backbone block")
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", default="adam", choices=["sgd", "adam", "adamw"])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--learning-rates", type=float, nargs="+", default=None,
                   help="a learning-rate grid chosen on validation with λ (equal budgets; "
                        "default: --lr alone)")
    p.add_argument("--weight-decays", type=float, nargs="+", default=None,
                   help="the weight-decay grid of standard fine-tuning, which has no λ "
                        "(give it as many values as the λ grid has, no prior included)")
    p.add_argument("--extend-grid", type=int, default=3,
                   help="when validation picks an end of the λ grid, try up to N decades "
                        "further (default 3; 0: never)")
    p.add_argument("--val-from-shots", action=argparse.BooleanOptionalAction, default=None,
                   help="--shots is the whole labelled budget: hold out a fifth of it to "
                        "choose, then retrain the choice on all of it (the default with "
                        "--method all; otherwise validation is a split besides the shots)")
    p.add_argument("--head-decay", type=float, default=1e-4)
    p.add_argument("--reinit-top", type=int, default=0,
                   help="re-initialise the top k backbone blocks (outside the prior)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--task", default="classification", choices=["classification", "segmentation"],
                   help="segmentation: --dataset isbi, fashion_scenes or an image/label folder")
    segmentation.add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("suggest", help="propose λ and re-initialisation from a "
                       "transferability measure, before fine-tuning")
    p.add_argument("--prior", required=True, help="prior name, path or URL")
    add_data_args(p, default="mnist_5k")
    p.add_argument("--shots", type=positive_int, default=10,
                   help="examples per class (default 10)")
    p.add_argument("--method", default="lowrank", choices=METHODS,
                   help="the prior the λ is for (default lowrank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the suggestion as JSON here")
    p.set_defaults(func=cmd_suggest)
