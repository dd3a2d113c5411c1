"""Where arrays live: the data mesh, batches split over devices and hosts, process 0.

Data parallelism: the batch is sharded over all devices along a ``data`` mesh axis and
the state is replicated; XLA inserts the gradient all-reduce. The same code runs on one
CPU, on 8 simulated CPU devices and on a GPU/TPU host. Multi-host: call
``jax.distributed.initialize()`` first (or start with ``python -m
bayes_transfer.launch``); every process computes the same global batch and hands its
devices only their rows (``docs/scaling.md``).
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bayes_transfer.errors import BayesTransferError


#: ``BAYES_TRANSFER_CPU_DEVICES=N`` sets how many JAX devices `use_cpu_cores` makes.
CPU_DEVICES_ENV = "BAYES_TRANSFER_CPU_DEVICES"


def use_cpu_cores(max_devices: int = 8) -> int:
    """Present this machine's CPU cores to JAX as several devices, so data-parallel
    training uses them all; returns the CPU device count in force.

    Why: XLA:CPU runs one small-batch training step mostly on one core (small_cnn at
    batch 128 on 2 cores: 714 images/s with one device, 988 with two,
    ``experiments/bench_cpu_training.py``). With one device per core, ``fit`` splits each
    batch over them like over GPUs; results change only by float rounding.

    The toolkit's own processes (the CLI, the experiments) call it first thing; a
    library import never does. It changes nothing when the backend has started, when
    the count is already chosen (``--xla_force_host_platform_device_count`` in
    ``XLA_FLAGS``, ``jax_num_cpu_devices``), or on GPU/TPU, whose devices it leaves alone.
    The count is a power of two (batch sizes usually are; a batch that does not split is
    replicated), at most ``max_devices`` and the cores this process may use;
    ``BAYES_TRANSFER_CPU_DEVICES=N`` overrides it (``1``: no split).
    """
    chosen = re.search(r"xla_force_host_platform_device_count=(\d+)",
                       os.environ.get("XLA_FLAGS", ""))
    if chosen:
        return int(chosen.group(1))
    if jax.config.jax_num_cpu_devices > 0 or os.environ.get("JAX_NUM_CPU_DEVICES"):
        return jax.config.jax_num_cpu_devices
    wanted = os.environ.get(CPU_DEVICES_ENV)
    if wanted is not None:
        if not wanted.isdigit() or int(wanted) < 1:
            raise BayesTransferError(f"{CPU_DEVICES_ENV}={wanted!r}: give a positive integer "
                                     f"(the number of JAX devices to split the CPU into)")
        count = int(wanted)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        count = 1 << (min(cores, max_devices).bit_length() - 1)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:     # the backend has started (a call from inside a running job)
        return len(jax.devices("cpu"))
    return count


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def shard_batch(batch: dict, mesh: Mesh, *, local: bool = False) -> dict:
    """Put a global batch on the mesh, split along ``data`` (replicated if uneven).

    ``local``: ``batch`` holds only this process's rows of the global batch (a streamed
    dataset: each host reads its share), rows ``p·B/P ..`` for process p of P.
    """
    n = len(mesh.devices.flat)
    size = len(next(iter(batch.values())))
    if local and jax.process_count() > 1:
        return _from_local_rows(batch, mesh, size * jax.process_count())
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


def _from_local_rows(batch: dict, mesh: Mesh, global_size: int) -> dict:
    n = len(mesh.devices.flat)
    if global_size % n:
        raise BayesTransferError(f"a streamed global batch of {global_size} does not split "
                                 f"over {n} devices; use a batch size divisible by {n}")
    sharding = NamedSharding(mesh, P("data"))
    rows = sorted({idx[0].indices(global_size)[:2] for idx in
                   sharding.addressable_devices_indices_map((global_size,)).values()})
    local = global_size // jax.process_count()
    first = jax.process_index() * local
    if (rows[0][0], rows[-1][1]) != (first, first + local):
        raise BayesTransferError(f"this process's devices hold rows {rows[0][0]}..{rows[-1][1]} "
                                 f"of the batch, not {first}..{first + local}: list the devices "
                                 f"process by process")
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_size,) + v.shape[1:])
            for k, v in batch.items()}


def place_aux(aux, mesh: Mesh):
    """Replicate ``aux`` (a prior) over the mesh, except arrays already sharded on it
    (``Prior.shard``: a large prior stays split along d)."""
    replicated = NamedSharding(mesh, P())

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, aux)


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
