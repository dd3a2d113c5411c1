"""SIGKILL mid-epoch, then resume: a streamed run gives bit for bit the parameters of an
uninterrupted one.

The data is a folder of small real images read by the grain pipeline with a worker
process (random-resized crops and flips drawn per example), checkpointed every step.
This file is also the driver: ``python tests/test_stream_resume.py FOLDER OUT CKPT
[KILL_AT]`` trains and, with ``KILL_AT``, kills itself with SIGKILL right after the
checkpoint of that step is written (the prefetch thread and the worker are running,
batches of the next steps already decoded), so the kill lands mid-epoch every time.
"""
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_folders import fashion_test_images, write_folder  # noqa: E402

EPOCHS, BATCH, KILL_AT = 3, 8, 6       # 33 training images: 4 steps an epoch; 6 is mid-epoch


def _drive(folder: str, out: str, ckpt: str, kill_at: int | None) -> None:
    from bayes_transfer import data, models
    from bayes_transfer.params import flatten_with_paths
    from bayes_transfer.training import TrainConfig, cross_entropy_loss, fit, loop

    splits = data.load(folder, image_size=16, workers=1)
    save, restore = loop._save, loop._restore

    def save_then_die(manager, step, *args):
        save(manager, step, *args)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def logged_restore(manager, *args):
        Path(out + ".restored").write_text(str(manager.latest_step()))
        return restore(manager, *args)

    loop._save, loop._restore = save_then_die, logged_restore
    model = models.create("small_cnn", 3, in_channels=3, width=0.25, seed=0)
    config = TrainConfig(epochs=EPOCHS, batch_size=BATCH, learning_rate=0.05, augment=True,
                         flip=True, checkpoint_dir=ckpt, checkpoint_every=1, progress=False)
    result = fit(model, splits.train, cross_entropy_loss, config)
    state = {**{f"params/{k}": np.asarray(v) for k, v in
                flatten_with_paths(result.state.params).items()},
             **{f"rest/{k}": np.asarray(v) for k, v in
                flatten_with_paths(result.state.rest).items()}}
    np.savez(out, loss=np.array([h["loss"] for h in result.history]), **state)


def _run(args, env, expect_kill=False):
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def fashion_images():
    return fashion_test_images()


def test_sigkill_mid_epoch_then_resume_is_bitwise_the_uninterrupted_run(tmp_path,
                                                                        fashion_images):
    folder = write_folder(tmp_path / "clothes", fashion_images)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    ref, got = tmp_path / "reference.npz", tmp_path / "resumed.npz"
    _run([folder, ref, tmp_path / "ckpt-ref"], env)
    _run([folder, got, tmp_path / "ckpt", KILL_AT], env, expect_kill=True)
    assert not got.exists()
    _run([folder, got, tmp_path / "ckpt"], env)
    assert (tmp_path / "resumed.npz.restored").read_text() == str(KILL_AT)   # mid-epoch
    assert not (tmp_path / "reference.npz.restored").exists()
    with np.load(ref) as a, np.load(got) as b:
        assert a.files == b.files
        for k in a.files:
            if k != "loss":      # the resumed run's history starts at the kill
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_array_equal(a["loss"][-2:], b["loss"][-2:])


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)


def test_a_checkpoint_without_the_data_position_still_resumes(tmp_path):
    """Checkpoints written before the data position was saved (the state alone, orbax's
    default item) resume as before: in memory, batches are a function of (seed, step)."""
    import jax
    import optax
    import orbax.checkpoint as ocp

    from bayes_transfer import data, models
    from bayes_transfer.training import TrainConfig, cross_entropy_loss, fit

    train = data.load("digits", seed=0).train.subset(np.arange(64))
    config = TrainConfig(epochs=2, batch_size=16, progress=False)
    tx = optax.sgd(0.05)               # one optimizer object: the step compiles once

    def run(**changes):
        return fit(models.create("small_cnn", 10, width=0.25), train, cross_entropy_loss,
                   dataclasses.replace(config, **changes), optimizer=tx)

    full, half = run(), run(epochs=1)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "old", options=options) as manager:
        manager.save(4, args=ocp.args.StandardSave(half.state))          # the old layout
    resumed = run(checkpoint_dir=str(tmp_path / "old"))
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
