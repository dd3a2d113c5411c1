"""Metrics against hand-computed values and an independent numpy ECE."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayes_transfer.evaluation import metrics

# Four binary examples. Top-class confidence / correct?:
#   0.90 yes, 0.85 no (label 1 has p=0.15), 0.70 yes, 0.55 yes.
PROBS = np.array([[0.90, 0.10],
                  [0.85, 0.15],
                  [0.30, 0.70],
                  [0.45, 0.55]], np.float32)
LABELS = np.array([0, 1, 1, 1])


def test_accuracy_and_error():
    assert float(metrics.accuracy(PROBS, LABELS)) == pytest.approx(0.75)
    assert float(metrics.error(PROBS, LABELS)) == pytest.approx(0.25)
    # logits give the same arg-max
    assert float(metrics.accuracy(np.log(PROBS) + 3.0, LABELS)) == pytest.approx(0.75)


def test_nll_from_probs_and_logits():
    expected = -(math.log(0.9) + math.log(0.15) + math.log(0.7) + math.log(0.55)) / 4
    assert float(metrics.nll(PROBS, LABELS)) == pytest.approx(expected, rel=1e-5)
    logits = np.log(PROBS) + 7.0          # softmax is shift-invariant
    assert float(metrics.nll(logits, LABELS, from_logits=True)) == pytest.approx(expected,
                                                                                rel=1e-5)


def test_nll_of_a_certain_mistake_is_finite():
    v = float(metrics.nll(np.array([[1.0, 0.0]]), np.array([1])))
    assert math.isfinite(v) and v == pytest.approx(-math.log(1e-12), rel=1e-3)


def test_brier():
    # per example: sum_c (p_c - onehot_c)^2
    #   2*0.1^2 = 0.02, 2*0.85^2 = 1.445, 2*0.3^2 = 0.18, 2*0.45^2 = 0.405 -> mean 0.5125
    assert float(metrics.brier(PROBS, LABELS)) == pytest.approx(0.5125, rel=1e-5)
    # three classes: (0.5-0)^2 + (0.3-0)^2 + (0.2-1)^2 = 0.25 + 0.09 + 0.64
    assert float(metrics.brier(np.array([[0.5, 0.3, 0.2]]), np.array([2]))) == pytest.approx(0.98)


def test_ece_by_hand():
    # 15 bins of width 1/15: 0.90 -> (0.867, 0.933], 0.85 -> (0.8, 0.867],
    # 0.70 -> (0.667, 0.733], 0.55 -> (0.533, 0.6]: one example per bin, so
    # ECE = mean |correct - conf| = (0.10 + 0.85 + 0.30 + 0.45) / 4 = 0.425
    assert float(metrics.ece(PROBS, LABELS)) == pytest.approx(0.425, rel=1e-5)
    # 4 bins: (0.5, 0.75] holds 0.70, 0.55 (acc 1, conf 0.625, gap 0.375);
    # (0.75, 1] holds 0.90, 0.85 (acc 0.5, conf 0.875, gap 0.375) -> 0.375
    assert float(metrics.ece(PROBS, LABELS, n_bins=4)) == pytest.approx(0.375, rel=1e-5)
    # 2 bins: all in (0.5, 1]: acc 0.75 = mean conf 0.75 -> 0
    assert float(metrics.ece(PROBS, LABELS, n_bins=2)) == pytest.approx(0.0, abs=1e-6)


def test_reliability_by_hand():
    r = metrics.reliability(PROBS, LABELS, n_bins=4)
    np.testing.assert_allclose(r["bin_edges"], [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(r["counts"], [0, 0, 2, 2])
    np.testing.assert_allclose(r["confidence"], [np.nan, np.nan, 0.625, 0.875], rtol=1e-6)
    np.testing.assert_allclose(r["accuracy"], [np.nan, np.nan, 1.0, 0.5])


def test_bins_are_right_closed():
    # confidence exactly 0.5 with 2 bins lands in [0, 0.5], not (0.5, 1]
    r = metrics.reliability(np.array([[0.5, 0.5]], np.float32), np.array([0]), n_bins=2)
    np.testing.assert_array_equal(r["counts"], [1, 0])


def _ece_numpy_loops(probs, labels, n_bins):
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        members = [i for i in range(len(conf))
                   if (conf[i] > lo or (b == 0 and conf[i] >= lo)) and conf[i] <= hi]
        if not members:
            continue
        acc = np.mean([pred[i] == labels[i] for i in members])
        avg_conf = np.mean([conf[i] for i in members])
        total += len(members) / len(conf) * abs(acc - avg_conf)
    return total


@pytest.mark.parametrize("n_bins", [15, 10, 7])
def test_ece_matches_numpy_reference_on_random_data(n_bins):
    rng = np.random.default_rng(n_bins)
    logits = rng.normal(size=(500, 5)) * rng.uniform(0.5, 4.0)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
    labels = rng.integers(0, 5, size=500)
    expected = _ece_numpy_loops(probs.astype(np.float64), labels, n_bins)
    assert float(metrics.ece(probs, labels, n_bins)) == pytest.approx(expected, abs=1e-5)
    r = metrics.reliability(probs, labels, n_bins)
    assert int(np.sum(r["counts"])) == 500


def test_metrics_jit():
    ece = jax.jit(metrics.ece, static_argnums=2)
    assert float(ece(PROBS, LABELS, 15)) == pytest.approx(0.425, rel=1e-5)
    cm = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))
    assert cm(TARGET, TARGET, 3, 255).sum() == 8


def test_classification_metrics():
    m = metrics.classification_metrics(PROBS, LABELS)
    assert set(m) == {"error", "nll", "ece", "brier", "accuracy"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["accuracy"] == pytest.approx(0.75) and m["error"] == pytest.approx(0.25)
    assert m["ece"] == pytest.approx(0.425, rel=1e-5)
    assert m["brier"] == pytest.approx(0.5125, rel=1e-5)
    m2 = metrics.classification_metrics(np.log(PROBS), LABELS, from_logits=True)
    assert m2["nll"] == pytest.approx(m["nll"], rel=1e-5)


def test_per_pixel_shapes_flatten():
    # (N, H, W, C) probabilities and (N, H, W) labels: every pixel is an example
    p = np.broadcast_to(PROBS[:, None, None, :], (4, 2, 3, 2))
    y = np.broadcast_to(LABELS[:, None, None], (4, 2, 3))
    assert float(metrics.ece(p, y)) == pytest.approx(0.425, rel=1e-5)
    assert float(metrics.accuracy(p, y)) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- segmentation
# 3x3 masks, classes {0, 1, 2}, 255 = ignore (bottom-right pixel).
TARGET = np.array([[0, 0, 1],
                   [0, 1, 1],
                   [2, 2, 255]])
PRED = np.array([[0, 1, 1],
                 [0, 1, 1],
                 [2, 0, 2]])
# (target, pred) over the 8 kept pixels: (0,0) (0,1) (1,1) (0,0) (1,1) (1,1) (2,2) (2,0)
CM = np.array([[2, 1, 0],
               [0, 3, 0],
               [1, 0, 1]])
# IoU_c = TP / (row + col - TP): 2/(3+3-2) = 0.5, 3/(3+4-3) = 0.75, 1/(2+1-1) = 0.5
IOU = np.array([0.5, 0.75, 0.5])


def test_confusion_matrix_by_hand():
    np.testing.assert_array_equal(metrics.confusion_matrix(PRED, TARGET, 3, ignore_index=255), CM)
    # adding up over batches gives the dataset's matrix
    both = metrics.confusion_matrix(np.stack([PRED, PRED]), np.stack([TARGET, TARGET]), 3, 255)
    np.testing.assert_array_equal(both, 2 * CM)


def test_iou_and_miou_by_hand():
    np.testing.assert_allclose(metrics.iou_per_class(PRED, TARGET, 3, ignore_index=255), IOU)
    assert float(metrics.mean_iou(PRED, TARGET, 3, ignore_index=255)) == pytest.approx(1.75 / 3)
    np.testing.assert_allclose(metrics.iou_from_confusion(CM), IOU)


def test_ignore_label_is_ignored():
    # what the model predicts at the ignored pixel does not matter
    other = PRED.copy()
    other[2, 2] = 1
    np.testing.assert_array_equal(metrics.confusion_matrix(other, TARGET, 3, 255), CM)
    assert float(metrics.pixel_accuracy(other, TARGET, ignore_index=255)) == pytest.approx(6 / 8)
    # ignore_index inside the class range: class-0 pixels drop out entirely
    cm0 = metrics.confusion_matrix(PRED, TARGET, 3, ignore_index=0)
    np.testing.assert_array_equal(cm0, [[0, 0, 0], [0, 3, 0], [1, 0, 1]])


def test_classes_absent_from_both_are_excluded_from_miou():
    iou = np.asarray(metrics.iou_per_class(PRED, TARGET, 5, ignore_index=255))
    np.testing.assert_allclose(iou[:3], IOU)
    assert np.isnan(iou[3]) and np.isnan(iou[4])
    assert float(metrics.mean_iou(PRED, TARGET, 5, ignore_index=255)) == pytest.approx(1.75 / 3)
    # a class predicted but absent from the target counts, with IoU 0
    pred = PRED.copy()
    pred[0, 0] = 3          # was a correct 0: IoU0 -> 1/(3+2-1) = 0.25, IoU3 = 0
    iou = np.asarray(metrics.iou_per_class(pred, TARGET, 4, ignore_index=255))
    np.testing.assert_allclose(iou, [0.25, 0.75, 0.5, 0.0])
    assert float(metrics.mean_iou(pred, TARGET, 4, ignore_index=255)) == pytest.approx(1.5 / 4)


def test_pixel_accuracy():
    assert float(metrics.pixel_accuracy(PRED, TARGET, ignore_index=255)) == pytest.approx(0.75)
    # without an ignore label the 255 pixel is simply wrong
    assert float(metrics.pixel_accuracy(PRED, TARGET)) == pytest.approx(6 / 9)


def test_reliability_diagram_writes_a_png(tmp_path):
    from bayes_transfer.evaluation.plots import reliability_diagram

    rng = np.random.default_rng(0)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=(200, 3)) * 2)))
    labels = rng.integers(0, 3, size=200)
    path = tmp_path / "figs" / "reliability.png"
    reliability_diagram({"MAP": (probs, labels), "toy": (PROBS, LABELS)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        reliability_diagram({}, tmp_path / "empty.png")
