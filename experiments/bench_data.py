"""Benchmarks of the streamed input pipeline (numbers in docs/data.md).

    python experiments/make_image_folder.py /tmp/fm10k --train 10000 --val 100
    python experiments/make_image_folder.py /tmp/fm40k --train 40000 --val 100
    python experiments/bench_data.py throughput /tmp/fm10k [--workers 0 1 2] [--batches 40]
    python experiments/bench_data.py memory /tmp/fm10k /tmp/fm40k [--workers 2]
    python experiments/bench_data.py step /tmp/fm10k [--arch resnet18] [--steps 8]

* ``throughput``: training batches (random-resized crop + flip to 224², normalised) per
  second out of the pipeline with 0, 1, 2 worker processes, after the first batch (the
  worker start-up is reported separately).
* ``memory``: peak resident memory (this process plus its workers, sampled every 50 ms)
  of one pass over every training image of each folder, each in a fresh process.
* ``step``: the training step on pre-loaded arrays (the same images decoded into memory
  first) against the same step fed by the streamed pipeline: marginal seconds per step,
  from two runs of 2 and 2 + N steps, so compilation and start-up cancel out.

Each prints one JSON line per measurement. Run them on an otherwise idle machine and say
in the docs if it was not (``uptime`` before and after is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _uptime() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _dataset(folder: str, workers: int, size: int = 224):
    from bayes_transfer import data
    from bayes_transfer.data.image_folder import open_folder

    source = open_folder(folder)["train"]
    return data.StreamedDataset.from_source(source, data.InputSpec(size), workers=workers)


def throughput(args) -> None:
    from bayes_transfer.data.pipeline import GrainStream

    for workers in args.workers:
        ds = _dataset(args.folder, workers)
        stream = GrainStream(ds, args.batch_size, seed=0, train=True, flip=True)
        t0 = time.perf_counter()
        it = stream.iterator(0, args.batches + 1)
        next(it)
        t1 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        t2 = time.perf_counter()
        it.close()
        print(json.dumps({"bench": "throughput", "workers": workers, "image_size": 224,
                          "batch_size": args.batch_size, "batches": args.batches,
                          "first_batch_s": round(t1 - t0, 2),
                          "images_per_s": round(args.batches * args.batch_size / (t2 - t1), 1),
                          "load": _uptime()}), flush=True)


def _tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def one_pass(args) -> None:
    """(in a fresh process) one pass over every training image; peak RSS of the tree."""
    from bayes_transfer.data.pipeline import GrainStream

    ds = _dataset(args.folder, args.workers)
    peak, stop = [_tree_rss()], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    stream = GrainStream(ds, args.batch_size, seed=0, train=True, flip=True)
    t0 = time.perf_counter()
    it = stream.iterator(0, stream.steps_per_epoch)
    n = sum(len(b["label"]) for b in it)
    seconds = time.perf_counter() - t0
    peak[0] = max(peak[0], _tree_rss())
    it.close()
    stop.set()
    print(json.dumps({"bench": "memory", "folder": args.folder, "images": n,
                      "workers": args.workers, "peak_rss_mb": round(peak[0] / 2**20),
                      "seconds": round(seconds, 1), "load": _uptime()}), flush=True)


def memory(args) -> None:
    for folder in args.folders:
        subprocess.run([sys.executable, __file__, "one-pass", folder, "--workers",
                        str(args.workers), "--batch-size", str(args.batch_size)], check=True)


def step(args) -> None:
    import numpy as np

    from bayes_transfer import models
    from bayes_transfer.training import TrainConfig, cross_entropy_loss, fit

    streamed = _dataset(args.folder, args.workers).subset(np.arange(args.images))
    t0 = time.perf_counter()
    preloaded = streamed.materialize()      # the same images, decoded into memory first
    decode_s = time.perf_counter() - t0
    results = {}
    for name, ds in (("preloaded", preloaded), ("streamed", streamed)):
        times = []
        for steps in (2, 2 + args.steps):
            model = models.create(args.arch, 10, in_channels=3, seed=0)
            config = TrainConfig(steps=steps, batch_size=args.batch_size, learning_rate=0.01,
                                 progress=False)
            t = time.perf_counter()
            fit(model, ds, cross_entropy_loss, config)
            times.append(time.perf_counter() - t)
        results[name] = (times[1] - times[0]) / args.steps
    print(json.dumps({"bench": "step", "arch": args.arch, "image_size": 224,
                      "batch_size": args.batch_size, "workers": args.workers,
                      "steps": args.steps, "preloaded_s_per_step": round(results["preloaded"], 3),
                      "streamed_s_per_step": round(results["streamed"], 3),
                      "streamed_over_preloaded": round(results["streamed"] /
                                                       results["preloaded"], 3),
                      "decode_into_memory_s": round(decode_s, 1), "load": _uptime()}),
          flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("folder")
    t.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--batches", type=int, default=40)
    t.add_argument("--batch-size", type=int, default=64)
    m = sub.add_parser("memory")
    m.add_argument("folders", nargs="+")
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--batch-size", type=int, default=64)
    o = sub.add_parser("one-pass")
    o.add_argument("folder")
    o.add_argument("--workers", type=int, default=2)
    o.add_argument("--batch-size", type=int, default=64)
    s = sub.add_parser("step")
    s.add_argument("folder")
    s.add_argument("--arch", default="resnet18")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--images", type=int, default=512)
    s.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    print(f"# load average before: {_uptime()} ({os.cpu_count()} CPUs)", flush=True)
    {"throughput": throughput, "memory": memory, "one-pass": one_pass, "step": step}[
        args.bench](args)
    print(f"# load average after: {_uptime()}", flush=True)


if __name__ == "__main__":
    main()
