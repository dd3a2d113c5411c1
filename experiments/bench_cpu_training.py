"""Training throughput on the CPU: the toolkit's loop, a bare JAX step and PyTorch.

    python experiments/bench_cpu_training.py [--arch small_cnn resnet20] [--rounds 5]

For each architecture, on the same real Fashion-MNIST images (batch 128, SGD with
momentum, forward + backward + update), it times in one process, alternating:

* ``toolkit``: ``bayes_transfer.training.fit`` (the one training loop: batching,
  sharding, progress, metrics), over one JAX device per core as the CLI runs it
  (``use_cpu_cores``; ``BAYES_TRANSFER_CPU_DEVICES=1``: one device);
* ``bare``: one jitted Flax NNX + optax step over pre-loaded batches, compiled with each
  set of XLA:CPU options in ``CANDIDATES`` (per-compilation options, so every candidate
  runs in this same process);
* ``torch``: the same layers in PyTorch (when installed), ``torch.set_num_threads`` =
  the cores JAX sees.

It prints images/s (median over rounds) and the ratios to PyTorch and to the bare JAX
step. ``--profile`` also times the layers alone in JAX and in PyTorch: each
convolution of small_cnn and resnet20 (forward, gradients with respect to the input and
to the kernel), max-pooling and BatchNorm + ReLU. Timings are
medians of alternating rounds, so load from other processes hits every variant alike.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bayes_transfer as bt
from bayes_transfer.models import small_cnn
from bayes_transfer.models._base import max_pool

_D = "LIBRARY_FUSION_TYPE_"
#: XLA:CPU options tried for the bare step (name -> compiler options); the fusion-type
#: values are the enum names XLA 0.10's flag parser accepts.
CANDIDATES = {
    "default": {},
    "ynn dot": {"xla_cpu_experimental_ynn_fusion_type": f"{_D}INDIVIDUAL_DOT"},
    "ynn dot+conv": {"xla_cpu_experimental_ynn_fusion_type":
                     f"{_D}INDIVIDUAL_DOT,{_D}INDIVIDUAL_CONVOLUTION"},
    "xnn dot+conv": {"xla_cpu_experimental_xnn_fusion_type":
                     f"{_D}INDIVIDUAL_DOT,{_D}INDIVIDUAL_CONVOLUTION"},
    "onednn": {"xla_cpu_use_onednn": True},
}


def _data(n: int):
    train = bt.data.load("fashion_mnist", seed=0).train.subset(np.arange(n))
    batches = list(bt.data.batches(train, 128, seed=0, epoch=0))
    return train, batches


def _bare_steps(model, batches, options: dict):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.05, momentum=0.9)

    def step(params, rest, opt, x, y):
        def loss(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            logits = m(x, train=True)
            return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
                    nnx.state(m, nnx.Not(nnx.Param)))
        (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), rest, opt, value

    state = (params, rest, tx.init(params))
    xs = [(jnp.asarray(b["image"]), jnp.asarray(b["label"])) for b in batches]

    def compile_step(options):
        # a fresh function object each time: jit's trace cache is keyed on it
        return jax.jit(lambda *a: step(*a)).lower(*state, *xs[0]).compile(
            compiler_options=options)

    compiled = {name: compile_step(o) for name, o in options.items()}
    if "default" in options:
        # the same step with flax's reduce-window max-pool, whose select-and-scatter
        # gradient the models replaced with models._base.max_pool (docs/benchmarks.md)
        with _flax_max_pool():
            compiled["default, flax max-pool"] = compile_step({})

    def runner(fn):
        def run():
            p, r, o = state
            for x, y in xs:
                p, r, o, _ = fn(p, r, o, x, y)
            jax.block_until_ready(p)
        return run
    return {f"bare {name}": runner(fn) for name, fn in compiled.items()}


@contextlib.contextmanager
def _flax_max_pool():
    """Trace small_cnn with ``nnx.max_pool`` in place of ``models._base.max_pool``."""
    saved = small_cnn.max_pool

    def pool(x, window, stride, padding=0):
        pad = ((padding, padding), (padding, padding)) if padding else "VALID"
        return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=pad)

    small_cnn.max_pool = pool
    try:
        yield
    finally:
        small_cnn.max_pool = saved


def _toolkit(model, train):
    config = bt.TrainConfig(epochs=1, batch_size=128, optimizer="sgd", learning_rate=0.05,
                            schedule="constant", progress=False)

    def run():
        jax.block_until_ready(bt.fit(model, train, bt.training.cross_entropy_loss,
                                     config).state.params)
    return run


def _torch_model(arch: str, torch):
    nn = torch.nn

    def cbr(i, o, stride=1):
        return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    if arch == "small_cnn":
        return nn.Sequential(*cbr(1, 32), nn.MaxPool2d(2), *cbr(32, 64), *cbr(64, 64),
                             nn.MaxPool2d(2), *cbr(64, 128), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(128, 10))

    class Block(nn.Module):          # CIFAR BasicBlock, option-A shortcut
        def __init__(self, i, o, stride):
            super().__init__()
            self.body = nn.Sequential(*cbr(i, o, stride), nn.Conv2d(o, o, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(o))
            self.stride, self.extra = stride, o - i

        def forward(self, x):
            s = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.extra:
                s = nn.functional.pad(s, (0, 0, 0, 0, self.extra // 2,
                                          self.extra - self.extra // 2))
            return torch.relu(self.body(x) + s)

    layers, ch = cbr(1, 16), 16
    for i, planes in enumerate((16, 32, 64)):
        for j in range(3):
            layers.append(Block(ch, planes, 2 if i > 0 and j == 0 else 1))
            ch = planes
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _torch(arch: str, batches, torch):
    model = _torch_model(arch, torch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xs = [(torch.from_numpy(np.ascontiguousarray(b["image"].transpose(0, 3, 1, 2))),
           torch.from_numpy(b["label"].astype(np.int64))) for b in batches]

    def run():
        for x, y in xs:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return run


def _time(fns: dict, rounds: int, images: int) -> tuple[dict, dict]:
    """({name: images per wall second}, {name: images per CPU second of this process})."""
    for fn in fns.values():      # warm-up: compiles
        fn()
    wall, cpu = ({name: [] for name in fns} for _ in range(2))
    for _ in range(rounds):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return ({name: images / statistics.median(ts) for name, ts in wall.items()},
            {name: images / statistics.median(ts) for name, ts in cpu.items()})


def _profile(torch, reps: int = 7) -> None:
    """The layers alone, batch 128 (milliseconds of this process's CPU time, medians):
    each convolution of small_cnn and resnet20 (JAX forward, input and kernel gradients
    vs PyTorch forward, forward + backward), max-pooling and BatchNorm + ReLU (forward +
    gradient)."""

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def ms(fn):
        jax.block_until_ready(fn())
        ts = []
        for _ in range(reps):
            t = time.process_time()
            jax.block_until_ready(fn())
            ts.append(time.process_time() - t)
        return 1e3 * statistics.median(ts)

    def tgrad(fn, *xs):
        return lambda: torch.autograd.grad(fn(), xs, allow_unused=True)

    print("\nconvolutions, ms: JAX fwd / dx / dw (sum)   PyTorch fwd, fwd+bwd")
    for hw, cin, cout in ((28, 1, 32), (14, 32, 64), (14, 64, 64), (7, 64, 128),
                          (28, 16, 16), (14, 32, 32), (7, 64, 64)):
        x, w = jnp.ones((128, hw, hw, cin)), jnp.full((3, 3, cin, cout), 0.01)
        g = jnp.ones((128, hw, hw, cout))
        fwd = jax.jit(conv)
        dx = jax.jit(lambda g, x=x, w=w: jax.vjp(conv, x, w)[1](g)[0])
        dw = jax.jit(lambda g, x=x, w=w: jax.vjp(conv, x, w)[1](g)[1])
        tx = torch.ones(128, cin, hw, hw, requires_grad=True)
        tw = torch.full((cout, cin, 3, 3), 0.01, requires_grad=True)
        tg = torch.ones(128, cout, hw, hw)

        def t_fwd():
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, padding=1)

        def t_both():
            y = torch.nn.functional.conv2d(tx, tw, padding=1)
            return torch.autograd.grad(y, (tx, tw), tg)

        j = [ms(lambda: fwd(x, w)), ms(lambda: dx(g)), ms(lambda: dw(g))]
        print(f"  {hw:2d}x{hw:<2d} {cin:3d}->{cout:<3d}  JAX {j[0]:6.2f} {j[1]:6.2f} {j[2]:6.2f}"
              f" ({sum(j):6.2f})   PyTorch {ms(t_fwd):6.2f} {ms(t_both):6.2f}")

    rng = np.random.RandomState(0)
    print("max-pool forward + gradient, ms: nnx.max_pool, models._base.max_pool, PyTorch")
    for shape, (k, st, pad) in (((128, 28, 28, 32), (2, 2, 0)), ((128, 14, 14, 64), (2, 2, 0)),
                                ((32, 112, 112, 64), (3, 2, 1))):
        x = jnp.asarray(rng.randn(*shape).astype(np.float32))
        padding = ((pad, pad), (pad, pad)) if pad else "VALID"
        flax_pool = jax.jit(jax.grad(lambda x: jnp.sum(nnx.max_pool(
            x, (k, k), strides=(st, st), padding=padding) ** 2)))
        ours = jax.jit(jax.grad(lambda x: jnp.sum(max_pool(x, k, st, pad) ** 2)))
        tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
        t = tgrad(lambda: (torch.nn.functional.max_pool2d(tx, k, st, pad) ** 2).sum(), tx)
        print(f"  {shape} {k}x{k}/{st}: {ms(lambda: flax_pool(x)):7.2f} "
              f"{ms(lambda: ours(x)):7.2f} {ms(t):7.2f}")

    print("BatchNorm (train) + ReLU, forward + gradient, ms: nnx, PyTorch")
    for shape in ((128, 28, 28, 16), (128, 14, 14, 32), (128, 7, 7, 64)):
        bn = nnx.BatchNorm(shape[-1], momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(bn)
        x = jnp.asarray(rng.randn(*shape).astype(np.float32))

        def f(state, x):
            m = nnx.merge(graphdef, state)
            return jnp.sum(jax.nn.relu(m(x, use_running_average=False)) ** 2)

        grad = jax.jit(jax.grad(f, argnums=(0, 1)))
        tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
        tbn = torch.nn.BatchNorm2d(shape[-1])
        t = tgrad(lambda: (torch.relu(tbn(tx)) ** 2).sum(), tx, *tbn.parameters())
        print(f"  {shape}: {ms(lambda: grad(state, x)):7.2f} {ms(t):7.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["small_cnn", "resnet20"])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--candidates", nargs="*", default=list(CANDIDATES),
                   help="XLA:CPU option sets for the bare step (names of CANDIDATES)")
    p.add_argument("--profile", action="store_true", help="also time the layers alone")
    p.add_argument("--one-thread", action="store_true",
                   help="JAX and PyTorch on one thread each (a fair work comparison on a "
                        "machine other jobs share)")
    args = p.parse_args(argv)
    if args.one_thread:      # before JAX starts its backend, which reads XLA_FLAGS
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()
    else:    # one JAX device per core, as the CLI has it: `fit` splits each batch over them
        bt.training.use_cpu_cores()
    try:
        import torch
        torch.set_num_threads(1 if args.one_thread else os.cpu_count() or 1)
    except ImportError:
        torch = None
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{len(jax.devices())} "
          f"(toolkit over all, bare step on one), "
          f"{os.cpu_count()} cores; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"torch {torch.__version__ if torch else 'not installed'}")
    train, batches = _data(args.images)
    images = len(batches) * 128
    for arch in args.arch:
        model = bt.models.create(arch, 10, seed=0)
        fns = {"toolkit": _toolkit(model, train),
               **_bare_steps(model, batches, {k: CANDIDATES[k] for k in args.candidates})}
        if torch is not None:
            fns["torch"] = _torch(arch, batches, torch)
        rates = _time(fns, args.rounds, images)
        print(f"\n{arch}: median of {args.rounds} alternating rounds of {len(batches)} steps")
        for label, rate in zip(("images/s (wall)", "images per CPU-second"), rates):
            print(f"  {label}")
            base = rate.get("bare default")
            for name, r in rate.items():
                ratios = [f"x{r / base:.2f} bare default" if base else "",
                          f"x{r / rate['torch']:.2f} PyTorch" if "torch" in rate else ""]
                print(f"    {name:18s} {r:7.0f}   " + "   ".join(x for x in ratios if x))
    if args.profile and torch is not None:
        _profile(torch)


if __name__ == "__main__":
    main()
