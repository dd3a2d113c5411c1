"""The one way from a prior to a model: its architecture, freshly built (or at its mean)."""
from __future__ import annotations

from typing import Any

from flax import nnx

from bayes_transfer.models._base import Classifier, ModelConfigError
from bayes_transfer.models.registry import create
from bayes_transfer.models.segmentation import (DEFAULT_DECODER_CHANNELS, SegmentationModel,
                                               create_segmentation)


def prior_architecture(prior) -> dict[str, Any]:
    """``prior.metadata["architecture"]`` (``create(**it)`` rebuilds the source model)."""
    arch = getattr(prior, "metadata", {}).get("architecture")
    if not arch:
        raise ModelConfigError(
            "the prior's metadata has no 'architecture' entry, so no model can be built for "
            "it; build the model yourself (bt.models.create(...)) and pass it instead")
    return dict(arch)


def from_prior(prior, num_classes: int | None = None, *, seed: int = 0, at_mean: bool = False,
               segmentation: bool = False,
               decoder_channels: int = DEFAULT_DECODER_CHANNELS) -> Classifier | SegmentationModel:
    """A model of the architecture ``prior`` was learned for.

    Args:
      prior: a ``Prior`` whose metadata records its architecture (``learn-prior`` and
        ``save_prior(..., metadata={"architecture": model_config(model)})`` do).
      num_classes: outputs of the new head (default: the source task's).
      seed: seed of the fresh initialisation.
      at_mean: put the prior mean into the parameters it covers (the backbone); by
        default the model is freshly initialised and ``finetune`` starts from the mean.
      segmentation: a segmentation model (encoder = the architecture, a new decoder);
        the source task's ``num_classes`` is dropped (there is no head).
      decoder_channels: width of the segmentation decoder.

    Example::

        model = bt.models.from_prior(prior, num_classes=10)
    """
    arch = prior_architecture(prior)
    if segmentation:
        if num_classes is None:
            raise ModelConfigError("a segmentation model needs num_classes (the mask classes)")
        arch.pop("num_classes", None)
        name, channels = arch.pop("arch"), arch.pop("in_channels", 1)
        model = create_segmentation(name, num_classes, in_channels=channels, seed=seed,
                                    decoder_channels=decoder_channels, **arch)
    else:
        if num_classes is not None:
            arch["num_classes"] = num_classes
        model = create(**{**arch, "seed": seed})
    if at_mean:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, prior.init_params(params), rest)
    return model


def segmentation_model_from_prior(prior, num_classes: int, *, seed: int = 0,
                                  decoder_channels: int = DEFAULT_DECODER_CHANNELS,
                                  in_channels: int | None = None) -> SegmentationModel:
    """``from_prior(prior, num_classes, segmentation=True)``, checking ``in_channels``."""
    channels = prior_architecture(prior).get("in_channels", 1)
    if in_channels is not None and in_channels != channels:
        raise ModelConfigError(f"the prior was learned on {channels}-channel images; "
                               f"in_channels={in_channels} would change the first conv")
    return from_prior(prior, num_classes, seed=seed, segmentation=True,
                      decoder_channels=decoder_channels)
