"""Benchmark: peak memory of loading a ResNet-50-scale prior artifact and using it.

    python experiments/bench_memory.py                      # d = 23,508,032, K = 20
    python experiments/bench_memory.py --d 1e6 --keep       # quick; keep the artifacts

d = 23,508,032 is the ResNet-50 backbone (torchvision layout, 159 arrays: every conv
kernel and batch-norm scale/bias, no classifier). For each storage dtype (float32,
bfloat16) a writer subprocess builds a low-rank prior (K = 20) from synthetic
SWAG-like arrays and saves it with ``save_prior``. Then every case runs in a fresh
subprocess that

1. imports jax and bayes_transfer,
2. loads the artifact with ``load_prior`` (``verify=True``: every file is hashed),
3. computes ``jax.jit(jax.value_and_grad(prior.log_prob))`` twice, at θ given either
   as one flat (d,) float32 vector (``flat``) or as the 159-leaf parameter tree of the
   network (``tree``; ``log_prob`` ravels it, the gradient comes back as a tree),

and records the resident set (``/proc/self/statm``) and the peak resident set
(``resource.getrusage(...).ru_maxrss``) after each step. ``net`` is the peak minus the
peak of a process that only imported jax and bayes_transfer (measured in its own
subprocess, reported as ``baseline``). The target is (K + 4)·d·4 bytes: the float32
factor, mean and variance, θ and the gradient. With bfloat16 storage the stored arrays
take (K + 2)·d·2 bytes, θ and the gradient stay float32: (K + 6)·d·2 in all, 0.54× the
float32 target. The same steps on a float32 artifact with d = 4,096 give the part of
``net`` that does not grow with d (XLA's compiler, its code and heap), reported as
``fixed``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

MiB = 2 ** 20
RESNET50_BACKBONE = 23_508_032
TINY_D = 4096          # the d-independent part of the memory (compiler, runtime)


def resnet50_backbone_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """(path, HWIO/vector shape) of the torchvision ResNet-50 backbone's parameters."""
    out = [("backbone/stem/conv/kernel", (7, 7, 3, 64)), ("backbone/stem/bn/scale", (64,)),
           ("backbone/stem/bn/bias", (64,))]
    cin = 64
    for li, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], 1):
        for b in range(blocks):
            p = f"backbone/layer{li}/{b}"
            convs = [("conv1", 1, cin, width), ("conv2", 3, width, width),
                     ("conv3", 1, width, 4 * width)]
            if b == 0:
                convs.append(("downsample", 1, cin, 4 * width))
            for name, k, a, o in convs:
                bn = "downsample/bn" if name == "downsample" else f"bn{name[-1]}"
                conv = "downsample/conv" if name == "downsample" else name
                out += [(f"{p}/{conv}/kernel", (k, k, a, o)), (f"{p}/{bn}/scale", (o,)),
                        (f"{p}/{bn}/bias", (o,))]
            cin = 4 * width
    assert sum(math.prod(s) for _, s in out) == RESNET50_BACKBONE
    return out


def _spec(d: int):
    """The ResNet-50 spec for d = 23,508,032; one flat array otherwise."""
    from bayes_transfer.params import ParamSpec

    if d == RESNET50_BACKBONE:
        shapes = resnet50_backbone_shapes()
        return ParamSpec(paths=tuple(p for p, _ in shapes), shapes=tuple(s for _, s in shapes),
                         dtypes=("float32",) * len(shapes))
    return ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float32",))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux


