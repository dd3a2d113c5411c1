"""Training: one loop (:func:`fit`) for source training, SWAG, SimCLR, MAP and SGLD.

``state`` (settings, state, result, the loss protocol), ``loop`` (``fit``), ``optim``
(optimizers), ``objectives`` (losses), ``predict`` (running a model), ``distributed``
(mesh, sharding, process 0) and ``checkpoints`` (saved model directories).
"""
from bayes_transfer.training.checkpoints import load_model, save_model
from bayes_transfer.training.distributed import (data_mesh, host_copy, on_process_0,
                                                 use_cpu_cores)
from bayes_transfer.training.loop import fit
from bayes_transfer.training.objectives import cross_entropy_loss, map_loss
from bayes_transfer.training.optim import make_optimizer
from bayes_transfer.training.predict import (make_apply, predict, refresh_batch_stats,
                                             split_model)
from bayes_transfer.training.state import TrainConfig, TrainResult, TrainState

__all__ = ["TrainConfig", "TrainResult", "TrainState", "cross_entropy_loss", "data_mesh",
           "fit", "host_copy", "load_model", "make_apply", "make_optimizer", "map_loss",
           "on_process_0", "predict", "refresh_batch_stats", "save_model", "split_model",
           "use_cpu_cores"]
