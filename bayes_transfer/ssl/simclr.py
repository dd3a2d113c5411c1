"""SimCLR (Chen et al., 2020): contrastive self-supervised source training.

Two random views of every image in a batch of N go through the backbone and a small
projection MLP; the NT-Xent loss pulls the two projections of an image together and
pushes them away from the other 2N − 2 projections in the batch. The prior is then
learned over the backbone exactly as after supervised training: the projection head
lives outside ``backbone/``, so the default rule (``^backbone/``) covers the same
parameters, with the same paths and shapes, as for the supervised model of the same
architecture — a SimCLR prior drops into every downstream method unchanged.

Example::

    from bayes_transfer import data, models
    from bayes_transfer.ssl import SimCLRModel, simclr_loss, linear_probe
    from bayes_transfer.training import TrainConfig, fit

    splits = data.load("fashion_mnist")
    model = SimCLRModel(models.create("small_cnn", 10), projection_dim=64)
    result = fit(model, splits.train, simclr_loss(0.2),
                 TrainConfig(epochs=10, batch_size=256, optimizer="adam", learning_rate=1e-3))
    print(linear_probe(result, splits))                     # frozen-feature test accuracy

    # or straight to a prior (a classifier is wrapped in a SimCLRModel for you):
    prior, result = learn_prior(models.create("small_cnn", 10), splits, config,
                                loss_fn=simclr_loss(0.2))
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from flax import nnx

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.models import model_config
from bayes_transfer.ssl.augment import ViewConfig, random_view

__all__ = ["ProjectionHead", "SimCLRLoss", "SimCLRModel", "as_simclr_model", "nt_xent",
           "simclr_loss"]


@jax.jit
def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> jax.Array:
    """NT-Xent (normalised temperature-scaled cross-entropy) of N positive pairs.

    ``z1[i]`` and ``z2[i]`` are the projections of two views of image i. With the 2N
    L2-normalised projections ``u`` (``z1`` then ``z2``) and ``s_ij = u_i·u_j / τ``,

        ℓ_i = −s_{i,p(i)} + log Σ_{j ≠ i} exp(s_ij),     loss = mean_i ℓ_i  (2N terms),

    ``p(i)`` the other view of the same image: the positive is one of the 2N − 1 other
    views, the remaining 2N − 2 are negatives, and the self-similarity is masked out.
    Computed with ``logsumexp`` (stable for any τ > 0) in float32.

    >>> z = jax.random.normal(jax.random.PRNGKey(0), (8, 16))
    >>> float(nt_xent(z, z, 0.1)) < float(nt_xent(z, z[::-1], 0.1))
    True
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two (N, D) arrays of one shape, got {z1.shape} "
                         f"and {z2.shape}")
    n = z1.shape[0]
    z = jnp.concatenate([z1, z2]).astype(jnp.float32)
    # u = z/‖z‖, with the norm floored so a zero projection gives no NaN
    u = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=1, keepdims=True), 1e-12))
    sim = (u @ u.T) / temperature
    idx = jnp.arange(2 * n)
    sim_masked = jnp.where(idx[:, None] == idx[None, :], -jnp.inf, sim)
    positive = sim[idx, (idx + n) % (2 * n)]
    return jnp.mean(jax.nn.logsumexp(sim_masked, axis=1) - positive)


class ProjectionHead(nnx.Module):
    """SimCLR's projection MLP: Linear → ReLU → Linear (``g`` in the paper)."""

    def __init__(self, in_features: int, hidden_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden_dim, rngs=rngs)
        self.out = nnx.Linear(hidden_dim, out_dim, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(h)))


