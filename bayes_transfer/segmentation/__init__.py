"""Semantic segmentation under a learned prior (``finetune``: data, loss, MAP, metrics,
save/load; ``overlays``: pictures). ``from bayes_transfer import segmentation as seg``."""
from bayes_transfer.segmentation.finetune import (DATASETS, DECODER_RULE, default_config,
                                                  evaluate_segmentation, finetune_segmentation,
                                                  load_segmentation_model, load_task,
                                                  model_from_prior, predict_probs,
                                                  save_segmentation_model, segmentation_loss,
                                                  segmentation_metrics)
from bayes_transfer.segmentation.overlays import save_overlays

__all__ = [
    "DECODER_RULE", "DATASETS", "default_config", "evaluate_segmentation", "finetune_segmentation",
    "load_segmentation_model", "load_task", "model_from_prior", "predict_probs",
    "save_overlays", "save_segmentation_model", "segmentation_loss", "segmentation_metrics",
]
