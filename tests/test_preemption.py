"""Preemption: SIGKILL at random points of a whole pipeline, rerun until it completes.

The pipeline is what a user runs on a preemptible machine: learn a prior on a source
task (source training, then SWAG collection: ``learn_prior(..., checkpoint_dir=...)``),
save it as an artifact, then MAP fine-tuning under it with λ chosen on validation
(``finetune(..., checkpoint_dir=...)``, one checkpoint sub-directory per candidate λ).
This file is also the driver script: ``python tests/test_preemption.py OUT CKPT`` runs
the pipeline, skipping the stages whose output already exists (each is written
atomically), and resuming the interrupted one from its checkpoints.

The test kills the driver for real (SIGKILL, no clean-up) twice in each of the three
phases (once, where the first kill's delay let a short phase run past its last
checkpoint), at points drawn from a seeded RNG (a checkpoint step to wait for, then a
random delay, so a kill may land mid-step, mid-save or mid-evaluation), reruns the same
command until it exits 0, and compares with an uninterrupted run of the same seed: the
prior artifact's arrays and metadata (all but the creation time and the digests that
cover it) and the fine-tuning metrics and parameters, bitwise on the CPU.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SOURCE_IMAGES = 256      # digits, 8×8: 8 steps per epoch at batch 32
PRETRAIN_EPOCHS = 2      # 16 steps
SWAG_EPOCHS = 1          # 8 steps, a snapshot every 2
FINETUNE_EPOCHS = 4      # 3 candidate runs (2 λ + no prior) of 4 × 3 steps
CHECKPOINT_EVERY = 2


# ---------------------------------------------------------------------- the driver
def _pipeline(out: Path, ckpt: Path) -> None:
    import jax

    from bayes_transfer import data, models
    from bayes_transfer.artifacts import read_prior, save_prior
    from bayes_transfer.inference.map import FinetuneConfig, finetune
    from bayes_transfer.learn import LearnPriorConfig, learn_prior
    from bayes_transfer.params import flatten_with_paths
    from bayes_transfer.swag import SwagConfig
    from bayes_transfer.training import TrainConfig

    out.mkdir(parents=True, exist_ok=True)
    _log_restores(out / "restores.log")
    prior_dir = out / "prior"
    if not prior_dir.exists():
        splits = data.load("digits", seed=0)
        splits = dataclasses.replace(splits, train=splits.train.subset(np.arange(SOURCE_IMAGES)))
        config = LearnPriorConfig(
            train=TrainConfig(epochs=PRETRAIN_EPOCHS, batch_size=32, learning_rate=0.05,
                              augment=True, checkpoint_every=CHECKPOINT_EVERY,
                              progress=False),
            swag_epochs=SWAG_EPOCHS, swag_learning_rate=0.02, swag=SwagConfig(rank=3, every=2))
        model = models.create("small_cnn", 10, seed=0, width=0.25)
        prior, _ = learn_prior(model, splits, config, checkpoint_dir=str(ckpt / "learn"),
                               metadata={"architecture": models.model_config(model)})
        save_prior(prior, prior_dir)               # atomic: all or nothing

    results = out / "finetune.json"
    if not results.exists():
        prior = read_prior(prior_dir)
        target = data.load("digits", shots_per_class=10, seed=1)
        config = FinetuneConfig(
            train=TrainConfig(epochs=FINETUNE_EPOCHS, batch_size=32, optimizer="adam",
                              learning_rate=1e-2, checkpoint_every=CHECKPOINT_EVERY,
                              progress=False),
            variances=(1e-2, 1.0))
        model = models.create("small_cnn", 10, seed=2, width=0.25)
        res = finetune(model, target, prior, "lowrank", config=config,
                       checkpoint_dir=str(ckpt / "finetune"))
        params = jax.device_get(res.result.params)
        np.savez(out / "finetune_params.npz",
                 **{k: np.asarray(v) for k, v in flatten_with_paths(params).items()})
        report = {"scale": res.scale, "metrics": res.metrics, "val": res.val_metrics,
                  "sweep": res.sweep}
        tmp = out / "finetune.json.tmp"
        tmp.write_text(json.dumps(report, sort_keys=True))   # floats round-trip exactly
        os.replace(tmp, results)


def _log_restores(log: Path) -> None:
    """A spy: append "directory step" to ``log`` for every checkpoint the loop resumes
    from, so the test can tell a resumed run from one that silently started over."""
    from bayes_transfer.training import loop

    restore = loop._restore

    def logged(manager, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{manager.directory} {manager.latest_step()}\n")
        return restore(manager, *args, **kwargs)

    loop._restore = logged


# ---------------------------------------------------------------------- the test
def _command(out, ckpt):
    return [sys.executable, __file__, str(out), str(ckpt)]


def _env(cache_dir: Path) -> dict:
    # A persistent compilation cache shared by all the runs: each restart loads the
    # compiled steps instead of compiling them again (the executables are the same, so
    # the numbers are too). It only saves time; the test holds without it.
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _progress(runs: list[Path]) -> int:
    """Steps checkpointed so far, summed over the runs of a phase (orbax renames a step
    directory into place once it is complete; its temporaries are not counted)."""
    total = 0
    for run in runs:
        steps = [int(p.name) for p in run.glob("[0-9]*") if p.name.isdigit()]
        total += max(steps, default=0)
    return total


def _kill_once(out, ckpt, env, runs, step: int, last: int, delay: float) -> bool:
    """Start the pipeline, wait until the phase has checkpointed ``step`` steps (and at
    least one more in this process), wait ``delay`` seconds more and SIGKILL it.

    Returns False, without starting anything, when an earlier kill's delay already let
    the phase run past ``last``, its last checkpoint before the end: a fast machine can
    finish a short phase within the delay, and there is nothing left to interrupt."""
    target = max(step, _progress(runs()) + 1)
    if target > last:
        return False
    proc = subprocess.Popen(_command(out, ckpt), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while _progress(runs()) < target and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        raise AssertionError(f"the pipeline ended (rc={proc.returncode}) before its kill at "
                             f"step {step}:\n{proc.stderr.read().decode()[-3000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return True


def _finish(out, ckpt, env) -> None:
    proc = subprocess.run(_command(out, ckpt), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _artifact(path: Path):
    from bayes_transfer.artifacts import read_prior

    meta = json.loads((path / "metadata.json").read_text())
    # Digests cover the creation time (and orbax's own files carry a timestamp).
    for key in ("created", "sha256", "files"):
        meta.pop(key)
    prior = read_prior(path)
    arrays = {"mean": prior.mean, "var": prior.var, "deviations": prior.deviations,
              "chol": prior.chol, "logdet": prior.logdet}
    return meta, {k: np.asarray(v) for k, v in arrays.items()}


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_result(tmp_path):
    env = _env(tmp_path / "jax-cache")
    t0 = time.perf_counter()
    reference = tmp_path / "reference"
    _finish(reference, tmp_path / "reference-ckpt", env)     # fills the compilation cache
    t1 = time.perf_counter()
    out, ckpt = tmp_path / "preempted", tmp_path / "ckpt"
    rng = np.random.default_rng(9)
    phases = [   # (name, its checkpoint directories, the steps it can be killed after)
        ("pretrain", lambda: [ckpt / "learn" / "pretrain"], PRETRAIN_EPOCHS * SOURCE_IMAGES // 32),
        ("swag", lambda: [ckpt / "learn" / "swag"], SWAG_EPOCHS * SOURCE_IMAGES // 32),
        # the last candidate run is kept clear, so the process is still alive at the kill
        ("finetune", lambda: sorted((ckpt / "finetune").glob("*")), 2 * FINETUNE_EPOCHS * 3),
    ]
    kills = []
    for name, runs, steps in phases:
        # Two kill points per phase, increasing, each followed by a random delay.
        # The first delay is short, so the second kill still finds the phase running.
        last = steps - CHECKPOINT_EVERY
        points = np.sort(rng.choice(np.arange(1, last), 2, replace=False))
        for step, longest in zip(points, (0.05, 0.3)):
            delay = float(rng.uniform(0.0, longest))
            if _kill_once(out, ckpt, env, runs, int(step), last, delay):
                kills.append((name, int(step), round(delay, 3)))
    assert not (out / "finetune.json").exists()
    _finish(out, ckpt, env)
    print(f"\nuninterrupted run {t1 - t0:.1f} s; {len(kills)} kills (phase, checkpointed "
          f"steps, delay s): {kills}; interrupted run {time.perf_counter() - t1:.1f} s")

    # Every phase was resumed from a checkpoint in the middle of its run at least once.
    restores = [line.split() for line in (out / "restores.log").read_text().splitlines()]
    totals = {"pretrain": PRETRAIN_EPOCHS * SOURCE_IMAGES // 32,
              "swag": SWAG_EPOCHS * SOURCE_IMAGES // 32, "finetune": FINETUNE_EPOCHS * 3}
    for phase, total in totals.items():
        mid = [int(step) for path, step in restores
               if phase in Path(path).parts[-2:] and 0 < int(step) < total]
        assert mid, (phase, restores)
    assert not (reference / "restores.log").exists()

    meta_a, arrays_a = _artifact(reference / "prior")
    meta_b, arrays_b = _artifact(out / "prior")
    assert meta_a == meta_b
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)   # bitwise

    report_a = json.loads((reference / "finetune.json").read_text())
    report_b = json.loads((out / "finetune.json").read_text())
    assert report_a == report_b, kills                                       # bitwise floats
    with np.load(reference / "finetune_params.npz") as a, \
            np.load(out / "finetune_params.npz") as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


if __name__ == "__main__":
    _pipeline(Path(sys.argv[1]), Path(sys.argv[2]))
