"""Stochastic-gradient Langevin dynamics (SGLD) as an optax transformation.

SGLD runs in the one training loop (:func:`bayes_transfer.train.fit`) unchanged: the
optimizer state holds a PRNG key and a step count, and the Gaussian noise is drawn
inside ``update``. The loss is the loop's usual per-example objective, e.g.
:func:`bayes_transfer.objectives.map_loss`.

The update, derived
-------------------
With N training examples, the (tempered) posterior the chain targets is

    π_T(θ) ∝ exp(−U(θ)/T),   U(θ) = −Σᵢ₌₁ᴺ log p(yᵢ | xᵢ, θ) − log p(θ)

(with ``map_loss(head_decay=α)`` the head also gets a Gaussian prior of precision
N·α: its term in U is N·α·‖θ_head‖²/2). The loop minimises the mean loss

    L(θ) = U(θ)/N = mean_i −log p(yᵢ | xᵢ, θ) − log p(θ)/N (+ α‖θ_head‖²/2),

and a mini-batch estimate of ∇L is unbiased for ∇U/N.

The Langevin diffusion dθ = −∇U(θ) dt + √(2T) dW has stationary density ∝ exp(−U/T)
(the Fokker–Planck flux p∇U + T∇p vanishes for p ∝ e^{−U/T}). Its Euler–Maruyama
step with time step ε is θ ← θ − ε∇U(θ) + √(2εT)·ξ, ξ ~ N(0, I). Writing ε = η/N,
with η the learning rate on the mean loss L (ε∇U = η∇L):

    θ ← θ − η·∇L(θ) + √(2·η·T/N)·ξ                                   (this module)

At T = 1 this is Welling & Teh's (2011) SGLD with their step ε_WT = 2η/N; T = 0 is
plain SGD on L; T < 1 is a "cold" posterior. The learning rate may follow any optax
schedule, including :func:`cyclical_sgld_schedule`.

Step size. For a Gaussian target with precision h along some direction (h an
eigenvalue of ∇²U), the chain is an AR(1) process with coefficient 1 − εh: it is
stable iff εh < 2 (η < 2N/h) and its stationary variance is T/(h·(1 − εh/2)), an
O(η) relative excess of εh/2 = ηh/(2N) over the exact T/h. Mini-batch gradient
noise adds O(η²) per step against the injected 2ηT/N, negligible for small η.

Preconditioning. A learned prior is stiff: its precision along low-variance
coordinates can be far larger than the likelihood's curvature. A *constant* diagonal
preconditioner M (a pytree like ``params``) keeps the target exact: the diffusion
dθ = −M∇U dt + √(2TM) dW has the same stationary density, and its step is

    θ ← θ − η·M·∇L(θ) + √(2·η·T/N)·√M·ξ.

:func:`prior_preconditioner` builds M from a prior's diagonal variances, so every
covered coordinate sees the same prior stiffness 1/(N·δ_max) in units of η.

Cyclical SGLD (Zhang et al., 2020, cSG-MCMC). Within each cycle of L steps the step
size follows a cosine from ``base_lr`` to ~0; the first fraction β of a cycle is an
*exploration* phase (SGD steps, no noise), the rest the *sampling* phase (SGLD steps);
samples are taken at the end of each cycle. See :func:`cyclical_sgld_schedule`.

Example (one chain in the training loop)::

    tx = sgld(1e-3, num_train=len(splits.train), temperature=1.0, seed=0)
    result = fit(model, splits.train, map_loss(len(splits.train)), config,
                 aux=prior, optimizer=tx)

or, collecting samples over cycles (with the chain continued from call to call)::

    samples = run_sgld(model, splits, prior, SGLDConfig(cycle_steps=200), num_samples=10)
    probs = bma_predict(graphdef, samples, None, splits.test)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.inference.samples import PosteriorSamples
from bayes_transfer.prior import prior_preconditioner
from bayes_transfer.training import TrainConfig, fit, map_loss, refresh_batch_stats, split_model

__all__ = [
    "SGLDState", "sgld", "CyclicalSchedule", "cyclical_sgld_schedule", "cyclical_sgld",
    "SGLDConfig", "run_sgld", "sgld_collection_steps",
]

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class SGLDState(NamedTuple):
    """State of :func:`sgld`: a plain pytree (checkpoints with orbax like any state).

    Attributes:
      count: int32, the number of updates done (the schedules' argument).
      key: uint32[2], the PRNG key the next update's noise is drawn from.
      preconditioner: a pytree like the parameters (constant diagonal M), or None.
    """

    count: jax.Array
    key: jax.Array
    preconditioner: Any = None


def _value(x, count):
    return x(count) if callable(x) else x


def sgld(learning_rate: ScalarOrSchedule, *, num_train: int, temperature: float = 1.0,
         seed: int = 0, noise_schedule: Callable | None = None,
         preconditioner=None) -> optax.GradientTransformation:
    """SGLD for the loop's mean loss L = U/N: θ ← θ − η∇L + √(2ηT/N)·ξ (module docstring).

    Args:
      learning_rate: η, a float or an optax schedule of the step count.
      num_train: N, the number of training examples the loss is a mean over.
      temperature: T ≥ 0; the chain targets exp(−U/T). T = 0 is plain SGD.
      seed: seed of the noise (the state's PRNG key; replace ``state.key`` to run
        chains with other seeds without rebuilding the transformation).
      noise_schedule: optional function of the step count giving a multiplier of the
        noise in [0, 1] (cyclical SGLD's exploration phase gives 0).
      preconditioner: optional constant diagonal M, a pytree like the parameters (see
        :func:`prior_preconditioner`); it is kept in the state, not baked into the
        compiled step.

    Put ``sgld`` last in an ``optax.chain``: transformations after it would rescale the
    injected noise. Gradient clipping before it biases the chain (no longer Langevin).

    Example::

        tx = sgld(optax.cosine_decay_schedule(1e-3, 1000), num_train=5000, temperature=1.0)
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    """
    if int(num_train) < 1:
        raise BayesTransferError(f"sgld: num_train must be >= 1, got {num_train!r}")
    if not (float(temperature) >= 0 and math.isfinite(float(temperature))):
        raise BayesTransferError(f"sgld: temperature must be finite and >= 0, got "
                                 f"{temperature!r}")
    n, temp = float(num_train), float(temperature)

    def init(params) -> SGLDState:
        del params
        return SGLDState(jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed), preconditioner)

    def update(updates, state: SGLDState, params=None):
        del params
        lr = jnp.asarray(_value(learning_rate, state.count), jnp.float32)
        scale = jnp.sqrt(2.0 * lr * temp / n)
        if noise_schedule is not None:
            scale = scale * jnp.asarray(noise_schedule(state.count), jnp.float32)
        key, sub = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(sub, max(len(leaves), 1))
        precond = (treedef.flatten_up_to(state.preconditioner)
                   if state.preconditioner is not None else [None] * len(leaves))
        new = []
        for g, k, m in zip(leaves, keys, precond):
            xi = jax.random.normal(k, g.shape, jnp.float32)
            if m is None:
                step = -lr * g.astype(jnp.float32) + scale * xi
            else:
                m = jnp.asarray(m, jnp.float32)
                step = -lr * m * g.astype(jnp.float32) + scale * jnp.sqrt(m) * xi
            new.append(step.astype(g.dtype))
        count = optax.safe_int32_increment(state.count)
        return treedef.unflatten(new), SGLDState(count, key, state.preconditioner)

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- cyclical
@dataclasses.dataclass(frozen=True)
class CyclicalSchedule:
    """cSG-MCMC's cosine step size (Zhang et al., 2020), one cycle every ``cycle_steps``.

    Counting steps from 0, with r = (count mod L)/L the position in the cycle:

        η(count) = min_lr + (base_lr − min_lr)/2 · (cos(π·r) + 1)

    so each cycle starts at ``base_lr`` and its last step uses just above ``min_lr``.
    Steps with r < ``exploration_fraction`` (β) form the exploration phase:
    :meth:`noise` is 0 there (SGD) and 1 in the sampling phase (SGLD). A sample is
    collected after the last step of every cycle (:meth:`is_sample_step`); with
    ``samples_per_cycle`` = m > 1, after the last step of each of m equal blocks of the
    sampling phase (:meth:`sample_positions`).

    The instance is callable (an optax schedule) and hashable, so ``sgld`` built from it
    can be cached and the training step compiled once.
    """

    base_lr: float
    cycle_steps: int
    exploration_fraction: float = 0.0
    min_lr: float = 0.0
    samples_per_cycle: int = 1

    def __post_init__(self):
        if int(self.cycle_steps) < 1:
            raise BayesTransferError(f"cycle_steps must be >= 1, got {self.cycle_steps!r}")
        if not 0.0 <= float(self.exploration_fraction) < 1.0:
            raise BayesTransferError(f"exploration_fraction must be in [0, 1), got "
                                     f"{self.exploration_fraction!r}")
        if not 1 <= int(self.samples_per_cycle) <= self.sampling_steps:
            raise BayesTransferError(
                f"samples_per_cycle must be between 1 and the {self.sampling_steps} steps of "
                f"the sampling phase, got {self.samples_per_cycle!r}")

    @property
    def exploration_steps(self) -> int:
        """Steps of each cycle in the exploration phase: ceil(β·L)."""
        return int(math.ceil(float(self.exploration_fraction) * int(self.cycle_steps) - 1e-9))

    @property
    def sampling_steps(self) -> int:
        return int(self.cycle_steps) - self.exploration_steps

    def _position(self, count):
        return jnp.remainder(jnp.asarray(count), int(self.cycle_steps))

    def __call__(self, count):
        r = self._position(count).astype(jnp.float32) / int(self.cycle_steps)
        lo, hi = float(self.min_lr), float(self.base_lr)
        return lo + 0.5 * (hi - lo) * (jnp.cos(jnp.pi * r) + 1.0)

    def noise(self, count):
        """Noise multiplier: 0 in the exploration phase, 1 in the sampling phase."""
        return (self._position(count) >= self.exploration_steps).astype(jnp.float32)

    def sample_positions(self) -> list[int]:
        """Positions (0-based, within a cycle) after which a sample is collected."""
        m, s0, ns = int(self.samples_per_cycle), self.exploration_steps, self.sampling_steps
        return [s0 + (ns * (j + 1)) // m - 1 for j in range(m)]

    def is_sample_step(self, count):
        """Whether the update with this 0-based ``count`` is followed by a sample."""
        pos = self._position(count)
        return functools.reduce(jnp.logical_or, [pos == p for p in self.sample_positions()])

    def sample_steps(self, num_cycles: int, first_cycle: int = 0) -> list[int]:
        """0-based step counts after which samples are collected, cycle by cycle."""
        L = int(self.cycle_steps)
        return [c * L + p for c in range(first_cycle, first_cycle + int(num_cycles))
                for p in self.sample_positions()]


def cyclical_sgld_schedule(base_lr: float, cycle_steps: int, *,
                           exploration_fraction: float = 0.0, min_lr: float = 0.0,
                           samples_per_cycle: int = 1) -> CyclicalSchedule:
    """The cSG-MCMC cosine step size as an optax schedule (see :class:`CyclicalSchedule`).

    Example::

        schedule = cyclical_sgld_schedule(1e-3, 200, exploration_fraction=0.5)
        tx = sgld(schedule, num_train=n, noise_schedule=schedule.noise)
        schedule.sample_steps(4)      # [199, 399, 599, 799]: one sample per cycle end
    """
    return CyclicalSchedule(float(base_lr), int(cycle_steps), float(exploration_fraction),
                            float(min_lr), int(samples_per_cycle))


def cyclical_sgld(base_lr: float, cycle_steps: int, *, num_train: int,
                  temperature: float = 1.0, exploration_fraction: float = 0.0,
                  seed: int = 0, preconditioner=None) -> optax.GradientTransformation:
    """SGLD with the cyclical schedule; noise only in each cycle's sampling phase."""
    schedule = cyclical_sgld_schedule(base_lr, cycle_steps,
                                      exploration_fraction=exploration_fraction)
    noise = schedule.noise if exploration_fraction > 0 else None
    return sgld(schedule, num_train=num_train, temperature=temperature, seed=seed,
                noise_schedule=noise, preconditioner=preconditioner)


@jax.jit
def _diag_range(prior):
    delta = prior.diag_part(jnp.float32)
    return jnp.min(delta), jnp.max(delta)


# --------------------------------------------------------------------------- the sampler
@dataclasses.dataclass(frozen=True)
class SGLDConfig:
    """Settings of :func:`run_sgld` (plain Python, like ``TrainConfig``).

    The chain runs ``burnin_cycles + ceil(num_samples / samples_per_cycle)`` cycles of
    ``cycle_steps`` optimizer steps and keeps the samples of all but the burn-in cycles.
    With ``schedule="constant"`` a "cycle" is just the thinning interval: the step size
    stays ``learning_rate`` and a sample is kept every ``cycle_steps`` steps.
    """

    learning_rate: float = 1e-3          # η (cyclical: the step size at each cycle start)
    temperature: float = 1.0             # T: target exp(−U/T)
    schedule: str = "cyclical"           # "cyclical" or "constant"
    cycle_steps: int = 100               # steps per cycle / between samples
    exploration_fraction: float = 0.0    # β: SGD (no noise) in the first β of each cycle
    samples_per_cycle: int = 1
    burnin_cycles: int = 1               # cycles whose samples are dropped
    precondition: bool = True            # M from the prior's variances (prior_preconditioner)
    batch_size: int = 32
    head_decay: float = 1e-4             # as in map_loss: a N(0, 1/(N·α)) prior on the head
    augment: bool = False
    seed: int = 0
    progress: bool = True

    def lr_schedule(self):
        if self.schedule == "cyclical":
            return cyclical_sgld_schedule(self.learning_rate, self.cycle_steps,
                                          exploration_fraction=self.exploration_fraction,
                                          samples_per_cycle=self.samples_per_cycle)
        if self.schedule == "constant":
            if self.samples_per_cycle != 1 or self.exploration_fraction:
                raise BayesTransferError("a constant SGLD schedule takes one sample per "
                                         "interval and has no exploration phase")
            return float(self.learning_rate)
        raise BayesTransferError(f"unknown SGLD schedule {self.schedule!r}; use 'cyclical' "
                                 f"or 'constant'")


def sgld_collection_steps(config: SGLDConfig, num_samples: int) -> list[int]:
    """0-based step counts after which :func:`run_sgld` keeps a sample."""
    schedule = config.lr_schedule()
    per = int(config.samples_per_cycle)
    cycles = int(math.ceil(int(num_samples) / per))
    if isinstance(schedule, CyclicalSchedule):
        steps = schedule.sample_steps(cycles, first_cycle=int(config.burnin_cycles))
    else:
        L = int(config.cycle_steps)
        steps = [(c + 1) * L - 1 for c in range(int(config.burnin_cycles),
                                                int(config.burnin_cycles) + cycles)]
    return steps[: int(num_samples)]


@functools.lru_cache(maxsize=32)
def _cached_sgld(schedule, num_train: int, temperature: float, noisy: bool):
    # The same settings give the same transformation object, so fit's compiled step is
    # reused across segments, seeds and λ (the key and M live in the state).
    noise = schedule.noise if noisy else None
    return sgld(schedule, num_train=num_train, temperature=temperature, noise_schedule=noise)


def run_sgld(model, splits, prior=None, config: SGLDConfig = SGLDConfig(), *,
             num_samples: int = 10, params=None, loss_fn=None, max_in_memory: int | None = None,
             sample_dir=None, refresh_bn: bool = False, bn_batches: int = 40):
    """Run an SGLD chain in the training loop and collect ``num_samples`` samples.

    ``fit`` is called once per segment between two collection steps (see
    :func:`sgld_collection_steps`), each call continuing the chain: parameters,
    BatchNorm state and the SGLD state (PRNG key, step count, so the schedule keeps
    its phase) are handed on. The training step compiles once.

    Args:
      model: the network (its parameters are the chain's start unless ``params``).
      splits: a ``Splits`` (its ``train`` is used) or an ``ArrayDataset``.
      prior: the prior on the backbone (the loss's ``aux``), None or flat for none.
      config: :class:`SGLDConfig`.
      num_samples: S, the number of samples kept.
      params: the start (e.g. a MAP solution); default the model's parameters.
      loss_fn: the loop loss (default ``map_loss(N, head_decay=config.head_decay)``); it
        must be a *mean* over examples of a total U/N for the noise to be right.
      max_in_memory, sample_dir: samples beyond the first ``max_in_memory`` go to
        ``.npz`` files in ``sample_dir`` (a temporary folder if None).
      refresh_bn: recompute each sample's BatchNorm statistics on the training set
        (the chain's running statistics lag the parameters by a few steps).

    Returns:
      a :class:`~bayes_transfer.inference.bma.PosteriorSamples` of (params, rest) pairs;
      its ``steps`` are the step counts of the samples and ``info`` the chain settings.
    """
    train = getattr(splits, "train", splits)
    n = len(train)
    if int(num_samples) < 1:
        raise BayesTransferError(f"run_sgld: num_samples must be >= 1, got {num_samples!r}")
    if prior is not None and prior.kind == "flat":
        prior = None
    loss_fn = loss_fn or map_loss(n, head_decay=float(config.head_decay))
    schedule = config.lr_schedule()
    noisy = isinstance(schedule, CyclicalSchedule) and schedule.exploration_steps > 0
    tx = _cached_sgld(schedule, n, float(config.temperature), noisy)

    graphdef, start, _ = split_model(model)
    params = start if params is None else params
    precond = prior_preconditioner(prior, params) if config.precondition else None
    _check_step_size(prior, precond, config.learning_rate, n)
    opt_state = SGLDState(jnp.zeros((), jnp.int32), jax.random.PRNGKey(config.seed), precond)

    steps = sgld_collection_steps(config, num_samples)
    samples = PosteriorSamples(sample_dir, max_in_memory=max_in_memory)
    samples.info = {"method": "sgld", **dataclasses.asdict(config), "num_train": n}
    done = 0
    for i, step in enumerate(steps):
        length = step + 1 - done
        train_config = TrainConfig(
            steps=length, batch_size=config.batch_size,
            augment=config.augment, seed=int(config.seed) * 100_003 + i,
            progress=config.progress, desc=f"sgld {i + 1}/{len(steps)}")
        result = fit(model, train, loss_fn, train_config, aux=prior, optimizer=tx,
                     params=params, opt_state=opt_state)
        params, opt_state = result.state.params, result.state.opt_state
        model = result.model
        done = step + 1
        if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)):
            raise BayesTransferError(
                f"SGLD diverged (non-finite parameters) before step {done}; lower "
                f"SGLDConfig.learning_rate (stability needs η·h/N < 2 for the largest "
                f"curvature h of U), or keep precondition=True with a learned prior")
        rest = result.state.rest
        if refresh_bn:
            rest = refresh_batch_stats(graphdef, params, rest, train, num_batches=bn_batches)
        samples.append(params, rest, step=step)
    samples.info["chain_count"] = int(opt_state.count)
    return samples


def _check_step_size(prior, precond, lr: float, n: int) -> None:
    """Warn when the prior alone makes the Langevin step unstable (ε·h ≥ 2)."""
    if prior is None or prior.kind == "flat":
        return
    lo, hi = _diag_range(prior)
    tight = float(hi) if precond is not None else float(lo)
    stiffness = float(lr) / (n * tight)
    if stiffness >= 2.0:
        warnings.warn(
            f"SGLD step η={lr:g} is unstable under this prior: η/(N·δ) = {stiffness:.3g} "
            f"≥ 2 along its {'loosest' if precond is not None else 'stiffest'} covered "
            f"direction; lower the learning rate below {2 * n * tight:.3g}"
            + ("" if precond is not None else " or enable precondition"), stacklevel=3)
