"""The experiment runner: a tiny config end to end, resume after a cut, config errors."""
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from bayes_transfer import models
from bayes_transfer.artifacts import save_prior
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.params import ParamSpec
from bayes_transfer.prior import Prior
from bayes_transfer.train import split_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import paired  # noqa: E402
import runner  # noqa: E402


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    model = models.create("small_cnn", 10, seed=1, width=0.25)
    _, params, _ = split_model(model)
    spec = ParamSpec.from_params(params)
    rng = np.random.default_rng(0)
    prior = Prior.lowrank(spec, spec.ravel(params),
                          jnp.asarray(rng.uniform(1e-4, 1e-3, spec.size), jnp.float32),
                          jnp.asarray(rng.normal(0, 1e-2, (3, spec.size)), jnp.float32))
    path = tmp_path_factory.mktemp("prior") / "p"
    save_prior(prior.with_metadata({"architecture": {
        "arch": "small_cnn", "num_classes": 10, "in_channels": 1, "width": 0.25}}), path)
    return str(path)


def tiny_config(prior_dir):
    return runner.check_config({
        "name": "tiny", "priors": {"p": prior_dir}, "target": {"dataset": "digits"},
        "shots": [2, 4], "seeds": 2, "methods": ["sgld:lowrank", "lowrank", "standard"],
        "tuning": {"learning_rates": [1e-3, 1e-2], "variances": [1.0], "steps": 3,
                   "batch_size": 10},
        "posterior": {"samples": 2, "sgld": {"cycle_steps": 2, "learning_rate": 1e-4}},
        "reliability": {"shots": 2, "seed": 0}})


def test_runner_end_to_end_and_resume_reproduces_a_cut_cell(prior_dir, tmp_path):
    config = tiny_config(prior_dir)
    summary = runner.run(config, tmp_path)
    rows = runner.read_rows(tmp_path / "runs.jsonl")
    assert len(rows) == 2 * 2 * 3 == len({r["key"] for r in rows})
    for r in rows:   # every method saw the same lr grid; the choice is one of them
        assert [t["learning_rate"] for t in r["tuning"]] == [1e-3, 1e-2]
        assert r["learning_rate"] in (1e-3, 1e-2)
        assert r["num_train"] == 10 * r["shots"]
    assert all(r["samples"] == 2 for r in rows if r["method"] == "sgld:lowrank")
    err = summary["p"]["lowrank"]["2"]["error"]
    vals = [r["test"]["error"] for r in rows if r["method"] == "lowrank" and r["shots"] == 2]
    assert err[0] == pytest.approx(np.mean(vals)) and err[3] == 2
    assert (tmp_path / "fewshot.png").stat().st_size > 1000
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    assert "| sgld:lowrank |" in (tmp_path / "summary.md").read_text()
    assert "12 of 12 cells ran" in (tmp_path / "summary.md").read_text()

    # A kill mid-write leaves a cut last line: the rerun redoes exactly that cell, alike.
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    (tmp_path / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    runner.run(config, tmp_path)
    again = runner.read_rows(tmp_path / "runs.jsonl")
    assert len(again) == len(rows)
    assert again[-1]["key"] == rows[-1]["key"]
    assert again[-1]["test"] == rows[-1]["test"]


def test_config_errors_say_what_is_wrong(prior_dir, tmp_path):
    good = {"name": "x", "priors": {"p": prior_dir}, "target": {"dataset": "digits"},
            "shots": [2], "seeds": 1, "methods": ["lowrank"]}
    with pytest.raises(BayesTransferError, match="unknown method 'mcmc:lowrank'"):
        runner.check_config({**good, "methods": ["mcmc:lowrank"]})
    with pytest.raises(BayesTransferError, match="missing key 'shots'"):
        runner.check_config({k: v for k, v in good.items() if k != "shots"})
    with pytest.raises(BayesTransferError, match="unknown tuning keys"):
        runner.check_config({**good, "tuning": {"lr": [1]}})
    with pytest.raises(BayesTransferError, match="variant 'x1' has unknown keys"):
        runner.check_config({**good, "methods": ["x1"],
                             "variants": {"x1": {"method": "lowrank", "reinit": 1}}})
    with pytest.raises(BayesTransferError, match="samplers run under a base prior"):
        runner.check_config({**good, "methods": ["sgld:x1"],
                             "variants": {"x1": {"method": "lowrank", "reinit_top": 1}}})
    ok = runner.check_config({**good, "methods": ["x1"],
                              "variants": {"x1": {"method": "l2sp", "l2": 1e-4}}})
    assert ok["variants"]["x1"]["l2"] == 1e-4
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BayesTransferError, match="not valid JSON"):
        runner.load_config(bad)


def test_committed_configs_are_valid():
    for path in sorted((Path(runner.ROOT) / "experiments" / "configs").glob("*.json")):
        config = runner.load_config(path)
        assert config["seeds"], path
        json.dumps(config)


