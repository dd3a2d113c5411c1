"""`fit` and `learn-prior` as 2 processes joined by `jax.distributed` equal one process.

Two processes on 127.0.0.1, each with 2 CPU devices (collectives over gloo), are
started with the documented launcher, ``python -m bayes_transfer.launch``; a reference
runs as one process with 4 devices, so both meshes have 4 devices.

* ``fit``: each trains a small BatchNorm network under a low-rank prior sharded along d
  (each device holds d/4 columns, each process half of them) with orbax checkpoints in a
  shared directory, resumes from them, and writes the model with ``write_model_dir``
  (what ``train --out`` does) and reads it back. This file is also the script the
  subprocesses run.
* ``learn-prior`` (the CLI): source training and SWAG collection on a few digits, then
  the artifact, which process 0 writes alone while process 1 waits.
"""
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from processes import finish, free_port, start

N, BATCH, STEPS = 64, 16, 6          # 4 steps per epoch: 6 steps cross an epoch boundary


def _worker(out_dir: str) -> None:
    import jax
    from flax import nnx

    from bayes_transfer.training.checkpoints import read_weights, write_model_dir
    from bayes_transfer.data import ArrayDataset
    from bayes_transfer.training.objectives import map_loss
    from bayes_transfer.params import ParamSpec, flatten_with_paths
    from bayes_transfer.prior import Prior, shard_prior
    from bayes_transfer.training import TrainConfig, data_mesh, fit, host_copy, split_model

    class Backbone(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(16, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)   # batch statistics: a cross-device mean

        def __call__(self, x, train=False):
            return nnx.relu(self.bn(self.dense(x.reshape(len(x), -1)),
                                    use_running_average=not train))

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.backbone = Backbone(rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x, train=False):
            return self.head(self.backbone(x, train))

    assert len(jax.devices()) == 4
    rng = np.random.default_rng(0)
    train = ArrayDataset(rng.uniform(0, 1, (N, 4, 4, 1)).astype(np.float32),
                         rng.integers(0, 3, N), 3, "synthetic")
    model = Tiny(nnx.Rngs(0))
    spec = ParamSpec.from_params(split_model(model)[1])
    d, k = spec.size, 3
    assert d % 4 == 0, d
    prior = Prior.lowrank(spec, rng.normal(0, 0.1, d).astype(np.float32),
                          rng.uniform(0.01, 0.1, d).astype(np.float32),
                          rng.normal(0, 0.1, (k, d)).astype(np.float32), scale=1.0, floor=1e-4)
    prior = shard_prior(prior, data_mesh(), min_dim=0)
    # Each device holds d/4 columns; this process addresses only its own devices' shards.
    assert {s.data.shape for s in prior.deviations.addressable_shards} == {(k, d // 4)}
    assert len(prior.deviations.addressable_shards) == len(jax.local_devices())

    config = TrainConfig(epochs=STEPS / (N // BATCH), batch_size=BATCH, optimizer="sgd",
                         learning_rate=0.1, seed=3, desc="multihost-fit",
                         checkpoint_dir=os.path.join(out_dir, "ckpt"))
    loss = map_loss(N, head_decay=1e-3)
    result = fit(model, train, loss, config, aux=prior)
    # A second fit on the same checkpoint directory restores the final step.
    restored = fit(Tiny(nnx.Rngs(1)), train, loss, config, aux=prior)
    # Every process calls the model writer (as `train --out` does); one copy is written.
    model_dir = os.path.join(out_dir, "model")
    write_model_dir(result, model_dir, {"note": "multihost test"})
    loaded = nnx.state(read_weights(model_dir, Tiny(nnx.Rngs(2))), nnx.Param)

    def local(tree):   # this process's own copy, read without the other process
        return flatten_with_paths(host_copy(tree))

    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(result.state.params))
    arrays = {**{f"params/{p}": x for p, x in local(result.state.params).items()},
              **{f"rest/{p}": x for p, x in local(result.state.rest).items()},
              **{f"restored/{p}": x for p, x in local(restored.state.params).items()},
              **{f"loaded/{p}": x for p, x in local(loaded).items()}}
    arrays["loss"] = np.array([h["loss"] for h in result.history])
    np.savez(os.path.join(out_dir, f"process{jax.process_index()}.npz"), **arrays)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "local_devices": len(jax.local_devices()), "d": d}))


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _launch(port: int) -> list[str]:
    return [sys.executable, "-m", "bayes_transfer.launch", "--coordinator",
            f"127.0.0.1:{port}", "--num-processes", "2", "--timeout", "60"]


