"""NumPyro interop: Bayesian multinomial logistic regression on a fine-tuned backbone.

The backbone is held fixed (its features are computed once); the head
(W ∈ R^{F×C}, b ∈ R^C) gets a prior and is sampled exactly with NUTS:

    θ = (W, b) ~ prior,   yᵢ ~ Categorical(softmax(φ(xᵢ)·W + b))

The prior is any NumPyro distribution over the flat (F·C + C,) vector
``[W.ravel() (row-major), b]``, or a :class:`~bayes_transfer.prior.Prior` whose spec covers
exactly the head's ``kernel`` and ``bias`` (its :meth:`~bayes_transfer.prior.Prior.as_numpyro`
is used and the vector is split with its spec); the default is N(0, prior_scale²·I).

Example::

    feats = last_layer_features(map_result.result, splits.train)
    post = last_layer_nuts(feats, splits.train.labels, None, num_samples=500)
    probs = last_layer_predict(post, last_layer_features(map_result.result, splits.test))
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer.errors import BayesTransferError
from bayes_transfer.training import predict

__all__ = ["last_layer_features", "last_layer_model", "last_layer_nuts", "last_layer_predict"]


def last_layer_features(result_or_model, dataset, *, batch_size: int = 500) -> np.ndarray:
    """(N, F) backbone features (``model.features``) of a trained model over a dataset."""

    return predict(result_or_model, dataset, batch_size=batch_size, method="features")


def _split_head(theta, num_features: int, num_classes: int, prior):
    """(W, b) from the flat head vector (the prior's spec order when it is a Prior)."""
    if prior is not None and hasattr(prior, "spec"):
        parts = prior.spec.unravel(theta)
        w = [v for p, v in parts.items() if re.search(r"kernel$", p)]
        b = [v for p, v in parts.items() if re.search(r"bias$", p)]
        return w[0], b[0]
    k = num_features * num_classes
    return theta[:k].reshape(num_features, num_classes), theta[k:]


def _head_distribution(prior_dist, dim: int, prior_scale: float):
    import numpyro.distributions as dist

    if prior_dist is None:
        return dist.Normal(jnp.zeros(dim), prior_scale).to_event(1)
    if hasattr(prior_dist, "as_numpyro"):
        paths = prior_dist.spec.paths
        if (prior_dist.dim != dim or len(paths) != 2
                or not any(p.endswith("kernel") for p in paths)
                or not any(p.endswith("bias") for p in paths)):
            raise BayesTransferError(
                f"a Prior over the head must cover exactly its kernel and bias ({dim} "
                f"numbers); this one covers {paths} (d={prior_dist.dim})")
        return prior_dist.as_numpyro()
    if tuple(prior_dist.event_shape) != (dim,):
        raise BayesTransferError(f"the head prior must have event shape ({dim},), got "
                                 f"{tuple(prior_dist.event_shape)}")
    return prior_dist


def last_layer_model(features, labels=None, *, num_classes: int, prior_dist=None,
                     prior_scale: float = 1.0):
    """The NumPyro model: θ ~ prior, y ~ Categorical(logits = φ·W + b)."""
    import numpyro
    import numpyro.distributions as dist

    features = jnp.asarray(features)
    f = features.shape[-1]
    d = f * num_classes + num_classes
    theta = numpyro.sample("theta", _head_distribution(prior_dist, d, prior_scale))
    w, b = _split_head(theta, f, num_classes, prior_dist)
    logits = features @ w + b
    with numpyro.plate("data", features.shape[0]):
        numpyro.sample("y", dist.Categorical(logits=logits), obs=labels)


def last_layer_nuts(features, labels, prior_dist=None, num_samples: int = 500, *,
                    num_warmup: int = 500, num_chains: int = 1, num_classes: int | None = None,
                    prior_scale: float = 1.0, seed: int = 0, progress: bool = False) -> dict:
    """Sample the head's posterior with NUTS; returns ``{"W": (S, F, C), "b": (S, C)}``.

    Args:
      features: (N, F) fixed backbone features; labels: (N,) integer classes.
      prior_dist: None (N(0, prior_scale²·I)), a NumPyro distribution over the flat
        (F·C + C,) head vector ``[W.ravel(), b]``, or a ``Prior`` over the head's kernel
        and bias.
      num_samples, num_warmup, num_chains: NUTS settings (S = num_samples·num_chains).

    The returned dict also holds ``"mcmc"``, the ``numpyro.infer.MCMC`` object
    (``mcmc.print_summary()`` gives R-hat and effective sample sizes).
    """
    from numpyro.infer import MCMC, NUTS

    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    c = int(num_classes or int(labels.max()) + 1)
    kernel = NUTS(last_layer_model)
    mcmc = MCMC(kernel, num_warmup=int(num_warmup), num_samples=int(num_samples),
                num_chains=int(num_chains), progress_bar=progress,
                chain_method="sequential")
    mcmc.run(jax.random.PRNGKey(seed), features, labels, num_classes=c,
             prior_dist=prior_dist, prior_scale=prior_scale)
    theta = mcmc.get_samples()["theta"]
    w, b = jax.vmap(lambda t: _split_head(t, features.shape[-1], c, prior_dist))(theta)
    return {"W": np.asarray(w), "b": np.asarray(b), "mcmc": mcmc}


@jax.jit
def _bma_linear(w, b, features):
    def body(acc, wb):   # one sample at a time: memory (N, C), not (S, N, C)
        return acc + jax.nn.softmax(features @ wb[0] + wb[1], axis=-1), None

    acc = jnp.zeros((features.shape[0], w.shape[-1]), jnp.float32)
    return jax.lax.scan(body, acc, (w, b))[0] / w.shape[0]


def last_layer_predict(posterior: dict, features) -> np.ndarray:
    """Bayesian model average (N, C) of softmax(φ·W + b) over the posterior samples."""
    return np.asarray(_bma_linear(jnp.asarray(posterior["W"]), jnp.asarray(posterior["b"]),
                                  jnp.asarray(features, jnp.float32)))
