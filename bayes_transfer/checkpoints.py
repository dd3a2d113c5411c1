"""Save and restore a trained model (architecture config + weights) as a directory.

``model.json`` holds the architecture (``bayes_transfer.models.model_config``) and the
weights are an orbax checkpoint of ``{"params", "rest"}``; no pickle anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from bayes_transfer import models as btmodels
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.train import TrainResult, split_model


def save_model(result: TrainResult, path, *, extra: dict | None = None) -> Path:
    """Write ``path/model.json`` and ``path/weights`` atomically (temp dir, then rename)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = btmodels.model_config(result.model)
        (tmp / "model.json").write_text(json.dumps({"model": config, **(extra or {})}, indent=2))
        state = {"params": result.state.params, "rest": result.state.rest}
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "weights", state)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_model(path):
    """(model, info) from a directory written by :func:`save_model`."""
    path = Path(path)
    meta = path / "model.json"
    if not meta.is_file():
        raise BayesTransferError(f"{path} is not a saved model: {meta.name} is missing (a saved "
                                 f"model directory holds model.json and weights/, as written "
                                 f"by `bayes-transfer train --out DIR`)")
    info = json.loads(meta.read_text())
    model = btmodels.create(**info["model"])
    graphdef, params, rest = split_model(model)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "rest": rest})
    try:
        with ocp.StandardCheckpointer() as ckptr:
            state = ckptr.restore((path / "weights").absolute(), abstract)
    except Exception as e:
        raise BayesTransferError(f"cannot read the weights in {path / 'weights'}: {e}") from e
    from flax import nnx
    return nnx.merge(graphdef, state["params"], state["rest"]), info
