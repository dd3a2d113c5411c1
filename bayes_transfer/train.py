"""The one training loop.

Supervised source training, SWAG collection, SimCLR, MAP fine-tuning under a prior and
SGLD all run through :func:`fit`; they differ only in their loss function and their
optimizer (and in whether a SWAG collector rides along), never in a copy of the loop.

A loss function has the signature::

    loss_fn(apply, params, rest, batch, key, aux) -> (loss, (new_rest, metrics))

where ``apply(params, rest, x, train=..., method=None) -> (out, new_rest)`` runs the
model functionally, ``rest`` is the non-parameter state (BatchNorm statistics),
``batch`` a dict of arrays, ``key`` a PRNG key for this step and ``aux`` any pytree
passed to :func:`fit` (a prior, say): it is an argument of the jitted step, so
changing λ between runs does not recompile.

Data parallelism: the batch is sharded over all devices along a ``data`` mesh axis
and the state is replicated; XLA inserts the gradient all-reduce. The same code runs on
one CPU, on 8 simulated CPU devices and on a GPU/TPU host. A large prior may stay
sharded along d (``Prior.shard``). Multi-host: call ``jax.distributed.initialize()``
first (or start with ``python -m bayes_transfer.launch``); every process computes the
same global batch and hands its devices only their rows (``docs/scaling.md``).

Checkpoints (orbax) hold the whole state, SWAG statistics included; batches and keys
are a function of (seed, step), so a resumed run is the same run.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from bayes_transfer import data as btdata
from bayes_transfer.errors import BayesTransferError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Plain-Python training settings (configs are code, as in big_vision)."""

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


def host_copy(tree):
    """This process's numpy copy of a tree of replicated arrays (``fit``'s state, a prior
    built from it). It needs no other process, so process 0 alone may call it before
    writing a file; an eager op on an array spread over several processes, by contrast,
    is a collective that every process must run."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise BayesTransferError(f"host_copy needs replicated arrays, got {x.sharding}")
            x = x.addressable_data(0)
        return np.asarray(x)

    return jax.tree.map(one, tree)


def on_process_0(write, what: str) -> None:
    """Run ``write()`` on process 0 of a multi-process run while the other processes
    wait for it. Every process joins one collective afterwards, whether the write
    worked or raised, so a failure on process 0 fails every process instead of leaving
    the others waiting for a file that never comes. One process: just ``write()``."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        write()
        return
    error = None
    if jax.process_index() == 0:
        try:
            write()
        except Exception as e:    # re-raised below, after the others have been told
            error = e
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is not None:
        raise error
    if int(failed):
        raise BayesTransferError(f"process 0 failed {what}; its output says why")


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


def split_model(model: nnx.Module):
    """(graphdef, params, rest): trainable parameters apart from state like BN stats."""
    return nnx.split(model, nnx.Param, ...)


def make_apply(graphdef) -> Callable:
    """A pure function running the model: apply(params, rest, x, train, method)."""

    def apply(params, rest, x, train: bool = False, method: str | None = None):
        # copy=True: the variables must belong to the innermost trace (grad inside jit).
        model = nnx.merge(graphdef, params, rest, copy=True)
        fn = model if method is None else getattr(model, method)
        out = fn(x, train=train)
        return out, nnx.state(model, nnx.Not(nnx.Param))

    return apply


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def _shard_batch(batch: dict, mesh: Mesh) -> dict:
    n = len(mesh.devices.flat)
    size = len(next(iter(batch.values())))
    # Batches that don't split evenly (tiny few-shot sets) are replicated instead.
    sharded = size % n == 0
    sharding = NamedSharding(mesh, P("data") if sharded else P())
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    # Multi-host: every process builds the same global batch (a function of seed and
    # step) and gives each of its own devices the rows the sharding assigns it. Asking
    # the sharding, not assuming process i holds the i-th block of rows, stays right
    # whatever order jax.devices() lists the hosts' devices in.
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def _place_aux(aux, mesh: Mesh):
    """Replicate ``aux`` (a prior) over the mesh, except arrays already sharded on it
    (``Prior.shard``: a large prior stays split along d)."""
    replicated = NamedSharding(mesh, P())

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, aux)