def _reset_peak() -> bool:
    """Reset the peak resident set (Linux ≥ 4.0: clear_refs 5), so the next step's peak
    is its own; False where that is not possible (peaks are then cumulative)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ====================================================================== children
def child_write(d: int, rank: int, dtype: str, path: str) -> dict:
    """Build a low-rank prior from SWAG-like synthetic arrays and save it."""
    import jax.numpy as jnp
    import numpy as np

    import bayes_transfer as bt
    from bayes_transfer.prior import Prior

    t = time.perf_counter()
    rng = np.random.default_rng(0)
    mean = (0.05 * rng.standard_normal(d, dtype=np.float32))
    var = np.exp(rng.uniform(math.log(1e-9), math.log(1e-3), d)).astype(np.float32)
    dev = np.empty((rank, d), np.float32)
    for k in range(rank):            # row by row: no (K, d) float64 temporary
        dev[k] = rng.standard_normal(d, dtype=np.float32)
        dev[k] *= 1e-3
    prior = Prior.lowrank(_spec(d), mean, var, dev, scale=10.0, floor=1e-9)
    del mean, var, dev
    if dtype == "bfloat16":
        prior = prior.astype(jnp.bfloat16)
    bt.save_prior(prior, path, metadata={"architecture": {"arch": "resnet50-synthetic"},
                                         "source": {"dataset": "synthetic"}}, overwrite=True)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return {"bytes_on_disk": size, "write_s": time.perf_counter() - t}


def child_baseline() -> dict:
    import importlib
    for module in ("jax", "bayes_transfer"):
        importlib.import_module(module)
    return {"peak": _peak(), "rss": _rss()}


def child_load(path: str, theta_kind: str) -> dict:
    """Each step records the resident set after it and its own peak (reset in between)."""
    steps = []
    resets = []

    def record(name):
        steps.append({"step": name, "rss": _rss(), "peak": _peak(),
                      "t": time.perf_counter() - t0})
        resets.append(_reset_peak())

    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    import bayes_transfer as bt
    from bayes_transfer.artifacts import arrays as artifact_arrays
    from bayes_transfer.artifacts import io as artifact_io
    from bayes_transfer.prior.woodbury import all_finite   # fused: no (d,) boolean array
    record("import jax, bayes_transfer")

    def traced_read_arrays(*args, **kwargs):      # the load's read step, measured apart
        out = artifact_arrays.read_arrays(*args, **kwargs)
        record("load: read arrays")
        return out

    artifact_io.read_arrays = traced_read_arrays    # what read_prior calls
    try:
        prior = bt.load_prior(path, verify=True)
    finally:
        artifact_io.read_arrays = artifact_arrays.read_arrays
    jax.block_until_ready(prior)
    record("load: to JAX, validate, Cholesky")

    d = prior.dim

    @jax.jit
    def make_theta(mean):
        return mean.astype(jnp.float32) + 1e-3 * jnp.cos(0.7 * jnp.arange(d, dtype=jnp.float32))

    theta = make_theta(prior.mean)
    if theta_kind == "tree":
        flat = theta
        theta = _nest(jax.jit(prior.spec.unravel)(flat))
        del flat
    jax.block_until_ready(theta)
    record(f"θ built ({theta_kind})")
    value_and_grad = jax.jit(lambda p, x: jax.value_and_grad(p.log_prob)(x))
    lp, g = value_and_grad(prior, theta)
    jax.block_until_ready((lp, g))
    record("log_prob + grad, 1st call (compiles)")
    finite = bool(jnp.isfinite(lp)) and all(bool(all_finite(x)) for x in jax.tree.leaves(g))
    del lp, g
    lp, g = value_and_grad(prior, theta)
    jax.block_until_ready((lp, g))
    record("log_prob + grad, 2nd call")
    return {"steps": steps, "finite": finite, "lp": float(lp), "d": d, "rank": prior.rank,
            "dtype": str(prior.deviations.dtype), "nbytes": prior.nbytes,
            "phase_peaks": all(resets)}


def _nest(flat: dict) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict = {}
    for path, x in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return tree


CHILDREN = {"write": child_write, "baseline": child_baseline, "load": child_load}


def run_child(*args: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-3:] or ["?"]
        return {"error": f"exit {out.returncode}: " + " | ".join(tail)}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ====================================================================== main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=float, default=RESNET50_BACKBONE,
                    help="number of parameters (default: the ResNet-50 backbone)")
    ap.add_argument("--rank", type=int, default=20, help="K, the number of deviation rows")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--theta", default="flat,tree", help="θ as a flat vector and/or a tree")
    ap.add_argument("--workdir", default=None, help="where the artifacts are written "
                                                    "(default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the artifacts")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        name, *rest = args.child
        kwargs = {"write": lambda: child_write(int(rest[0]), int(rest[1]), rest[2], rest[3]),
                  "baseline": child_baseline,
                  "load": lambda: child_load(rest[0], rest[1])}
        print(json.dumps(kwargs[name]()))
        return

    d, rank = int(args.d), args.rank
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_memory-")
    os.makedirs(workdir, exist_ok=True)
    import jax
    print(f"# bench_memory  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"jax {jax.__version__}  backend {jax.default_backend()}  {os.cpu_count()} CPU "
          f"cores  {platform.processor() or platform.machine()}  load avg "
          f"{os.getloadavg()[0]:.1f}")
    print(f"# d = {d:,}, K = {rank}; target (K+4)·d·4 = {(rank + 4) * d * 4 / MiB:.0f} MiB; "
          f"memory in MiB")
    try:
        base = run_child("baseline")
        print(f"# baseline (a process that imported jax and bayes_transfer): peak "
              f"{base['peak'] / MiB:.0f} MiB, resident {base['rss'] / MiB:.0f} MiB")
        tiny = os.path.join(workdir, f"prior-{TINY_D}-{rank}-float32")
        if not (args.keep and os.path.exists(os.path.join(tiny, "metadata.json"))):
            run_child("write", str(TINY_D), str(rank), "float32", tiny)
        fixed = run_child("load", tiny, "flat")
        if "error" not in fixed:
            fixed_net = max(x["peak"] for x in fixed["steps"]) - base["peak"]
            print(f"# fixed: the same steps with d = {TINY_D:,} (float32, θ flat): net peak "
                  f"{fixed_net / MiB:.0f} MiB")
        results = {}
        for dtype in args.dtypes.split(","):
            path = os.path.join(workdir, f"prior-{d}-{rank}-{dtype}")
            if not (args.keep and os.path.exists(os.path.join(path, "metadata.json"))):
                w = run_child("write", str(d), str(rank), dtype, path)
                if "error" in w:
                    print(f"# writing the {dtype} artifact failed: {w['error']}")
                    continue
                print(f"# {dtype} artifact: {w['bytes_on_disk'] / MiB:.0f} MiB on disk, "
                      f"written in {w['write_s']:.0f} s")
            for theta in args.theta.split(","):
                results[dtype, theta] = r = run_child("load", path, theta)
                print(json.dumps({"dtype": dtype, "theta": theta, **r}), file=sys.stderr)
        target = (rank + 4) * d * 4

        def phase(r, prefix):      # the highest peak of the steps whose name starts so
            return max(x["peak"] for x in r["steps"] if x["step"].startswith(prefix))

        print("\n## peak resident memory above the baseline peak, MiB")
        print("# net = whole process; load = load_prior (read, to JAX, validation, "
              "Cholesky); lp+grad = building θ and two jitted value_and_grad calls, after "
              "the load; held = resident after the last call")
        print(f"{'storage':>9} {'θ':>5} {'raw':>6} {'net':>6} {'target':>6} {'net/tgt':>7} "
              f"{'load':>6} {'lp+grad':>7} {'/tgt':>5} {'held':>6} {'finite':>6}")
        nets = {}
        for (dtype, theta), r in results.items():
            if "error" in r:
                print(f"{dtype:>9} {theta:>5} error: {r['error']}")
                continue
            raw = max(x["peak"] for x in r["steps"])
            net, load = raw - base["peak"], phase(r, "load") - base["peak"]
            use = max(phase(r, "θ"), phase(r, "log_prob")) - base["peak"]
            held = r["steps"][-1]["rss"] - base["peak"]
            nets[dtype, theta] = (net, use)
            print(f"{dtype:>9} {theta:>5} {raw / MiB:6.0f} {net / MiB:6.0f} {target / MiB:6.0f} "
                  f"{net / target:7.2f} {load / MiB:6.0f} {use / MiB:7.0f} {use / target:5.2f} "
                  f"{held / MiB:6.0f} {str(r['finite']):>6}")
        if not all(r.get("phase_peaks", True) for r in results.values()):
            print("# (peaks could not be reset between steps here: they are cumulative)")
        for theta in args.theta.split(","):
            if ("float32", theta) in nets and ("bfloat16", theta) in nets:
                (na, ua), (nb, ub) = nets["float32", theta], nets["bfloat16", theta]
                b16 = results["bfloat16", theta]["nbytes"]
                f32 = results["float32", theta]["nbytes"]
                print(f"# θ {theta}: bfloat16 / float32: net peak {nb / na:.2f}, lp+grad peak "
                      f"{ub / ua:.2f}, stored arrays {b16 / f32:.2f} ({b16 / MiB:.0f} vs "
                      f"{f32 / MiB:.0f} MiB); (K+6)·d·2 / (K+4)·d·4 = "
                      f"{(rank + 6) / (2 * (rank + 4)):.2f}")
        print("\n## each step: resident after it (its own peak), MiB above the baseline peak")
        for (dtype, theta), r in results.items():
            if "error" in r:
                continue
            print(f"# {dtype}, θ {theta}:")
            for x in r["steps"]:
                print(f"   {x['step']:<38} {(x['rss'] - base['peak']) / MiB:7.0f} "
                      f"({(x['peak'] - base['peak']) / MiB:7.0f})  t={x['t']:6.1f} s")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
