"""The training loop: learning on real data, exact resume after SIGKILL, data parallelism."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bayes_transfer import data, models
from bayes_transfer.training.objectives import cross_entropy_loss
from bayes_transfer.training import TrainConfig, fit, predict

SCRIPT = str(Path(__file__).with_name("train_script.py"))


def _run(args, env=None, **kw):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, check=True,
                          capture_output=True, text=True, timeout=600, **kw)


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_loss_falls_on_real_data():
    splits = data.load("fashion_mnist", seed=0)
    train = splits.train.subset(np.arange(1024))
    model = models.create("small_cnn", 10, seed=0)
    config = TrainConfig(epochs=3, batch_size=64, learning_rate=0.05, progress=False)
    result = fit(model, train, cross_entropy_loss, config)
    losses = [h["loss"] for h in result.history]
    # Untrained, the loss is about log(10) = 2.3; it must fall epoch after epoch.
    assert losses[-1] < losses[0] < np.log(10), losses
    logits = predict(result, splits.test.subset(np.arange(500)))
    acc = (logits.argmax(-1) == splits.test.labels[:500]).mean()
    assert acc > 0.5, acc   # 10 classes: chance is 0.1


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference.npz"
    _run([str(reference)])

    ckpt = tmp_path / "ckpt"
    resumed = tmp_path / "resumed.npz"
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, SCRIPT, str(tmp_path / "unused.npz"), str(ckpt)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it for real once a few checkpoints exist, in the middle of the run.
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [int(p.name) for p in ckpt.glob("[0-9]*") if p.name.isdigit()] if ckpt.exists() else []
        if steps and max(steps) >= 9:
            break
        if proc.poll() is not None:
            pytest.fail("the training subprocess ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "unused.npz").exists()

    _run([str(resumed), str(ckpt)])
    a, b = _load(reference), _load(resumed)
    assert a.keys() == b.keys()
    # The resumed process only saw the epochs after the kill.
    n = len(b.pop("history_loss"))
    np.testing.assert_array_equal(a.pop("history_loss")[-n:], _load(resumed)["history_loss"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)   # bitwise on the CPU


def test_eight_devices_equal_one_device(tmp_path):
    one, eight = tmp_path / "one.npz", tmp_path / "eight.npz"
    args = ["--epochs", "0.25", "--batch", "64"]   # two steps
    _run([str(one), *args], env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    out = _run([str(eight), *args],
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    a, b = _load(one), _load(eight)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_eight_device_subprocess_really_has_eight_devices():
    code = "import jax; print(len(jax.devices()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ,
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert out.stdout.strip() == "8"
