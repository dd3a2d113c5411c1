"""Transferability measures (LogME, kNN), suggest, and the non-binary transfer options of
FinetuneConfig (reinit_top, layer_lr, l2)."""
import dataclasses
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import optimize, stats

import bayes_transfer as bt
from bayes_transfer import data, models
from bayes_transfer.inference.map import FinetuneConfig, _reinit_top, finetune, with_l2
from bayes_transfer.params import backbone_blocks, top_block_paths
from bayes_transfer.prior import restrict_prior
from bayes_transfer.training.objectives import map_loss
from bayes_transfer.params import ParamSpec, flatten_with_paths
from bayes_transfer.prior import Prior
from bayes_transfer.analysis.suggest import Suggestion, suggest
from bayes_transfer.training import TrainConfig, fit, make_apply, split_model
from bayes_transfer.analysis.transferability import knn_accuracy, logme, logme_per_class, transferability


# ---------------------------------------------------------------------------- LogME
def _dense_max_evidence(f, y):
    """max over (α, β) of log N(y; 0, FFᵀ/α + I/β) / n, by Nelder-Mead on (log α, log β)."""
    n = len(y)

    def neg(t):
        a, b = np.exp(t)
        return -stats.multivariate_normal(np.zeros(n), f @ f.T / a + np.eye(n) / b).logpdf(y)

    best = optimize.minimize(neg, np.zeros(2), method="Nelder-Mead",
                             options=dict(xatol=1e-10, fatol=1e-13, maxiter=4000))
    return -best.fun / n, np.exp(best.x)


@pytest.mark.parametrize("n,dim", [(40, 6), (15, 25)])   # n > D and n < D (few-shot)
def test_logme_is_the_maximised_evidence_of_bayesian_linear_regression(n, dim):
    rng = np.random.default_rng(n)
    labels = rng.integers(0, 3, n)
    feats = rng.normal(size=(n, dim)) + 2.0 * np.eye(3, dim)[labels]
    ev, alpha, beta = logme_per_class(feats, labels, num_classes=3)
    for c in range(3):
        ref, (a, b) = _dense_max_evidence(feats, (labels == c).astype(float))
        np.testing.assert_allclose(ev[c], ref, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(beta[c], b, rtol=1e-4)
        if a < 1e6:
            np.testing.assert_allclose(alpha[c], a, rtol=1e-4)
        else:   # the evidence is largest at α = ∞ (w = 0): both go there
            assert alpha[c] > 1e6
    assert logme(feats, labels) == pytest.approx(ev.mean())


def test_features_that_carry_the_labels_score_higher_than_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    noise = rng.normal(size=(200, 16))
    informative = noise + 3.0 * np.eye(4, 16)[labels]
    assert logme(informative, labels) > logme(noise, labels) + 0.05
    assert knn_accuracy(informative, labels) > 0.9
    assert knn_accuracy(noise, labels) < 0.45


def test_knn_accuracy_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 5))
    y = rng.integers(0, 2, 30)              # two classes, odd k: no ties
    q, qy = rng.normal(size=(12, 5)), rng.integers(0, 2, 12)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731

    def brute(xs, ys, qs, qys, k, loo):
        sim = unit(qs) @ unit(xs).T
        hits = 0
        for i in range(len(qs)):
            s = sim[i].copy()
            if loo:
                s[i] = -np.inf
            nn = np.argsort(-s)[:k]
            hits += int(np.bincount(ys[nn], minlength=2).argmax() == qys[i])
        return hits / len(qs)

    for k in (1, 3, 5):
        assert knn_accuracy(x, y, k=k) == pytest.approx(brute(x, y, x, y, k, True))
        assert knn_accuracy(x, y, q, qy, k=k) == pytest.approx(brute(x, y, q, qy, k, False))


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def splits():
    return data.load("digits", shots_per_class=5, seed=0)


