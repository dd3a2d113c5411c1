"""Errors the toolkit raises on bad input: each says what was wrong and what to do."""


class BayesTransferError(Exception):
    """Base class of every error raised on purpose by bayes_transfer."""


class SpecMismatchError(BayesTransferError, ValueError):
    """Parameters do not match a prior's covered-parameter spec (path, shape or dtype)."""


class PriorError(BayesTransferError, ValueError):
    """A prior's arrays are unusable (NaN/Inf, non-positive variance, bad shapes)."""


class ArtifactError(BayesTransferError):
    """A prior artifact is missing, malformed or cannot be read (names the file at fault)."""


class ArtifactIntegrityError(ArtifactError):
    """A prior artifact's files or metadata do not match its recorded sha256 digests."""


class ArtifactVersionError(ArtifactError):
    """A prior artifact was written in a format this version of bayes_transfer cannot read."""
