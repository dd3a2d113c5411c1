"""Errors the toolkit raises on bad input: each says what was wrong and what to do."""


class BayesTransferError(Exception):
    """Base class of every error raised on purpose by bayes_transfer."""


class SpecMismatchError(BayesTransferError, ValueError):
    """Parameters do not match a prior's covered-parameter spec (path, shape or dtype)."""


class PriorError(BayesTransferError, ValueError):
    """A prior's arrays are unusable (NaN/Inf, non-positive variance, bad shapes)."""
