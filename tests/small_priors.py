"""Test helper (not a test module): a random low-rank prior around a small CNN's weights."""
import jax.numpy as jnp
import numpy as np

from bayes_transfer import models
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.training import split_model


def random_lowrank_prior(seed: int = 1, width: float = 0.5, rank: int = 4) -> Prior:
    """A low-rank prior centred on ``small_cnn(seed)``'s backbone, SWAG-sized variances."""
    _, params, _ = split_model(models.create("small_cnn", 10, seed=seed, width=width))
    spec = ParamSpec.from_params(params)
    rng = np.random.default_rng(0)
    return Prior.lowrank(spec, spec.ravel(params),
                         jnp.asarray(rng.uniform(1e-4, 1e-3, spec.size), jnp.float32),
                         jnp.asarray(rng.normal(0, 1e-2, (rank, spec.size)), jnp.float32))
