"""torchvision-style ResNet-18 / ResNet-50 whose parameters map one-to-one to torchvision.

Layout and names follow ``torchvision.models.resnet``: ``conv1`` (7x7, stride 2,
padding 3) - ``bn1`` - ReLU - max-pool (3x3, stride 2, padding 1) - ``layer1..layer4``
- global average pool - ``fc``. Everything but ``fc`` is the backbone
(``backbone/...``); ``fc`` is the head (``head/...``). BatchNorm uses eps 1e-5 and
flax momentum 0.9 (= torch momentum 0.1). Convolutions use torch's explicit
symmetric padding, so ported torchvision weights compute the same function.

:func:`torchvision_names` gives, for every parameter and BatchNorm statistic, its
torchvision state-dict key and how to convert the tensor; :func:`load_torchvision_state_dict`
and :func:`to_torchvision_state_dict` use it to import and export weights (any
mapping of names to arrays or torch tensors; torch itself is not needed).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bayes_transfer.models._base import (Classifier, ModelConfigError, batch_norm, conv,
                                        global_avg_pool, max_pool)
from bayes_transfer.models.blocks import BasicBlock, Bottleneck
from bayes_transfer.params import flatten_with_paths, path_str

# How a torch tensor becomes the flax array (the inverse goes the other way).
IDENTITY = "identity"
CONV_OIHW_TO_HWIO = "oihw_to_hwio"      # conv weight (out, in, kh, kw) -> (kh, kw, in, out)
LINEAR_TRANSPOSE = "transpose"          # linear weight (out, in) -> (in, out)
TRANSFORMS = (IDENTITY, CONV_OIHW_TO_HWIO, LINEAR_TRANSPOSE)

# torchvision state-dict entries with no flax counterpart (BatchNorm's step counter,
# unused when momentum is set); ignored on import, written as 0 on export.
IGNORED_TORCH_SUFFIXES = ("num_batches_tracked",)

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


class TorchvisionResNetBackbone(nnx.Module):
    """Stem (``conv1``, ``bn1``, max-pool) + ``layer1..layer4`` + global average pool."""

    def __init__(self, block: type, layers: tuple[int, ...], in_channels: int = 3, *,
                 zero_init_residual: bool = False, rngs: nnx.Rngs):
        self.conv1 = conv(in_channels, 64, 7, 2, padding=3, rngs=rngs)
        self.bn1 = batch_norm(64, rngs=rngs)
        ch = 64
        channels = [64]
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                b = block(ch, planes, stride, shortcut="B", rngs=rngs)
                if zero_init_residual:   # last BN of each residual branch starts at 0
                    last = b.bn3 if isinstance(b, Bottleneck) else b.bn2
                    last.scale.set_value(jnp.zeros_like(last.scale.get_value()))
                blocks.append(b)
                ch = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
            channels.append(ch)
        self.num_features = ch
        self.feature_channels = tuple(channels)
        self.feature_strides = (2, 4, 8, 16, 32)

    def feature_maps(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """Stem output before max-pool (stride 2), then layer1..layer4 (strides 4..32)."""
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        maps = [x]
        x = max_pool(x, 3, 2, padding=1)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for b in layer:
                x = b(x, train=train)
            maps.append(x)
        return maps

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return global_avg_pool(self.feature_maps(x, train=train)[-1])


class TorchvisionResNet(Classifier):
    """torchvision's ResNet layout; use :class:`ResNet18` or :class:`ResNet50`."""

    _arch: str = ""
    _block: type = BasicBlock
    _layers: tuple[int, ...] = ()

    def __init__(self, num_classes: int, *, in_channels: int = 1, rngs: nnx.Rngs,
                 zero_init_residual: bool = False):
        if not self._layers:
            raise ModelConfigError("instantiate ResNet18 or ResNet50, not TorchvisionResNet")
        self.backbone = TorchvisionResNetBackbone(
            self._block, self._layers, in_channels, zero_init_residual=zero_init_residual,
            rngs=rngs)
        config = {"zero_init_residual": True} if zero_init_residual else {}
        self._finish(self._arch, num_classes, in_channels, config, rngs=rngs)


class ResNet18(TorchvisionResNet):
    """torchvision ResNet-18 (BasicBlock [2, 2, 2, 2]); 11,176,512 backbone params (RGB)."""

    _arch, _block, _layers = "resnet18", BasicBlock, (2, 2, 2, 2)


class ResNet50(TorchvisionResNet):
    """torchvision ResNet-50 (Bottleneck [3, 4, 6, 3]); 23,508,032 backbone params (RGB).

    Example (ImageNet weights exported from torch as ``{name: numpy array}``)::

        model = ResNet50(1000, in_channels=3, rngs=nnx.Rngs(0))
        load_torchvision_state_dict(model, state_dict)
    """

    _arch, _block, _layers = "resnet50", Bottleneck, (3, 4, 6, 3)


def _state_of(x):
    return nnx.state(x) if isinstance(x, nnx.Module) else x


