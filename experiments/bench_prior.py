"""Benchmark: the Prior's log-density + gradient, and SWAG collection, at large d.

    python experiments/bench_prior.py                       # d = 1e5, 1e6, 25.6e6; K = 20
    python experiments/bench_prior.py --sizes 1e6 --rank 20 --reps 11

What it measures (float32, one CPU/GPU device, median over ``--reps`` after warm-up,
every call ended with ``block_until_ready``):

* ``prior``: ``jax.jit(jax.value_and_grad(prior.log_prob))`` on a flat (d,) vector,
  for ``Prior.lowrank`` with a (K, d) factor. Compared with the memory-bound floor of
  reading the factor twice: two jitted matrix–vector products over the same (K, d)
  array, ``D @ v`` and ``D.T @ u`` (the forward and backward passes must each read D̂
  once). The two are timed alternately within each repetition and the ratio is the
  median of the per-repetition ratios, so load from other processes affects both.
* ``numpyro``: ``numpyro.distributions.LowRankMultivariateNormal`` log_prob + grad
  (the distribution built once, outside the timing, and passed into jit). It stores
  the factor transposed, (d, K), and materialises (d, K) temporaries (peak ≈ 3.5× the
  factor): skipped above ``--numpyro-max`` or when it would not fit in 80% of the
  available memory (the output says so); 3 repetitions when a call takes over 1 s.
* ``swag``: the collector's jitted ``update`` (state donated) on a snapshot step and on
  a non-snapshot step, with parameters as a tree of 8 leaves.
* Peak memory: each (size, part) runs in its own subprocess; the peak RSS
  (``resource.getrusage`` high-water mark) minus the RSS after importing JAX and
  running a tiny jitted function, against (K + 4)·d·4 bytes (factor, mean, var, θ,
  gradient) for ``prior`` and (K + 3)·d·4 (state and parameters) for ``swag``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MiB = 2 ** 20


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call; CPU time sums all threads of this process."""
    import jax
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t, time.process_time() - c


def _faults(fn, n: int = 3) -> float:
    """Minor page faults per call (fresh buffers of the size of d floats: d·4/4096 each)."""
    import jax
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        jax.block_until_ready(fn())
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n


def _data(d: int, rank: int):
    """Factor, mean, var, θ: deterministic, written by fused jitted kernels.

    (``jax.random`` at this size would hold uint32 temporaries as large as the factor,
    which would dominate the memory figures.)
    """
    import jax
    import jax.numpy as jnp

    def wave(shape, freq, amp, offset=0.0):
        n = 1
        for s in shape:
            n *= s
        return jax.jit(lambda: offset + amp * jnp.sin(
            freq * jnp.arange(n, dtype=jnp.float32).reshape(shape)))()

    dev = wave((rank, d), 0.37, 1e-2)
    mean = wave((d,), 1.1, 1.0)
    var = wave((d,), 0.3, 4e-5, 5e-5)         # in [1e-5, 9e-5]
    theta = jax.jit(lambda m: m + 1e-2 * jnp.cos(0.7 * jnp.arange(d, dtype=jnp.float32)))(mean)
    return jax.block_until_ready((dev, mean, var, theta))


def _baseline():
    import jax
    import jax.numpy as jnp
    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(8)))
    return _rss_peak_bytes()


