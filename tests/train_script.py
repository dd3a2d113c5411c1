"""Run by tests in a subprocess: a short deterministic training run with SWAG collection.

usage: python tests/train_script.py OUT.npz [CHECKPOINT_DIR] [--steps N] [--batch B]
Writes the final parameters, BatchNorm statistics and SWAG statistics to OUT.npz.
"""
import argparse
import sys

import jax
import numpy as np

from bayes_transfer import data, models
from bayes_transfer.training.objectives import cross_entropy_loss
from bayes_transfer.params import ParamSpec, flatten_with_paths
from bayes_transfer.swag import SwagConfig, swag_collector
from bayes_transfer.training import TrainConfig, fit


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("checkpoint_dir", nargs="?")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    splits = data.load("digits", seed=0)
    train = splits.train.subset(np.arange(512))
    model = models.create("small_cnn", 10, seed=0, width=0.5)
    params = jax.tree.map(np.asarray, __import__("flax").nnx.state(model, __import__("flax").nnx.Param))
    spec = ParamSpec.from_params(params)
    swag = swag_collector(spec, SwagConfig(rank=3, every=2))
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch, learning_rate=0.05,
                         augment=True, checkpoint_dir=args.checkpoint_dir, checkpoint_every=1,
                         progress=False)
    result = fit(model, train, cross_entropy_loss, config, swag=swag)
    state = jax.device_get(result.state)
    arrays = {f"params/{k}": np.asarray(v) for k, v in flatten_with_paths(state.params).items()}
    arrays.update({f"rest/{k}": np.asarray(v) for k, v in flatten_with_paths(state.rest).items()})
    arrays.update({f"swag/{k}": np.asarray(v) for k, v in state.swag._asdict().items()})
    arrays["history_loss"] = np.array([h["loss"] for h in result.history])
    np.savez(args.out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
