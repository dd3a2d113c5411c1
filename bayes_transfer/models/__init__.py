"""Flax NNX models: a backbone (images -> features) and a linear head.

Every model follows one convention, which the training loop and the prior rely on:

- ``Model(num_classes, *, in_channels=1, rngs, **config)``; NHWC float32 inputs;
- ``model.backbone`` maps images to (N, F) features (global pooling included) and
  ``model.head`` is ``nnx.Linear(F, num_classes)``, so parameter paths start with
  ``backbone/`` or ``head/`` (a prior covers :data:`BACKBONE_RULE` by default);
- ``model(x, train=False)`` gives logits, ``model.features(x, train=False)`` the
  backbone features, ``model.backbone.feature_maps(x, train=False)`` the NHWC map of
  each stage (for segmentation decoders; channels in
  ``backbone.feature_channels``, strides in ``backbone.feature_strides``);
- BatchNorm reads ``train`` at call time, so one graphdef serves training and eval.

Functional use (e.g. inside ``jax.jit``)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def forward(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        logits = m(x, train=True)                       # updates BatchNorm statistics
        return logits, nnx.state(m, nnx.Not(nnx.Param))  # the new `rest`

Inside a transform nested in the jit (``jax.grad`` of a loss that merges), merge
with ``copy=True`` so the BatchNorm variables belong to the inner trace.
"""
from bayes_transfer.models._base import (BN_EPSILON, BN_MOMENTUM, Classifier, ModelConfigError,
                                        UnknownArchitectureError, count_params)
from bayes_transfer.models.blocks import BasicBlock, Bottleneck
from bayes_transfer.models.registry import (ARCHITECTURES, architecture_options, create,
                                            model_config)
from bayes_transfer.models.resnet_cifar import (CifarResNetBackbone, ResNet, ResNet20, ResNet32,
                                               ResNet56)
from bayes_transfer.models.resnet_torchvision import (IGNORED_TORCH_SUFFIXES, TRANSFORMS, ResNet18,
                                                     ResNet50, TorchvisionResNet,
                                                     TorchvisionResNetBackbone, flax_to_torch,
                                                     load_torchvision_state_dict,
                                                     to_torchvision_state_dict, torch_to_flax,
                                                     torchvision_names)
from bayes_transfer.models.small_cnn import SmallCNN, SmallCNNBackbone
from bayes_transfer.models.segmentation import SegmentationModel, create_segmentation
from bayes_transfer.models.from_prior import (from_prior, prior_architecture,
                                             segmentation_model_from_prior)

BACKBONE_RULE = r"^backbone/"

__all__ = [
    "ARCHITECTURES", "BACKBONE_RULE", "from_prior", "prior_architecture", "SegmentationModel", "create_segmentation",
    "segmentation_model_from_prior", "BN_EPSILON", "BN_MOMENTUM", "BasicBlock", "Bottleneck",
    "CifarResNetBackbone", "Classifier", "IGNORED_TORCH_SUFFIXES", "ModelConfigError",
    "ResNet", "ResNet18", "ResNet20", "ResNet32", "ResNet50", "ResNet56", "SmallCNN",
    "SmallCNNBackbone", "TRANSFORMS", "TorchvisionResNet", "TorchvisionResNetBackbone",
    "UnknownArchitectureError", "architecture_options", "count_params", "create", "flax_to_torch",
    "load_torchvision_state_dict", "model_config", "to_torchvision_state_dict",
    "torch_to_flax", "torchvision_names",
]
