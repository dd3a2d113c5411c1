"""The arrays of a prior artifact: the Orbax checkpoint under ``arrays/``.

Writing goes through Orbax (chunks of at most 64 MiB). Reading uses TensorStore
directly, a chunk at a time, into 64-byte aligned memory that JAX then uses in place on
the CPU; an artifact in a layout this reader does not know falls back to Orbax's
restore. Nothing is unpickled.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np

from bayes_transfer.artifacts.format import ARRAYS_DIR, DTYPES, LAYOUT, METADATA_FILE
from bayes_transfer.errors import ArtifactError, PriorError
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior

__all__ = ["process_local", "prior_arrays", "write_arrays", "read_arrays", "prior_from_arrays"]

_CHUNK_BYTES = 64 << 20


# ====================================================================== writing
def process_local(prior: Prior) -> Prior:
    """``prior`` with every array that spans other processes' devices replaced by this
    process's own copy (its first addressable shard), so that checking and writing it
    run no computation that the other processes would have to join. Unchanged (the
    same object) when every array is addressable, as in a one-process run."""
    leaves = jax.tree.leaves(prior)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return prior

    def local(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if not x.is_fully_replicated:
            raise PriorError(
                f"save_prior got an array of shape {x.shape} sharded across processes "
                f"({x.sharding}); each process holds only part of it. Replicate it first "
                f"(jax.experimental.multihost_utils.process_allgather, or build the prior "
                f"from fit's replicated state)")
        return x.addressable_data(0)

    return jax.tree.map(local, prior)


def prior_arrays(prior: Prior) -> dict[str, np.ndarray]:
    """The arrays to store, ``{"mean", "var"[, "deviations"]}``, as C-ordered NumPy."""
    arrays = {"mean": prior.mean, "var": prior.var}
    if prior.deviations is not None:
        arrays["deviations"] = prior.deviations
    out = {}
    for name, x in arrays.items():
        if isinstance(x, jax.core.Tracer):
            raise PriorError("save_prior cannot be called inside a jitted or traced function")
        a = np.asarray(jax.device_get(x))
        if a.dtype.name not in DTYPES:
            raise PriorError(f"prior {name} has dtype {a.dtype}; an artifact stores "
                             f"{', '.join(DTYPES)} (use prior.astype(jnp.float32))")
        out[name] = np.array(a, order="C")   # (ascontiguousarray would make scalars 1-d)
    return out


def write_arrays(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an Orbax checkpoint at ``directory`` (which must not exist)."""
    import orbax.checkpoint as ocp

    # A plain (synchronous) Checkpointer: save returns once the files are written. Chunks
    # of at most 64 MiB: restoring decodes chunk by chunk, so loading needs the arrays plus
    # a few chunks instead of twice the (K, d) factor (one chunk per array before).
    save_args = {name: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES) for name in arrays}
    if jax.process_count() == 1:
        handler, options = ocp.StandardCheckpointHandler(), {}
    else:
        # Several jax.distributed processes: process 0 (save_prior checked) writes its
        # NumPy copies alone. With orbax's defaults its barriers would wait for every
        # process; with process 0 the only active one the write is local, and the files
        # are those of a one-process save (ocdbt.process_0/ included).
        mp = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
        handler = ocp.StandardCheckpointHandler(multiprocessing_options=mp)
        options = {"multiprocessing_options": mp}
    with ocp.Checkpointer(handler, **options) as ckptr:
        ckptr.save(directory, args=ocp.args.StandardSave(arrays, save_args=save_args))


