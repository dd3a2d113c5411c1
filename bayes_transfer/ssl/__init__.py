"""Self-supervised source training: SimCLR, its on-device views, and linear probes.

>>> from bayes_transfer.ssl import SimCLRModel, simclr_loss, linear_probe  # doctest: +SKIP
>>> model = SimCLRModel(models.create("small_cnn", 10))                   # doctest: +SKIP
>>> result = fit(model, splits.train, simclr_loss(0.2), config)           # doctest: +SKIP
>>> linear_probe(result, splits)                                          # doctest: +SKIP

A SimCLR model's parameters are ``backbone/...`` (the classifier's backbone, covered by
the default prior rule) and ``projector/...`` (the projection MLP, never in the prior),
so ``learn_prior(model, splits, config, loss_fn=simclr_loss(0.2))`` gives a prior over
exactly the parameters a supervised prior of the same architecture covers.
"""
from bayes_transfer.ssl.augment import (ViewConfig, color_jitter, random_flip,
                                        random_resized_crop, random_view, two_views)
from bayes_transfer.ssl.linear_probe import (DEFAULT_L2_GRID, LinearProbeResult,
                                             extract_features, fit_logistic_regression,
                                             linear_probe, probe_features)
from bayes_transfer.ssl.simclr import (ProjectionHead, SimCLRLoss, SimCLRModel, as_simclr_model,
                                       nt_xent, simclr_loss)

__all__ = [
    "DEFAULT_L2_GRID", "LinearProbeResult", "ProjectionHead", "SimCLRLoss", "SimCLRModel",
    "ViewConfig", "as_simclr_model", "color_jitter", "extract_features",
    "fit_logistic_regression", "linear_probe", "nt_xent", "probe_features", "random_flip",
    "random_resized_crop", "random_view", "simclr_loss", "two_views",
]
