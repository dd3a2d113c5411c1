"""``bayes_transfer.suggest``: fine-tuning settings proposed from a transferability
measure computed before fine-tuning.

The measure is kNN accuracy of the prior's backbone features on the target's labelled
splits (train + validation, leave-one-out; ``bayes_transfer.transferability``),
normalised so that chance is 0 and perfect is 1:  q = (knn − 1/C)/(1 − 1/C). By default
the same is measured with a freshly initialised backbone of the same architecture,
and the *gain* g = q − q_random says whether the source features beat random ones.
LogME is computed and reported too; the rule does not read it (its scale depends on
the feature dimension and n, so it has no threshold that carries across targets).

The rule (simple on purpose; ``experiments/`` checks it against sweeps):

1. **Prior strength, from the gain.** q alone rises with the number of labelled
   target images (kNN on any features improves with more neighbours), so a rule on q
   proposes stronger priors as data grows, the opposite of what validation prefers.
   The gain g = q − q_random subtracts what a random backbone reaches *on the same
   images*, so it measures what the source adds at this data size and shrinks as
   data makes the source less needed. The suggested variance is

       v* = strongest · 10^((full_gain − g) / gain_per_decade)   (v* = strongest once g ≥ full_gain)

   snapped to the nearest grid value in log scale (``FinetuneConfig.variances``; small
   v = strong prior): every ``gain_per_decade`` of gain makes the prior one decade
   stronger, down to ``strongest``. If g ≤ ``min_gain`` (the source features are no
   better than random ones) the weakest prior of the grid is suggested.

   The defaults (strongest 1, full_gain 0.1, gain_per_decade 0.025) were calibrated
   on *validation* choices only: the 33 lowrank sweeps on Fashion-MNIST 5–9 (seven
   sources at 10 per class, and the classes 0–4 prior at 1–100 per class), checked on
   MNIST-5k held out (``experiments/suggest_calibrate.py``; RESULTS.md has the table).

   Without a random baseline (``baseline=False``, or a model this toolkit did not
   build) there is no gain, and the older rule on q is used: grid position
   round((1 − q)·(m − 1)) + ``offset`` (calibrated on the 10-per-class sweeps: offset
   1). It ignores the amount of data; the explanation says so.
2. **Re-initialisation.** ``reinit_top = 1`` (the top backbone block starts fresh and
   leaves the prior) when q < ``reinit_below`` or the gain is ≤ ``min_gain``; else 0.
3. **Layer-wise learning rate.** Not suggested: ``layer_lr = 1``.

Example::

    s = bt.suggest(prior, splits)
    print(s.explain())
    result = bt.finetune(model, splits, prior, "lowrank", config=s.finetune_config())
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from bayes_transfer import models
from bayes_transfer.analysis.transferability import transferability
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.inference.map import DEFAULT_VARIANCES, FinetuneConfig
from bayes_transfer.prior import Prior

__all__ = ["Suggestion", "rule", "suggest"]


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """Suggested fine-tuning settings and the measures they came from.

    ``variance`` is an effective prior variance v (λ = v / mean diag Σ₀ for each
    method, :meth:`scale`); ``measures`` holds ``logme``, ``knn``, ``knn_normalized``
    (q) and, with a baseline, the same for a random backbone (``*_random``), ``gain``
    (q − q_random) and ``logme_gain``.
    """

    measures: dict
    variance: float
    reinit_top: int
    layer_lr: float
    reasons: tuple[str, ...]

    @property
    def score(self) -> float:
        """q, the normalised kNN accuracy the rule reads."""
        return self.measures["knn_normalized"]

    def scale(self, prior, method: str = "lowrank") -> float:
        """λ for ``method``'s prior: ``variance / mean(diag Σ₀)`` (inf for no prior)."""
        method_prior = prior.for_method(method)
        if method_prior.kind == "flat" or math.isinf(self.variance):
            return math.inf
        return self.variance / float(jnp.mean(method_prior.base_variance()))

    def finetune_config(self, base: FinetuneConfig = FinetuneConfig()) -> FinetuneConfig:
        """``base`` with the suggested settings: a one-point λ grid (v), no no-prior run."""
        return dataclasses.replace(base, variances=(self.variance,), include_no_prior=False,
                                   reinit_top=self.reinit_top, layer_lr=self.layer_lr)

    def as_dict(self) -> dict:
        return {**self.measures, "variance": self.variance, "reinit_top": self.reinit_top,
                "layer_lr": self.layer_lr}

    def explain(self) -> str:
        m = self.measures
        lines = [f"kNN accuracy of the prior's features: {m['knn']:.3f} (chance "
                 f"{m['knn_chance']:.3f}; normalised q = {m['knn_normalized']:.3f}) on "
                 f"{m['num_examples']} labelled target examples; LogME {m['logme']:.4f}."]
        if "knn_random" in m:
            lines.append(f"A random backbone of the same architecture: kNN {m['knn_random']:.3f} "
                         f"(q = {m['knn_normalized_random']:.3f}), LogME "
                         f"{m['logme_random']:.4f}; gain in q: {m['gain']:+.3f}, in LogME: "
                         f"{m['logme_gain']:+.4f}.")
        lines += list(self.reasons)
        lines.append(f"Suggested: effective prior variance {self.variance:g}, reinit_top="
                     f"{self.reinit_top}, layer_lr={self.layer_lr:g}.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def suggest(prior_or_model, target_splits, *, model: nnx.Module | None = None,
            variances: tuple[float, ...] = DEFAULT_VARIANCES, k: int = 5,
            baseline: bool = True, reinit_below: float = 0.5, min_gain: float = 0.0,
            strongest: float = 1.0, full_gain: float = 0.1, gain_per_decade: float = 0.025,
            offset: int = 1, seed: int = 0) -> Suggestion:
    """Propose fine-tuning settings for ``target_splits`` from a transferability measure
    (module docstring: the measure and the rule).

    Args:
      prior_or_model: a ``Prior`` (features at its mean; the model comes from ``model``
        or the prior's architecture metadata) or a model holding pretrained weights.
      target_splits: the target task (``train`` and ``val`` are read, never ``test``).
      variances: the effective-variance grid the suggestion picks from.
      k: neighbours of the kNN measure.
      baseline: also measure a freshly initialised backbone (seed ``seed + 1``), for the
        gain; skipped for a model that is not a ``bayes_transfer`` classifier.
      reinit_below: q under which the top block is re-initialised.
      min_gain: a gain at or below it counts as "no better than random".
      strongest, full_gain, gain_per_decade: the gain rule (module docstring: rule 1).
      offset: grid steps added to the position q maps to when there is no baseline.
    """
    if not variances:
        raise BayesTransferError("suggest needs at least one candidate variance")
    measures = dict(transferability(prior_or_model, target_splits, model=model, k=k))
    random_model = _random_model(prior_or_model, model, seed + 1) if baseline else None
    if random_model is not None:
        rnd = transferability(random_model, target_splits, k=k)
        measures.update(logme_random=rnd["logme"], knn_random=rnd["knn"],
                        knn_normalized_random=rnd["knn_normalized"],
                        gain=measures["knn_normalized"] - rnd["knn_normalized"],
                        logme_gain=measures["logme"] - rnd["logme"])
    variance, reinit, reasons = rule(measures, variances, reinit_below=reinit_below,
                                     min_gain=min_gain, strongest=strongest,
                                     full_gain=full_gain, gain_per_decade=gain_per_decade,
                                     offset=offset)
    return Suggestion(measures=measures, variance=variance, reinit_top=reinit, layer_lr=1.0,
                      reasons=reasons)


