"""Batch streams for the training loop: in memory, or streamed through grain.

`batch_stream` turns any dataset into a *stream*, the one thing ``fit`` iterates:

* ``steps_per_epoch``; ``iterator(start, stop)``: the batches of steps ``start ..
  stop − 1`` (numpy dicts ``{"image": float32 NHWC normalised, "label": int32}``), with
  ``close()``; ``state(step)``: a JSON-able description of the position (saved with each
  checkpoint) and ``check_state(saved, step)`` (refuses a checkpoint of other data);
* ``process_local``: whether a batch holds only this JAX process's rows of the global
  batch; ``device_augment``: whether the jitted step should add its random shifts.

An ``ArrayDataset`` gives an `ArrayStream`: the batches of `batches`, exactly as
before (bit for bit). A `StreamedDataset` gives a `GrainStream`:

* **global batches**: the order of an epoch is ``default_rng([seed, epoch])
  .permutation(N)`` (as in memory) and global batch ``b`` its positions ``b·B ..
  (b+1)·B − 1``; example augmentations draw from ``default_rng([seed, epoch, position])``.
  So the batches are a pure function of (seed, step), whatever the number of hosts or
  worker processes, and a resumed run reads exactly the batches it would have read;
* **sharded by JAX process**: with P processes, process p decodes only rows
  ``p·B/P .. (p+1)·B/P − 1`` of every global batch (its devices' rows);
* **worker processes**: ``grain.MapDataset.range(start, stop).map(load one batch)``,
  then ``mp_prefetch`` with the dataset's ``workers``: each worker decodes whole
  batches, and grain interleaves them back in order;
* the uint8 batch is normalised here, in the training process, when it arrives.

`Prefetch` runs an iterator and a placement function (the loop's ``shard_batch``) in a
thread, a few batches ahead, so input overlaps the step.
"""
from __future__ import annotations

import gc
import os
import queue
import signal
import threading
import time
from typing import Callable, Iterator

import numpy as np

from bayes_transfer.data.array_dataset import ArrayDataset
from bayes_transfer.data.batching import batches, num_batches
from bayes_transfer.data.image_ops import normalize_batch
from bayes_transfer.errors import BayesTransferError

_AUGMENT_STREAM = 3          # default_rng([seed, epoch, position, 3]): augmentation
#: One-pass utilities (evaluation, decoding a few-shot set, the unreadable-image check)
#: decode shorter passes in this process: a worker takes seconds to start.
MIN_IMAGES_FOR_WORKERS = 2000


