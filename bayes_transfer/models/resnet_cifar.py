"""CIFAR-style ResNets (He et al. 2016, section 4.2): 6n+2 layers.

A 3x3 stem conv with 16 channels, three stages of n BasicBlocks at 16/32/64
channels (times ``width``; strides 1, 2, 2), global average pool. The default
shortcut is the paper's option A (parameter-free), giving ResNet-20's 0.27M
parameters; ``shortcut="B"`` uses 1x1 projections instead. Works for any input
size, e.g. 28x28 (maps 28/14/7) and 32x32 (32/16/8).
"""
from __future__ import annotations

import jax
from flax import nnx

from bayes_transfer.models._base import (Classifier, ModelConfigError, batch_norm, conv,
                                        global_avg_pool)
from bayes_transfer.models.blocks import BasicBlock


class CifarResNetBackbone(nnx.Module):
    """Stem + three stages (``layer1..layer3``) + global average pool."""

    def __init__(self, depth: int = 20, in_channels: int = 1, *, width: float = 1.0,
                 shortcut: str = "A", rngs: nnx.Rngs):
        if depth < 8 or (depth - 2) % 6:
            raise ModelConfigError(
                f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, "
                f"...); got {depth}")
        if shortcut not in ("A", "B"):
            raise ModelConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        widths = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = conv(in_channels, widths[0], 3, rngs=rngs)
        self.bn1 = batch_norm(widths[0], rngs=rngs)
        ch = widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(ch, planes, stride, shortcut=shortcut, rngs=rngs))
                ch = planes
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.num_features = ch
        self.feature_channels = tuple(widths)
        self.feature_strides = (1, 2, 4)

    def feature_maps(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """Outputs of layer1, layer2, layer3 (strides 1, 2, 4)."""
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                x = block(x, train=train)
            maps.append(x)
        return maps

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return global_avg_pool(self.feature_maps(x, train=train)[-1])


class ResNet(Classifier):
    """CIFAR-style ResNet with ``depth = 6n + 2`` layers.

    Example::

        model = ResNet(10, depth=20, rngs=nnx.Rngs(0))   # same as ResNet20(10, ...)
        logits = model(jnp.zeros((8, 32, 32, 1)))
    """

    def __init__(self, num_classes: int, *, in_channels: int = 1, rngs: nnx.Rngs,
                 depth: int = 20, width: float = 1.0, shortcut: str = "A"):
        self.backbone = CifarResNetBackbone(depth, in_channels, width=width,
                                            shortcut=shortcut, rngs=rngs)
        if depth in (20, 32, 56):
            arch, config = f"resnet{depth}", {"width": width, "shortcut": shortcut}
        else:
            arch, config = "cifar_resnet", {"depth": depth, "width": width,
                                            "shortcut": shortcut}
        self._finish(arch, num_classes, in_channels, config, rngs=rngs)


class ResNet20(ResNet):
    """ResNet-20 (0.27M parameters at width 1 with 10 classes)."""

    def __init__(self, num_classes: int, *, in_channels: int = 1, rngs: nnx.Rngs,
                 width: float = 1.0, shortcut: str = "A"):
        super().__init__(num_classes, in_channels=in_channels, rngs=rngs, depth=20,
                         width=width, shortcut=shortcut)


class ResNet32(ResNet):
    """ResNet-32 (0.46M parameters at width 1)."""

    def __init__(self, num_classes: int, *, in_channels: int = 1, rngs: nnx.Rngs,
                 width: float = 1.0, shortcut: str = "A"):
        super().__init__(num_classes, in_channels=in_channels, rngs=rngs, depth=32,
                         width=width, shortcut=shortcut)


class ResNet56(ResNet):
    """ResNet-56 (0.85M parameters at width 1)."""

    def __init__(self, num_classes: int, *, in_channels: int = 1, rngs: nnx.Rngs,
                 width: float = 1.0, shortcut: str = "A"):
        super().__init__(num_classes, in_channels=in_channels, rngs=rngs, depth=56,
                         width=width, shortcut=shortcut)
