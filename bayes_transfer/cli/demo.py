"""``demo``: the main job on the embedded default (:mod:`bayes_transfer.demo`)."""
from __future__ import annotations

from bayes_transfer.demo import (DEMO_CONFIG, FAST_CONFIG, FAST_METHODS, FULL_GRID_CONFIG,
                                 run_demo)
from bayes_transfer.prior import METHODS


def cmd_demo(args) -> None:
    config = FULL_GRID_CONFIG if args.full_grid else FAST_CONFIG if args.fast else DEMO_CONFIG
    methods = args.methods.split(",") if args.methods else FAST_METHODS if args.fast \
        else METHODS
    run_demo(args.prior, target=args.dataset, shots=args.shots, seeds=tuple(range(args.seeds)),
             methods=tuple(methods), out_dir=args.out, config=config)


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="Fashion-MNIST prior → MNIST-5k few-shot, all methods")
    p.add_argument("--prior", default=None, help="prior name, path or URL "
                   "(default: the published fashion-mnist/small-cnn)")
    p.add_argument("--dataset", default="mnist_5k")
    p.add_argument("--shots", type=int, default=10,
                   help="labelled examples per class, validation included (default 10)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated (default: {','.join(METHODS)}; with --fast: "
                        f"{','.join(FAST_METHODS)})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--full-grid", action="store_true",
                        help="5 prior strengths (v = 0.01..100, 6 weight decays for standard) "
                             "and 40 epochs per run instead of 3 (v = 1, 10, 100) and 30")
    budget.add_argument("--fast", action="store_true",
                        help="a smoke test of the whole pipeline in seconds: standard vs "
                             "lowrank, one configuration each (v = 10), 5 epochs; its "
                             "numbers mean little")
    p.add_argument("--out", default="outputs/demo")
    p.set_defaults(func=cmd_demo)