def torchvision_names(params) -> dict[str, tuple[str, str]]:
    """Map flax paths to ``(torchvision state-dict key, transform)``.

    ``params`` is a model, an ``nnx.State`` or a nested dict; pass the whole state
    (``nnx.state(model)``) to cover BatchNorm running statistics as well as
    parameters, or ``nnx.state(model, nnx.Param)`` for parameters only.
    ``transform`` (one of :data:`TRANSFORMS`) says how the torch tensor becomes the
    flax array: ``"oihw_to_hwio"`` for conv weights, ``"transpose"`` for the linear
    ``fc`` weight, ``"identity"`` otherwise.

    Example: ``backbone/layer1/0/downsample/1/mean -> ("layer1.0.downsample.1.running_mean",
    "identity")`` and ``head/kernel -> ("fc.weight", "transpose")``.
    """
    names = {}
    for path, leaf in flatten_with_paths(_state_of(params)).items():
        parts = path.split("/")
        if parts[0] == "backbone":
            module = parts[1:-1]
        elif parts[0] == "head":
            module = ["fc"]
        else:
            raise ModelConfigError(f"path {path!r} is neither backbone/ nor head/")
        leaf_name = parts[-1]
        if leaf_name not in _LEAF_TO_TORCH:
            raise ModelConfigError(f"no torchvision name for the leaf {leaf_name!r} of {path!r}")
        if leaf_name == "kernel":
            transform = CONV_OIHW_TO_HWIO if len(leaf.shape) == 4 else LINEAR_TRANSPOSE
        else:
            transform = IDENTITY
        names[path] = (".".join(module + [_LEAF_TO_TORCH[leaf_name]]), transform)
    return names


def torch_to_flax(array, transform: str) -> np.ndarray:
    """Convert a torch tensor (or array) to the flax layout."""
    a = _to_numpy(array)
    if transform == CONV_OIHW_TO_HWIO:
        return np.transpose(a, (2, 3, 1, 0))
    if transform == LINEAR_TRANSPOSE:
        return np.transpose(a)
    if transform == IDENTITY:
        return a
    raise ModelConfigError(f"unknown transform {transform!r}; known: {TRANSFORMS}")


def flax_to_torch(array, transform: str) -> np.ndarray:
    """Inverse of :func:`torch_to_flax`."""
    a = np.asarray(array)
    if transform == CONV_OIHW_TO_HWIO:
        return np.transpose(a, (3, 2, 0, 1))
    if transform == LINEAR_TRANSPOSE:
        return np.transpose(a)
    if transform == IDENTITY:
        return a
    raise ModelConfigError(f"unknown transform {transform!r}; known: {TRANSFORMS}")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):          # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def load_torchvision_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *,
                                include_head: bool = True, strict: bool = True) -> None:
    """Copy torchvision weights (``{key: tensor or array}``) into ``model``, in place.

    ``include_head=False`` keeps the model's own head (e.g. a new number of classes)
    and ignores ``fc.*``. With one input channel and RGB weights, the stem kernel is
    summed over colours (grey image = equal RGB). ``strict`` raises on missing or
    unexpected keys (``num_batches_tracked`` is always ignored).
    """
    state = nnx.state(model)
    flat = flatten_with_paths(state)
    names = torchvision_names(state)
    new = {}
    used = set()
    for path, (key, transform) in names.items():
        if not include_head and path.startswith("head/"):
            continue
        if key not in state_dict:
            if strict:
                raise ModelConfigError(f"torch key {key!r} (for {path!r}) missing from the "
                                       f"state dict")
            continue
        used.add(key)
        value = torch_to_flax(state_dict[key], transform)
        target = tuple(flat[path].shape)
        if (transform == CONV_OIHW_TO_HWIO and value.shape != target and target[2] == 1
                and value.shape[:2] + value.shape[3:] == target[:2] + target[3:]):
            value = value.sum(axis=2, keepdims=True)      # RGB stem -> grey stem
        if value.shape != target:
            hint = (" (a different number of classes: pass include_head=False)"
                    if path.startswith("head/") else "")
            raise ModelConfigError(f"{key!r}: torch shape gives {value.shape} but {path!r} "
                                   f"is {target}{hint}")
        new[path] = value.astype(np.dtype(flat[path].dtype))
    if strict:
        extra = [k for k in state_dict if k not in used
                 and not k.endswith(IGNORED_TORCH_SUFFIXES)
                 and (include_head or not k.startswith("fc."))]
        if extra:
            raise ModelConfigError(f"unexpected torch keys (not in this model): {extra[:5]}")

    def put(kp, x):
        p = path_str(kp)
        return jnp.asarray(new[p]) if p in new else x

    nnx.update(model, jax.tree_util.tree_map_with_path(put, state))


def to_torchvision_state_dict(model: nnx.Module, *, num_batches_tracked: bool = True
                              ) -> dict[str, np.ndarray]:
    """The model's weights as a torchvision-style ``{key: numpy array}`` state dict.

    ``torch.nn.Module.load_state_dict({k: torch.from_numpy(v) ...})`` accepts it.
    """
    state = nnx.state(model)
    flat = flatten_with_paths(state)
    out = {}
    for path, (key, transform) in torchvision_names(state).items():
        out[key] = np.ascontiguousarray(flax_to_torch(flat[path], transform))
        if num_batches_tracked and key.endswith("running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out
