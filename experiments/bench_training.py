"""Overheads inside the training loop, as ratios measured in one run.

1. A fine-tuning step with the learned low-rank prior term vs the same step without it.
2. An epoch of training with SWAG collection riding along vs the same epoch without it.

    python experiments/bench_training.py [--arch small_cnn] [--images 4096] [--reps 3]

Runs alternate with/without and the overhead is the median of per-pair ratios, after a
warm-up run of each (which compiles),
on real Fashion-MNIST images, on whatever devices JAX sees.
"""
import argparse
import statistics
import time

import jax
import numpy as np

import runner  # noqa: F401  (the repository's prior registry: runner/__init__.py)
from bayes_transfer import data, hub, models
from bayes_transfer.training.objectives import cross_entropy_loss, map_loss
from bayes_transfer.params import ParamSpec
from bayes_transfer.swag import SwagConfig, swag_collector
from bayes_transfer.training import TrainConfig, fit, split_model


def paired(fn_a, fn_b, reps):
    """Median times of a and b, and the median of per-pair ratios b/a.

    Runs alternate (a, b, a, b, ...) so that load from other processes hits both alike.
    """
    def once(fn):
        t = time.perf_counter()
        jax.block_until_ready(fn().state.params)
        return time.perf_counter() - t

    once(fn_a), once(fn_b)  # warm-up: compiles
    pairs = [(once(fn_a), once(fn_b)) for _ in range(reps)]
    ta, tb = (statistics.median(x) for x in zip(*pairs))
    return ta, tb, statistics.median(b / a for a, b in pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prior", default="fashion-mnist/small-cnn")
    args = p.parse_args()

    train = data.load("fashion_mnist", seed=0).train.subset(np.arange(args.images))
    model = models.create(args.arch, 10, seed=0)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, progress=False)
    steps = train.images.shape[0] // args.batch_size
    print(f"{args.arch}, {steps} steps of batch {args.batch_size} on {jax.devices()[0].platform}"
          f" x{len(jax.devices())}")

    prior = hub.load_prior(args.prior).rescale(1e4)
    loss = map_loss(len(train))
    flat = prior.for_method("standard")
    t_flat, t_prior, ratio = paired(lambda: fit(model, train, loss, config, aux=flat),
                                    lambda: fit(model, train, loss, config, aux=prior),
                                    args.reps)
    print(f"fine-tuning step without prior term: {1e3 * t_flat / steps:8.2f} ms")
    print(f"fine-tuning step with low-rank prior (d={prior.dim}, K={prior.rank}): "
          f"{1e3 * t_prior / steps:8.2f} ms   overhead {100 * (ratio - 1):+.1f}%")

    _, params, _ = split_model(model)
    swag = swag_collector(ParamSpec.from_params(params), SwagConfig(rank=20, every=40))
    t_plain, t_swag, ratio = paired(lambda: fit(model, train, cross_entropy_loss, config),
                                    lambda: fit(model, train, cross_entropy_loss, config,
                                                swag=swag), args.reps)
    print(f"epoch without SWAG: {t_plain:7.2f} s;  with SWAG (K=20, every 40 steps): "
          f"{t_swag:7.2f} s   overhead {100 * (ratio - 1):+.1f}%")

if __name__ == "__main__":
    main()
