"""Temperature scaling (Guo et al., 2017), fitted on validation logits.

A single T > 0 divides the logits: p = softmax(z / T). T is the maximum-likelihood
value on a validation set. With β = 1/T the validation NLL

    ℓ(β) = mean_i [ logsumexp(β·zᵢ) − β·zᵢ,yᵢ ]

is convex in β (a log-sum-exp of linear functions), with derivatives

    ℓ'(β)  = mean_i ( E_{p_β}[zᵢ] − zᵢ,yᵢ ),   ℓ''(β) = mean_i Var_{p_β}[zᵢ] ≥ 0,

so a safeguarded Newton iteration on β (backtracking, β kept positive) converges in a
handful of steps; :func:`fit_temperature` does that. Works for (N, C) and for
(N, H, W, C) segmentation logits (every pixel counts, ``ignore_index`` excluded). For a
Bayesian model average, whose output is probabilities, pass ``log(p̄)`` as the logits.

Metrics come from :mod:`bayes_transfer.metrics`, reliability diagrams from
:func:`bayes_transfer.plots.reliability_diagram`.

Example::

    T, test_probs = temperature_scale(val_logits, val_labels, test_logits)
    report = calibrate(val_logits, val_labels, test_logits, test_labels,
                       plot_path="results/reliability.png")
    print(report.temperature, report.metrics["test_after"]["ece"])
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bayes_transfer.evaluation import metrics as btmetrics
from bayes_transfer.errors import BayesTransferError

__all__ = ["fit_temperature", "apply_temperature", "temperature_scale", "calibrate",
           "CalibrationResult", "temperature_nll"]

_BETA_MIN, _BETA_MAX = 1e-4, 1e4


def _flatten(logits, labels, ignore_index):
    z = np.asarray(logits, np.float32)
    y = np.asarray(labels).astype(np.int32)
    if z.shape[:-1] != y.shape:
        raise BayesTransferError(f"logits of shape {z.shape} do not match labels of shape "
                                 f"{y.shape}: expected logits (..., C) with labels (...)")
    z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    if ignore_index is not None:
        keep = y != ignore_index
        z, y = z[keep], y[keep]
    if len(y) == 0:
        raise BayesTransferError("no (non-ignored) example to fit a temperature on")
    return jnp.asarray(z), jnp.asarray(y)


@jax.jit
def _derivatives(beta, z, y):
    """(ℓ(β), ℓ'(β), ℓ''(β)) of the mean NLL of softmax(β·z)."""
    s = beta * z
    logp = jax.nn.log_softmax(s, axis=-1)
    p = jnp.exp(logp)
    zy = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    nll = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
    ez = jnp.sum(p * z, axis=-1)
    var = jnp.sum(p * (z - ez[:, None]) ** 2, axis=-1)
    return nll, jnp.mean(ez - zy), jnp.mean(var)


def temperature_nll(logits, labels, temperature, *, ignore_index=None) -> float:
    """Mean NLL of softmax(logits / T) (nats)."""
    z, y = _flatten(logits, labels, ignore_index)
    return float(_derivatives(jnp.float32(1.0 / temperature), z, y)[0])


def fit_temperature(logits, labels, *, ignore_index: int | None = None, max_iter: int = 50,
                    tol: float = 1e-7) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T) on these labels.

    Safeguarded Newton on β = 1/T (the NLL is convex in β; module docstring), starting
    at T = 1. Returns T as a Python float (in [1e-4, 1e4]).
    """
    z, y = _flatten(logits, labels, ignore_index)
    beta = 1.0
    nll, g, h = (float(v) for v in _derivatives(jnp.float32(beta), z, y))
    for _ in range(int(max_iter)):
        if h > 1e-12:
            step = -g / h
        else:   # flat curvature: move geometrically in the descent direction
            step = beta if g < 0 else -0.5 * beta
        new = beta + step
        if new <= 0:
            new = 0.5 * beta
        new = float(np.clip(new, _BETA_MIN, _BETA_MAX))
        # Backtrack until the NLL does not increase (convexity guarantees progress).
        cand = None
        for _ in range(30):
            values = [float(v) for v in _derivatives(jnp.float32(new), z, y)]
            if values[0] <= nll + 1e-7 * abs(nll):
                cand = values
                break
            new = 0.5 * (beta + new)
        if cand is None:    # no decrease along the step: β is optimal to precision
            break
        moved = abs(new - beta)
        beta, (nll, g, h) = new, cand
        if moved <= tol * max(beta, 1.0) or abs(g) < 1e-7:
            break
    return float(1.0 / beta)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """softmax(logits / T) as float32 numpy probabilities."""
    z = jnp.asarray(logits, jnp.float32) / jnp.float32(temperature)
    return np.asarray(jax.nn.softmax(z, axis=-1))


def temperature_scale(val_logits, val_labels, logits=None, *,
                      ignore_index: int | None = None) -> tuple[float, np.ndarray]:
    """(T fitted on validation, calibrated probabilities of ``logits`` (default: the
    validation logits))."""
    t = fit_temperature(val_logits, val_labels, ignore_index=ignore_index)
    return t, apply_temperature(val_logits if logits is None else logits, t)


@dataclasses.dataclass
class CalibrationResult:
    temperature: float
    val_probs: np.ndarray                 # calibrated validation probabilities
    test_probs: np.ndarray | None         # calibrated test probabilities
    metrics: dict                         # {"val_before", "val_after", "test_before", "test_after"}
    plot_path: str | None = None


def calibrate(val_logits, val_labels, test_logits=None, test_labels=None, *,
              plot_path=None, name: str = "model", n_bins: int = 15,
              ignore_index: int | None = None) -> CalibrationResult:
    """Fit T on validation, apply it, and report NLL/ECE/Brier before and after.

    With ``plot_path`` a reliability diagram (before / after, on test if given, else on
    validation) is saved there as a PNG.
    """
    t = fit_temperature(val_logits, val_labels, ignore_index=ignore_index)
    metric = functools.partial(_metrics, n_bins=n_bins, ignore_index=ignore_index)
    val_before = apply_temperature(val_logits, 1.0)
    val_after = apply_temperature(val_logits, t)
    report = {"val_before": metric(val_before, val_labels),
              "val_after": metric(val_after, val_labels)}
    test_after = None
    if test_logits is not None:
        test_before = apply_temperature(test_logits, 1.0)
        test_after = apply_temperature(test_logits, t)
        if test_labels is not None:
            report["test_before"] = metric(test_before, test_labels)
            report["test_after"] = metric(test_after, test_labels)
    if plot_path is not None:
        from bayes_transfer.evaluation.plots import reliability_diagram  # matplotlib on demand

        if test_logits is not None and test_labels is not None:
            before, after, labels, split = test_before, test_after, test_labels, "test"
        else:
            before, after, labels, split = val_before, val_after, val_labels, "validation"
        before, labels_b = _valid(before, labels, ignore_index)
        after, _ = _valid(after, labels, ignore_index)
        reliability_diagram({f"{name}": (before, labels_b),
                             f"{name}, T = {t:.3g}": (after, labels_b)},
                            plot_path, n_bins=n_bins, title=f"temperature scaling ({split})")
    return CalibrationResult(t, val_after, test_after, report,
                             None if plot_path is None else str(plot_path))


def _valid(probs, labels, ignore_index):
    p = np.asarray(probs).reshape(-1, np.shape(probs)[-1])
    y = np.asarray(labels).reshape(-1)
    if ignore_index is not None:
        keep = y != ignore_index
        p, y = p[keep], y[keep]
    return p, y


def _metrics(probs, labels, *, n_bins, ignore_index):
    p, y = _valid(probs, labels, ignore_index)
    return btmetrics.classification_metrics(p, y, n_bins=n_bins)
