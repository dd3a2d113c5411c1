"""The map between the reference's flat torch-order vectors and a prior's ParamSpec.

The reference PyTorch priors (:mod:`bayes_transfer.interop.torch_prior`) store θ̄, v and
the rows of C flat in torchvision's ``backbone.parameters()`` order, each tensor in
torch's layout (a conv weight OIHW). :func:`reference_layout` says, for every trainable
backbone tensor, where it sits in that vector and where in the prior's
:class:`~bayes_transfer.params.ParamSpec` (our Flax paths, conv kernels HWIO), and
:class:`ReferenceLayout` reorders vectors and matrices between the two.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from flax import nnx

from bayes_transfer import models
from bayes_transfer.errors import TorchImportError
from bayes_transfer.params import BACKBONE_RULE, ParamSpec

__all__ = ["SUPPORTED_ARCHS", "ParamMap", "ReferenceLayout", "reference_layout"]

#: Architectures with torchvision's layout (``bayes_transfer.models.resnet_torchvision``).
SUPPORTED_ARCHS = ("resnet18", "resnet50")
# torchvision registration order of ResNet submodules and parameters
_RANK = {"conv1": 0, "bn1": 1, "conv2": 2, "bn2": 3, "conv3": 4, "bn3": 5, "downsample": 6,
         "layer1": 11, "layer2": 12, "layer3": 13, "layer4": 14, "weight": 0, "bias": 1}


def _torch_order(key: str) -> tuple[int, ...]:
    """Sort key giving torchvision's ``parameters()`` order of ResNet parameter names."""
    return tuple(int(t) if t.isdigit() else _RANK[t] for t in key.split("."))


@dataclasses.dataclass(frozen=True)
class ParamMap:
    """One trainable backbone tensor: where it sits in torch's flat vector and in ours."""

    key: str                      # torchvision state-dict name, e.g. "layer1.0.conv1.weight"
    path: str                     # Flax path, e.g. "backbone/layer1/0/conv1/kernel"
    transform: str                # "oihw_to_hwio", "transpose" or "identity"
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    torch_offset: int             # offset in the reference's flat vectors
    spec_offset: int              # offset in the prior's (d,) vector (ParamSpec order)

    @property
    def size(self) -> int:
        return math.prod(self.torch_shape)


@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
    """The map between the reference's flat torch-order vectors and a prior's ParamSpec."""

    arch: str
    spec: ParamSpec
    params: tuple[ParamMap, ...]      # in torch (``backbone.parameters()``) order

    @property
    def dim(self) -> int:
        return self.spec.size

    @property
    def torch_keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params)

    def to_spec_order(self, x, dtype=np.float32) -> np.ndarray:
        """Reorder ``x`` ((d,) or (K, d), torch order) into spec order, OIHW → HWIO."""
        return self._permute(x, dtype, to_spec=True)

    def to_torch_order(self, x, dtype=np.float32) -> np.ndarray:
        """Inverse of :meth:`to_spec_order`: spec order → the reference's torch order."""
        return self._permute(x, dtype, to_spec=False)

    def _permute(self, x, dtype, *, to_spec: bool) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim not in (1, 2) or x.shape[-1] != self.dim:
            raise TorchImportError(f"expected a ({self.dim},) vector or (K, {self.dim}) matrix "
                                   f"for {self.arch}, got shape {x.shape}")
        lead = x.shape[:-1]
        nb = len(lead)
        out = np.empty(x.shape, dtype=dtype or x.dtype)
        for p in self.params:
            n = p.size
            src_o, dst_o = ((p.torch_offset, p.spec_offset) if to_spec
                            else (p.spec_offset, p.torch_offset))
            src_shape = p.torch_shape if to_spec else p.flax_shape
            seg = x[..., src_o:src_o + n].reshape(lead + src_shape)
            seg = np.transpose(seg, tuple(range(nb)) + tuple(
                nb + a for a in _axes(p.transform, inverse=not to_spec, ndim=len(src_shape))))
            out[..., dst_o:dst_o + n] = seg.reshape(lead + (n,))
        return out


def _axes(transform: str, *, inverse: bool, ndim: int) -> tuple[int, ...]:
    if transform == "oihw_to_hwio":
        return (3, 2, 0, 1) if inverse else (2, 3, 1, 0)
    if transform == "transpose":
        return (1, 0)
    return tuple(range(ndim))


@functools.lru_cache(maxsize=8)
def reference_layout(arch: str = "resnet50", num_classes: int = 1000) -> ReferenceLayout:
    """The torch-order ↔ ParamSpec map of ``arch``'s backbone (RGB input, 3 channels).

    The spec is ``ParamSpec.from_params(nnx.state(model, nnx.Param))`` of
    ``bayes_transfer.models.create(arch, num_classes, in_channels=3)`` (built abstractly:
    no weights are allocated), i.e. what a fine-tuning job on that model checks against.
    """
    if arch not in SUPPORTED_ARCHS:
        raise TorchImportError(f"architecture {arch!r} has no torchvision layout here; the "
                               f"reference format is supported for {', '.join(SUPPORTED_ARCHS)}")
    model = nnx.eval_shape(lambda: models.create(arch, num_classes, in_channels=3))
    state = nnx.state(model, nnx.Param)
    spec = ParamSpec.from_params(state, BACKBONE_RULE)
    names = models.torchvision_names(state)
    spec_offsets = dict(zip(spec.paths, spec.offsets))
    entries = []
    for path, flax_shape in zip(spec.paths, spec.shapes):
        key, transform = names[path]
        torch_shape = _torch_shape(flax_shape, transform)
        entries.append((key, path, transform, torch_shape, tuple(flax_shape)))
    entries.sort(key=lambda e: _torch_order(e[0]))
    params, offset = [], 0
    for key, path, transform, torch_shape, flax_shape in entries:
        params.append(ParamMap(key, path, transform, torch_shape, flax_shape, offset,
                               spec_offsets[path]))
        offset += math.prod(torch_shape)
    return ReferenceLayout(arch, spec, tuple(params))


def _torch_shape(flax_shape, transform) -> tuple[int, ...]:
    s = tuple(int(v) for v in flax_shape)
    if transform == "oihw_to_hwio":          # HWIO -> OIHW
        return (s[3], s[2], s[0], s[1])
    if transform == "transpose":
        return s[::-1]
    return s
