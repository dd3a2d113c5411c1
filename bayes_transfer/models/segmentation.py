"""Segmentation networks whose encoder is exactly a prior's backbone.

:class:`SegmentationModel` = ``backbone`` (the very module a classification model of the
same architecture has, under the same attribute name, so its parameter paths
``backbone/...`` match a classification prior's spec) + a light U-Net-style ``decoder``
(upsample, concatenate the skip connection from ``backbone.feature_maps``, one
conv-BN-ReLU per level, a 1x1 conv to per-pixel logits at input resolution).

A prior learned on a classification task therefore applies to the encoder unchanged::

    prior = bt.load_prior("fashion-mnist/small-cnn")
    model = bt.models.from_prior(prior, 2, segmentation=True)     # fresh decoder
    params = prior.init_params(nnx.state(model, nnx.Param))         # encoder = θ̄

Inputs of any size work: they are reflect-padded to a multiple of the encoder's
largest stride and the logits are cropped back, so ``model(x)`` has shape
``(N, H, W, num_classes)`` for ``x`` of shape ``(N, H, W, C)``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bayes_transfer.models._base import ModelConfigError, batch_norm, conv
from bayes_transfer.models.registry import ARCHITECTURES, create

#: Channels of every decoder level (a light decoder: the encoder carries the prior).
DEFAULT_DECODER_CHANNELS = 32


class _DecoderBlock(nnx.Module):
    """Upsample to the skip's resolution, concatenate it, conv3x3-BN-ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        self.conv = conv(in_ch + skip_ch, out_ch, 3, rngs=rngs)
        self.bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x, skip, *, train: bool = False):
        n, h, w, _ = skip.shape
        x = jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), method="bilinear")
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


class UNetDecoder(nnx.Module):
    """Decoder over the encoder's feature maps (deepest first), to full-resolution logits.

    ``blocks[i]`` fuses the running map with skip ``len(maps) - 2 - i``; when the
    shallowest map is not at stride 1 (torchvision ResNets: stride 2), a last block
    upsamples to the input resolution (skip: the input image itself).
    """

    def __init__(self, feature_channels, feature_strides, num_classes: int, in_channels: int,
                 *, channels: int = DEFAULT_DECODER_CHANNELS, rngs: nnx.Rngs):
        feature_channels = tuple(int(c) for c in feature_channels)
        blocks = []
        ch = feature_channels[-1]
        for skip_ch in reversed(feature_channels[:-1]):
            blocks.append(_DecoderBlock(ch, skip_ch, channels, rngs=rngs))
            ch = channels
        self.to_input = int(feature_strides[0]) != 1
        if self.to_input:
            blocks.append(_DecoderBlock(ch, in_channels, channels, rngs=rngs))
            ch = channels
        self.blocks = nnx.List(blocks)
        self.classifier = nnx.Conv(ch, num_classes, (1, 1), rngs=rngs)

    def __call__(self, maps, image, *, train: bool = False):
        x = maps[-1]
        skips = list(reversed(maps[:-1])) + ([image] if self.to_input else [])
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip, train=train)
        return self.classifier(x)


class SegmentationModel(nnx.Module):
    """Encoder (a registered classification backbone) + U-Net-style decoder.

    Args:
      backbone_arch: a classification architecture (``small_cnn``, ``resnet20``, ...);
        the encoder is ``create(backbone_arch, ...).backbone``, the same module class with
        the same parameter paths.
      num_classes: output classes per pixel (background included).
      in_channels: channels of the NHWC input images.
      seed: initialisation seed (encoder and decoder).
      decoder_channels: width of every decoder level.
      **backbone_config: options of the architecture (``width`` for small_cnn, ...).

    Example::

        model = SegmentationModel("small_cnn", 2)
        logits = model(jnp.zeros((2, 64, 64, 1)))          # (2, 64, 64, 2)
    """

    def __init__(self, backbone_arch: str, num_classes: int, *, in_channels: int = 1,
                 seed: int = 0, decoder_channels: int = DEFAULT_DECODER_CHANNELS,
                 **backbone_config: Any):
        if num_classes < 1:
            raise ModelConfigError(f"num_classes must be >= 1, got {num_classes}")
        classifier = create(backbone_arch, 1, in_channels=in_channels, seed=seed,
                            **backbone_config)
        backbone = classifier.backbone
        for attr in ("feature_maps", "feature_channels", "feature_strides"):
            if not hasattr(backbone, attr):
                raise ModelConfigError(f"the {backbone_arch!r} backbone has no {attr}; a "
                                       f"segmentation encoder needs its feature maps")
        self.backbone = backbone
        self.decoder = UNetDecoder(backbone.feature_channels, backbone.feature_strides,
                                   num_classes, in_channels, channels=decoder_channels,
                                   rngs=nnx.Rngs(seed + 1))
        self.arch = backbone_arch
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.decoder_channels = int(decoder_channels)
        self.max_stride = int(max(backbone.feature_strides))
        self._config = tuple(sorted(classifier.config.items()))   # hashable static attribute

    @property
    def config(self) -> dict[str, Any]:
        """The backbone's architecture options (``width``, ...)."""
        return dict(self._config)

    def features(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """The encoder's feature maps (NHWC, shallowest first)."""
        return self.backbone.feature_maps(x, train=train)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Per-pixel logits ``(N, H, W, num_classes)`` of NHWC float32 images."""
        h, w = x.shape[1], x.shape[2]
        s = self.max_stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:   # any size in; the encoder sees a multiple of its largest stride
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
        logits = self.decoder(self.backbone.feature_maps(x, train=train), x, train=train)
        return logits[:, :h, :w, :]


def create_segmentation(arch: str, num_classes: int, *, in_channels: int = 1, seed: int = 0,
                        decoder_channels: int = DEFAULT_DECODER_CHANNELS,
                        **config: Any) -> SegmentationModel:
    """A fresh :class:`SegmentationModel`; the ``create`` of segmentation models.

    ``arch`` is the encoder's architecture (one of ``ARCHITECTURES``); ``config`` its
    options. ``create_segmentation(**segmentation_config(model))`` rebuilds ``model``.
    """
    if arch not in ARCHITECTURES:
        # create() raises the informative UnknownArchitectureError
        create(arch, 1)
    return SegmentationModel(arch, num_classes, in_channels=in_channels, seed=seed,
                             decoder_channels=decoder_channels, **config)


def segmentation_config(model: SegmentationModel) -> dict[str, Any]:
    """JSON-serialisable ``{"arch", "num_classes", "in_channels", "decoder_channels", ...}``."""
    if not isinstance(model, SegmentationModel):
        raise ModelConfigError(f"segmentation_config needs a SegmentationModel, got "
                               f"{type(model).__name__}")
    return {"arch": model.arch, "num_classes": model.num_classes,
            "in_channels": model.in_channels, "decoder_channels": model.decoder_channels,
            **model.config}
