"""The prior: a Gaussian over the covered parameters, learned from a SWAG posterior.

``prior`` (the :class:`Prior` type), ``woodbury`` (the log-density's kernels),
``sharding`` (placing a prior on a mesh) and ``ops`` (a prior's marginal, its
preconditioner).
"""
from bayes_transfer.prior.ops import prior_preconditioner, restrict_prior
from bayes_transfer.prior.prior import KINDS, METHODS, Prior
from bayes_transfer.prior.sharding import SHARD_MIN_DIM, shard_prior

__all__ = ["KINDS", "METHODS", "Prior", "SHARD_MIN_DIM", "prior_preconditioner",
           "restrict_prior", "shard_prior"]
