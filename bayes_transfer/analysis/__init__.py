"""Before and beside fine-tuning: how well a prior's features transfer (``transferability``),
the prior strength to try (``suggest``), and gradient diagnostics (``diagnostics``)."""
from bayes_transfer.analysis.suggest import Suggestion, suggest
from bayes_transfer.analysis.transferability import transferability

__all__ = ["Suggestion", "suggest", "transferability"]
