"""Parameter paths: every rule over them, the backbone's blocks, and ParamSpec (the
parameters a prior covers, flattened to one vector).

A path is the '/'-joined key path of a leaf in a parameter tree, e.g.
``backbone/stage1/0/conv1/kernel``. The same strings come out of an ``nnx.State``
(its ``.value`` wrapper is dropped) and of the equivalent nested dict, so a rule
written once works for Flax NNX models, Linen-style dicts and imported weights.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer.errors import BayesTransferError, SpecMismatchError

BACKBONE_RULE = r"^backbone/"
#: The classification head's leaves (outside every prior; ``head_decay`` applies).
HEAD_RULE = r"^head/"


def path_str(keypath: Iterable[Any]) -> str:
    """'/'-joined string of a JAX key path, without NNX's trailing ``value``."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name == "value":
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten_with_paths(tree) -> dict[str, Any]:
    """Leaves of ``tree`` keyed by path string, in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): leaf for p, leaf in leaves}


def _dtype_name(x) -> str:
    return str(np.dtype(x.dtype)) if hasattr(x, "dtype") else type(x).__name__


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Which parameters a prior covers: paths (in flattening order), shapes and dtypes.

    Example::

        spec = ParamSpec.from_params(params)          # default rule: the backbone
        theta = spec.ravel(params)                     # (d,) vector
        params = spec.replace(params, theta + 1.0)     # write a vector back
    """

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    rule: str = BACKBONE_RULE

    @classmethod
    def from_params(cls, params, rule: str = BACKBONE_RULE) -> "ParamSpec":
        pattern = re.compile(rule)
        leaves = {p: x for p, x in flatten_with_paths(params).items() if pattern.search(p)}
        if not leaves:
            known = ", ".join(list(flatten_with_paths(params))[:5])
            raise SpecMismatchError(
                f"the rule {rule!r} selects no parameter; paths look like: {known} ...")
        return cls(
            paths=tuple(leaves),
            shapes=tuple(tuple(int(s) for s in x.shape) for x in leaves.values()),
            dtypes=tuple(_dtype_name(x) for x in leaves.values()),
            rule=rule,
        )

    @property
    def size(self) -> int:
        """d, the number of covered scalars."""
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum([0] + [int(np.prod(s)) for s in self.shapes]))

    def check(self, params) -> None:
        """Raise SpecMismatchError naming the first covered path that differs."""
        found = flatten_with_paths(params)
        for path, shape, dtype in zip(self.paths, self.shapes, self.dtypes):
            if path not in found:
                raise SpecMismatchError(
                    f"parameter {path!r} (shape {shape}, {dtype}) is covered by the prior "
                    f"but missing from the model; is it the architecture the prior was "
                    f"learned for?")
            x = found[path]
            if tuple(x.shape) != shape or _dtype_name(x) != dtype:
                raise SpecMismatchError(
                    f"parameter {path!r}: the prior expects shape {shape} {dtype}, the model "
                    f"has shape {tuple(x.shape)} {_dtype_name(x)}")
        pattern = re.compile(self.rule)
        extra = [p for p in found if pattern.search(p) and p not in set(self.paths)]
        if extra:
            raise SpecMismatchError(
                f"parameter {extra[0]!r} matches the prior's rule {self.rule!r} but the prior "
                f"does not cover it; the model has more layers than the prior's")

    def ravel(self, params, dtype=jnp.float32) -> jax.Array:
        """Concatenate the covered leaves into one (d,) vector, in spec order."""
        found = flatten_with_paths(params)
        leaves = []
        for path, shape in zip(self.paths, self.shapes):
            if path not in found:
                raise SpecMismatchError(f"parameter {path!r} covered by the prior is missing "
                                        f"from the parameters given")
            x = found[path]
            if tuple(jnp.shape(x)) != shape:   # static: also checked under jit
                raise SpecMismatchError(
                    f"parameter {path!r}: the prior expects shape {shape}, the parameters "
                    f"given have shape {tuple(jnp.shape(x))}; is it the architecture the "
                    f"prior was learned for?")
            leaves.append(jnp.ravel(x).astype(dtype))
        return jnp.concatenate(leaves)

    def unravel(self, vec) -> dict[str, jax.Array]:
        """Split a (d,) vector into {path: array} with the spec's shapes and dtypes."""
        o = self.offsets
        return {p: jnp.reshape(vec[o[i]:o[i + 1]], s).astype(dt)
                for i, (p, s, dt) in enumerate(zip(self.paths, self.shapes, self.dtypes))}

    def replace(self, params, vec):
        """A copy of ``params`` with the covered leaves taken from ``vec``."""
        new = self.unravel(vec)
        return map_with_paths(lambda p, x: new.get(p, x), params)

    def to_json(self) -> dict:
        return {"rule": self.rule, "paths": list(self.paths),
                "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes)}

    @classmethod
    def from_json(cls, d: dict) -> "ParamSpec":
        try:
            spec = cls(paths=tuple(str(p) for p in d["paths"]),
                       shapes=tuple(tuple(int(v) for v in s) for s in d["shapes"]),
                       dtypes=tuple(str(t) for t in d["dtypes"]), rule=str(d["rule"]))
            re.compile(spec.rule)
        except (KeyError, TypeError, ValueError, re.error) as e:
            raise SpecMismatchError(f"malformed parameter spec: {e!r}") from None
        # (a spec read from a file: lengths that disagree, negative or int64-overflowing
        # sizes would otherwise surface later as unrelated errors)
        if not len(spec.paths) == len(spec.shapes) == len(spec.dtypes) or any(
                v < 0 for s in spec.shapes for v in s) or sum(
                math.prod(s) for s in spec.shapes) >= 2 ** 62:
            raise SpecMismatchError(f"malformed parameter spec: {len(spec.paths)} paths, "
                                    f"{len(spec.shapes)} shapes, {len(spec.dtypes)} dtypes, "
                                    f"shapes {str(spec.shapes)[:200]}")
        return spec

    def __repr__(self) -> str:
        return f"ParamSpec(rule={self.rule!r}, {len(self.paths)} arrays, d={self.size})"


def map_with_paths(fn, tree):
    """``jax.tree.map`` whose function also receives each leaf's path string."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def backbone_blocks(params, rule: str = BACKBONE_RULE) -> list[tuple[str, tuple[str, ...]]]:
    """The backbone's blocks, from the input to the output: ``[(name, leaf paths), ...]``.

    A block is the path prefix up to the first run of integer components after
    ``backbone/``: ``stages/2/0`` for small_cnn (``backbone/stages/<stage>/<block>/...``),
    ``layer3/2`` for the ResNets (``backbone/layer<i>/<block>/...``; a block's downsample
    belongs to it). Leaves with no integer component (the ResNet stem ``conv1``/``bn1``)
    form one first block, ``stem``. Blocks are ordered by their names with numbers
    compared as numbers.
    """
    pattern = re.compile(rule)
    groups: dict[str, list[str]] = {}
    for path in flatten_with_paths(params):
        if not pattern.search(path):
            continue
        parts = path.split("/")[1:]
        first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if first is None:
            name = "stem"
        else:
            last = first
            while last + 1 < len(parts) - 1 and parts[last + 1].isdigit():
                last += 1
            name = "/".join(parts[:last + 1])
        groups.setdefault(name, []).append(path)

    def order(name):
        if name == "stem":
            return (0,)
        return (1,) + tuple((0, int(t), "") if t.isdigit() else (1, 0, t)
                            for t in re.split(r"(\d+)", name))

    return [(name, tuple(groups[name])) for name in sorted(groups, key=order)]


def top_block_paths(params, k: int, rule: str = BACKBONE_RULE) -> tuple[str, ...]:
    """Leaf paths of the top (output-side) ``k`` blocks of :func:`backbone_blocks`."""
    if k <= 0:
        return ()
    blocks = backbone_blocks(params, rule)
    if k > len(blocks):
        raise BayesTransferError(f"reinit_top={k}, but the backbone has {len(blocks)} blocks: "
                                 f"{', '.join(name for name, _ in blocks)}")
    return tuple(p for _, paths in blocks[-k:] for p in paths)
