"""SimCLR's random views, made on the device inside the jitted train step.

Every function here is pure ``jax.numpy``: a view is a function of a PRNG key and the
batch, so the training loop's ``(seed, step)`` keys make a run reproducible and a
resumed run identical. Each image gets its own random parameters (``vmap``).

The pipeline (Chen et al., 2020, §3 and appendix A, adapted to small grey images):

1. random resized crop: a box covering a uniform fraction ``scale`` of the image area
   with aspect ratio log-uniform in ``ratio``, resized back to ``H × W`` with bilinear
   interpolation (``jax.image.scale_and_translate``);
2. horizontal flip with probability ½;
3. colour jitter with probability ``jitter_prob``: brightness (an additive shift) and
   contrast (scaling about the image's mean), in the standardised pixel units the
   batches come in (``data.batches`` normalises to mean 0, std 1).

Shapes and dtype are preserved; grey (C = 1) and RGB (C = 3) images alike. The public
functions are jitted (their settings are static), so they are fast outside a train step
too; inside one they are inlined.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

__all__ = ["ViewConfig", "random_resized_crop", "random_flip", "color_jitter", "random_view",
           "two_views"]


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Strength of SimCLR's augmentations (hashable: it is part of a compiled step).

    Attributes:
      scale: range of the crop's area as a fraction of the image's.
      ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
      flip: random horizontal flips.
      brightness: the additive brightness shift is uniform in ``±brightness``.
      contrast: the contrast factor is uniform in ``1 ± contrast``.
      jitter_prob: probability that an image gets brightness/contrast jitter at all.
    """

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_prob: float = 0.8


def _crop_box(key, h: int, w: int, scale, ratio):
    """(y0, x0, ch, cw) of one random crop box, a float box inside the image."""
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * h * w
    log_r = jax.random.uniform(k_ratio, (), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    r = jnp.exp(log_r)
    # Boxes that would not fit are clipped to the image (torchvision retries instead; the
    # clip keeps one fixed-shape draw and only changes the rare extreme boxes).
    cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
    ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
    y0 = jax.random.uniform(k_y, ()) * (h - ch)
    x0 = jax.random.uniform(k_x, ()) * (w - cw)
    return y0, x0, ch, cw


def _resized_crop_one(key, image, scale, ratio):
    h, w, _ = image.shape
    y0, x0, ch, cw = _crop_box(key, h, w, scale, ratio)
    sy, sx = h / ch, w / cw
    # scale_and_translate maps input coordinate u to output u·scale + translation: the
    # box's corner (y0, x0) goes to (0, 0) and its far corner to (h, w).
    out = jax.image.scale_and_translate(
        image.astype(jnp.float32), (h, w, image.shape[-1]), spatial_dims=(0, 1),
        scale=jnp.stack([sy, sx]), translation=jnp.stack([-y0 * sy, -x0 * sx]),
        method="linear", antialias=True)
    return out.astype(image.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "ratio"))
def random_resized_crop(key: jax.Array, images: jax.Array, *, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> jax.Array:
    """A random crop of each ``(N, H, W, C)`` image, resized back to ``H × W``.

    >>> x = jnp.ones((4, 28, 28, 1))
    >>> random_resized_crop(jax.random.PRNGKey(0), x).shape
    (4, 28, 28, 1)
    """
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, im: _resized_crop_one(k, im, scale, ratio))(keys, images)


@jax.jit
def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability ½."""
    mirror = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(mirror, images[:, :, ::-1, :], images)


@functools.partial(jax.jit, static_argnames=("brightness", "contrast", "prob"))
def color_jitter(key: jax.Array, images: jax.Array, *, brightness: float = 0.4,
                 contrast: float = 0.4, prob: float = 0.8) -> jax.Array:
    """Random contrast (about each image's mean) then brightness, with probability ``prob``.

    The images are standardised (mean 0, std 1 over the dataset), so brightness is an
    additive shift in units of the dataset's pixel standard deviation; contrast scales
    each image's deviations from its own mean (over pixels and channels).
    """
    n = images.shape[0]
    k_apply, k_b, k_c = jax.random.split(key, 3)
    x = images.astype(jnp.float32)
    apply = jax.random.bernoulli(k_apply, prob, (n, 1, 1, 1))
    shift = jax.random.uniform(k_b, (n, 1, 1, 1), minval=-brightness, maxval=brightness)
    factor = jax.random.uniform(k_c, (n, 1, 1, 1), minval=1 - contrast, maxval=1 + contrast)
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    jittered = (x - mean) * factor + mean + shift
    return jnp.where(apply, jittered, x).astype(images.dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def random_view(key: jax.Array, images: jax.Array, config: ViewConfig = ViewConfig()) -> jax.Array:
    """One random SimCLR view of each image of an ``(N, H, W, C)`` batch.

    Deterministic per ``key``; a different key gives a different view.
    """
    k_crop, k_flip, k_jitter = jax.random.split(key, 3)
    x = random_resized_crop(k_crop, images, scale=config.scale, ratio=config.ratio)
    if config.flip:
        x = random_flip(k_flip, x)
    if config.jitter_prob > 0 and (config.brightness > 0 or config.contrast > 0):
        x = color_jitter(k_jitter, x, brightness=config.brightness, contrast=config.contrast,
                         prob=config.jitter_prob)
    return x


@functools.partial(jax.jit, static_argnames=("config",))
def two_views(key: jax.Array, images: jax.Array,
              config: ViewConfig = ViewConfig()) -> tuple[jax.Array, jax.Array]:
    """Two independent random views of each image (SimCLR's positive pairs)."""
    k1, k2 = jax.random.split(key)
    return random_view(k1, images, config), random_view(k2, images, config)