def child_prior(d: int, rank: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from bayes_transfer.params import ParamSpec
    from bayes_transfer.prior import Prior

    base = _baseline()
    dev, mean, var, theta = _data(d, rank)
    spec = ParamSpec(paths=("backbone/w",), shapes=((d,),), dtypes=("float32",))
    t = time.perf_counter()
    prior = Prior.lowrank(spec, mean, var, dev, scale=10.0, floor=1e-6)
    jax.block_until_ready(prior.chol)
    build_s = time.perf_counter() - t

    value_and_grad = jax.jit(lambda p, x: jax.value_and_grad(p.log_prob)(x))
    log_prob = jax.jit(lambda p, x: p.log_prob(x))
    matvec = jax.jit(lambda a, v: a @ v)
    rmatvec = jax.jit(lambda a, u: a.T @ u)
    u = jnp.linspace(-1.0, 1.0, rank, dtype=jnp.float32)

    def two_pass():
        return matvec(dev, theta), rmatvec(dev, u)

    for _ in range(2):
        jax.block_until_ready(value_and_grad(prior, theta))
        jax.block_until_ready(log_prob(prior, theta))
        jax.block_until_ready(two_pass())
    names = ("two", "vg", "lp", "Dv", "DTu")
    fns = (two_pass, lambda: value_and_grad(prior, theta), lambda: log_prob(prior, theta),
           lambda: matvec(dev, theta), lambda: rmatvec(dev, u))
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for _ in range(reps):          # interleaved, so load from other processes hits all
        for name, fn in zip(names, fns):
            w, c = _timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    faults = {name: _faults(fn) / (d * 4 / 4096) for name, fn in zip(names[:2], fns[:2])}
    lp, g = value_and_grad(prior, theta)
    assert bool(jnp.isfinite(lp)) and bool(jnp.all(jnp.isfinite(g)))
    out = {k + "_s": statistics.median(v) for k, v in wall.items()}
    out.update({k + "_cpu_s": statistics.median(v) for k, v in cpu.items()})
    out.update(ratio=statistics.median(a / b for a, b in zip(wall["vg"], wall["two"])),
               ratio_cpu=statistics.median(a / b for a, b in zip(cpu["vg"], cpu["two"])),
               faults_vg=faults["vg"], faults_two=faults["two"], build_s=build_s,
               peak_bytes=_rss_peak_bytes() - base, base_bytes=base,
               model_bytes=(rank + 4) * d * 4)
    return out


def child_numpyro(d: int, rank: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro.distributions as dist

    base = _baseline()
    dev, mean, var, theta = _data(d, rank)
    factor = jax.jit(lambda a: jnp.sqrt(10.0 / (2 * (rank - 1))) * a.T)(dev)   # (d, K)
    del dev
    diag = 5.0 * var + 1e-6
    mvn = dist.LowRankMultivariateNormal(mean, factor, diag)
    value_and_grad = jax.jit(lambda m, x: jax.value_and_grad(m.log_prob)(x))
    jax.block_until_ready(value_and_grad(mvn, theta))
    warm = _timed(lambda: value_and_grad(mvn, theta))[0]
    reps = reps if warm < 1.0 else min(reps, 3)     # seconds per call: fewer repetitions
    times = [_timed(lambda: value_and_grad(mvn, theta)) for _ in range(reps)]
    return {"vg_s": statistics.median(t[0] for t in times),
            "vg_cpu_s": statistics.median(t[1] for t in times), "reps": reps,
            "peak_bytes": _rss_peak_bytes() - base}


def child_swag(d: int, rank: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from bayes_transfer.params import ParamSpec
    from bayes_transfer.swag import SwagConfig, swag_collector

    base = _baseline()
    n_leaves = 8
    sizes = [d // n_leaves] * (n_leaves - 1) + [d - (n_leaves - 1) * (d // n_leaves)]
    params = {"backbone": {f"layer{i}": jnp.full((s,), 0.1 * i, jnp.float32)
                           for i, s in enumerate(sizes)}}
    spec = ParamSpec.from_params(params)
    config = SwagConfig(rank=rank, every=2)                       # snapshot on odd steps
    swag = swag_collector(spec, config)
    update = jax.jit(swag.update, donate_argnums=0)
    state = swag.init(params)
    snap, skip = [], []
    for i in range(2 * (reps + 2)):
        taken = bool(config.is_snapshot(i))
        w, c = time.perf_counter(), time.process_time()
        state = update(state, params)
        jax.block_until_ready(state)
        if i >= 4:
            (snap if taken else skip).append((time.perf_counter() - w, time.process_time() - c))
    assert int(state.count) == reps + 2
    # reference: one pass over the (K, d) buffer, as a matrix-vector product
    v = jnp.ones((d,), jnp.float32)
    matvec = jax.jit(lambda a, x: a @ x)
    jax.block_until_ready(matvec(state.deviations, v))
    stream = [_timed(lambda: matvec(state.deviations, v)) for _ in range(max(3, reps // 2))]
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    return {"snap_s": med(snap, 0), "skip_s": med(skip, 0), "stream_s": med(stream, 0),
            "snap_cpu_s": med(snap, 1), "skip_cpu_s": med(skip, 1),
            "stream_cpu_s": med(stream, 1), "peak_bytes": _rss_peak_bytes() - base,
            "model_bytes": (rank + 3) * d * 4}


#: NumPyro's peak memory in units of the factor's size (measured: 6.8 GiB at K·d·4 = 1.9 GiB).
NUMPYRO_BYTES_PER_FACTOR = 4


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


CHILDREN = {"prior": child_prior, "numpyro": child_numpyro, "swag": child_swag}


def run_child(part: str, d: int, rank: int, reps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", part, "--sizes", str(d),
           "--rank", str(rank), "--reps", str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_ms(s: float) -> str:
    return f"{1e3 * s:9.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e5,1e6,25.6e6",
                    help="comma-separated d values (floats allowed: 25.6e6)")
    ap.add_argument("--rank", type=int, default=20, help="K, the number of deviation rows")
    ap.add_argument("--reps", type=int, default=9, help="timed repetitions (median)")
    ap.add_argument("--numpyro-max", type=float, default=3e7,
                    help="largest d at which NumPyro's LowRankMultivariateNormal is timed "
                         "(it is also skipped when it would not fit in available memory)")
    ap.add_argument("--parts", default="prior,numpyro,swag")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]

    if args.child:
        print(json.dumps(CHILDREN[args.child](sizes[0], args.rank, args.reps)))
        return

    import jax
    parts = args.parts.split(",")
    print(f"# bench_prior  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"jax {jax.__version__}  backend {jax.default_backend()}  "
          f"{os.cpu_count()} CPU cores  {platform.processor() or platform.machine()}  "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"# K = {args.rank}, float32, median of {args.reps} reps; times in ms; "
          f"memory = peak RSS above the post-import baseline, MiB")
    rows = []
    for d in sizes:
        res = {"d": d}
        if "prior" in parts:
            res["prior"] = run_child("prior", d, args.rank, args.reps)
        if "numpyro" in parts:
            need = NUMPYRO_BYTES_PER_FACTOR * args.rank * d * 4
            if d > args.numpyro_max:
                res["numpyro"] = {"skipped": f"d > --numpyro-max={args.numpyro_max:.3g}"}
            elif need > 0.8 * _available_bytes():
                res["numpyro"] = {"skipped": f"needs ~{need / 2**30:.1f} GiB, more than 80% "
                                             f"of the {_available_bytes() / 2**30:.1f} GiB "
                                             f"available"}
            else:
                res["numpyro"] = run_child("numpyro", d, args.rank, args.reps)
        if "swag" in parts:
            res["swag"] = run_child("swag", d, args.rank, args.reps)
        rows.append(res)
        print(json.dumps(res), file=sys.stderr)

    if "prior" in parts:
        print("\n## log_prob + grad (jit(value_and_grad), flat θ) vs reading the factor twice")
        print("# wall-clock medians; 'ratio' = median over reps of (lp+grad)/(2 passes), "
              "'cpu ratio' the same in process CPU time (less sensitive to other load)")
        print(f"{'d':>11} {'lp+grad':>9} {'lp only':>9} {'D@v':>9} {'D.T@u':>9} "
              f"{'2 passes':>9} {'ratio':>6} {'cpu ratio':>9} {'numpyro':>9} {'np/ours':>7} "
              f"{'peak MiB':>9} {'(K+4)d4':>8} {'build s':>7}")
        for r in rows:
            p, n = r["prior"], r.get("numpyro", {})
            if "error" in p:
                print(f"{r['d']:>11} error: {p['error']}")
                continue
            if "vg_s" in n:
                np_t, np_r = fmt_ms(n["vg_s"]), f"{n['vg_s'] / p['vg_s']:7.1f}"
            else:
                np_t, np_r = f"{'skipped' if 'skipped' in n else 'error':>9}", f"{'-':>7}"
            print(f"{r['d']:>11} {fmt_ms(p['vg_s'])} {fmt_ms(p['lp_s'])} {fmt_ms(p['Dv_s'])} "
                  f"{fmt_ms(p['DTu_s'])} {fmt_ms(p['two_s'])} {p['ratio']:6.2f} "
                  f"{p['ratio_cpu']:9.2f} {np_t} {np_r} "
                  f"{p['peak_bytes'] / MiB:9.0f} {p['model_bytes'] / MiB:8.0f} "
                  f"{p['build_s']:7.2f}")
        print("# fresh d-sized buffers per call (page faults / (d·4/4096)): "
              + ", ".join(f"d={r['d']}: lp+grad {r['prior']['faults_vg']:.1f}, "
                          f"2 passes {r['prior']['faults_two']:.1f}"
                          for r in rows if "faults_vg" in r["prior"]))
        for r in rows:
            n = r.get("numpyro", {})
            if "skipped" in n:
                print(f"# numpyro skipped at d={r['d']}: {n['skipped']} (it holds the factor "
                      f"as (d, K) and makes (d, K) temporaries)")
            elif "error" in n:
                print(f"# numpyro failed at d={r['d']}: {n['error']}")
            elif "peak_bytes" in n:
                print(f"# numpyro at d={r['d']}: peak {n['peak_bytes'] / MiB:.0f} MiB, "
                      f"cpu {1e3 * n['vg_cpu_s']:.1f} ms, median of {n['reps']} reps")
    if "swag" in parts:
        print("\n## SWAG update (jit, state donated): snapshot step vs non-snapshot step")
        print("# wall-clock medians (CPU time in parentheses); reference: one pass over the "
              "(K, d) buffer (a matrix-vector product)")
        print(f"{'d':>11} {'snapshot':>19} {'no snapshot':>17} {'1 pass K×d':>19} "
              f"{'peak MiB':>9} {'(K+3)d4':>8}")
        for r in rows:
            s = r["swag"]
            if "error" in s:
                print(f"{r['d']:>11} error: {s['error']}")
                continue
            print(f"{r['d']:>11} {fmt_ms(s['snap_s'])} ({fmt_ms(s['snap_cpu_s'])}) "
                  f"{1e3 * s['skip_s']:7.3f} ({1e3 * s['skip_cpu_s']:7.3f}) "
                  f"{fmt_ms(s['stream_s'])} ({fmt_ms(s['stream_cpu_s'])}) "
                  f"{s['peak_bytes'] / MiB:9.0f} {s['model_bytes'] / MiB:8.0f}")

if __name__ == "__main__":
    main()
