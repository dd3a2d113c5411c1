"""Test helper (not a test module): Bayesian linear regression run through the real loop.

The inputs x and the target y ride in an image array (N, 1, 1, d + 1), y last, so an
``ArrayDataset`` (or a look-alike) carries them and ``fit`` batches them as images.
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx

NOISE = 0.5     # the likelihood's noise standard deviation


class _Weights(nnx.Module):
    def __init__(self, d):
        self.w = nnx.Param(jnp.zeros(d))


class LinearModel(nnx.Module):
    """y ≈ x·w, with w at the path ``backbone/w``; reads x from the image, y left out."""

    def __init__(self, d):
        self.backbone = _Weights(d)

    def __call__(self, images, train=False):
        return images.reshape(images.shape[0], -1)[:, :-1] @ self.backbone.w[...]


def targets(batch):
    return batch["image"][:, 0, 0, -1]


def gaussian_nll(pred, batch):
    """The mean negative log-likelihood of a batch, less its constant."""
    return 0.5 * jnp.mean(jnp.square(targets(batch) - pred)) / NOISE**2


def regression(rng, n=40, d=6):
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + NOISE * rng.normal(size=n)
    return x, y


def as_images(x, y, dtype=np.float32):
    n, d = x.shape
    return np.concatenate([x, y[:, None]], 1).reshape(n, 1, 1, d + 1).astype(dtype)