def test_compute_time_estimates_missing_cells_from_their_group():
    config = {"priors": {"a": "x", "b": "y"}, "shots": [1, "all"], "seeds": [0, 1],
              "methods": ["standard", "lowrank"]}
    secs = {("a", 1, 0, "standard"): 10, ("a", 1, 1, "standard"): 20,
            ("a", "all", 0, "standard"): 100, ("a", 1, 0, "lowrank"): 40,
            ("b", "all", 0, "lowrank"): 300, ("b", "all", 1, "lowrank"): 500}
    rows = [{"key": runner.cell_key(*k), "seconds": v} for k, v in secs.items()]
    rows.append({"key": runner.cell_key("c", 1, 0, "standard"), "seconds": 1e6})  # not in config
    c = runner.compute_time(rows, config)
    assert (c["cells"], c["done"]) == (16, 6)
    assert c["done_hours"] == pytest.approx(970 / 3600)
    assert c["seconds_per_cell"]["standard"] == {"1": 15.0, "all": 100.0}
    # missing: standard 1 x2 (15 each), standard all x3 (100), lowrank 1 x3 (40), all x2 (400)
    assert c["estimate_hours"] == pytest.approx((970 + 30 + 300 + 120 + 800) / 3600)
    assert "6 of 16 cells ran" in runner.format_compute(c)
    no_group = runner.compute_time(rows[:3], config)   # no lowrank run yet
    assert no_group["estimate_hours"] is None
    assert "not estimable yet" in runner.format_compute(no_group)


def test_report_only_without_results_says_what_to_do(prior_dir, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"name": "x", "priors": {"p": prior_dir},
                               "target": {"dataset": "digits"}, "shots": [2], "seeds": 1,
                               "methods": ["lowrank"]}))
    with pytest.raises(SystemExit, match="no results in .*run without --report-only"):
        runner.main([str(cfg), "--out", str(tmp_path / "none"), "--report-only"])
    with pytest.raises(SystemExit, match="no results in"):
        runner.main([str(cfg), "--out", str(tmp_path / "none"), "--estimate"])


def test_paired_differences_use_only_seeds_where_both_methods_ran():
    config = {"priors": {"p": "x"}, "shots": [10], "seeds": [0, 1, 2, 3],
              "methods": ["a", "b"]}
    test = lambda e: {"error": e, "nll": 2 * e, "ece": 0.5}            # noqa: E731
    rows = [{"key": runner.cell_key("p", 10, s, "a"), "test": test(v)}
            for s, v in enumerate([0.3, 0.5, 0.4, 0.9])]
    rows += [{"key": runner.cell_key("p", 10, s, "b"), "test": test(v)}
             for s, v in enumerate([0.1, 0.2, 0.4])]                # seed 3: no b
    (e,) = paired.paired(rows, config, "a", "b")
    assert e["n"] == 3
    assert e["error"] == pytest.approx(runner.interval([0.2, 0.3, 0.0]))
    assert e["nll"][0] == pytest.approx(2 * np.mean([0.2, 0.3, 0.0]))
    assert e["ece"][:2] == (0.0, 0.0)
    text = paired.format_paired([e], "a", "b")
    assert "| p | 10 | 3 | +0.1667" in text and "*" not in text.split("\n", 2)[2]


def test_equal_budgets_validation_within_the_shots_and_evidence(prior_dir, tmp_path):
    config = runner.check_config({
        "name": "budgets", "priors": {"p": prior_dir}, "target": {"dataset": "digits"},
        "shots": [5], "seeds": 1,
        "methods": ["standard", "lowrank", "lowrank-evidence", "lowrank-de-elbo"],
        "variants": {"lowrank-evidence": {"method": "lowrank", "scale": "evidence"},
                     "lowrank-de-elbo": {"method": "lowrank", "scale": "de-elbo"}},
        "tuning": {"learning_rates": [1e-3, 1e-2], "variances": [1.0], "steps": 3,
                   "batch_size": 10, "weight_decays": [0.0, 1e-2], "validation": "within",
                   "evidence": {"updates": 1}, "elbo": {"init_std": 1e-2}}})
    runner.run(config, tmp_path)
    rows = {r["method"]: r for r in runner.read_rows(tmp_path / "runs.jsonl")}
    # standard: 2 rates × 2 weight decays; lowrank: 2 rates × (v = 1, no prior);
    # evidence, de-elbo: 1
    assert [rows[m]["budget"] for m in config["methods"]] == [4, 4, 1, 1]
    assert rows["standard"]["steps"] == rows["lowrank"]["steps"] == 4 * 3 + 3   # + refit
    assert rows["lowrank-evidence"]["steps"] == rows["lowrank-de-elbo"]["steps"] == 3
    # the 5 shots per class are every label: 4 train + 1 validation, then all 5
    assert all(r["num_train"] == 50 and r["refit"] for r in rows.values())
    trace = rows["lowrank-evidence"]["evidence_trace"]
    assert len(trace) == 2 and trace[0]["applied"] and not trace[1]["applied"]
    elbo = rows["lowrank-de-elbo"]["evidence_trace"][-1]
    assert elbo["step"] == 3 and elbo["kappa"] > 1 and elbo["std"] > 0
    text = (tmp_path / "summary.md").read_text()
    assert "## budget and compute per cell" in text
    assert "| lowrank-evidence | 5 | 1 | 3 |" in text
    with pytest.raises(BayesTransferError, match="at least 2 shots per class"):
        runner.check_config({**config, "shots": [1, 5]})
    # 1 per class: nothing to hold out, so one-run methods alone, on the one label each
    one = runner.check_config({**config, "shots": [1], "methods": ["lowrank-de-elbo"]})
    runner.run(one, tmp_path / "one")
    [row] = runner.read_rows(tmp_path / "one" / "runs.jsonl")
    assert row["num_train"] == 10 and row["budget"] == 1
    with pytest.raises(BayesTransferError, match="variant 'x': 'elbo'"):
        runner.check_config({**config, "methods": ["x"], "variants": {
            "x": {"method": "lowrank", "scale": "de-elbo", "elbo": {"per_blok": True}}}})
    with pytest.raises(BayesTransferError, match="'scale' can only be one of"):
        runner.check_config({**config, "variants": {"x": {"method": "lowrank", "scale": 3}},
                             "methods": ["x"]})
