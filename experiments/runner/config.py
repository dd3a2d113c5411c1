"""The runner's config: a JSON file, checked once, with command-line overrides.

A config is a JSON file (see ``experiments/configs/``)::

    {
      "name": "fewshot_mnist5k",
      "priors": {"fashion": "fashion-mnist/small-cnn"},      # label → name, path or URL
      "target": {"dataset": "mnist_5k", "classes": null},
      "shots": [1, 5, 10, 50, 100, "all"],                  # examples per class
      "seeds": 5,
      "methods": ["standard", "l2sp", "isotropic", "diag", "lowrank", "sgld:lowrank"],
      "tuning": {"learning_rates": [0.01], "variances": [1, 10, 100], "steps": 125,
                 "batch_size": 32, "select_by": "nll"},
      "posterior": {"samples": 10, "sgld": {...SGLDConfig fields}, "swag": {...}},
      "reliability": {"shots": 10, "seed": 0}
    }

Methods: a name of ``Prior.for_method`` (``standard, l2, l2sp, isotropic, diag,
lowrank``) is MAP fine-tuning; ``sgld:M`` and ``swag:M`` are the Bayesian model average
of SGLD / downstream-SWAG samples under prior M, started from M's MAP solution with its
λ. A config's ``"variants"`` name further MAP methods: ``{"lowrank-reinit1": {"method":
"lowrank", "reinit_top": 1}}``, any ``FinetuneConfig`` field (``reinit_top``,
``layer_lr``, ``layer_lr_decay``, ``l2``) on top of a base method (non-binary transfer),
or ``"scale": "evidence"``: one run at the first learning rate, λ learned by the Laplace
evidence (``bayes_transfer.inference.evidence``; its settings in ``tuning["evidence"]``),
or ``"scale": "de-elbo"``: the same by the data-emphasized ELBO
(``bayes_transfer.inference.elbo``; settings in ``tuning["elbo"]``, which a variant's
``"elbo"`` overrides, e.g. ``{"per_block": true}``).
The tuning budget is the same for every method: each learning rate × each effective
prior variance (plus the no-prior limit), or for standard fine-tuning, which has no λ,
each learning rate × each of ``"weight_decays"`` (decoupled; give as many as the λ grid
has values, no prior included), ``steps`` optimizer steps each, chosen on the
validation split (``select_by``); the test split is read only for the chosen run.
``"extend": N`` tries up to N decades past an end of the variances that validation
picks; ``"validation": "within"`` takes the validation split out of the shots and
retrains the choice on all of them. Each row records the method's budget
(configurations), optimizer steps and seconds. The
samplers take the MAP run's λ and learning-rate choice; their own settings are fixed in
the config (the same for every prior).
"""
from __future__ import annotations

import json
from pathlib import Path

from bayes_transfer import METHODS, BayesTransferError
from bayes_transfer.inference import ElboConfig, EvidenceConfig

SAMPLERS = ("sgld", "swag")
#: FinetuneConfig fields a variant may set (non-binary transfer).
VARIANT_KEYS = ("reinit_top", "layer_lr", "layer_lr_decay", "l2", "scale", "elbo")
DEFAULT_TUNING = {"learning_rates": [1e-2], "variances": [1.0, 10.0, 100.0], "steps": 125,
                  "batch_size": 32, "select_by": "nll", "head_decay": 1e-4,
                  "weight_decays": None, "extend": 0, "validation": "extra", "evidence": {},
                  "elbo": {}}
#: Variant scales learned in one run, without a validation split.
ONE_RUN_SCALES = ("evidence", "de-elbo")
#: "validation": "extra" (the validation examples come on top of the shots) or "within"
#: (the shots are every label: a fifth is held out to choose, then the choice is
#: retrained on all of them; data.load(val_from_shots=True), FinetuneConfig.refit)


