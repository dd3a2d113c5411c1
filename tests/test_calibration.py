"""Temperature scaling: recovers a known temperature; lowers validation (and test) NLL."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayes_transfer.evaluation import metrics
from bayes_transfer.inference.calibration import (apply_temperature, calibrate, fit_temperature,
                                                  temperature_nll, temperature_scale)

K_SIGMA = 4.0


def _synthetic(t0, n=4000, c=5, seed=0):
    """Labels drawn from softmax(true logits); the model reports true·t0.

    Dividing the reported logits by T = t0 gives back the true ones, so the fitted T
    should be t0.
    """
    rng = np.random.default_rng(seed)
    true = rng.normal(0, 2.0, (n, c)).astype(np.float32)
    p = np.asarray(jax.nn.softmax(jnp.asarray(true), -1), np.float64)
    labels = (p.cumsum(-1) > rng.uniform(size=(n, 1))).argmax(-1)
    return true * t0, labels, true


def _standard_error(true, t0):
    """SE of the maximum-likelihood T: 1/√(N·I(β)) in β = 1/T, I(β) = mean Var_p[z]
    at the truth (z = reported logits), times dT/dβ = T²."""
    z = true * t0
    p = np.asarray(jax.nn.softmax(jnp.asarray(true), -1), np.float64)
    ez = (p * z).sum(-1, keepdims=True)
    info = float((p * (z - ez) ** 2).sum(-1).mean())
    return t0 ** 2 / math.sqrt(len(z) * info)


@pytest.mark.parametrize("t0", [2.5, 0.5])
def test_recovers_a_known_temperature(t0):
    logits, labels, true = _synthetic(t0)
    t = fit_temperature(logits, labels)
    se = _standard_error(true, t0)
    assert abs(t - t0) < K_SIGMA * se, (t, t0, se)
    assert K_SIGMA * se < 0.1 * t0            # the check is tight
    # The fitted T is the NLL's minimum.
    nll = temperature_nll(logits, labels, t)
    assert nll <= temperature_nll(logits, labels, t * 1.02) + 1e-6
    assert nll <= temperature_nll(logits, labels, t / 1.02) + 1e-6


def test_reduces_validation_and_test_nll(tmp_path):
    val_logits, val_labels, _ = _synthetic(3.0, seed=1)      # overconfident
    test_logits, test_labels, _ = _synthetic(3.0, seed=2)
    report = calibrate(val_logits, val_labels, test_logits, test_labels,
                       plot_path=tmp_path / "reliability.png", name="synthetic")
    m = report.metrics
    assert m["val_after"]["nll"] < m["val_before"]["nll"]
    assert m["test_after"]["nll"] < m["test_before"]["nll"]
    assert m["test_after"]["ece"] < m["test_before"]["ece"]
    # Accuracy is unchanged: a temperature does not move the arg-max.
    assert m["test_after"]["error"] == pytest.approx(m["test_before"]["error"])
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    # The simple API agrees, and metrics.nll agrees with the NLL it minimises.
    t, probs = temperature_scale(val_logits, val_labels, test_logits)
    assert t == pytest.approx(report.temperature)
    np.testing.assert_allclose(probs, report.test_probs, atol=1e-6)
    assert float(metrics.nll(apply_temperature(val_logits, t), val_labels)) == pytest.approx(
        temperature_nll(val_logits, val_labels, t), rel=1e-4)


def test_segmentation_logits_with_ignored_pixels():
    logits, labels, _ = _synthetic(2.0, n=2400, c=3, seed=3)
    logits = logits.reshape(6, 20, 20, 3)
    labels = labels.reshape(6, 20, 20).copy()
    full = fit_temperature(logits, labels)
    # Ignored pixels must not count, whatever their logits.
    labels[:, :5] = 255
    logits[:, :5] = 50.0 * np.sign(logits[:, :5])
    t = fit_temperature(logits, labels, ignore_index=255)
    kept = fit_temperature(logits[:, 5:], labels[:, 5:])
    assert t == pytest.approx(kept, rel=1e-4)
    assert abs(t - full) < 0.2 * full
