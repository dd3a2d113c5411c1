"""Evaluation: calibration and segmentation metrics, reliability diagrams."""
from bayes_transfer.evaluation import metrics

__all__ = ["metrics"]