# ====================================================================== reading
def read_arrays(root: Path, meta: dict, dtype=None) -> dict[str, np.ndarray]:
    """The stored arrays of the artifact directory ``root`` as NumPy arrays (cast to
    ``dtype`` if given), checked against its metadata ``meta``. Read chunk by chunk into
    64-byte aligned memory, which ``jax.device_put`` on the CPU then uses as is;
    artifacts this reader does not understand go through Orbax's restore (the arrays,
    then a copy on ``device_put``)."""
    import orbax.checkpoint as ocp

    directory = (root / ARRAYS_DIR).absolute()
    if not directory.is_dir():
        raise ArtifactError(f"{root} has no {ARRAYS_DIR}/ directory. {LAYOUT}.")
    try:
        return _read_arrays_aligned(directory, meta, dtype)
    except Exception:     # another layout, or damaged: Orbax reads it or says what is wrong
        pass
    try:
        # No target: Orbax rebuilds the dict from its JSON tree metadata and returns
        # numpy arrays in their saved dtypes. Nothing is unpickled.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            tree = ckptr.restore(directory, args=ocp.args.StandardRestore())
    except Exception as e:  # orbax / tensorstore raise many types; report one
        summary = " ".join(str(e).split())[:400]
        raise ArtifactError(
            f"cannot read the arrays of the artifact {root} ({type(e).__name__}: {summary}); "
            f"the array files are truncated or corrupt: delete the artifact and download it "
            f"again") from e
    expected = meta["arrays"]
    if not isinstance(tree, dict) or set(tree) != set(expected):
        raise ArtifactError(f"{root}/{ARRAYS_DIR} holds "
                            f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}"
                            f", {METADATA_FILE} describes {sorted(expected)}; the artifact is "
                            f"malformed")
    out = {}
    for name, info in expected.items():
        a = np.asarray(tree[name])
        if list(a.shape) != info["shape"] or a.dtype.name != info["dtype"]:
            raise ArtifactError(
                f"{root}: array {name!r} was restored with shape {list(a.shape)} "
                f"{a.dtype.name}, {METADATA_FILE} records {info['shape']} {info['dtype']}; "
                f"the artifact is malformed")
        out[name] = a if dtype is None else a.astype(dtype)
    return out


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on an ``align``-byte boundary
    (XLA:CPU aliases such host memory instead of copying it)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _read_arrays_aligned(directory: Path, meta: dict, dtype) -> dict[str, np.ndarray]:
    """Read each array of an Orbax (0.12) checkpoint with TensorStore directly.

    Only JSON (Orbax's ``_METADATA`` and the zarr headers) and the compressed chunks are
    read. TensorStore fills each array a stored chunk at a time (at most 64 MiB with
    ``save_prior``'s chunking; two at once), so loading needs the arrays plus two chunks,
    where Orbax's restore returns arrays that ``device_put`` then has to copy (they are
    16-byte aligned).
    """
    import tensorstore as ts

    layout = json.loads((directory / "_METADATA").read_text(encoding="utf-8"))
    driver = "zarr3" if layout.get("use_zarr3") else "zarr"
    # No cache, and two chunks in flight: the memory in flight must not grow with the cores.
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                          "data_copy_concurrency": {"limit": 2},
                          "file_io_concurrency": {"limit": 2}})
    out = {}
    for name, info in meta["arrays"].items():
        kvstore = ({"driver": "ocdbt", "base": directory.as_uri(), "path": name}
                   if layout.get("use_ocdbt")
                   else {"driver": "file", "path": str(directory / name)})
        store = ts.open({"driver": driver, "kvstore": kvstore, "open": True}, read=True,
                        context=context).result()
        shape = tuple(store.shape)
        if (list(shape) != info["shape"]
                or np.dtype(store.dtype.numpy_dtype).name != info["dtype"]):
            raise ArtifactError(f"array {name!r} does not match {METADATA_FILE}")
        target = np.dtype(DTYPES[info["dtype"]] if dtype is None else dtype)
        if target != store.dtype.numpy_dtype:
            store = ts.cast(store, target)
        array = _aligned_empty(shape, target)
        ts.array(array, copy=False, write=True).write(store).result()
        out[name] = array
    return out


def prior_from_arrays(meta: dict, arrays: dict) -> Prior:
    """The Prior that ``meta`` and the arrays read by :func:`read_arrays` describe."""
    spec = ParamSpec.from_json(meta["spec"])
    # Hand each array to JAX once, in place: a Prior holding NumPy arrays would pass its
    # (K, d) factor to the device again on every jitted call. XLA:CPU uses 64-byte aligned
    # host memory as is (_read_arrays_aligned's) and copies other memory (Orbax's), in
    # which case the host copy is freed as soon as the device copy exists.
    for name in sorted(arrays, key=lambda k: -arrays[k].nbytes):
        arrays[name] = jax.device_put(arrays[name])
    scale = math.inf if meta["kind"] == "flat" else meta["scale"]
    # Prior.from_arrays validates (NaN/Inf, variance > 0, shapes) and caches the Cholesky factor.
    prior = Prior.from_arrays(spec, arrays["mean"], arrays["var"], arrays.get("deviations"),
                              scale, meta["floor"], meta["kind"])
    return prior.with_metadata(meta)