def rule(measures: dict, variances, *, reinit_below: float = 0.5, min_gain: float = 0.0,
         strongest: float = 1.0, full_gain: float = 0.1, gain_per_decade: float = 0.025,
         offset: int = 1) -> tuple[float, int, tuple[str, ...]]:
    """(variance, reinit_top, reasons) from ``measures`` (module docstring: the rule);
    separate from :func:`suggest` so it can be re-applied to stored measures."""
    if strongest <= 0 or full_gain <= 0 or gain_per_decade <= 0:
        raise BayesTransferError(
            f"suggest's rule needs positive strongest, full_gain and gain_per_decade; got "
            f"{strongest}, {full_gain}, {gain_per_decade}")
    grid = sorted(float(v) for v in variances)
    if not grid or not all(0 < v < math.inf for v in grid):
        raise BayesTransferError(f"suggest's variance grid must be positive and finite "
                                 f"(no-prior is not a grid value); got {list(variances)}")
    q = min(max(measures["knn_normalized"], 0.0), 1.0)
    gain = measures.get("gain")
    no_gain = gain is not None and gain <= min_gain
    reasons = []
    if no_gain:
        variance = grid[-1]
        reasons.append(f"The source features are no better than random ones (gain "
                       f"{gain:+.3f} <= {min_gain:g}): weakest prior of the grid.")
    elif gain is not None:
        target = math.log10(strongest) + max(full_gain - gain, 0.0) / gain_per_decade
        # nearest in log scale; a tie goes to the weaker prior (the later grid value)
        variance = min(reversed(grid), key=lambda v: abs(math.log10(v) - target))
        reasons.append(f"Gain {gain:+.3f} over a random backbone on the same images gives "
                       f"v* = {strongest:g}·10^(({full_gain:g} - gain)/{gain_per_decade:g}) = "
                       f"10^{target:.2f}; nearest on the grid: {variance:g} (small variance = "
                       f"strong prior).")
    else:
        index = min(max(int(round((1.0 - q) * (len(grid) - 1))) + offset, 0), len(grid) - 1)
        variance = grid[index]
        reasons.append(f"No random baseline, so no gain: q = {q:.3f} maps to grid position "
                       f"round((1 - q)·{len(grid) - 1}) {offset:+d} = {index} of {grid}. This "
                       f"rule ignores how much target data there is (q grows with it).")
    reinit = 1 if (no_gain or q < reinit_below) else 0
    reasons.append(f"reinit_top={reinit}: " + (
        "the top block starts fresh, outside the prior." if reinit else
        f"q >= {reinit_below:g} and the features beat random ones, so every block is "
        f"transferred."))
    return variance, reinit, tuple(reasons)


def _random_model(prior_or_model, model, seed: int):
    """A freshly initialised model of the same architecture, or None if unknown."""
    if model is None and isinstance(prior_or_model, Prior):
        try:
            return models.from_prior(prior_or_model, seed=seed)
        except models.ModelConfigError:
            return None
    source = model if model is not None else prior_or_model
    if isinstance(source, models.Classifier):
        return models.create(**{**models.model_config(source), "seed": seed})
    return None
