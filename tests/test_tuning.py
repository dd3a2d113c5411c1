"""The validation protocol of ``finetune``: equal budgets (learning rate × λ or weight
decay), grids that extend past a clipped end, retraining the choice on train ∪ val.

``fit`` is replaced by a stand-in that records its call and returns the settings it got,
and ``evaluate`` scores those settings with a known function, so every choice here has
a known answer and nothing trains.
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest

from bayes_transfer import data, models
from bayes_transfer.inference import map as btmap
from bayes_transfer.inference.map import FinetuneConfig, finetune
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.training import TrainConfig, split_model


@pytest.fixture(scope="module")
def splits():
    return data.load("digits", shots_per_class=5, seed=0)


@pytest.fixture(scope="module")
def prior():
    model = models.create("small_cnn", 10, seed=1, width=0.25)
    _, params, _ = split_model(model)
    spec = ParamSpec.from_params(params)
    return Prior.diagonal(spec, spec.ravel(params), np.full(spec.size, 1e-3, np.float32))


@pytest.fixture
def calls(monkeypatch):
    """Replace fit: each call is recorded and returns its settings as the 'result'."""
    made = []

    def fake_fit(model, dataset, loss, train, *, aux=None, params=None, optimizer=None, **kw):
        made.append(types.SimpleNamespace(n=len(dataset), lr=train.learning_rate,
                                          wd=train.weight_decay, opt=train.optimizer,
                                          scale=float(aux.scale), loss=loss))
        return made[-1]

    monkeypatch.setattr(btmap, "fit", fake_fit)
    return made


def scored(best_variance, best_lr=1e-2, base=1e-3):
    """evaluate(): validation NLL is smallest at variance ``best_variance`` and ``best_lr``
    (λ = v / base), and grows by decades away from them; no prior: 10."""
    def evaluate(result, dataset):
        if math.isinf(result.scale):
            nll = 10.0 + abs(math.log10(result.lr / best_lr)) + result.wd
        else:
            v = result.scale * base
            nll = (math.log10(v / best_variance)) ** 2 + abs(math.log10(result.lr / best_lr))
        return {"nll": nll, "error": 0.5, "ece": 0.1, "brier": 0.2}, None
    return evaluate


def config(**kw):
    return FinetuneConfig(train=TrainConfig(steps=10, batch_size=16, optimizer="adam",
                                            learning_rate=1e-2, progress=False), **kw)


def model():
    return models.create("small_cnn", 10, seed=0, width=0.25)


def test_the_default_is_one_learning_rate_and_the_grid_as_before(splits, prior, calls):
    res = finetune(model(), splits, prior, "diag", config=config(variances=(0.1, 1.0)),
                   evaluate=scored(1.0))
    assert [(c.lr, c.scale) for c in calls] == [(1e-2, pytest.approx(100.0)),
                                               (1e-2, pytest.approx(1000.0)), (1e-2, math.inf)]
    assert all(c.opt == "adam" and c.wd == 0 for c in calls)
    assert res.budget == 3 and res.steps == 30 and res.grid_extended == []
    assert res.scale == pytest.approx(1000.0) and res.learning_rate == 1e-2
    assert not res.refit and res.seconds > 0


def test_every_method_gets_learning_rates_times_its_grid(splits, prior, calls):
    cfg = config(variances=(0.1, 1.0), learning_rates=(1e-3, 1e-2),
                 weight_decays=(0.0, 1e-3, 1e-2))
    res = finetune(model(), splits, prior, "l2sp", config=cfg, evaluate=scored(0.1, base=1.0))
    assert res.budget == 6 == len(calls)                      # 2 rates × (2 λ + no prior)
    assert res.learning_rate == 1e-2
    assert res.scale == pytest.approx(0.1)                    # L2-SP: Σ₀ = I, λ = v
    calls.clear()
    std = finetune(model(), splits, prior, "standard", config=cfg, evaluate=scored(0.1))
    assert std.budget == 6 == len(calls)                      # 2 rates × 3 weight decays
    assert {(c.lr, c.wd, c.opt) for c in calls} == {
        (lr, wd, "adamw" if wd else "adam") for lr in (1e-3, 1e-2) for wd in (0.0, 1e-3, 1e-2)}
    assert math.isinf(std.scale) and (std.learning_rate, std.weight_decay) == (1e-2, 0.0)
    assert [s["weight_decay"] for s in std.sweep][:3] == [0.0, 1e-3, 1e-2]


def test_standard_gets_as_many_weight_decays_as_the_grid_has_values(splits, prior, calls):
    """The default budget is equal too: standard, which has no λ, is tuned over weight
    decays, one per value of the others' grid (variances and the no-prior limit)."""
    cfg = config(variances=(0.1, 1.0, 10.0))
    std = finetune(model(), splits, prior, "standard", config=cfg, evaluate=scored(0.1))
    assert [c.wd for c in calls] == [0.0, 0.01, 0.1, 1.0] and std.budget == 4
    calls.clear()
    diag = finetune(model(), splits, prior, "diag", config=cfg, evaluate=scored(0.1))
    assert diag.budget == len(calls) == 4
    assert btmap.equal_weight_decays(6) == (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def test_a_clipped_grid_extends_a_decade_at_a_time(splits, prior, calls):
    cfg = config(variances=(0.1, 1.0), max_extensions=4)
    res = finetune(model(), splits, prior, "diag", config=cfg, evaluate=scored(1e-3))
    added = [e["variance"] for e in res.grid_extended]
    np.testing.assert_allclose(added, [1e-2, 1e-3, 1e-4])   # 1e-4 is worse: 1e-3 is inside
    assert all(e["side"] == "low" for e in res.grid_extended) and not res.grid_clipped
    assert res.scale * 1e-3 == pytest.approx(1e-3) and res.budget == 3 + 3
    # a limit: still at the end after one decade, and the result says so
    calls.clear()
    res = finetune(model(), splits, prior, "diag", config=config(variances=(0.1, 1.0),
                   max_extensions=1), evaluate=scored(1e-3))
    assert [e["variance"] for e in res.grid_extended] == pytest.approx([1e-2])
    assert res.grid_clipped and res.scale * 1e-3 == pytest.approx(1e-2)
    # the top end extends only without the no-prior limit (which is the open end)
    calls.clear()
    res = finetune(model(), splits, prior, "diag", config=config(
        variances=(0.1, 1.0), include_no_prior=False, max_extensions=2), evaluate=scored(30.0))
    assert [e["variance"] for e in res.grid_extended] == pytest.approx([10.0, 100.0])
    assert res.scale * 1e-3 == pytest.approx(10.0) and not res.grid_clipped


def test_a_weight_decay_chosen_at_the_top_extends_too(splits, prior, calls):
    """Standard's grid is weight decays: validation picking the largest one tried makes
    it try ten times more (at that learning rate), as far as max_extensions allows."""
    def evaluate(result, dataset):      # best weight decay: 50 (NLL grows away from it)
        wd = max(result.wd, 1e-6)
        return {"nll": (math.log10(wd / 50.0)) ** 2, "error": 0.5}, None

    res = finetune(model(), splits, prior, "standard", config=config(
        variances=(0.1, 1.0, 10.0), max_extensions=3), evaluate=evaluate)
    assert [c.wd for c in calls] == [0.0, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    assert [e["weight_decay"] for e in res.grid_extended] == [10.0, 100.0, 1000.0]
    assert res.weight_decay == 100.0 and not res.grid_clipped and res.budget == 7
    calls.clear()
    res = finetune(model(), splits, prior, "standard", config=config(
        variances=(0.1, 1.0, 10.0), max_extensions=1), evaluate=evaluate)
    assert res.weight_decay == 10.0 and res.grid_clipped


def test_refit_retrains_the_choice_on_every_labelled_example(splits, prior, calls):
    cfg = config(variances=(0.1, 1.0), learning_rates=(1e-3, 1e-2), refit=True)
    res = finetune(model(), splits, prior, "diag", config=cfg, evaluate=scored(0.1, 1e-3))
    *sweep, last = calls
    n_train, n_all = len(splits.train), len(splits.train) + len(splits.val)
    assert all(c.n == n_train for c in sweep) and last.n == n_all
    assert (last.lr, last.scale) == (1e-3, pytest.approx(100.0))
    assert last.loss is not sweep[0].loss                      # the prior term's N is n_all
    assert res.refit and res.result is last and res.budget == 6
    assert res.steps == 6 * 10 + 10


def test_evidence_with_refit_trains_once_on_train_and_val(splits, prior, calls):
    res = finetune(model(), splits, prior, "standard", scale="evidence",
                   config=config(refit=True), evaluate=scored(1.0))
    assert [c.n for c in calls] == [len(splits.train) + len(splits.val)]
    assert res.budget == 1 and res.val_metrics == {} and math.isinf(res.scale)


def test_validation_out_of_the_shots_splits_the_same_k_per_class():
    default = data.load("digits", shots_per_class=10, seed=3)
    within = data.load("digits", shots_per_class=10, seed=3, val_from_shots=True)
    assert np.bincount(within.train.labels).tolist() == [8] * 10
    assert np.bincount(within.val.labels).tolist() == [2] * 10
    flat = lambda ds: sorted(map(bytes, ds.images.reshape(len(ds), -1)))  # noqa: E731
    # every label is one of the default's k-shot training set, none is used twice
    assert flat(within.train) + flat(within.val) != [] and sorted(
        flat(within.train) + flat(within.val)) == flat(default.train)
    assert not set(flat(within.train)) & set(flat(within.val))
    assert len(default.val) == 100                            # the default is unchanged
    three = data.load("digits", shots_per_class=10, seed=3, val_from_shots=True,
                      val_per_class=3)
    assert np.bincount(three.val.labels).tolist() == [3] * 10
    with pytest.raises(Exception, match="between 1 and shots_per_class - 1"):
        data.load("digits", shots_per_class=1, seed=0, val_from_shots=True)


@pytest.fixture(scope="module")
def prior_path(prior, tmp_path_factory):
    from bayes_transfer.artifacts import save_prior
    path = tmp_path_factory.mktemp("prior") / "diag"
    save_prior(prior.with_metadata({"architecture": {
        "arch": "small_cnn", "num_classes": 10, "in_channels": 1, "width": 0.25}}), path)
    return str(path)


def test_the_command_line_says_when_the_grid_was_extended(prior_path, calls, monkeypatch,
                                                          capsys, tmp_path):
    from bayes_transfer.cli import main
    monkeypatch.setattr(btmap, "evaluate_classification", scored(1e-5))
    out = tmp_path / "r.json"
    main(["finetune", "--prior", prior_path, "--dataset", "digits", "--shots", "5",
          "--method", "diag", "--epochs", "1", "--extend-grid", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "validation chose an end of the grid: extended it to v = 0.001, 0.0001" in text
    assert "still at the end after 2 decades" in text
    assert "(8 configurations," in text                   # 5 variances + none + 2 added
    import json
    row = json.loads(out.read_text())["results"][0]
    assert row["grid_clipped"] and len(row["grid_extended"]) == 2 and row["budget"] == 8


def test_the_command_line_learns_the_scale_by_the_evidence(prior_path, capsys, tmp_path):
    from bayes_transfer.cli import main
    out = tmp_path / "r.json"
    main(["finetune", "--prior", prior_path, "--dataset", "digits", "--shots", "5",
          "--method", "diag", "--epochs", "4", "--scale", "evidence", "--out", str(out)])
    text = capsys.readouterr().out
    assert "evidence: v = λ·mean diag Σ₀ went" in text
    import json
    row = json.loads(out.read_text())["results"][0]
    assert [t["step"] for t in row["evidence_trace"]] == [1, 2, 3, 4]
    assert row["budget"] == 1 and row["steps"] == 4
    main(["finetune", "--prior", prior_path, "--dataset", "digits", "--shots", "5",
          "--method", "diag", "--epochs", "4", "--scale", "de-elbo", "--out", str(out)])
    assert "de-elbo: v = λ*·mean diag Σ₀ went" in capsys.readouterr().out
    row = json.loads(out.read_text())["results"][0]
    assert row["evidence_trace"][-1]["kappa"] > 1 and row["budget"] == 1
    main(["finetune", "--prior", prior_path, "--dataset", "digits", "--shots", "5",
          "--method", "diag", "--epochs", "2", "--scale", "de-elbo", "--per-block"])
    assert "  block " in capsys.readouterr().out
    assert main(["finetune", "--prior", prior_path, "--dataset", "digits", "--method",
                 "diag", "--scale", "elbo"]) == 2
    assert "--scale 'elbo': give a number (λ) or one of" in capsys.readouterr().err


def test_the_command_line_compares_all_methods_with_equal_budgets_inside_the_shots(
        prior_path, calls, monkeypatch, tmp_path):
    """`finetune --method all` tunes every method alike, as the demo does: learning rates
    --lr and --lr/10 crossed with each method's grid (weight decays for standard), chosen
    on validation held out of the shots, the choice retrained on all of them."""
    import json

    from bayes_transfer.cli import main
    monkeypatch.setattr(btmap, "evaluate_classification", scored(1.0))
    out = tmp_path / "r.json"
    assert main(["finetune", "--prior", prior_path, "--dataset", "digits", "--shots", "5",
                 "--method", "all", "--epochs", "1", "--extend-grid", "0",
                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    # every method but lowrank: this prior is diagonal, it has no SWAG deviations
    assert [r["method"] for r in rows] == [m for m in btmap.METHODS if m != "lowrank"]
    assert {r["budget"] for r in rows} == {2 * 6}        # 2 rates × (5 λ + none), or 6 wd
    assert {c.lr for c in calls} == {1e-2, 1e-3}
    sizes = sorted({c.n for c in calls})
    assert sizes == [40, 50]                   # 4 of the 5 per class to train, all 5 to refit
    # an explicit choice wins: validation besides the shots, one learning rate
    calls.clear()
    main(["finetune", "--prior", prior_path, "--dataset", "digits", "--shots", "5",
          "--method", "all", "--epochs", "1", "--extend-grid", "0", "--no-val-from-shots",
          "--learning-rates", "0.01"])
    assert {c.lr for c in calls} == {1e-2} and {c.n for c in calls} == {50}