def fit(
    model: nnx.Module,
    dataset,
    loss_fn: Callable,
    config: TrainConfig,
    *,
    aux: Any = None,
    optimizer: optax.GradientTransformation | None = None,
    swag=None,
    params=None,
    opt_state=None,
    eval_fn: Callable[[TrainResult], dict] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` (an ``ArrayDataset``) by minimising ``loss_fn``.

    ``swag`` is a SWAG collector (``bayes_transfer.swag.swag_collector``) updated after
    every optimizer step; ``params`` overrides the model's initial parameters (for
    instance a prior's mean); ``opt_state`` overrides ``optimizer.init(params)``, to
    continue a run's optimizer state over several calls (an SGLD chain's PRNG key and
    step count, see ``bayes_transfer.inference.sgld``); ``eval_fn`` is called at the end
    of each epoch with the current result and its dict goes into the history.
    """
    graphdef, model_params, rest = split_model(model)
    params = model_params if params is None else params
    steps_per_epoch = btdata.num_batches(dataset, config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    tx = optimizer or make_optimizer(config, total_steps)

    mesh = data_mesh()
    step_fn = _compiled_step(graphdef, loss_fn, tx, config.augment, config.flip, swag, mesh)

    replicated = NamedSharding(mesh, P())
    state = TrainState(jnp.zeros((), jnp.int32), params, rest,
                       tx.init(params) if opt_state is None else opt_state,
                       None if swag is None else swag.init(params))
    # A private copy: the step donates its input state, the caller keeps its arrays.
    state = jax.tree.map(jnp.copy, jax.device_put(state, replicated))
    aux = _place_aux(aux, mesh)

    manager = _checkpoint_manager(config)
    if manager is not None and manager.latest_step() is not None:
        state = _restore(manager, state, replicated)
    start = int(state.step)

    history: list[dict] = []
    key0 = jax.random.PRNGKey(config.seed)
    # One progress bar per run, not one per process.
    bar = tqdm(total=total_steps, initial=start, desc=config.desc,
               disable=not config.progress or jax.process_index() != 0,
               dynamic_ncols=True, leave=False)
    step, tic, seen = start, time.perf_counter(), 0
    metrics = {}
    epoch = start // steps_per_epoch
    while step < total_steps:
        skip = step - epoch * steps_per_epoch
        for i, batch in enumerate(btdata.batches(dataset, config.batch_size, seed=config.seed,
                                                 epoch=epoch)):
            if i < skip:
                continue
            if step >= total_steps:
                break
            key = jax.random.fold_in(key0, step)
            state, metrics = step_fn(state, _shard_batch(batch, mesh), key, aux)
            step += 1
            seen += len(batch["label"]) if "label" in batch else len(batch["image"])
            bar.update(1)
            if step % 10 == 0 or step == total_steps:
                rate = seen / (time.perf_counter() - tic)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", img_s=f"{rate:.0f}")
            if manager is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                _save(manager, step, state)
        epoch += 1
        record = {"epoch": epoch, "step": step,
                  **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        if eval_fn is not None:
            record.update(eval_fn(TrainResult(graphdef, state, history)))
        history.append(record)
        if manager is not None and not config.checkpoint_every:
            _save(manager, step, state)
    bar.close()
    if manager is not None:
        _save(manager, step, state)
        manager.wait_until_finished()
        manager.close()
    return TrainResult(graphdef, state, history)


@functools.lru_cache(maxsize=32)
def _compiled_step(graphdef, loss_fn, tx, augment: bool, flip: bool, swag, mesh: Mesh):
    """The jitted train step; cached so repeated runs (a λ sweep, seeds) compile once."""
    apply = make_apply(graphdef)
    replicated = NamedSharding(mesh, P())

    def train_step(state: TrainState, batch, key, aux):
        if augment:
            batch = dict(batch, image=btdata.augment(jax.random.fold_in(key, 1), batch["image"],
                                                     flip=flip))

        def objective(p):
            return loss_fn(apply, p, state.rest, batch, key, aux)

        (loss, (rest, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        swag_state = state.swag if swag is None else swag.update(state.swag, params)
        metrics = dict(metrics, loss=loss)
        new = TrainState(state.step + 1, params, rest, opt_state, swag_state)
        # The state stays replicated even when a sharded prior's gradient is not: the
        # next call then sees the same input shardings and does not recompile.
        return jax.lax.with_sharding_constraint(new, replicated), metrics

    return jax.jit(train_step, donate_argnums=(0,))


# ---------------------------------------------------------------------- checkpoints
def _checkpoint_manager(config: TrainConfig):
    if not config.checkpoint_dir:
        return None
    path = Path(config.checkpoint_dir).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(path, options=options)


def _save(manager, step: int, state: TrainState) -> None:
    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.StandardSave(state))


def _restore(manager, state: TrainState, sharding) -> TrainState:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    try:
        return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types; the user needs one message
        raise BayesTransferError(
            f"cannot resume from the checkpoint in {manager.directory}: {e}. It was written "
            f"by a different model, optimizer or SWAG setting; use a new --checkpoint-dir or "
            f"delete this one to start over") from e


# ---------------------------------------------------------------------- evaluation
def predict(result_or_model, dataset, *, batch_size: int = 500, method: str | None = None,
            params=None) -> np.ndarray:
    """Model outputs (logits, or ``method``'s output) over a whole dataset, in order."""
    if isinstance(result_or_model, TrainResult):
        graphdef, p, rest = (result_or_model.graphdef, result_or_model.state.params,
                             result_or_model.state.rest)
    else:
        graphdef, p, rest = split_model(result_or_model)
    p = p if params is None else params
    return _predict_fn(graphdef, method)(p, rest, dataset, batch_size)


@functools.lru_cache(maxsize=32)
def _predict_fn(graphdef, method):
    apply = make_apply(graphdef)

    @jax.jit
    def forward(params, rest, x):
        return apply(params, rest, x, train=False, method=method)[0]

    def run(params, rest, dataset, batch_size):
        outs = []
        n = len(dataset)
        batch_size = min(batch_size, n)
        for batch in btdata.batches(dataset, batch_size, seed=0, epoch=0, shuffle=False,
                                    drop_remainder=False):
            x = batch["image"]
            pad = batch_size - len(x)
            if pad:  # a fixed shape avoids recompiling for the last batch
                x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            outs.append(np.asarray(forward(params, rest, x))[: batch_size - pad])
        return np.concatenate(outs)

    return run
