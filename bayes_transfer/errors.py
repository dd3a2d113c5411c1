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


class HubError(BayesTransferError):
    """The prior hub cannot resolve, fetch or register a prior (registry, cache, network)."""


class RegistryError(HubError):
    """A prior registry file is missing, is not valid JSON or has a malformed entry."""


class UnknownPriorError(HubError, LookupError):
    """A prior name is not in the registry (the message lists the known names)."""


class OfflineModeError(HubError):
    """Offline mode is on and the prior (or registry) is not available locally."""


class DownloadError(HubError):
    """Downloading a prior failed: HTTP error, timeout, truncated or oversized body."""


class ChecksumMismatchError(HubError, ArtifactIntegrityError):
    """A prior's sha256 differs from the digest pinned by the registry or the caller."""


class TorchFormatError(BayesTransferError, ValueError):
    """A PyTorch ``.pt`` file cannot be read: not a torch.save zip, truncated, or malformed."""


class LegacyTorchFormatError(TorchFormatError):
    """A ``.pt`` file uses torch's pre-1.6 (non-zip) format: re-save it with a recent torch."""


class UnsafePickleError(TorchFormatError):
    """A ``.pt`` file's pickle asks for a global outside the tensor allowlist; nothing ran."""


class TorchImportError(BayesTransferError, ValueError):
    """Reference-format torch prior files do not fit the architecture or each other."""
