"""bayes_transfer: Bayesian transfer learning with learned priors, in JAX.

Learn a SWAG posterior on a source task, publish it as a prior artifact, and fine-tune
under it (MAP) or sample under it downstream.

    import bayes_transfer as bt
    prior = bt.load_prior("priors/fashion-mnist-small-cnn")
    splits = bt.data.load("mnist_5k", shots_per_class=10, seed=0)
    model = bt.models.create(**{**prior.metadata["architecture"], "num_classes": 10})
    result = bt.finetune(model, splits, prior, method="lowrank")   # λ chosen on val
    print(result.scale, result.metrics)
"""
from bayes_transfer import compat

compat.install()   # old module paths (bayes_transfer.train, .artifact, ...) still import

from bayes_transfer import data, metrics, models  # noqa: E402
from bayes_transfer.artifact import save_prior, verify_artifact
from bayes_transfer.hub import load_prior
from bayes_transfer.errors import BayesTransferError, PriorError, SpecMismatchError
from bayes_transfer.inference.map import FinetuneConfig, FinetuneResult, finetune
from bayes_transfer.learn import LearnPriorConfig, learn_prior
from bayes_transfer.objectives import map_loss
from bayes_transfer.params import BACKBONE_RULE, ParamSpec
from bayes_transfer.prior import METHODS, Prior
from bayes_transfer.swag import SwagConfig, swag_collector, swag_prior
from bayes_transfer.suggest import Suggestion, suggest
from bayes_transfer.train import TrainConfig, TrainResult, fit, predict

__version__ = "0.1.0"

__all__ = [
    "BACKBONE_RULE", "BayesTransferError", "FinetuneConfig", "FinetuneResult",
    "LearnPriorConfig", "METHODS", "ParamSpec", "Prior", "PriorError", "SpecMismatchError",
    "Suggestion", "SwagConfig", "TrainConfig", "TrainResult", "data", "finetune", "fit",
    "learn_prior", "load_prior", "map_loss", "metrics", "models", "predict", "save_prior",
    "suggest", "swag_collector", "swag_prior", "verify_artifact",
]
