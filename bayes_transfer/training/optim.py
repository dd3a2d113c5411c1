"""Optimizers: the one factory a ``TrainConfig`` describes, and per-leaf multipliers.

Everything here returns an ``optax.GradientTransformation`` and is cached where a new
object would make ``fit`` recompile its step (a λ sweep reuses one optimizer object).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import optax

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.params import BACKBONE_RULE, backbone_blocks, map_with_paths
from bayes_transfer.training.state import TrainConfig


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax optimizer a config describes (cached: the same settings give the same
    object, so the jitted step is reused across runs instead of recompiled)."""
    return _optimizer(config.optimizer, config.learning_rate, config.schedule,
                      config.warmup_steps, config.momentum, config.weight_decay, total_steps)


@functools.lru_cache(maxsize=64)
def _optimizer(name, lr, schedule, warmup_steps, momentum, weight_decay, total_steps):
    if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else lr, lr,
                                                warmup_steps, max(total_steps, 1))
    elif schedule != "constant":
        raise BayesTransferError(f"unknown schedule {schedule!r}; use 'constant' or 'cosine'")
    if name == "sgd":
        tx = optax.sgd(lr, momentum=momentum or None)
        if weight_decay:
            tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
        return tx
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    raise BayesTransferError(f"unknown optimizer {name!r}; use 'sgd', 'adam' or 'adamw'")


@functools.lru_cache(maxsize=32)
def with_lr_factors(tx: optax.GradientTransformation,
                    factors: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
    """``tx`` with each leaf's updates multiplied by its factor (``(path, factor)`` pairs;
    other leaves unchanged): exactly a per-leaf learning rate for SGD (momentum
    included) and Adam, whose updates are linear in the learning rate.

    One ``optax.scale`` per distinct factor, routed by ``optax.partition`` on the leaf
    paths. Cached on (``tx``, ``factors``) so the compiled step is reused across a sweep.
    """
    table = dict(factors)
    labels = {f: f"x{f!r}" for f in set(table.values()) | {1.0}}
    transforms = {labels[f]: optax.identity() if f == 1.0 else optax.scale(f) for f in labels}

    def label_tree(tree):
        return map_with_paths(lambda p, _: labels[table.get(p, 1.0)], tree)

    return optax.chain(tx, optax.partition(transforms, label_tree))


def layer_lr_factors(paths, params, layer_lr: float, decay: float = 1.0,
                     rule: str = BACKBONE_RULE) -> dict[str, float]:
    """{path: learning-rate multiplier} of the transferred leaves ``paths``: ``layer_lr``
    for the top transferred block, ×``decay`` for each transferred block below it
    (discriminative fine-tuning, Howard & Ruder 2018)."""
    paths = set(paths)
    factors, depth = {}, 0
    for _, block in reversed(backbone_blocks(params, rule)):
        covered = [p for p in block if p in paths]
        if covered:
            factors.update({p: layer_lr * decay ** depth for p in covered})
            depth += 1
    # covered leaves outside the backbone's blocks (none for the built-in models)
    factors.update({p: layer_lr for p in paths - set(factors)})
    return factors


class ScaleByTreeState(NamedTuple):
    scale: object


def scale_by_tree(tree) -> optax.GradientTransformation:
    """Multiply updates elementwise by a constant pytree kept in the state (a diagonal
    preconditioner): in the state, not baked into the jitted step, so a new tree does
    not recompile."""
    def init(params):
        del params
        return ScaleByTreeState(tree)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates, state.scale), state

    return optax.GradientTransformation(init, update)
