"""Batched image augmentation in pure ``jax.numpy``, usable inside a jitted train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(key: jax.Array, images: jax.Array, *, pad: int = 2, flip: bool = False) -> jax.Array:
    """Random shift (zero-pad by ``pad`` then crop back) and optional horizontal flip.

    Each image of the ``(N, H, W, C)`` batch gets its own offsets in
    ``[-pad, pad]`` on both axes and, if ``flip``, a coin flip for mirroring.
    Deterministic per ``key``; with ``pad=0`` and ``flip=False`` it is the identity.
    Flip is off by default because mirrored digits are different digits.
    ``pad`` and ``flip`` must be Python values (they shape the computation).

    >>> x = jnp.ones((8, 28, 28, 1))
    >>> augment(jax.random.PRNGKey(0), x).shape
    (8, 28, 28, 1)
    """
    n, h, w, c = images.shape
    shift_key, flip_key = jax.random.split(key)
    if pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * pad + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
        images = jnp.where(mirror, images[:, :, ::-1, :], images)
    return images