def _prior_around(model, seed=0):
    _, params, _ = split_model(model)
    spec = ParamSpec.from_params(params)
    rng = np.random.default_rng(seed)
    mean = spec.ravel(params) + jnp.asarray(rng.normal(0, 1e-2, spec.size), jnp.float32)
    var = jnp.asarray(rng.uniform(1e-4, 1e-3, spec.size), jnp.float32)
    dev = jnp.asarray(rng.normal(0, 1e-2, (3, spec.size)), jnp.float32)
    return Prior.lowrank(spec, mean, var, dev).with_metadata(
        {"architecture": models.model_config(model)})


@pytest.fixture(scope="module")
def prior():
    return _prior_around(models.create("small_cnn", 10, seed=1, width=0.25))


def test_transferability_and_suggest_end_to_end(splits, prior):
    t = transferability(prior, splits)
    assert t["num_examples"] == len(splits.train) + len(splits.val)
    assert 0.0 <= t["knn"] <= 1.0 and math.isfinite(t["logme"])
    with pytest.raises(bt.BayesTransferError):
        transferability(prior, splits, parts=("train", "test"))
    s = suggest(prior, splits, variances=(1e-2, 1.0, 100.0))
    assert isinstance(s, Suggestion) and bt.suggest is suggest
    assert s.variance in (1e-2, 1.0, 100.0) and s.reinit_top in (0, 1)
    assert {"knn_random", "gain"} <= set(s.measures)
    assert "Suggested" in s.explain()
    cfg = s.finetune_config()
    assert cfg.variances == (s.variance,) and cfg.reinit_top == s.reinit_top
    assert s.scale(prior, "l2sp") == pytest.approx(s.variance)     # Σ₀ = I for L2-SP


def test_suggest_rule_direction(monkeypatch, prior, splits):
    """High q → strong prior, no re-init; low q → weakest prior and re-init; ``offset``
    moves the choice along the grid, clipped at its ends."""
    module = importlib.import_module("bayes_transfer.suggest")   # bt.suggest is the function
    for q, offset, v, r in [(0.95, 0, 1e-2, 0), (0.95, 1, 1.0, 0), (0.95, -3, 1e-2, 0),
                            (0.5, 0, 1.0, 0), (0.5, 1, 100.0, 0), (0.1, 1, 100.0, 1)]:
        fake = {"logme": 0.0, "knn": q, "knn_chance": 0.0, "knn_normalized": q,
                "num_examples": 10}
        monkeypatch.setattr(module, "transferability", lambda *a, fake=fake, **kw: fake)
        s = module.suggest(prior, splits, variances=(1e-2, 1.0, 100.0), baseline=False,
                           offset=offset)
        assert (s.variance, s.reinit_top) == (v, r), (q, offset)


def test_suggest_gain_rule_against_hand_computed_values():
    """v* = strongest·10^((full_gain − g)/gain_per_decade), snapped to the log-nearest grid
    value (ties to the weaker prior), strongest once g ≥ full_gain, the weakest grid
    value with re-initialisation when g ≤ 0; q does not enter (the same gain at 1 and at
    100 examples per class gives the same prior)."""
    from bayes_transfer.analysis.suggest import rule

    grid = (1e-2, 1e-1, 1.0, 10.0, 100.0)
    for gain, v, r in [(0.3, 1.0, 0), (0.1, 1.0, 0), (0.075, 10.0, 0), (0.05, 100.0, 0),
                       (0.0875, 10.0, 0),        # v* = 10^0.5: a tie, the weaker prior
                       (0.09, 1.0, 0), (0.01, 100.0, 0), (0.0, 100.0, 1), (-0.2, 100.0, 1)]:
        for q in (0.55, 0.9):
            m = {"knn_normalized": q, "gain": gain}
            assert rule(m, grid)[:2] == (v, r), (gain, q)
    m = {"knn_normalized": 0.8, "gain": 0.05}
    assert rule(m, grid, strongest=0.01, full_gain=0.05)[0] == 0.01
    assert rule(m, grid, gain_per_decade=0.05)[0] == 10.0          # one decade from 1
    assert rule(m, (0.3, 3.0, 30.0))[0] == 30.0                    # v* = 100, off a decade grid
    assert "Gain +0.050" in rule(m, grid)[2][0]
    with pytest.raises(bt.BayesTransferError, match="positive"):
        rule(m, grid, gain_per_decade=0.0)
    with pytest.raises(bt.BayesTransferError, match="grid"):
        rule(m, (1.0, float("inf")))
    assert rule({"knn_normalized": 0.8, "gain": 0.01}, grid, gain_per_decade=1e-6)[0] == 100.0


