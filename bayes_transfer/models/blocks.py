"""Residual blocks, named like torchvision's so weights map one-to-one.

``BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU.
``Bottleneck``: conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, add, ReLU
(the stride sits on the 3x3 conv, as in torchvision's "ResNet v1.5").

Shortcuts, when the shape changes:
- ``"B"`` (torchvision): ``downsample = [conv1x1(stride), BN]``, an ``nnx.List`` so
  its paths are ``downsample/0/kernel`` and ``downsample/1/scale`` like torch's
  ``downsample.0.weight`` / ``downsample.1.weight``;
- ``"A"`` (He et al. 2016, CIFAR): parameter-free; subsample spatially by the stride
  and zero-pad the new channels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bayes_transfer.models._base import batch_norm, conv


def _shortcut_a(x: jax.Array, stride: int, out_ch: int) -> jax.Array:
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    extra = out_ch - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


def _make_shortcut(in_ch: int, out_ch: int, stride: int, shortcut: str, *, rngs: nnx.Rngs):
    """(pad_shortcut, downsample): option A pads, option B projects, else identity."""
    if stride == 1 and in_ch == out_ch:
        return False, None
    if shortcut == "A":
        return True, None
    return False, nnx.List([conv(in_ch, out_ch, 1, stride, rngs=rngs),
                            batch_norm(out_ch, rngs=rngs)])


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, *, shortcut: str = "B",
                 rngs: nnx.Rngs):
        out_ch = planes * self.expansion
        self.conv1 = conv(in_ch, planes, 3, stride, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, out_ch, 3, rngs=rngs)
        self.bn2 = batch_norm(out_ch, rngs=rngs)
        self.stride = stride
        self.out_channels = out_ch
        self.pad_shortcut, self.downsample = _make_shortcut(in_ch, out_ch, stride, shortcut,
                                                            rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        return nnx.relu(y + _shortcut(self, x, ura))


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, *, shortcut: str = "B",
                 rngs: nnx.Rngs):
        out_ch = planes * self.expansion
        self.conv1 = conv(in_ch, planes, 1, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.conv3 = conv(planes, out_ch, 1, rngs=rngs)
        self.bn3 = batch_norm(out_ch, rngs=rngs)
        self.stride = stride
        self.out_channels = out_ch
        self.pad_shortcut, self.downsample = _make_shortcut(in_ch, out_ch, stride, shortcut,
                                                            rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = self.bn3(self.conv3(y), use_running_average=ura)
        return nnx.relu(y + _shortcut(self, x, ura))


def _shortcut(block, x: jax.Array, use_running_average: bool) -> jax.Array:
    if block.downsample is not None:
        ds_conv, ds_bn = block.downsample
        return ds_bn(ds_conv(x), use_running_average=use_running_average)
    if block.pad_shortcut:
        return _shortcut_a(x, block.stride, block.out_channels)
    return x
