"""NumPyro interop: an exact (NUTS) Bayesian last layer on a backbone fine-tuned under the prior.

    python experiments/numpyro_lastlayer.py --seed 0

1. MAP fine-tuning under the learned low-rank prior (λ chosen on validation, the
   demo's budget) on MNIST-5k with 10 examples per class.
2. The backbone is frozen; its features feed a NumPyro multinomial logistic regression
   whose head prior is a ``bayes_transfer.Prior`` used through ``prior.as_numpyro()``.
   The prior variance is chosen on validation NLL from a small grid (as λ is).
3. NUTS samples the head; the test metrics of its Bayesian model average are printed
   beside the MAP model's, and written to ``experiments/results/numpyro_lastlayer.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runner  # noqa: E402,F401  (the repository's prior registry: runner/__init__.py)

import bayes_transfer as bt  # noqa: E402
from bayes_transfer import data as btdata  # noqa: E402
from bayes_transfer.evaluation.metrics import evaluate_probs  # noqa: E402
from bayes_transfer.inference.map import FinetuneConfig, finetune  # noqa: E402
from bayes_transfer.inference.numpyro_lastlayer import (  # noqa: E402
    last_layer_features, last_layer_nuts, last_layer_predict)
from bayes_transfer.params import ParamSpec  # noqa: E402
from bayes_transfer.prior import Prior  # noqa: E402


#: The demo's MAP budget (3 prior strengths + the no-prior limit, 30 epochs).
MAP_CONFIG = dataclasses.replace(
    FinetuneConfig(), variances=(1.0, 10.0, 100.0),
    train=dataclasses.replace(FinetuneConfig().train, epochs=30))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prior", default="fashion-mnist/small-cnn")
    p.add_argument("--dataset", default="mnist_5k")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variances", default="0.1,1,10", help="head prior variances tried")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "numpyro_lastlayer.json"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    prior = bt.load_prior(args.prior)
    splits = btdata.load(args.dataset, shots_per_class=args.shots, seed=args.seed)
    model = bt.models.from_prior(prior, splits.train.num_classes, seed=args.seed)
    res = finetune(model, splits, prior, "lowrank", config=MAP_CONFIG)
    print(f"MAP (lowrank, λ={res.scale:.3g}): test {res.metrics}")

    feats = {name: last_layer_features(res.result, getattr(splits, name))
             for name in ("train", "val", "test")}
    spec = ParamSpec.from_params(res.result.state.params, rule="^head/")
    trials = []
    for var in (float(v) for v in args.variances.split(",")):
        head_prior = Prior.isotropic(spec, var=var)   # used through head_prior.as_numpyro()
        post = last_layer_nuts(feats["train"], splits.train.labels, head_prior,
                               num_samples=args.samples, num_warmup=args.warmup,
                               num_classes=splits.train.num_classes, seed=args.seed,
                               progress=True)
        val = evaluate_probs(last_layer_predict(post, feats["val"]), splits.val.labels)
        trials.append({"variance": var, "val": val, "post": post})
        print(f"head prior N(0, {var:g}·I): val {val}")
    best = min(trials, key=lambda t: t["val"]["nll"])
    test = evaluate_probs(last_layer_predict(best["post"], feats["test"]), splits.test.labels)
    print(f"NUTS last layer (variance {best['variance']:g} chosen on val): test {test}")
    print(f"MAP                                           : test {res.metrics}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python experiments/numpyro_lastlayer.py " + " ".join(argv or sys.argv[1:]),
        "prior": args.prior, "dataset": args.dataset, "shots": args.shots, "seed": args.seed,
        "map": {"scale": res.scale, "test": res.metrics},
        "nuts": {"variance": best["variance"], "test": test, "samples": args.samples,
                 "warmup": args.warmup,
                 "val_by_variance": {str(t["variance"]): t["val"] for t in trials}},
        "seconds": time.perf_counter() - t0}, indent=2))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