def test_suggest_cli_writes_the_suggestion_and_a_finetune_command_that_runs(prior, tmp_path,
                                                                            capsys):
    """``bayes-transfer suggest`` prints the explanation and a ``finetune`` command with
    λ and the re-initialisation depth; that command runs as printed."""
    import json
    import shlex

    from bayes_transfer import cli
    from bayes_transfer.artifacts import save_prior

    path = tmp_path / "prior"
    save_prior(prior, path)
    out = tmp_path / "suggestion.json"
    assert cli.main(["suggest", "--prior", str(path), "--dataset", "digits", "--shots", "5",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    expected = suggest(prior, data.load("digits", shots_per_class=5, seed=0))
    assert (got["variance"], got["reinit_top"]) == (expected.variance, expected.reinit_top)
    assert got["scale"] == pytest.approx(expected.scale(prior, "lowrank"), rel=1e-5)
    command = shlex.split(printed.strip().splitlines()[-2].strip())
    assert command == got["command"] and command[:2] == ["bayes-transfer", "finetune"]
    assert command[command.index("--reinit-top") + 1] == str(got["reinit_top"])
    result = tmp_path / "finetune.json"
    assert cli.main([*command[1:], "--epochs", "1", "--out", str(result)]) == 0
    (row,) = json.loads(result.read_text())["results"]
    assert row["scale"] == pytest.approx(got["scale"], rel=1e-5)


# ---------------------------------------------------------------------------- non-binary transfer
def _abstract_params(arch):
    """Parameter shapes only (nnx.eval_shape): no initialisation cost."""
    return split_model(nnx.eval_shape(lambda: models.create(arch, 10, in_channels=3)))[1]


def test_blocks_follow_each_architectures_paths():
    for arch, first, last in [("small_cnn", "stages/0/0", "stages/2/0"),
                              ("resnet20", "stem", "layer3/2"), ("resnet18", "stem", "layer4/1")]:
        params = _abstract_params(arch)
        blocks = backbone_blocks(params)
        assert blocks[0][0] == first and blocks[-1][0] == last
        covered = [p for _, paths in blocks for p in paths]
        assert sorted(covered) == sorted(p for p in flatten_with_paths(params)
                                         if p.startswith("backbone/"))
    params = _abstract_params("resnet18")
    assert "backbone/layer4/0/downsample/0/kernel" in top_block_paths(params, 2)
    with pytest.raises(bt.BayesTransferError):
        top_block_paths(params, 10)


def test_reinit_changes_exactly_the_top_blocks_and_marginalises_the_prior(prior):
    model = models.create("small_cnn", 10, seed=0, width=0.25)
    _, fresh, _ = split_model(model)
    start = prior.init_params(fresh)
    params, sub = _reinit_top(model, start, prior, 2)
    chosen = set(top_block_paths(start, 2))
    assert {p.split("/")[2] + "/" + p.split("/")[3] for p in chosen} == {"1/1", "2/0"}
    before, after, init = (flatten_with_paths(t) for t in (start, params, fresh))
    for path in before:
        if path in chosen:
            np.testing.assert_array_equal(after[path], init[path])
            assert not np.array_equal(after[path], before[path])
        else:
            np.testing.assert_array_equal(after[path], before[path])
    assert set(sub.spec.paths) == set(prior.spec.paths) - chosen
    sub.init_params(params)                       # the restricted spec's rule still checks


def test_restricted_prior_is_the_dense_marginal():
    jax.config.update("jax_enable_x64", True)
    try:
        params = {"backbone": {"a": {"0": {"w": jnp.zeros((2, 3))}, "1": {"w": jnp.zeros(4)}},
                               "stem": jnp.zeros(2)}}
        spec = ParamSpec.from_params(params)
        rng = np.random.default_rng(0)
        d = spec.size
        full = Prior.lowrank(spec, rng.normal(size=d), rng.uniform(0.5, 1.5, d),
                             rng.normal(size=(3, d)), scale=2.0, floor=0.1)
        drop = ("backbone/a/1/w",)
        keep = np.concatenate([np.arange(o, o + s) for p, o, s in zip(
            spec.paths, spec.offsets, [int(np.prod(s)) for s in spec.shapes]) if p not in drop])
        theta = rng.normal(size=d)
        for kind in ("lowrank", "diag", "isotropic"):
            p = full.for_method(kind) if kind != "isotropic" else full.for_method("l2sp")
            sub = restrict_prior(p, drop)
            assert sub.kind == p.kind and sub.dim == len(keep)
            cov = np.asarray(p.covariance())[np.ix_(keep, keep)]
            ref = stats.multivariate_normal(np.asarray(jnp.broadcast_to(p.mean, (d,)))[keep],
                                            cov).logpdf(theta[keep])
            np.testing.assert_allclose(sub.log_prob(jnp.asarray(theta[keep])), ref, rtol=1e-10)
    finally:
        jax.config.update("jax_enable_x64", False)


TINY = TrainConfig(epochs=1, batch_size=25, optimizer="adam", learning_rate=1e-2,
                   schedule="constant", progress=False)


def test_layer_lr_zero_freezes_the_transferred_blocks(splits, prior):
    model = models.create("small_cnn", 10, seed=0, width=0.25)
    cfg = FinetuneConfig(train=TINY, layer_lr=0.0, reinit_top=1)
    res = finetune(model, splits, prior, "lowrank", scale=1.0, config=cfg)
    _, fresh, _ = split_model(model)
    before = flatten_with_paths(_reinit_top(model, prior.init_params(fresh), prior, 1)[0])
    after = flatten_with_paths(res.result.params)
    top = set(top_block_paths(fresh, 1))
    for path, x in after.items():
        if path.startswith("backbone/") and path not in top:
            np.testing.assert_array_equal(x, before[path])        # frozen at the prior mean
        else:
            assert not np.array_equal(x, before[path])             # head and fresh block train


def test_layer_lr_scales_the_backbone_step(splits, prior):
    """One Adam step: the backbone moves layer_lr times as far, the head as far."""
    from bayes_transfer.inference.map import layer_lr_optimizer

    model = models.create("small_cnn", 10, seed=0, width=0.25)
    _, fresh, _ = split_model(model)
    start = flatten_with_paths(prior.init_params(fresh))
    one_step = dataclasses.replace(TINY, epochs=0.5)   # 50 examples, 2 batches
    loss = map_loss(len(splits.train))
    moves = {}
    for factor in (1.0, 0.25):
        cfg = FinetuneConfig(train=one_step, layer_lr=factor)
        tx = layer_lr_optimizer(cfg, len(splits.train), prior.spec.paths, fresh)
        res = fit(model, splits.train, loss, one_step, aux=prior, params=prior.init_params(fresh),
                  optimizer=tx)
        assert int(res.state.step) == 1
        moves[factor] = {p: np.asarray(x) - np.asarray(start[p])
                         for p, x in flatten_with_paths(res.params).items()}
    for path, move in moves[0.25].items():
        expected = (0.25 if path.startswith("backbone/") else 1.0) * moves[1.0][path]
        np.testing.assert_allclose(move, expected, rtol=1e-4, atol=1e-6)


def test_layer_lr_decay_gives_each_block_its_own_step(splits, prior):
    """One Adam step with layer_lr=0.5, decay 0.25: the j-th block below the top moves
    0.5·0.25ʲ times as far as with no multipliers, the head as far."""
    from bayes_transfer.inference.map import layer_lr_optimizer

    model = models.create("small_cnn", 10, seed=0, width=0.25)
    _, fresh, _ = split_model(model)
    start = flatten_with_paths(prior.init_params(fresh))
    one_step = dataclasses.replace(TINY, epochs=0.5)
    loss = map_loss(len(splits.train))
    blocks = backbone_blocks(fresh)
    assert len(blocks) >= 3
    depth = {p: j for j, (_, paths) in enumerate(reversed(blocks)) for p in paths}
    moves = {}
    for lr, decay in ((1.0, 1.0), (0.5, 0.25)):
        cfg = FinetuneConfig(train=one_step, layer_lr=lr, layer_lr_decay=decay)
        tx = layer_lr_optimizer(cfg, len(splits.train), prior.spec.paths, fresh)
        assert (tx is None) == (lr == 1.0 and decay == 1.0)
        res = fit(model, splits.train, loss, one_step, aux=prior, params=prior.init_params(fresh),
                  optimizer=tx)
        moves[decay] = {p: np.asarray(x) - np.asarray(start[p])
                        for p, x in flatten_with_paths(res.params).items()}
    for path, move in moves[0.25].items():
        factor = 0.5 * 0.25 ** depth[path] if path in depth else 1.0
        np.testing.assert_allclose(move, factor * moves[1.0][path], rtol=1e-4, atol=1e-7)


def test_layer_lr_decay_counts_only_transferred_blocks(prior):
    from bayes_transfer.inference.map import layer_lr_optimizer
    from bayes_transfer.training.optim import layer_lr_factors

    _, fresh, _ = split_model(models.create("small_cnn", 10, seed=0, width=0.25))
    top = set(top_block_paths(fresh, 1))
    kept = [p for p in prior.spec.paths if p not in top]     # as after reinit_top=1
    factors = layer_lr_factors(kept, fresh, 0.1, 0.5)
    assert set(factors) == set(kept)
    below = top_block_paths(fresh, 2)
    second = [p for p in below if p not in top]
    assert second and all(factors[p] == 0.1 for p in second)  # the top transferred block
    assert sorted(set(factors.values()), reverse=True)[:2] == [0.1, 0.05]
    with pytest.raises(bt.BayesTransferError, match="layer_lr_decay"):
        layer_lr_optimizer(FinetuneConfig(layer_lr_decay=-1.0), 10, kept, fresh)


def test_l2_adds_half_l2_times_the_squared_norm(splits, prior):
    model = models.create("small_cnn", 10, seed=0, width=0.25)
    graphdef, params, rest = split_model(model)
    apply = make_apply(graphdef)
    batch = next(iter(data.batches(splits.train, 16, seed=0, epoch=0)))
    base = map_loss(len(splits.train), head_decay=1e-4)
    assert with_l2(base, 0.0) is base and with_l2(base, 0.3) is with_l2(base, 0.3)
    key = jax.random.PRNGKey(0)
    plain, _ = base(apply, params, rest, batch, key, prior)
    more, (_, parts) = with_l2(base, 0.3)(apply, params, rest, batch, key, prior)
    sq = sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(params))
    # a float32 difference of two losses that hold the prior's quadratic term: 1e-4
    np.testing.assert_allclose(more - plain, 0.15 * sq, rtol=1e-4)
    np.testing.assert_allclose(parts["l2"], 0.15 * sq, rtol=1e-5)


def test_defaults_change_nothing():
    cfg = FinetuneConfig()
    assert (cfg.reinit_top, cfg.layer_lr, cfg.l2) == (0, 1.0, 0.0)
