"""Shared pieces of every model: the classifier shell, layer factories, counting.

Every model is a :class:`Classifier`: a ``backbone`` (images -> (N, F) features,
global pooling included) and a ``head`` (``nnx.Linear(F, num_classes)``). Parameter
paths therefore start with ``backbone/`` or ``head/``, which is what a prior's
default rule (``^backbone/``) selects.
"""
from __future__ import annotations

import functools

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.params import flatten_with_paths


class ModelConfigError(BayesTransferError, ValueError):
    """A model was asked for with an impossible or unknown configuration."""


class UnknownArchitectureError(ModelConfigError):
    """``create`` was given an architecture name that is not registered."""

# BatchNorm conventions shared by all models: torch's eps and momentum 0.1, which is
# flax momentum 0.9 (flax keeps `momentum` of the old running value).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# He et al. (2015) normal init with fan_out, as torchvision initialises its convs.
he_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs,
         padding: int | None = None, use_bias: bool = False) -> nnx.Conv:
    """Conv with torch-style symmetric padding (``kernel // 2`` by default), no bias.

    Explicit symmetric padding (rather than ``'SAME'``) makes strided convolutions
    give the same output as PyTorch's, so ported weights compute the same function.
    """
    p = kernel // 2 if padding is None else padding
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                    padding=((p, p), (p, p)), use_bias=use_bias,
                    kernel_init=he_normal_fan_out, rngs=rngs)


def batch_norm(num_features: int, *, rngs: nnx.Rngs, scale_init=None) -> nnx.BatchNorm:
    kwargs = {} if scale_init is None else {"scale_init": scale_init}
    return nnx.BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                         rngs=rngs, **kwargs)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """``nnx.max_pool(x, (window, window), strides=(stride, stride), padding=...)`` on NHWC
    maps, written as the maximum of ``window²`` strided slices.

    The same values and the same gradient: each window's gradient goes to its first
    maximum in row-major order, as XLA's select-and-scatter gives it. Why: XLA:CPU's
    select-and-scatter is 20-40x slower than these slices and selects
    (``experiments/bench_cpu_training.py``, ``docs/benchmarks.md``).
    """
    return _max_pool(x, window, stride, padding)


def _pool_slices(x, window: int, stride: int, padding: int):
    """The padded input's ``window²`` strided slices, one per window offset (row-major)."""
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                    constant_values=-jnp.inf)
    n, h, w, c = x.shape
    out_h, out_w = (h - window) // stride + 1, (w - window) // stride + 1

    def piece(x, i, j):
        return jax.lax.slice(x, (0, i, j, 0), (n, i + stride * (out_h - 1) + 1,
                                                j + stride * (out_w - 1) + 1, c),
                             (1, stride, stride, 1))
    return x, [(i, j) for i in range(window) for j in range(window)], piece


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
    padded, offsets, piece = _pool_slices(x, window, stride, padding)
    out = None
    for i, j in offsets:
        p = piece(padded, i, j)
        out = p if out is None else jnp.maximum(out, p)
    return out


def _max_pool_fwd(x, window, stride, padding):
    # The gradient's route is fixed here, as the index of each window's first maximum,
    # not found again in the backward pass by comparing x with the output: under jit, XLA
    # may recompute x's producer in two fusions rounded differently, and then no element
    # of a window equals its maximum and the window's gradient is lost.
    padded, offsets, piece = _pool_slices(x, window, stride, padding)
    out, first = None, None
    for k, (i, j) in enumerate(offsets):
        p = piece(padded, i, j)
        if out is None:
            out, first = p, jnp.zeros(p.shape, jnp.int8 if len(offsets) < 128 else jnp.int32)
        else:
            first = jnp.where(p > out, k, first)    # strictly greater: the first one stays
            out = jnp.maximum(out, p)
    return out, (first, x[:0])     # x[:0]: x's shape and dtype, without its values


def _max_pool_bwd(window, stride, padding, saved, g):
    first, empty = saved
    zeros = jnp.zeros((g.shape[0], *empty.shape[1:]), empty.dtype)
    padded, offsets, piece = _pool_slices(zeros, window, stride, padding)
    grad = jnp.zeros_like(padded)
    for k, (i, j) in enumerate(offsets):
        _, scatter = jax.vjp(lambda t, i=i, j=j: piece(t, i, j), padded)
        grad = grad + scatter(jnp.where(first == k, g, 0).astype(g.dtype))[0]
    if padding:
        grad = grad[:, padding:-padding, padding:-padding, :]
    return (grad,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))


class Classifier(nnx.Module):
    """Backbone + linear head. Subclasses build ``self.backbone`` and call ``_finish``.

    The backbone must provide ``__call__(x, *, train) -> (N, F)``,
    ``feature_maps(x, *, train) -> list of NHWC maps`` and the attributes
    ``num_features`` (F), ``feature_channels`` and ``feature_strides`` (one per map).
    """

    backbone: nnx.Module
    head: nnx.Linear

    def _finish(self, arch: str, num_classes: int, in_channels: int, config: dict,
                *, rngs: nnx.Rngs) -> None:
        self.head = nnx.Linear(self.backbone.num_features, num_classes, rngs=rngs)
        self.arch = arch
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        # stored as a sorted tuple of pairs: static module attributes must be hashable
        self._config = tuple(sorted(config.items()))

    @property
    def config(self) -> dict[str, Any]:
        """Architecture options beyond arch/num_classes/in_channels (see model_config)."""
        return dict(self._config)

    def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Backbone features (N, F) of NHWC images."""
        return self.backbone(x, train=train)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits (N, num_classes) of NHWC float32 images."""
        return self.head(self.backbone(x, train=train))


def count_params(model_or_state, rule: str | None = None, filter=nnx.Param) -> int:
    """Number of scalars in the ``filter`` variables whose path matches ``rule``.

    ``count_params(model)`` counts all trainable parameters;
    ``count_params(model, r"^backbone/")`` the backbone's. Works on abstract
    (``nnx.eval_shape``) models too.
    """
    state = (nnx.state(model_or_state, filter) if isinstance(model_or_state, nnx.Module)
             else model_or_state)
    pattern = re.compile(rule) if rule is not None else None
    total = 0
    for path, leaf in flatten_with_paths(state).items():
        if pattern is None or pattern.search(path):
            n = 1
            for s in leaf.shape:
                n *= int(s)
            total += n
    return total
