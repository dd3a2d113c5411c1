"""Two JAX processes streaming one folder: each reads a disjoint share of every global
batch, together the whole of it (the batch one process would read), and ``fit`` puts
the global batch together from the shares (both processes end with the same weights).

Two processes joined by ``jax.distributed`` on 127.0.0.1 (``python -m
bayes_transfer.launch``), one CPU device each. Every image of the folder carries its own
number in its first pixels, so a batch says which images it holds. This file is also
the script they run.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from processes import finish, free_port, start

N_PER_CLASS, CLASSES, BATCH, STEPS = 10, 3, 8, 5     # 30 images: 3 steps an epoch; 5 cross one


def _write_folder(root: Path) -> None:
    """Image number i (0..29): an 8×8 RGB PNG whose pixel (0, 0) is i and (0, 1) is 7·i
    mod 256, the rest a smooth pattern; file names sort in number order."""
    for i in range(N_PER_CLASS * CLASSES):
        d = root / "train" / f"class{i % CLASSES}"
        d.mkdir(parents=True, exist_ok=True)
        x = np.add.outer(np.arange(8), np.arange(8)) * 8 + i
        image = np.stack([x, x.T, 255 - x], -1).astype(np.uint8)
        image[0, 0], image[0, 1] = i, (7 * i) % 256
        Image.fromarray(image).save(d / f"{i:03d}.png")
    (root / "val" / "class0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "val" / "class0" / "only.png")


def _numbers(images: np.ndarray) -> np.ndarray:
    """The image numbers written into a batch (pixel values in [0, 1]: no normalisation)."""
    first = np.round(images[:, 0, 0, 0] * 255).astype(int)
    assert np.array_equal(np.round(images[:, 0, 1, 0] * 255).astype(int), (7 * first) % 256)
    return first


def _worker(folder: str, out: str) -> None:
    import jax

    from bayes_transfer import data, models
    from bayes_transfer.data.pipeline import GrainStream
    from bayes_transfer.params import flatten_with_paths
    from bayes_transfer.training import TrainConfig, cross_entropy_loss, fit, host_copy

    spec = data.InputSpec(8, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), eval_ratio=1.0)
    train = data.load(folder, input_spec=spec, in_memory=False, val_per_class=1).train
    assert len(train) == 27
    # What this process reads of every global batch (evaluation transform: exact pixels).
    stream = GrainStream(train, BATCH, seed=4, train=False)
    it = stream.iterator(0, STEPS)
    seen = [_numbers(b["image"]).tolist() for b in it]
    it.close()
    # fit with random-resized crops: the global batch is put together from the shares.
    config = TrainConfig(epochs=STEPS / stream.steps_per_epoch, batch_size=BATCH, seed=4,
                         learning_rate=0.1, augment=True, flip=True, progress=False)
    result = fit(models.create("small_cnn", 3, in_channels=3, width=0.25), train,
                 cross_entropy_loss, config)
    params = flatten_with_paths(host_copy(result.state.params))
    np.savez(os.path.join(out, f"params{jax.process_index()}.npz"), **params)
    Path(out, f"seen{jax.process_index()}.json").write_text(json.dumps(
        {"process": jax.process_index(), "processes": jax.process_count(), "seen": seen,
         "local": stream.process_local}))


def test_two_processes_each_read_their_share_of_every_global_batch(tmp_path):
    from bayes_transfer import data
    from bayes_transfer.data.pipeline import GrainStream

    folder = tmp_path / "numbered"
    _write_folder(folder)
    multi = tmp_path / "multi"
    multi.mkdir()
    port = free_port()
    launch = [sys.executable, "-m", "bayes_transfer.launch", "--coordinator",
              f"127.0.0.1:{port}", "--num-processes", "2", "--timeout", "60"]
    logs = [tmp_path / "p0", tmp_path / "p1"]
    procs = [start([*launch, "--process-id", str(i), __file__, str(folder), str(multi)], 1,
                    logs[i]) for i in range(2)]
    finish(procs, logs, timeout=240)

    shares = [json.loads((multi / f"seen{i}.json").read_text()) for i in range(2)]
    assert [(s["process"], s["processes"], s["local"]) for s in shares] == [
        (0, 2, True), (1, 2, True)]
    # The global batches, as one process computes them.
    spec = data.InputSpec(8, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), eval_ratio=1.0)
    train = data.load(folder, input_spec=spec, in_memory=False, val_per_class=1).train
    whole = GrainStream(train, BATCH, seed=4, train=False, process_index=0, process_count=1)
    it = whole.iterator(0, STEPS)
    expected = [_numbers(b["image"]).tolist() for b in it]
    it.close()
    for step in range(STEPS):
        a, b = shares[0]["seen"][step], shares[1]["seen"][step]
        assert len(a) == len(b) == BATCH // 2
        assert not set(a) & set(b)                       # disjoint shares ...
        assert a + b == expected[step]                   # ... that make the global batch
    # fit ran on the global batches put together from the shares: one replicated state.
    with np.load(multi / "params0.npz") as p0, np.load(multi / "params1.npz") as p1:
        assert p0.files == p1.files and p0.files
        for k in p0.files:
            np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