def test_two_processes_equal_one_process(tmp_path):
    port = free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    launch = _launch(port)
    logs = [tmp_path / "process0", tmp_path / "process1", tmp_path / "single"]
    procs = [start([*launch, "--process-id", str(i), __file__, str(multi)], 2, logs[i])
             for i in range(2)]
    procs.append(start([sys.executable, __file__, str(single)], 4, logs[2]))
    outs = finish(procs, logs, timeout=150)

    infos = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert [(i["process"], i["processes"], i["local_devices"]) for i in infos] == [
        (0, 2, 2), (1, 2, 2), (0, 1, 4)]
    # One progress bar per run: process 0 prints it, process 1 does not.
    assert "multihost-fit" in outs[0][1] and "multihost-fit" not in outs[1][1]

    p0, p1, ref = (_load(multi / "process0.npz"), _load(multi / "process1.npz"),
                   _load(single / "process0.npz"))
    assert p0.keys() == p1.keys() == ref.keys()
    for key in p0:
        # The two processes hold the same replicated state, bit for bit ...
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
        # ... which is the one-process result up to float rounding (sums over gloo).
        np.testing.assert_allclose(p0[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in (k for k in p0 if k.startswith("params/")):
        np.testing.assert_array_equal(p0[key], p0[key.replace("params/", "restored/", 1)])
        np.testing.assert_array_equal(p0[key], p0[key.replace("params/", "loaded/", 1)])
    assert len(p0["loss"]) == 2 and not np.allclose(p0["params/head/kernel"], 0)


# Source training and SWAG on 100 digits (8x8): 5 steps of each phase over the 4-device
# mesh (20 images a step, 5 per device), a snapshot every step, so the K = 3 ring buffer
# of deviations wraps around.
LEARN_PRIOR = ["-m", "bayes_transfer.cli", "learn-prior", "--dataset", "digits",
               "--source-shots", "10", "--batch-size", "20", "--epochs", "1",
               "--swag-epochs", "1", "--every", "1", "--rank", "3", "--no-augment", "--seed", "1"]


def _layout(root: Path) -> list[str]:
    """The artifact's files, with each of Orbax's random chunk names written as ``*``."""
    return sorted({re.sub(r"/[0-9a-f]{32}$", "/*", x.relative_to(root).as_posix())
                   for x in root.rglob("*") if x.is_file()})


@pytest.mark.slow     # 68-80 s on 2 busy cores: three processes, each compiling its steps
def test_learn_prior_two_processes_equal_one_process(tmp_path):
    from bayes_transfer.artifacts import read_prior

    port = free_port()
    multi, single = tmp_path / "multi" / "prior", tmp_path / "single" / "prior"
    multi.parent.mkdir()
    single.parent.mkdir()
    logs = [tmp_path / "process0", tmp_path / "process1", tmp_path / "single"]
    procs = [start([*_launch(port), "--process-id", str(i), *LEARN_PRIOR, "--out", str(multi)],
                    2, logs[i]) for i in range(2)]
    procs.append(start([sys.executable, *LEARN_PRIOR, "--out", str(single)], 4, logs[2]))
    outs = finish(procs, logs, timeout=300)

    # Process 0 wrote the artifact and says so; process 1 waited for it and prints nothing.
    assert f"to {multi}" in outs[0][0] and "saved" not in outs[1][0], outs
    assert "swag" in outs[0][1] and "swag" not in outs[1][1]
    # One artifact in place, no temporary sibling left behind.
    assert sorted(p.name for p in multi.parent.iterdir()) == ["prior"]
    assert _layout(multi) == _layout(single)
    assert any("ocdbt.process_0" in f for f in _layout(multi))

    got, ref = read_prior(multi, verify=True), read_prior(single, verify=True)
    assert (got.kind, got.dim, got.rank, got.scale, got.floor) == (
        ref.kind, ref.dim, ref.rank, ref.scale, ref.floor) == ("lowrank", ref.dim, 3, 1.0, 0.0)
    assert got.spec == ref.spec
    for name in ("mean", "var", "deviations"):
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32, name
        # Equal up to the rounding of gloo's sums: within 1e-4 of the array's scale.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max(), err_msg=name)
    assert not np.allclose(np.asarray(ref.deviations), 0)
    meta, ref_meta = got.metadata, ref.metadata
    assert meta["swag"] == ref_meta["swag"] and meta["swag"]["snapshots"] == 5
    assert meta["training"] == ref_meta["training"] and meta["source"] == ref_meta["source"]
    for key in ("source_accuracy", "source_accuracy_at_mean"):
        assert abs(meta[key] - ref_meta[key]) <= 0.01, key


if __name__ == "__main__":
    _worker(sys.argv[1])
