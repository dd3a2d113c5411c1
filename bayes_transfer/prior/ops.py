"""Operations that derive a new object from a prior: its marginal on fewer leaves, and
the diagonal preconditioner its variances define."""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.params import ParamSpec, map_with_paths
from bayes_transfer.prior.prior import Prior


def restrict_prior(prior: Prior, drop: tuple[str, ...]) -> Prior:
    """The marginal of ``prior`` on its covered leaves other than ``drop``.

    A Gaussian's marginal keeps the mean, the variances and the deviation columns of
    the kept coordinates, so every kind stays the same kind; λ, ε and the metadata are
    kept. The spec's rule excludes the dropped leaves (``spec.check`` still passes).
    """
    drop = tuple(p for p in prior.spec.paths if p in set(drop))
    if not drop:
        return prior
    spec = prior.spec
    keep = [i for i, p in enumerate(spec.paths) if p not in set(drop)]
    if not keep:
        raise BayesTransferError("the re-initialised blocks are every parameter the prior "
                                 "covers; use method='standard' and a fresh model instead")
    o = spec.offsets
    index = np.concatenate([np.arange(o[i], o[i + 1]) for i in keep])
    alt = "|".join(re.escape(p) for p in drop)
    new_spec = ParamSpec(paths=tuple(spec.paths[i] for i in keep),
                         shapes=tuple(spec.shapes[i] for i in keep),
                         dtypes=tuple(spec.dtypes[i] for i in keep),
                         rule=f"^(?!(?:{alt})$)(?=.*?(?:{spec.rule}))")
    sub = lambda x: x if x is None or x.ndim == 0 else x[..., index]  # noqa: E731
    if prior.kind == "flat":
        new = Prior.flat(new_spec, sub(prior.mean))
    elif prior.kind == "isotropic":
        new = Prior.isotropic(new_spec, sub(prior.mean), prior.var, scale=prior.scale,
                              floor=prior.floor)
    elif prior.kind == "diag":
        new = Prior.diagonal(new_spec, sub(prior.mean), sub(prior.var), scale=prior.scale,
                             floor=prior.floor)
    else:
        new = Prior.lowrank(new_spec, sub(prior.mean), sub(prior.var), sub(prior.deviations),
                            scale=prior.scale, floor=prior.floor)
    return dataclasses.replace(new, info=prior.info)


def prior_preconditioner(prior, params, *, min_ratio: float = 0.0):
    """A constant diagonal preconditioner M for SGLD (``bayes_transfer.inference.sgld``) or
    preconditioned SGD from a prior's variances.

    On the prior's covered parameters M = δ / max(δ), with δ = λ·diag(Σ₀) + ε the
    prior's diagonal (the part of its covariance the low-rank factor only adds to);
    elsewhere (the head) M = 1. Then every covered coordinate feels the prior's
    restoring force at the same rate 1/(N·max δ) per unit of η, so a step size that is
    stable for the likelihood and the loosest prior direction is stable for all.
    ``min_ratio`` floors M (0: none). Returns None for a flat or missing prior, or an
    isotropic one (M would be all ones).
    """
    if prior is None or prior.kind in ("flat", "isotropic"):
        return None
    return _preconditioner(prior, params, float(min_ratio))


@functools.partial(jax.jit, static_argnums=2)
def _preconditioner(prior, params, min_ratio):
    delta = jnp.broadcast_to(prior.diag_part(jnp.float32), (prior.dim,))
    m = jnp.maximum(delta / jnp.max(delta), min_ratio)
    covered = prior.spec.unravel(m)
    return map_with_paths(
        lambda p, x: covered[p].astype(jnp.float32) if p in covered
        else jnp.ones(jnp.shape(x), jnp.float32), params)
