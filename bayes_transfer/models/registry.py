"""Build models by name, and describe a model so it can be rebuilt (``create(**cfg)``)."""
from __future__ import annotations

import inspect
from typing import Any

from flax import nnx

from bayes_transfer.models._base import Classifier, ModelConfigError, UnknownArchitectureError
from bayes_transfer.models.resnet_cifar import ResNet, ResNet20, ResNet32, ResNet56
from bayes_transfer.models.resnet_torchvision import ResNet18, ResNet50
from bayes_transfer.models.small_cnn import SmallCNN

# name -> model class; every class takes (num_classes, *, in_channels, rngs, **config)
_REGISTRY: dict[str, type[Classifier]] = {
    "small_cnn": SmallCNN,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "cifar_resnet": ResNet,      # any 6n+2 depth: create("cifar_resnet", 10, depth=44)
}

ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)


def create(arch: str, num_classes: int, *, in_channels: int = 1, seed: int = 0,
           **config: Any) -> Classifier:
    """A freshly initialised model.

    Args:
      arch: one of :data:`ARCHITECTURES` (``small_cnn``, ``resnet20``, ``resnet32``,
        ``resnet56``, ``resnet18``, ``resnet50``, ``cifar_resnet``).
      num_classes: outputs of the head.
      in_channels: channels of the NHWC input images.
      seed: seed of the parameter initialisation.
      **config: architecture options (``width`` for small_cnn / CIFAR ResNets, ...).

    Example::

        model = create("resnet20", 10)
        same_shapes = create(**model_config(model))
    """
    try:
        cls = _REGISTRY[arch]
    except (KeyError, TypeError):
        raise UnknownArchitectureError(
            f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None
    options = architecture_options(arch)
    unknown = sorted(set(config) - set(options))
    if unknown:
        raise ModelConfigError(f"{arch!r} has no option {', '.join(map(repr, unknown))}; its "
                               f"options: {', '.join(options) or 'none'}")
    return cls(num_classes, in_channels=in_channels, rngs=nnx.Rngs(seed), **config)


def architecture_options(arch: str) -> dict[str, Any]:
    """The ``**config`` options of ``arch`` with their defaults."""
    try:
        cls = _REGISTRY[arch]
    except (KeyError, TypeError):
        raise UnknownArchitectureError(
            f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}") from None
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("in_channels", "rngs")}


def model_config(model: Classifier) -> dict[str, Any]:
    """``{"arch", "num_classes", "in_channels", **config}``: ``create(**it)`` rebuilds it.

    The dict is JSON-serialisable, so an artifact can store it.
    """
    if not isinstance(model, Classifier):
        raise UnknownArchitectureError(
            f"model_config needs a bayes_transfer model, got {type(model).__name__}")
    return {"arch": model.arch, "num_classes": model.num_classes,
            "in_channels": model.in_channels, **model.config}
