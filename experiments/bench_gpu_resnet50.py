"""Throughput of MAP fine-tuning of a torchvision ResNet-50 under a K = 20 low-rank prior.

    python experiments/bench_gpu_resnet50.py                        # batch 128, 224×224, fp32
    python experiments/bench_gpu_resnet50.py --dtype bfloat16 --batch-size 256
    python experiments/bench_gpu_resnet50.py --batch-size 2 --image-size 64 --steps 2  # CPU smoke
    python experiments/bench_gpu_resnet50.py --arch small_cnn --batch-size 8 --image-size 28 \
        --steps 1 --reps 1                          # the same code in seconds (tests run it)

Made for a GPU (or TPU) host, it runs on whatever devices JAX sees: with several, the
batch is sharded over a ``data`` mesh axis (``bayes_transfer.training.data_mesh``), the
state is replicated and the prior is sharded along d (``Prior.shard``), as in
``bayes_transfer.training.fit``.

What it measures. One training step is the one ``fit`` compiles for MAP fine-tuning:
``bayes_transfer.training.map_loss`` (cross-entropy + head decay − log p(θ_backbone)/N),
its gradient, an SGD-with-momentum update, state donated. It is timed

* without the prior term (the flat prior: standard fine-tuning),
* with the prior N(θ̄, λ·(½diag(var) + ½D̂ᵀD̂/(K−1))) over the whole backbone
  (d = 23,508,032, K = ``--rank``),

alternately (``--steps`` steps each, ``--reps`` times, median), after a warm-up that
compiles. It prints images/s for both, the prior term's share of the step time
(1 − t_without/t_with) and, separately, the time of ``value_and_grad(prior.log_prob)``
alone. ``--dtype bfloat16`` runs the network in bfloat16 (parameters kept in float32,
cast inside the step; the prior term stays float32); ``--prior-dtype bfloat16`` stores
the prior's arrays in bfloat16.

The inputs are random tensors (normal images, uniform labels), made once on the device:
a throughput benchmark needs no data pipeline, and none is timed. The prior is
synthetic too (mean = the initial backbone, random variances and deviations): the cost
of its term depends on d and K only.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bayes_transfer import models
from bayes_transfer.training.objectives import map_loss
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.training import data_mesh, make_apply, split_model


def synthetic_prior(spec: ParamSpec, params, rank: int, seed: int = 0) -> Prior:
    """A low-rank prior over ``spec`` with SWAG-like magnitudes, built on the device."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    mean = spec.ravel(params)
    var = jax.jit(lambda k: jax.random.uniform(k, (spec.size,), jnp.float32, 1e-6, 1e-5))(k1)
    # Row by row (lax.map): the temporaries of the random bits are (d,), not (K, d).
    dev = jax.jit(lambda k: jax.lax.map(
        lambda i: 1e-3 * jax.random.normal(jax.random.fold_in(k, i), (spec.size,), jnp.float32),
        jnp.arange(rank)))(k2)
    return Prior.lowrank(spec, mean, var, dev, scale=1.0)


