"""Save and restore a trained model (architecture config + weights) as a directory.

``model.json`` holds the architecture (``bayes_transfer.models.model_config``) and the
weights are an orbax checkpoint of ``{"params", "rest"}``; no pickle anywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from bayes_transfer import models as btmodels
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.fsutil import atomic_write
from bayes_transfer.training.distributed import host_copy, on_process_0
from bayes_transfer.training.predict import split_model
from bayes_transfer.training.state import TrainResult


def save_model(result: TrainResult, path, *, extra: dict | None = None) -> Path:
    """Write ``path/model.json`` and ``path/weights`` atomically (temp dir, then rename)."""
    return write_model_dir(result, path, {"model": btmodels.model_config(result.model),
                                          **(extra or {})})


def write_model_dir(result: TrainResult, path, info: dict) -> Path:
    """``info`` as ``model.json`` plus the weights (orbax), atomically."""
    path = Path(path).absolute()
    state = {"params": result.state.params, "rest": result.state.rest}
    if jax.process_count() == 1:
        return _write_model_dir(path, info, state, ocp.options.MultiprocessingOptions())
    # Multi-process: the state is replicated, so process 0 writes its own copy alone
    # (a collective orbax save would go to each process's own temporary directory and
    # hang) and the others wait until the directory is in place.
    on_process_0(lambda: _write_model_dir(
        path, info, host_copy(state), ocp.options.MultiprocessingOptions(active_processes={0})),
        f"writing the model directory {path}")
    return path


def _write_model_dir(path: Path, info: dict, state, multiprocessing_options) -> Path:
    with atomic_write(path, directory=True) as tmp:
        (tmp / "model.json").write_text(json.dumps(info, indent=2))
        with ocp.StandardCheckpointer(multiprocessing_options=multiprocessing_options) as ckptr:
            ckptr.save(tmp / "weights", state)
    return path


def read_model_info(path) -> dict:
    """The ``model.json`` of a saved model directory."""
    path = Path(path)
    meta = path / "model.json"
    if not meta.is_file():
        raise BayesTransferError(f"{path} is not a saved model: {meta.name} is missing (a saved "
                                 f"model directory holds model.json and weights/, as written "
                                 f"by `bayes-transfer train --out DIR`)")
    return json.loads(meta.read_text())


def read_weights(path, model):
    """``model`` (its architecture) with the weights saved in ``path/weights``."""
    graphdef, params, rest = split_model(model)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "rest": rest})
    try:
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore((Path(path) / "weights").absolute(), abstract)
    except Exception as e:  # orbax raises many types; the user needs one message
        raise BayesTransferError(f"cannot read the weights in {Path(path) / 'weights'}: {e}") from e
    return nnx.merge(graphdef, state["params"], state["rest"])


def load_model(path):
    """(model, info) from a directory written by :func:`save_model`."""
    info = read_model_info(path)
    return read_weights(path, btmodels.create(**info["model"])), info
