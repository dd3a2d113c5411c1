"""bayes_transfer: Bayesian transfer learning with learned priors, in JAX.

Learn a SWAG posterior on a source task, publish it as a prior artifact, and fine-tune
under it (MAP) or sample under it downstream.

The layout: ``params`` (path rules, ParamSpec) → ``prior`` (the Gaussian) and ``swag``
→ ``training`` (the one loop) → ``learn`` (source side) and ``inference`` (downstream:
MAP, SGLD, SWAG, BMA) → ``evaluation``, ``analysis``; ``artifacts`` and ``hub`` store
and publish priors, ``interop`` reads PyTorch files, ``cli`` is the command line.

    import bayes_transfer as bt
    prior = bt.load_prior("fashion-mnist/small-cnn")           # ships with the package
    splits = bt.data.load("mnist_5k", shots_per_class=10, seed=0)
    model = bt.models.from_prior(prior, num_classes=10)
    result = bt.finetune(model, splits, prior, method="lowrank")   # λ chosen on val
    print(result.scale, result.metrics)
"""
__version__ = "0.1.0"

from bayes_transfer import compat

compat.install()   # old module paths (bayes_transfer.train, .artifact, ...) still import

# The public API, from the modules that hold it.
from bayes_transfer import data, models  # noqa: E402
from bayes_transfer.analysis.suggest import Suggestion, suggest  # noqa: E402
from bayes_transfer.artifacts import save_prior, verify_artifact  # noqa: E402
from bayes_transfer.errors import BayesTransferError, PriorError, SpecMismatchError  # noqa: E402
from bayes_transfer.evaluation import metrics  # noqa: E402
from bayes_transfer.hub import load_prior  # noqa: E402
from bayes_transfer.inference.map import FinetuneConfig, FinetuneResult, finetune  # noqa: E402
from bayes_transfer.learn import LearnPriorConfig, learn_prior  # noqa: E402
from bayes_transfer.params import BACKBONE_RULE, ParamSpec  # noqa: E402
from bayes_transfer.prior import METHODS, Prior  # noqa: E402
from bayes_transfer.swag import SwagConfig, swag_collector, swag_prior  # noqa: E402
from bayes_transfer.training import TrainConfig, TrainResult, fit, map_loss, predict  # noqa: E402


__all__ = [
    "BACKBONE_RULE", "BayesTransferError", "FinetuneConfig", "FinetuneResult",
    "LearnPriorConfig", "METHODS", "ParamSpec", "Prior", "PriorError", "SpecMismatchError",
    "Suggestion", "SwagConfig", "TrainConfig", "TrainResult", "data", "finetune", "fit",
    "learn_prior", "load_prior", "map_loss", "metrics", "models", "predict", "save_prior",
    "suggest", "swag_collector", "swag_prior", "verify_artifact",
]