def make_step(graphdef, loss_fn, tx, compute_dtype, replicated):
    """The jitted MAP training step (the step ``fit`` builds, plus mixed precision).

    Its outputs are pinned to ``replicated``: left to sharding propagation, a prior
    sharded along d can leave the new parameters sharded, and the next call, with inputs
    placed differently, would compile the step again.
    """
    apply = make_apply(graphdef)

    def apply_in(params, rest, x, train=False, method=None):
        cast = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        out, new_rest = apply(cast, rest, x.astype(compute_dtype), train=train, method=method)
        # BatchNorm statistics keep their dtype (the state's structure must not change).
        new_rest = jax.tree.map(lambda new, old: new.astype(old.dtype), new_rest, rest)
        return out.astype(jnp.float32), new_rest

    def step(state, batch, prior):
        params, rest, opt_state = state
        (loss, (rest, _)), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            apply_in, params, rest, batch, None, prior)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), rest, opt_state), loss

    return jax.jit(step, donate_argnums=(0,), out_shardings=replicated)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128, help="global batch (all devices)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--reps", type=int, default=3, help="alternating measurements (median)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the network")
    p.add_argument("--prior-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rank", type=int, default=20, help="K, rows of the prior's deviations")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--arch", default="resnet50", choices=models.ARCHITECTURES,
                   help="the network (resnet50 is the benchmark; smaller ones run the same "
                        "code quickly, e.g. as a smoke test on a CPU)")
    p.add_argument("--num-train", type=int, default=50_000,
                   help="N in the prior term −log p(θ)/N (scales it, costs nothing)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    devices = jax.devices()
    mesh = data_mesh()
    n_dev = len(devices)
    if args.batch_size % n_dev:
        p.error(f"--batch-size {args.batch_size} must be a multiple of the {n_dev} devices")
    replicated = NamedSharding(mesh, P())
    compute_dtype = jnp.dtype(args.dtype)

    model = models.create(args.arch, args.num_classes, in_channels=3, seed=0)
    graphdef, params, rest = split_model(model)
    spec = ParamSpec.from_params(params)           # the backbone, as learn_prior covers it
    prior = synthetic_prior(spec, params, args.rank)
    if args.prior_dtype != "float32":
        prior = prior.astype(jnp.dtype(args.prior_dtype))
    prior = prior.shard(mesh)                      # sharded along d when n_dev > 1
    flat = prior.for_method("standard")           # no prior term: log p = 0

    tx = optax.sgd(0.01, momentum=0.9)
    loss_fn = map_loss(args.num_train, head_decay=1e-4)
    step = make_step(graphdef, loss_fn, tx, compute_dtype, replicated)

    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    batch = {"image": jax.random.normal(kx, shape, jnp.float32),
             "label": jax.random.randint(ky, (args.batch_size,), 0, args.num_classes)}
    batch = jax.device_put(batch, NamedSharding(mesh, P("data")))

    def fresh_state():   # a private copy per measurement: the step donates its state
        return jax.tree.map(jnp.copy, jax.device_put((params, rest, tx.init(params)),
                                                     replicated))

    states = {"without": fresh_state(), "with": fresh_state()}
    priors = {"without": flat, "with": prior}

    def run(which, steps):
        state = states[which]
        t = time.perf_counter()
        for _ in range(steps):
            state, loss = step(state, batch, priors[which])
        jax.block_until_ready((state, loss))
        states[which] = state
        return time.perf_counter() - t, float(loss)

    t0 = time.perf_counter()
    run("without", 1), run("with", 1)              # compile both
    compile_s = time.perf_counter() - t0
    times = {"without": [], "with": []}
    losses = {}
    for _ in range(args.reps):
        for which in ("without", "with"):
            dt, losses[which] = run(which, args.steps)
            times[which].append(dt / args.steps)
    t_without = statistics.median(times["without"])
    t_with = statistics.median(times["with"])

    # The prior term alone: log_prob and its gradient at replicated parameters.
    prior_vg = jax.jit(jax.value_and_grad(lambda pr, th: pr.log_prob(th), argnums=1))
    theta = jax.device_put(params, replicated)
    jax.block_until_ready(prior_vg(prior, theta))
    alone = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for _ in range(args.steps):
            out = prior_vg(prior, theta)
        jax.block_until_ready(out)
        alone.append((time.perf_counter() - t) / args.steps)
    t_alone = statistics.median(alone)

    result = {
        "arch": args.arch,
        "device": f"{devices[0].platform}:{devices[0].device_kind}",
        "devices": n_dev,
        "batch_size": args.batch_size, "image_size": args.image_size, "dtype": args.dtype,
        "prior_dtype": args.prior_dtype, "d": prior.dim, "K": prior.rank,
        "steps": args.steps, "reps": args.reps, "compile_s": round(compile_s, 2),
        "step_ms_without_prior": 1e3 * t_without, "step_ms_with_prior": 1e3 * t_with,
        "images_per_s_without_prior": args.batch_size / t_without,
        "images_per_s_with_prior": args.batch_size / t_with,
        "prior_share_of_step": 1.0 - t_without / t_with,
        "prior_value_and_grad_ms": 1e3 * t_alone,
        "prior_value_and_grad_share_of_step": t_alone / t_with,
        "loss_finite": all(math.isfinite(v) for v in losses.values()),
        "jax": jax.__version__, "python": platform.python_version(),
    }
    try:
        stats = devices[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["peak_device_memory_gib"] = stats["peak_bytes_in_use"] / 2 ** 30
    except Exception:   # not every backend reports memory
        pass

    name = "ResNet-50 (torchvision layout)" if args.arch == "resnet50" else args.arch
    print(f"{name}, {args.num_classes} classes, batch {args.batch_size} "
          f"of {args.image_size}×{args.image_size}×3 (random), {args.dtype}, on {n_dev}× "
          f"{result['device']}")
    print(f"prior: low-rank, d = {prior.dim:,} (backbone), K = {prior.rank}, "
          f"{args.prior_dtype}, {prior.nbytes / 2 ** 30:.2f} GiB")
    print(f"step without prior term: {1e3 * t_without:9.2f} ms  "
          f"{result['images_per_s_without_prior']:9.1f} images/s")
    print(f"step with prior term:    {1e3 * t_with:9.2f} ms  "
          f"{result['images_per_s_with_prior']:9.1f} images/s")
    print(f"prior term's share of the step: {100 * result['prior_share_of_step']:.1f}% "
          f"(log_prob + grad alone: {1e3 * t_alone:.2f} ms, "
          f"{100 * result['prior_value_and_grad_share_of_step']:.1f}% of the step)")
    if "peak_device_memory_gib" in result:
        print(f"peak device memory: {result['peak_device_memory_gib']:.2f} GiB")
    if not result["loss_finite"]:
        print("warning: the loss is not finite")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
