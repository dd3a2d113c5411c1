"""What a training run is: its settings, its state and its result; the loss protocol.

A loss function has the signature::

    loss_fn(apply, params, rest, batch, key, aux) -> (loss, (new_rest, metrics))

where ``apply(params, rest, x, train=..., method=None) -> (out, new_rest)`` runs the
model functionally (:func:`bayes_transfer.training.predict.make_apply`), ``rest`` is the
non-parameter state (BatchNorm statistics), ``batch`` a dict of arrays, ``key`` a PRNG
key for this step and ``aux`` any pytree passed to ``fit`` (a prior, say): it is an
argument of the jitted step, so changing λ between runs does not recompile.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
from flax import nnx

from bayes_transfer.errors import BayesTransferError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Plain-Python training settings (configs are code, as in big_vision).

    The run's length is ``steps`` optimizer steps if given, else ``epochs`` passes over
    the data (fractional epochs round up to whole steps); :meth:`total_steps` resolves
    it once, and the loop, the learning-rate schedule and the samplers all read that.
    """

    epochs: float = 1.0            # may be fractional: a number of steps rounded up
    batch_size: int = 128
    optimizer: str = "sgd"         # "sgd" (with momentum), "adam" or "adamw"
    learning_rate: float = 0.05
    schedule: str = "cosine"       # "constant" or "cosine" (decays to 0 over the run)
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.0      # decoupled (adamw) or added to the gradient (sgd)
    augment: bool = False          # random shifts on the device, inside the step
    flip: bool = False             # with augment: random horizontal flips too
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0      # steps; 0: at the end of each epoch
    progress: bool = True
    desc: str = "train"
    steps: int | None = None       # the run's length in steps; overrides epochs

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's length in optimizer steps (at least 1)."""
        if self.steps is not None:
            if int(self.steps) < 1:
                raise BayesTransferError(f"steps must be >= 1, got {self.steps}")
            return int(self.steps)
        return max(1, math.ceil(self.epochs * steps_per_epoch))


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    swag: Any = None                # a SwagState when SWAG statistics are collected


@dataclasses.dataclass
class TrainResult:
    graphdef: Any
    state: TrainState
    history: list[dict]

    @property
    def params(self):
        return self.state.params

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params, self.state.rest)