def load_config(path, **overrides) -> dict:
    """Read and check a config; ``overrides`` (not None) replace top-level keys."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BayesTransferError(f"no config file at {path}; see experiments/configs/") from None
    except json.JSONDecodeError as e:
        raise BayesTransferError(f"config {path} is not valid JSON: {e}") from None
    config.update({k: v for k, v in overrides.items() if v is not None})
    return check_config(config, str(path))


def parse_shots(text: str | None):
    """'1,5,all' -> [1, 5, 'all'] (None stays None: the config's own)."""
    return None if text is None else [s if s == "all" else int(s) for s in text.split(",")]


def check_config(config: dict, where: str = "config") -> dict:
    """``config`` with defaults filled in (tuning, variants, seeds as a list), or a
    ``BayesTransferError`` naming what is wrong."""
    for key in ("name", "priors", "target", "shots", "seeds", "methods"):
        if key not in config:
            raise BayesTransferError(f"{where}: missing key {key!r}")
    if not isinstance(config["priors"], dict) or not config["priors"]:
        raise BayesTransferError(f"{where}: 'priors' must map labels to prior names/paths")
    variants = config.setdefault("variants", {})
    for name, variant in variants.items():
        if variant.get("method") not in METHODS:
            raise BayesTransferError(f"{where}: variant {name!r} needs a 'method', one of "
                                     f"{METHODS}")
        unknown = set(variant) - {"method", *VARIANT_KEYS}
        if unknown:
            raise BayesTransferError(f"{where}: variant {name!r} has unknown keys "
                                     f"{sorted(unknown)}; use {', '.join(VARIANT_KEYS)}")
        try:
            ElboConfig(**variant.get("elbo", {}))
        except TypeError as e:
            raise BayesTransferError(f"{where}: variant {name!r}: 'elbo': {e}") from None
        if variant.get("scale", "evidence") not in ONE_RUN_SCALES:
            raise BayesTransferError(f"{where}: variant {name!r}: 'scale' can only be one of "
                                     f"{ONE_RUN_SCALES} (λ learned in one run)")
    for method in config["methods"]:
        sampler, _, base = method.rpartition(":")
        if sampler and base in variants:
            raise BayesTransferError(f"{where}: {method!r}: samplers run under a base prior "
                                     f"method ({METHODS}), not a variant")
        if (base not in METHODS and base not in variants) or (sampler and sampler not in SAMPLERS):
            raise BayesTransferError(
                f"{where}: unknown method {method!r}; use one of {METHODS}, or "
                f"'sgld:M' / 'swag:M' with M one of them")
    for shots in config["shots"]:
        if shots != "all" and not (isinstance(shots, int) and shots > 0):
            raise BayesTransferError(f"{where}: shots must be positive integers or 'all', "
                                     f"got {shots!r}")
    unknown = set(config.get("tuning", {})) - set(DEFAULT_TUNING)
    if unknown:
        raise BayesTransferError(f"{where}: unknown tuning keys {sorted(unknown)}; "
                                 f"known: {sorted(DEFAULT_TUNING)}")
    config["tuning"] = tuning = {**DEFAULT_TUNING, **config.get("tuning", {})}
    if tuning["validation"] not in ("extra", "within"):
        raise BayesTransferError(f"{where}: tuning 'validation' must be 'extra' or 'within', "
                                 f"got {tuning['validation']!r}")
    one_run_only = all(variants.get(m.rpartition(":")[2], {}).get("scale") in ONE_RUN_SCALES
                       for m in config["methods"])
    if tuning["validation"] == "within" and 1 in config["shots"] and not one_run_only:
        raise BayesTransferError(f"{where}: 'validation': 'within' needs at least 2 shots per "
                                 f"class (one to train, one to validate); 1 per class can "
                                 f"only be run with 'extra' or by evidence variants alone")
    for key, cls in (("evidence", EvidenceConfig), ("elbo", ElboConfig)):
        try:
            cls(**tuning[key])
        except TypeError as e:
            raise BayesTransferError(f"{where}: tuning {key!r}: {e}") from None
    seeds = config["seeds"]
    config["seeds"] = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    return config
