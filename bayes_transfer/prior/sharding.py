"""A prior placed on a device mesh: sharded along d when it is large, else replicated."""
from __future__ import annotations

import dataclasses
import warnings

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

#: Below this many covered parameters :func:`shard_prior` replicates a prior rather than
#: sharding it: its arrays are small next to the activations, and no collective is needed.
SHARD_MIN_DIM = 1 << 20


def shard_prior(prior, mesh, axis: str = "data", *, min_dim: int = SHARD_MIN_DIM):
    """``prior`` with its arrays placed on ``mesh`` for data-parallel training.

    When d ≥ ``min_dim`` and the mesh axis ``axis`` has n > 1 devices dividing d, the
    per-coordinate arrays are sharded along d over ``axis``: ``mean`` and ``var`` (d,) as
    ``P(axis)``, the deviations (K, d) as ``P(None, axis)``, so each device holds d/n
    columns, (K + 2)·d/n numbers instead of (K + 2)·d. The K×K Cholesky factor, λ, ε and
    log|Σ| are tiny and replicated. Otherwise (a small prior, one device, or n not
    dividing d, with a warning) everything is replicated.

    ``log_prob`` and its gradient under ``jax.jit`` then run sharded: each device
    reduces its columns (D̂·δ⁻¹r and rᵀδ⁻¹r) and XLA adds an all-reduce of K + 1 numbers;
    the result equals the unsharded one up to float rounding (the sum's order differs).
    Parameters come in replicated (data parallelism) and their gradient goes out
    replicated.

    Example::

        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        prior = shard_prior(load_prior("priors/resnet50"), mesh)
        loss, grads = jax.jit(jax.value_and_grad(prior.log_prob))(params)
    """
    n = mesh.shape[axis]
    replicated = NamedSharding(mesh, P())
    shard = prior.dim >= min_dim and n > 1
    if shard and prior.dim % n:
        warnings.warn(f"the prior's d={prior.dim} is not divisible by the {n} devices of mesh "
                      f"axis {axis!r}; it is replicated instead of sharded", stacklevel=2)
        shard = False

    def place(x, spec):
        if x is None:
            return None
        along_d = shard and x.ndim >= 1 and x.shape[-1] == prior.dim
        return jax.device_put(x, NamedSharding(mesh, spec) if along_d else replicated)

    return dataclasses.replace(
        prior,
        mean=place(prior.mean, P(axis)), var=place(prior.var, P(axis)),
        deviations=place(prior.deviations, P(None, axis)),
        scale=place(prior.scale, P()), floor=place(prior.floor, P()),
        chol=place(prior.chol, P()), logdet=place(prior.logdet, P()))
