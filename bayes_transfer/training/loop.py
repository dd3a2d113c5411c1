"""The one training loop.

Supervised source training, SWAG collection, SimCLR, MAP fine-tuning under a prior and
SGLD all run through :func:`fit`; they differ only in their loss function
(:mod:`bayes_transfer.training.state` has the protocol) and their optimizer (and in
whether a SWAG collector rides along), never in a copy of the loop.

The batch is sharded over all devices along the ``data`` mesh axis and the state is
replicated (:mod:`bayes_transfer.training.distributed`); a large prior may stay sharded
along d (``Prior.shard``). Checkpoints (orbax) hold the whole state, SWAG statistics
included; batches and keys are a function of (seed, step), so a resumed run is the same
run.
"""
from __future__ import annotations

import functools
import itertools
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from bayes_transfer import data as btdata
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.training.distributed import data_mesh, place_aux, shard_batch
from bayes_transfer.training.optim import make_optimizer
from bayes_transfer.training.predict import make_apply, split_model
from bayes_transfer.training.state import TrainConfig, TrainResult, TrainState


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
    on_step: Callable[[int, TrainResult, Any], Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``dataset`` by minimising ``loss_fn``.

    ``dataset`` is an ``ArrayDataset`` (in memory) or a ``StreamedDataset`` (decoded by
    grain worker processes, each host reading its share of every batch); the loop sees
    only batches (``bayes_transfer.data.batch_stream``).

    ``swag`` is a SWAG collector (``bayes_transfer.swag.swag_collector``) updated after
    every optimizer step; ``params`` overrides the model's initial parameters (for
    instance a prior's mean); ``opt_state`` overrides ``optimizer.init(params)``, to
    continue a run's optimizer state over several calls (an SGLD chain's PRNG key and
    step count, see ``bayes_transfer.inference.sgld``); ``eval_fn`` is called at the end
    of each epoch with the current result and its dict goes into the history;
    ``on_step(step, result, aux)`` is called after every step and returns the ``aux``
    of the next steps (the same object: unchanged), e.g. a prior whose λ is learned
    (``bayes_transfer.inference.evidence``).
    """
    graphdef, model_params, rest = split_model(model)
    params = model_params if params is None else params
    # The batches: in memory or streamed, one interface (bayes_transfer.data.pipeline).
    stream = btdata.batch_stream(dataset, config.batch_size, seed=config.seed,
                                 augment=config.augment, flip=config.flip)
    steps_per_epoch = stream.steps_per_epoch
    total_steps = config.total_steps(steps_per_epoch)
    tx = optimizer or make_optimizer(config, total_steps)

    mesh = data_mesh()
    step_fn = _compiled_step(graphdef, loss_fn, tx, stream.device_augment, config.flip, swag,
                             mesh)

    replicated = NamedSharding(mesh, P())
    state = TrainState(jnp.zeros((), jnp.int32), params, rest,
                       tx.init(params) if opt_state is None else opt_state,
                       None if swag is None else swag.init(params))
    # A private copy: the step donates its input state, the caller keeps its arrays.
    state = jax.tree.map(jnp.copy, jax.device_put(state, replicated))
    aux = place_aux(aux, mesh)

    manager = _checkpoint_manager(config)
    if manager is not None and manager.latest_step() is not None:
        state = _restore(manager, state, replicated, stream)
    start = int(state.step)
    # Batches of steps start.., placed on the devices a few steps ahead, in a thread.
    batches = btdata.prefetch(stream.iterator(start, total_steps),
                              functools.partial(shard_batch, mesh=mesh,
                                                local=stream.process_local))

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
        # The rest of this epoch (all of it, unless resumed mid-epoch).
        for batch in itertools.islice(batches, min(total_steps, (epoch + 1) * steps_per_epoch)
                                      - step):
            key = jax.random.fold_in(key0, step)
            state, metrics = step_fn(state, batch, key, aux)
            step += 1
            seen += len(batch["label"]) if "label" in batch else len(batch["image"])
            bar.update(1)
            if step % 10 == 0 or step == total_steps:
                rate = seen / (time.perf_counter() - tic)
                shown = {k: f"{float(metrics[k]):.4f}" for k in ("loss", "nll", "prior")
                         if k in metrics}
                bar.set_postfix(**shown, img_s=f"{rate:.0f}")
            if on_step is not None:
                new_aux = on_step(step, TrainResult(graphdef, state, history), aux)
                if new_aux is not aux:
                    aux = place_aux(new_aux, mesh)
            if manager is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                _save(manager, step, state, stream)
        epoch += 1
        record = {"epoch": epoch, "step": step,
                  **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        if eval_fn is not None:
            record.update(eval_fn(TrainResult(graphdef, state, history)))
        history.append(record)
        if manager is not None and not config.checkpoint_every:
            _save(manager, step, state, stream)
    batches.close()
    bar.close()
    if manager is not None:
        _save(manager, step, state, stream)
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


def _save(manager, step: int, state: TrainState, stream) -> None:
    """The state and the data position (``stream.state``: which batch comes next)."""
    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(stream.state(step))))


def _restore(manager, state: TrainState, sharding, stream) -> TrainState:
    """The latest checkpoint's state; its data position must be this stream's."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    step = manager.latest_step()
    legacy = Path(manager.directory, str(step), "default")
    try:
        if legacy.is_dir():   # written before the data position was saved: the state alone
            with ocp.StandardCheckpointer() as checkpointer:
                restored = {"state": checkpointer.restore(legacy, abstract), "data": None}
        else:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; the user needs one message
        raise BayesTransferError(
            f"cannot resume from the checkpoint in {manager.directory}: {e}. It was written "
            f"by a different model, optimizer or SWAG setting; use a new --checkpoint-dir or "
            f"delete this one to start over") from e
    stream.check_state(restored["data"], int(restored["state"].step))
    return restored["state"]