def _grain():
    """grain, with absl's flags marked parsed (grain reads them; a program that does not
    use absl.app never parses them, and grain would raise on first use)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    import grain

    return grain


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
    """grain ``worker_init_fn``: the worker ends when the training process dies, even by
    SIGKILL (a preempted or OOM-killed run leaves no decoding processes behind)."""
    del worker_index, worker_count
    parent = os.getppid()
    try:                                   # Linux: the kernel sends SIGKILL
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch():                           # elsewhere (and as a fallback): poll
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="bt-exit-with-parent").start()


def _check_state(saved: dict | None, expected: dict, step: int) -> None:
    if saved is None:
        return
    mismatch = sorted(k for k in expected if k != "next_step" and saved.get(k) != expected[k])
    if mismatch:
        raise BayesTransferError(
            "the checkpoint was written for other data or data settings ("
            + "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {expected[k]!r}"
                        for k in mismatch)
            + "); resume with the same dataset, batch size and seed, or use a new "
              "--checkpoint-dir")
    if int(saved.get("next_step", step)) != step:
        raise BayesTransferError(f"the checkpoint's data position ({saved['next_step']}) "
                                 f"does not match its training step ({step})")


class ArrayStream:
    """The in-memory batches of `batches`, one epoch after another."""

    process_local = False

    def __init__(self, dataset, batch_size: int, *, seed: int, augment: bool):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.steps_per_epoch = num_batches(dataset, batch_size)
        self.device_augment = augment

    def iterator(self, start: int, stop: int) -> Iterator[dict]:
        spe = self.steps_per_epoch
        epoch, skip, step = start // spe, start % spe, start
        while step < stop:
            for i, batch in enumerate(batches(self.dataset, self.batch_size, seed=self.seed,
                                              epoch=epoch)):
                if i < skip:
                    continue
                if step >= stop:
                    return
                yield batch
                step += 1
            epoch, skip = epoch + 1, 0

    def state(self, step: int) -> dict:
        return {"kind": "arrays", "next_step": int(step), "examples": len(self.dataset),
                "batch_size": self.batch_size, "seed": self.seed}

    def check_state(self, saved: dict | None, step: int) -> None:
        _check_state(saved, self.state(step), step)


class BatchLoader:
    """Step → this process's rows of that step's batch, uint8 (runs in grain workers)."""

    def __init__(self, dataset, batch_size: int, rows: tuple[int, int], *, seed: int,
                 train: bool, flip: bool, shuffle: bool, steps_per_epoch: int):
        self.dataset, self.batch_size, self.rows = dataset, batch_size, rows
        self.seed, self.train, self.flip, self.shuffle = seed, train, flip, shuffle
        self.steps_per_epoch = steps_per_epoch
        self._orders: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_orders"}

    def __setstate__(self, state):
        self.__dict__.update(state, _orders={})

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.dataset)
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)
                            if self.shuffle else np.arange(n)}
        return self._orders[epoch]

    def positions(self, step: int) -> tuple[int, int, int]:
        """(epoch, first, last + 1) positions in the epoch's order of this process's rows."""
        epoch, b = divmod(int(step), self.steps_per_epoch)
        lo = b * self.batch_size
        return epoch, lo + self.rows[0], min(lo + self.rows[1], len(self.dataset))

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, lo, hi = self.positions(step)
        order = self.order(epoch)
        images = []
        for p in range(lo, hi):
            rng = (np.random.default_rng([self.seed, epoch, p, _AUGMENT_STREAM])
                   if self.train else None)
            images.append(self.dataset.example(order[p], rng, flip=self.flip))
        return {"image": np.stack(images), "label": self.dataset.labels[order[lo:hi]]}


class StreamIterator:
    """Batches of steps ``start .. stop − 1`` from grain, normalised; ``close()`` ends the
    worker processes."""

    def __init__(self, loader: BatchLoader, start: int, stop: int, workers: int,
                 normalization=None):
        grain = _grain()
        ds = grain.MapDataset.range(start, stop).map(loader)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=2),
                                worker_init_fn=exit_with_parent)
        self._it = iter(ds)
        self._workers = workers
        self._normalization = normalization
        self._left = max(0, stop - start)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._left <= 0:
            raise StopIteration
        batch = next(self._it)
        self._left -= 1
        # Copies: a worker's batch lives in shared memory, released with its array.
        image = (np.array(batch["image"]) if self._normalization is None
                 else normalize_batch(batch["image"], *self._normalization))
        return {"image": image, "label": np.array(batch["label"], np.int32)}

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it, self._left = iter(()), 0    # drop grain's iterators (and their buffers)
        if self._workers:
            # grain's iterators hold the last shared-memory batch in a reference cycle:
            # collect it now, not at exit (where it would be reported as leaked).
            gc.collect()


class GrainStream:
    """Batches of a `StreamedDataset` through grain (see the module docstring).

    ``train``: random-resized crops (and flips with ``flip``); otherwise resize + centre
    crop. ``process_index``/``process_count`` default to JAX's.
    """

    device_augment = False

    def __init__(self, dataset, batch_size: int, *, seed: int, train: bool, flip: bool = True,
                 shuffle: bool = True, drop_remainder: bool = True,
                 process_index: int | None = None, process_count: int | None = None):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        n = len(dataset)
        if n == 0:
            raise BayesTransferError(f"dataset {dataset.name!r} has no examples")
        self.dataset, self.seed, self.train = dataset, seed, train
        self.batch_size = min(batch_size, n)
        self.steps_per_epoch = num_batches(n, batch_size, drop_remainder=drop_remainder)
        self.process_local = process_count > 1
        if self.batch_size % process_count:
            raise BayesTransferError(
                f"the global batch of {self.batch_size} does not split over {process_count} "
                f"processes; use a batch size divisible by {process_count}")
        local = self.batch_size // process_count
        rows = (process_index * local, (process_index + 1) * local)
        self.loader = BatchLoader(dataset, self.batch_size, rows, seed=seed, train=train,
                                  flip=flip, shuffle=shuffle,
                                  steps_per_epoch=self.steps_per_epoch)

    def iterator(self, start: int, stop: int, *, normalize: bool = True,
                 workers: int | None = None) -> StreamIterator:
        """Batches of steps ``start .. stop − 1`` (``workers``: the dataset's by default)."""
        workers = self.dataset.workers if workers is None else workers
        return StreamIterator(self.loader, start, stop, workers,
                              self.dataset.normalization if normalize else None)

    def state(self, step: int) -> dict:
        return {"kind": "streamed", "next_step": int(step), "data": self.dataset.fingerprint,
                "batch_size": self.batch_size, "seed": self.seed, "train": self.train,
                "flip": self.loader.flip}

    def check_state(self, saved: dict | None, step: int) -> None:
        _check_state(saved, self.state(step), step)


def batch_stream(dataset, batch_size: int, *, seed: int, augment: bool = False,
                 flip: bool = False):
    """The training stream of ``dataset`` (see the module docstring).

    In memory, ``augment``/``flip`` are the jitted step's random shifts and flips; for a
    streamed dataset ``augment`` means random-resized crops (flipped if ``flip``),
    made by the workers, and no augmentation means resize + centre crop.
    """
    if isinstance(dataset, ArrayDataset) or not hasattr(dataset, "source"):
        return ArrayStream(dataset, batch_size, seed=seed, augment=augment)
    return GrainStream(dataset, batch_size, seed=seed, train=augment, flip=flip)


def _pass_workers(dataset, images: int) -> int:
    """Worker processes for one pass over ``images`` images: none for a short pass
    (starting a worker costs seconds, the time to decode a few thousand images)."""
    return dataset.workers if images >= MIN_IMAGES_FOR_WORKERS else 0


def eval_batches(dataset, batch_size: int, *, seed: int, epoch: int, shuffle: bool,
                 drop_remainder: bool) -> Iterator[dict]:
    """One epoch of a streamed dataset, evaluation transform, all on this process."""
    stream = GrainStream(dataset, batch_size, seed=seed, train=False, shuffle=shuffle,
                         drop_remainder=drop_remainder, process_index=0, process_count=1)
    spe = stream.steps_per_epoch
    it = stream.iterator(epoch * spe, (epoch + 1) * spe,
                         workers=_pass_workers(dataset, spe * stream.batch_size))
    try:
        yield from it
    finally:
        it.close()


def decode_all(dataset, batch_size: int = 64) -> np.ndarray:
    """Every example of a streamed dataset in order, evaluation transform, uint8."""
    stream = GrainStream(dataset, batch_size, seed=0, train=False, shuffle=False,
                         drop_remainder=False, process_index=0, process_count=1)
    it = stream.iterator(0, stream.steps_per_epoch, normalize=False,
                         workers=_pass_workers(dataset, len(dataset)))
    try:
        return np.concatenate([b["image"] for b in it])
    finally:
        it.close()


class _Checker:
    """Chunk → [(position, message)] of the examples in it that cannot be decoded."""

    def __init__(self, dataset, chunk: int):
        self.dataset, self.chunk = dataset, chunk

    def __call__(self, c: int):
        bad = []
        for i in range(c * self.chunk, min((c + 1) * self.chunk, len(self.dataset))):
            try:
                self.dataset.example(i)
            except BayesTransferError as e:
                bad.append((i, str(e).split("; replace or remove it")[0]))
        return bad


def find_unreadable(dataset, chunk: int = 64) -> list[tuple[int, str]]:
    """``(position, message)`` of every example of ``dataset`` that does not decode
    (each decoded once, by the dataset's worker processes)."""
    grain = _grain()
    chunks = -(-len(dataset) // chunk)
    ds = grain.MapDataset.range(chunks).map(_Checker(dataset, chunk))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    workers = _pass_workers(dataset, len(dataset))
    if workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                            worker_init_fn=exit_with_parent)
    it = iter(ds)
    try:
        return [item for _ in range(chunks) for item in next(it)]
    finally:
        getattr(it, "close", lambda: None)()


class Prefetch:
    """``place(batch)`` for the batches of ``iterator``, ``depth`` ahead, in a thread.

    An exception in the thread (a file that does not decode) is raised by ``next``;
    ``close()`` stops the thread and closes ``iterator``.
    """

    def __init__(self, iterator, place: Callable, depth: int = 2):
        self._iterator, self._place = iterator, place
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bt-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for batch in self._iterator:
                if not self._put(("batch", self._place(batch))):
                    return
            self._put(("end", None))
        except BaseException as e:      # handed to the training thread, raised there
            self._put(("error", e))

    def __iter__(self):
        return self

    def __next__(self):
        kind, item = self._queue.get()
        if kind == "batch":
            return item
        self._queue.put((kind, item))     # stays exhausted / failed
        if kind == "end":
            raise StopIteration
        raise item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def prefetch(iterator, place: Callable, depth: int = 2):
    """A generator over `Prefetch` (``place(batch)``, ``depth`` ahead, in a thread) that
    stops the thread and closes ``iterator`` when it is closed or garbage-collected."""
    ahead = Prefetch(iterator, place, depth)
    try:
        yield from ahead
    finally:
        ahead.close()