class SimCLRModel(nnx.Module):
    """A backbone and a projection head: parameters ``backbone/...`` and ``projector/...``.

    ``SimCLRModel(classifier)`` takes the backbone of a ``bayes_transfer.models``
    classifier (the same module, not a copy) and drops its task head; the classifier's
    architecture is kept in :attr:`architecture` (``models.model_config``) so a prior
    learned from this model records what to rebuild downstream. Also accepts a bare
    backbone module (anything with ``__call__(x, *, train)`` and ``num_features``).

    ``model(x, train=...)`` gives projections ``z``; ``model.features(x, train=...)``
    the backbone features ``h`` (what a linear probe and a downstream task use).
    """

    def __init__(self, model: nnx.Module, *, projection_dim: int = 64,
                 hidden_dim: int | None = None, seed: int = 0):
        backbone = getattr(model, "backbone", model)
        if not hasattr(backbone, "num_features"):
            raise BayesTransferError(
                f"SimCLRModel needs a bayes_transfer classifier or a backbone with "
                f"`num_features`; got {type(model).__name__}")
        self.backbone = backbone
        f = int(backbone.num_features)
        hidden = f if hidden_dim is None else int(hidden_dim)
        self.projector = ProjectionHead(f, hidden, int(projection_dim), rngs=nnx.Rngs(seed))
        self.projection_dim = int(projection_dim)
        self.hidden_dim = hidden
        self.num_features = f
        # a JSON string: module attributes that go into the graphdef must be hashable
        self._architecture = None
        if hasattr(model, "arch"):
            self._architecture = json.dumps(model_config(model), sort_keys=True)

    @property
    def architecture(self) -> dict | None:
        """``models.model_config`` of the wrapped classifier (None for a bare backbone)."""
        return None if self._architecture is None else json.loads(self._architecture)

    def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Backbone features (N, F)."""
        return self.backbone(x, train=train)

    def project(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Projections ``z = g(h)`` (N, projection_dim)."""
        return self.projector(self.backbone(x, train=train))

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Projections (N, projection_dim), as :meth:`project`."""
        return self.project(x, train=train)


def as_simclr_model(model: nnx.Module, **kwargs) -> SimCLRModel:
    """``model`` itself if it is a :class:`SimCLRModel`, else ``SimCLRModel(model, **kwargs)``."""
    return model if isinstance(model, SimCLRModel) else SimCLRModel(model, **kwargs)


@dataclasses.dataclass(frozen=True)
class SimCLRLoss:
    """The SimCLR objective in the training loop's loss signature.

    ``loss(apply, params, rest, batch, key, aux)``: two views of ``batch["image"]`` are
    drawn from ``key`` on the device, the 2N views go through the model in ONE call with
    ``train=True`` (BatchNorm statistics over all 2N views, as in the paper) and the
    NT-Xent loss of the projections is returned. Labels are ignored. A frozen dataclass,
    so equal settings hash equal and the loop's compiled step is reused across runs.

    ``objective = "simclr"`` marks it for ``learn_prior`` (which then wraps a classifier in
    a :class:`SimCLRModel` and reports a linear-probe accuracy).
    """

    temperature: float = 0.2
    views: ViewConfig = ViewConfig()
    objective = "simclr"  # a class attribute, not a field

    def __post_init__(self):
        if not self.temperature > 0:
            raise BayesTransferError(f"the temperature must be > 0, got {self.temperature}")

    def __call__(self, apply, params, rest, batch, key, aux):
        x = batch["image"]
        n = x.shape[0]
        k1, k2 = jax.random.split(jax.random.fold_in(key, 0x51C1))
        views = jnp.concatenate([random_view(k1, x, self.views), random_view(k2, x, self.views)])
        try:
            z, new_rest = apply(params, rest, views, train=True, method="project")
        except AttributeError as e:
            if "project" not in str(e):
                raise
            raise BayesTransferError(
                "simclr_loss trains a model with a projection head: wrap the classifier as "
                "SimCLRModel(model) (learn_prior does this for you)") from None
        loss = nt_xent(z[:n], z[n:], self.temperature)
        # the positive's rank-1 accuracy: how often the other view is the nearest one
        u = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-6)
        sim = u @ u.T - 3.0 * jnp.eye(2 * n)
        acc = jnp.mean(jnp.argmax(sim, axis=1) == (jnp.arange(2 * n) + n) % (2 * n))
        return loss, (new_rest, {"nt_xent": loss, "pair_acc": jax.lax.stop_gradient(acc)})


def simclr_loss(temperature: float = 0.2, views: ViewConfig | None = None) -> SimCLRLoss:
    """SimCLR's NT-Xent loss with on-device views, for :func:`bayes_transfer.train.fit`.

    ``temperature`` τ defaults to 0.2, a common choice for batches of a few hundred
    images (the paper's 0.1 went with batches of 4096, 0.5 with its CIFAR runs);
    ``views`` sets the augmentations (:class:`~bayes_transfer.ssl.ViewConfig`). The
    model must have a projection head: a :class:`SimCLRModel`.

    >>> loss = simclr_loss(0.2)
    >>> # fit(SimCLRModel(models.create("small_cnn", 10)), splits.train, loss, config)
    """
    return SimCLRLoss(float(temperature), ViewConfig() if views is None else views)
