"""Downstream inference under a prior: MAP fine-tuning, SGLD, SWAG and model averaging."""
from bayes_transfer.inference.bma import bma_predict
from bayes_transfer.inference.calibration import temperature_scale
from bayes_transfer.inference.elbo import ElboConfig
from bayes_transfer.inference.evidence import EvidenceConfig
from bayes_transfer.inference.map import FinetuneConfig, FinetuneResult, finetune, scale_grid
from bayes_transfer.inference.posterior import PosteriorConfig, PosteriorResult, sample_posterior
from bayes_transfer.inference.samples import PosteriorSamples
from bayes_transfer.inference.sgld import cyclical_sgld_schedule, sgld

__all__ = ["ElboConfig", "EvidenceConfig", "FinetuneConfig", "FinetuneResult", "PosteriorConfig", "PosteriorResult",
           "PosteriorSamples", "bma_predict", "cyclical_sgld_schedule", "finetune",
           "sample_posterior", "scale_grid", "sgld", "temperature_scale"]
