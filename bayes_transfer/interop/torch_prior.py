"""Import the learned-prior authors' reference PyTorch priors as prior artifacts.

The reference code (Shwartz-Ziv et al. 2022, "Pre-Train Your Loss") published its
ImageNet priors for torchvision ResNet-50 as four ``torch.save`` files::

    PREFIX_model.pt      the backbone's state dict (no ``fc``), BatchNorm running stats included
    PREFIX_mean.pt       θ̄ ∈ R^d      SWAG mean
    PREFIX_variance.pt   v ∈ R^d       SWAG diagonal variance, clamp(E[θ²] − θ̄², 1e-6)
    PREFIX_covmat.pt     C ∈ R^{K×d}   SWAG low-rank factor, one row per collected deviation

The three vectors are flat in ``backbone.parameters()`` order: torchvision's module
registration order (conv1, bn1, layer1.0.conv1, layer1.0.bn1, ..., downsample last in a
block), trainable parameters only, each tensor flattened in torch's layout (a conv
weight OIHW, row-major). :func:`import_torch_prior` reads them with the safe reader
(:mod:`bayes_transfer.interop.torch_reader`; nothing is unpickled with ``pickle``), reorders
every vector and every row of C into the prior's :class:`~bayes_transfer.params.ParamSpec`
order (our Flax backbone paths), transposing each conv slice OIHW → HWIO (the same
permutation for θ̄, v and C; the map is :mod:`bayes_transfer.interop.torch_layout`),
converts the covariance convention and writes an artifact.

What the reference's density is, and how it is converted
--------------------------------------------------------
Its SWAG class stores the deviations θᵢ − θ̄ᵢ of the last K snapshots and exports the
factor ``C = D̂ / √(K − 1)`` (``CovarianceSpace.get_space``); its own SWAG sampler
uses ``scale·(diag(v) + CᵀC)`` with ``scale = ½``, i.e. the SWAG covariance
``½·diag(v) + ½·D̂ᵀD̂/(K − 1)`` that this toolkit calls Σ₀. Its downstream prior
(``priorBox/sghmc/utils.load_prior`` + ``GaussianPriorCELossShifted``), with prior_scale
λ, prior_eps ε, number_of_samples_prior k and ``scale_low_rank`` (default on), is::

    N(θ̄,  diag(λ·v + ε) + m·CₖᵀCₖ),    Cₖ = C[:k] (the first k rows),  m = λ² (or 1)

so the SWAG ½ is not applied and the factor is scaled by λ, the low-rank part by λ².
In this toolkit λ multiplies the whole covariance: ``N(θ̄, λ'·(½diag(var) +
½D̂ᵀD̂/(K' − 1)) + ε'·I)``. No single artifact reproduces the reference at every λ
(its shape changes with λ), so the conversion is exact at the λ you give:

``convention="reference"`` (default), k ≥ 1 rows kept, ``c = max(k − 1, 1)``:
    ``scale λ' = 2λ``, ``var = v``, ``deviations D̂ = √(c·m/λ)·Cₖ``, ``floor ε' = ε``.
    Then λ'·½·var = λ·v and λ'·½·D̂ᵀD̂/c = m·CₖᵀCₖ: the reference's density at λ exactly.
    At λ = 1 (and ``scale_low_rank``) D̂ = √c·Cₖ is the SWAG deviation matrix itself and
    Σ₀ the SWAG covariance; at any other λ the factor carries the reference's extra √λ,
    and rescaling the artifact to λ'' gives (λ''/2λ)·Σ_ref(λ), not Σ_ref(λ''/2).
    k = 0 (the reference's diagonal-only prior ``diag(λv + ε)``) gives a ``diag`` prior
    with scale λ.
``convention="swag"``:
    the SWAG posterior itself, ``var = v``, ``D̂ = √c·Cₖ`` (``covmat="normalized"``, the
    reference's export) or ``D̂ = Cₖ`` (``covmat="raw"``: the file already holds raw
    deviations), at ``scale = λ`` in this toolkit's convention. It matches the reference
    density only where λ'·½ = λ_ref = 1.

Which of the two a file's C is (``normalized`` or ``raw``) cannot be told from the file;
the ``reference`` conversion does not depend on it, because it reproduces the density the
reference code computed from whatever the file holds. The metadata records all of this
(``converted_from``, ``reference``, ``scale_note``).

Example::

    from bayes_transfer.interop import import_torch_prior, import_torch_weights
    prior = import_torch_prior("downloads/resnet50_ssl_prior", arch="resnet50",
                               out="priors/imagenet-resnet50-simclr", method="simclr",
                               scale=1.0)
    params, batch_stats = import_torch_weights("downloads/resnet50_ssl_prior_model.pt")
    model = bt.models.create("resnet50", 10, in_channels=3)
    nnx.update(model, params); nnx.update(model, batch_stats)     # backbone = the torch weights

or ``bayes-transfer priors import-torch downloads/resnet50_ssl_prior --out DIR``.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bayes_transfer import models
from bayes_transfer.artifacts import save_prior
from bayes_transfer.errors import TorchImportError
from bayes_transfer.fsutil import sha256_file
from bayes_transfer.interop.torch_layout import (SUPPORTED_ARCHS, ParamMap, ReferenceLayout,
                                                 reference_layout)
from bayes_transfer.interop.torch_reader import load as read_pt
from bayes_transfer.params import flatten_with_paths
from bayes_transfer.prior import Prior

__all__ = ["SUPPORTED_ARCHS", "REFERENCE_FILES", "CONVENTIONS", "ReferenceLayout", "ParamMap",
           "reference_layout", "reference_files", "convert_reference", "import_torch_prior",
           "import_torch_weights"]

#: role -> file-name suffix appended to PREFIX.
REFERENCE_FILES = {"model": "_model.pt", "mean": "_mean.pt", "variance": "_variance.pt",
                   "covmat": "_covmat.pt"}
CONVENTIONS = ("reference", "swag")
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


# ====================================================================== files
def reference_files(prefix) -> dict[str, Path]:
    """``{"model", "mean", "variance", "covmat"}`` -> the PREFIX_*.pt paths.

    ``prefix`` may also be one of the four files (its suffix is stripped).
    """
    text = str(Path(prefix).expanduser())
    for suffix in REFERENCE_FILES.values():
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    return {role: Path(text + suffix) for role, suffix in REFERENCE_FILES.items()}


def _load_array(path: Path, role: str, ndim: int) -> np.ndarray:
    obj = read_pt(path)
    if not isinstance(obj, np.ndarray):
        raise TorchImportError(f"{path} should hold one tensor (the reference's {role}), but "
                               f"holds a {type(obj).__name__}")
    if obj.ndim != ndim:
        raise TorchImportError(f"{path}: the reference's {role} is a {ndim}-d tensor, got "
                               f"shape {obj.shape}")
    if not np.issubdtype(obj.dtype, np.floating) and obj.dtype.name != "bfloat16":
        raise TorchImportError(f"{path}: the {role} has dtype {obj.dtype}, not floating point")
    return obj


def _state_dict(obj, path: Path) -> dict[str, np.ndarray]:
    """The {name: array} state dict inside a loaded model file."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            break
        if isinstance(obj, dict):
            inner = [obj[k] for k in ("state_dict", "model", "resnet", "backbone")
                     if isinstance(obj.get(k), dict)]
            if inner:
                obj = inner[0]
                continue
        raise TorchImportError(f"{path} does not hold a state dict ({{name: tensor}}); found "
                               f"{type(obj).__name__}")
    keys = list(obj)
    if not all(isinstance(k, str) for k in keys):
        raise TorchImportError(f"{path}: state dict keys must be strings")
    if keys and all(k.startswith("module.") for k in keys):     # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _dim_hint(d: int, layout: ReferenceLayout) -> str:
    hints = []
    for arch in SUPPORTED_ARCHS:
        if arch != layout.arch and reference_layout(arch).dim == d:
            hints.append(f"it is the size of {arch}'s backbone: pass arch={arch!r}")
    fc = {"resnet18": 512, "resnet50": 2048}[layout.arch]
    if (d - layout.dim) % (fc + 1) == 0 and d > layout.dim:
        hints.append(f"it is {layout.arch}'s backbone plus a {(d - layout.dim) // (fc + 1)}-"
                     f"class fc layer; the reference format holds the backbone only")
    return ("; " + "; ".join(hints)) if hints else ""


# ====================================================================== model check
def _check_model(sd: dict, mean_t: np.ndarray, layout: ReferenceLayout, path: Path,
                 rtol: float, atol: float) -> dict:
    """Compare the state dict's trainable parameters (torch order) with the mean vector."""
    params = [k for k in sd if not k.endswith(_BN_STATS) and not k.startswith("fc.")]
    expected = layout.torch_keys
    report: dict[str, Any] = {"checked": True}
    missing = [k for k in expected if k not in sd]
    extra = [k for k in params if k not in set(expected)]
    if missing or extra:
        report.update(matches=False, problem=(
            f"{path} does not hold {layout.arch}'s backbone: "
            + (f"missing {missing[:3]} ({len(missing)} missing)" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra[:3]} ({len(extra)} unexpected)" if extra else "")))
        return report
    if tuple(params) != expected:
        first = next(i for i, (a, b) in enumerate(zip(params, expected)) if a != b)
        report["order_note"] = (f"{path} lists parameters in a different order from "
                                f"torchvision's registration order (first at position {first}: "
                                f"{params[first]!r} vs {expected[first]!r}); the mean is read "
                                f"in torchvision's order")
    bad, worst, first_bad = 0, 0.0, None
    for p in layout.params:
        a = np.asarray(sd[p.key])
        if tuple(a.shape) != p.torch_shape:
            report.update(matches=False, problem=(
                f"{path}: {p.key!r} has shape {tuple(a.shape)}, {layout.arch} expects "
                f"{p.torch_shape}"))
            return report
        b = mean_t[p.torch_offset:p.torch_offset + p.size].astype(np.float32)
        a = a.reshape(-1).astype(np.float32)
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            diff = float(np.max(np.abs(a - b)))
            bad += 1
            worst = max(worst, diff)
            if first_bad is None:
                first_bad = (p.key, diff)
    report.update(matches=bad == 0, parameters=len(layout.params), mismatched=bad)
    if bad:
        report["problem"] = (
            f"{path} does not match the mean vector: {bad} of {len(layout.params)} parameters "
            f"differ (first {first_bad[0]!r}, max |Δ| {first_bad[1]:.3g}; overall max |Δ| "
            f"{worst:.3g}); the model file is not the prior mean (is it the final SGD iterate "
            f"rather than the SWAG mean, or from another run?)")
    return report


# ====================================================================== conversion
def convert_reference(mean_t, variance_t, covmat_t, layout: ReferenceLayout, *,
                      scale: float = 1.0, floor: float = 0.0, rank: int | None = None,
                      scale_low_rank: bool = True, convention: str = "reference",
                      covmat: str = "normalized", dtype=np.float32) -> dict:
    """Convert the reference's torch-order arrays to this toolkit's convention.

    Returns ``{"kind", "mean", "var", "deviations" (or None), "scale", "floor",
    "rows_used", "rows_in_file", "note"}`` with arrays in ``layout.spec`` order (see the
    module docstring for the formulas).
    """
    if convention not in CONVENTIONS:
        raise TorchImportError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if covmat not in ("normalized", "raw"):
        raise TorchImportError(f"covmat must be 'normalized' or 'raw', got {covmat!r}")
    scale, floor = float(scale), float(floor)
    if not (math.isfinite(scale) and scale > 0):
        raise TorchImportError(f"scale λ must be a positive finite number, got {scale}")
    if not (math.isfinite(floor) and floor >= 0):
        raise TorchImportError(f"floor (the reference's prior_eps) must be >= 0, got {floor}")
    rows_in_file = int(covmat_t.shape[0])
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
        raise TorchImportError(f"rank must be an integer >= 0 or None, got {rank!r}")
    k = rows_in_file if rank is None else min(rank, rows_in_file)
    mean = layout.to_spec_order(mean_t, dtype)
    var = layout.to_spec_order(variance_t, dtype)
    if k == 0:
        # reference with number_of_samples_prior = 0: N(θ̄, diag(λ·v + ε))
        note = (f"diagonal prior: the reference density N(mean, diag(λ·variance + ε)) at "
                f"λ = {scale:g}, ε = {floor:g}, reproduced exactly at every λ (no low-rank part)")
        return dict(kind="diag", mean=mean, var=var, deviations=None, scale=scale, floor=floor,
                    rows_used=0, rows_in_file=rows_in_file, note=note)
    c = max(k - 1, 1)
    dev = layout.to_spec_order(covmat_t[:k], dtype)
    if convention == "reference":
        m = scale ** 2 if scale_low_rank else 1.0
        dev *= np.asarray(math.sqrt(c * m / scale), dtype=dev.dtype)
        ours = 2.0 * scale
        part = "λ²·CₖᵀCₖ" if scale_low_rank else "CₖᵀCₖ"
        extra = "λ" if scale_low_rank else "1/λ"
        growth = "grows as λ² and changes" if scale_low_rank else "stays fixed, changing"
        note = (f"converted from the reference PyTorch prior, whose density is N(mean, "
                f"diag(λ·variance + ε) + {part}) (prior_scale λ on the diagonal"
                f"{' and on the factor, so λ² on the low-rank part' if scale_low_rank else ''}, "
                f"no SWAG ½). This artifact reproduces it exactly at the reference's "
                f"λ = {scale:g}, ε = {floor:g}, k = {k}: stored scale = 2λ = {ours:g}, "
                f"var = variance, deviations = √((k−1)·{extra})·Cₖ, floor = ε. Here λ "
                f"multiplies the whole covariance, so rescaling to λ'' gives "
                f"(λ''/{ours:g})·Σ_ref(λ = {scale:g}), not the reference's Σ_ref(λ''/2), whose "
                f"low-rank part {growth} its shape")
        if scale == 1.0:
            note += ("; at λ = 1 the stored Σ₀ = ½diag(v) + ½CₖᵀCₖ is the SWAG covariance "
                     "(C being SWAG's D̂/√(K−1))")
        else:
            note += (f"; the deviations carry the reference's extra factor √({extra}) = "
                     f"{math.sqrt(m / scale):g}, so the stored Σ₀ is not the SWAG covariance "
                     f"(it is when imported at λ = 1)")
    else:
        if covmat == "normalized":
            dev *= np.asarray(math.sqrt(c), dtype=dev.dtype)
            how = "√(k−1)·Cₖ (C taken as SWAG's D̂/√(K−1))"
        else:
            how = "Cₖ (C taken as raw deviations D̂)"
        ours = scale
        note = (f"the SWAG posterior of the reference files in this toolkit's convention: "
                f"var = variance, deviations = {how}, scale λ = {scale:g} multiplying the whole "
                f"covariance, floor ε = {floor:g}. This is not the density the reference code "
                f"used, N(mean, diag(λ·variance + ε) + λ²·CₖᵀCₖ), except that scale 2 here "
                f"equals the reference at λ = 1 when C is D̂/√(K−1)")
    return dict(kind="lowrank", mean=mean, var=var, deviations=dev, scale=ours, floor=floor,
                rows_used=k, rows_in_file=rows_in_file, note=note)


# ====================================================================== public API
def import_torch_prior(prefix, arch: str = "resnet50", out=None, num_classes: int = 1000,
                       method: str | None = None, *, scale: float = 1.0, floor: float = 0.0,
                       rank: int | None = None, scale_low_rank: bool = True,
                       convention: str = "reference", covmat: str = "normalized",
                       check_model: str = "error", dtype: str = "float32",
                       source_dataset: str = "imagenet", overwrite: bool = False,
                       model_rtol: float = 1e-5, model_atol: float = 1e-6):
    """Read the reference's ``PREFIX_{model,mean,variance,covmat}.pt`` and return a Prior.

    Args:
      prefix: the common prefix of the four files (``.../resnet50_ssl_prior``), or one
        of the files.
      arch: ``"resnet50"`` (the published priors) or ``"resnet18"``.
      out: if given, the artifact directory to write (``save_prior``).
      num_classes: the head size recorded in ``metadata["architecture"]`` (the prior
        covers the backbone only).
      method: the source training, e.g. ``"supervised"`` or ``"simclr"`` (recorded).
      scale: the reference's prior_scale λ at which its density is reproduced
        (``convention="reference"``), or this toolkit's λ (``convention="swag"``).
      floor: the reference's prior_eps ε (its default was 0.1), stored as the floor.
      rank: the reference's number_of_samples_prior k: keep the first k rows of the
        covmat (its default was 5); None keeps them all; 0 gives a diagonal prior.
      scale_low_rank: the reference's flag of the same name (its default: True).
      convention: ``"reference"`` or ``"swag"``; see the module docstring.
      covmat: ``"normalized"`` (C = D̂/√(K−1)) or ``"raw"`` (C = D̂); used by "swag" only.
      check_model: ``PREFIX_model.pt`` must equal the mean: ``"error"`` raises
        TorchImportError on a mismatch, ``"warn"`` warns and records it, ``"ignore"``
        does not read the model file.
      dtype: ``"float32"`` or ``"bfloat16"`` for the stored arrays.

    Returns the Prior (kind ``lowrank``, or ``diag`` for rank 0) with metadata
    ``converted_from``, ``reference`` (parameters, files, sha256s, model check) and
    ``scale_note`` saying exactly what was converted.
    """
    if check_model not in ("error", "warn", "ignore"):
        raise TorchImportError(f"check_model must be 'error', 'warn' or 'ignore', got "
                               f"{check_model!r}")
    if dtype not in ("float32", "bfloat16"):
        raise TorchImportError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    files = reference_files(prefix)
    needed = ["mean", "variance", "covmat"] + ([] if check_model == "ignore" else ["model"])
    missing = [str(files[r]) for r in needed if not files[r].is_file()]
    if missing:
        found = [str(p) for p in files.values() if p.is_file()]
        raise TorchImportError(
            f"missing reference prior file(s): {', '.join(missing)}; the reference format is "
            f"PREFIX_model.pt, PREFIX_mean.pt, PREFIX_variance.pt and PREFIX_covmat.pt"
            + (f" (found: {', '.join(found)})" if found else "")
            + ("; pass check_model='ignore' to import without the model file"
               if missing == [str(files['model'])] else ""))
    layout = reference_layout(arch, num_classes)
    d = layout.dim
    mean_t = _load_array(files["mean"], "mean", 1)
    var_t = _load_array(files["variance"], "variance", 1)
    cov_t = _load_array(files["covmat"], "covmat", 2)
    for role, x in (("mean", mean_t), ("variance", var_t)):
        if x.shape != (d,):
            raise TorchImportError(f"{files[role]}: the {role} has {x.shape[0]} values, the "
                                   f"{arch} backbone has d = {d}{_dim_hint(x.shape[0], layout)}")
    if cov_t.shape[1] != d:
        hint = ("; it looks transposed: the reference stores the covmat as (K, d)"
                if cov_t.shape[0] == d else _dim_hint(cov_t.shape[1], layout))
        raise TorchImportError(f"{files['covmat']}: shape {cov_t.shape}, expected (K, {d}) "
                               f"for {arch}{hint}")

    model_report: dict[str, Any] = {"checked": False}
    if check_model != "ignore":
        sd = _state_dict(read_pt(files["model"]), files["model"])
        model_report = _check_model(sd, mean_t, layout, files["model"], model_rtol, model_atol)
        del sd
        if not model_report["matches"]:
            if check_model == "error":
                raise TorchImportError(model_report["problem"] + "; pass check_model='warn' "
                                       "to import the prior anyway")
            warnings.warn(model_report["problem"], stacklevel=2)

    conv = convert_reference(mean_t, var_t, cov_t, layout, scale=scale, floor=floor, rank=rank,
                             scale_low_rank=scale_low_rank, convention=convention,
                             covmat=covmat)
    del mean_t, var_t, cov_t
    if conv["kind"] == "diag":
        prior = Prior.diagonal(layout.spec, conv["mean"], conv["var"], scale=conv["scale"],
                               floor=conv["floor"])
    else:
        prior = Prior.lowrank(layout.spec, conv["mean"], conv["var"], conv["deviations"],
                              scale=conv["scale"], floor=conv["floor"])
    if dtype == "bfloat16":
        prior = prior.astype(jnp.bfloat16)

    reference = {
        "prior_scale": float(scale), "prior_eps": float(floor),
        "number_of_samples_prior": None if rank is None else int(rank),
        "rows_in_file": conv["rows_in_file"], "rows_used": conv["rows_used"],
        "scale_low_rank": bool(scale_low_rank), "convention": convention,
        "covmat": covmat if convention == "swag" else "as stored (reference density)",
        "density": "N(mean, diag(prior_scale*variance + prior_eps) + "
                   + ("prior_scale^2" if scale_low_rank else "1")
                   + " * covmat[:k]^T covmat[:k])",
        "files": {role: {"name": p.name, "sha256": sha256_file(p)}
                  for role, p in files.items() if p.is_file() and role in needed},
        "model_check": model_report,
        "vector_order": "torchvision backbone.parameters() order, OIHW conv weights; "
                        "reordered to the spec's Flax paths, conv slices transposed to HWIO",
    }
    metadata = {
        "architecture": {"arch": arch, "num_classes": int(num_classes), "in_channels": 3},
        "source": {"dataset": source_dataset, "split": "train",
                   "name": f"{source_dataset} (reference torch prior)",
                   "method": method},
        "swag": {"K": conv["rows_used"]},
        "converted_from": "reference-torch",
        "reference": reference,
        "scale_note": conv["note"],
    }
    prior = prior.with_metadata(metadata)
    if out is not None:
        save_prior(prior, out, overwrite=overwrite)
    return prior


def import_torch_weights(path, arch: str = "resnet50", *, num_classes: int = 1000):
    """A torchvision backbone state dict (``PREFIX_model.pt``) as Flax ``(params, batch_stats)``.

    Both are nested dicts shaped like ``nnx.state(model, nnx.Param)`` and
    ``nnx.state(model, nnx.BatchStat)`` restricted to ``backbone/`` (list indices as
    ints), with conv kernels in HWIO; ``nnx.update(model, params)`` and
    ``nnx.update(model, batch_stats)`` load them into a model from
    ``models.create(arch, n, in_channels=3)``. ``fc.*`` entries, if any, are ignored;
    any other missing or unexpected key raises TorchImportError.
    """
    if arch not in SUPPORTED_ARCHS:
        raise TorchImportError(f"architecture {arch!r} has no torchvision layout here; "
                               f"supported: {', '.join(SUPPORTED_ARCHS)}")
    path = Path(path).expanduser()
    sd = _state_dict(read_pt(path), path)
    model = nnx.eval_shape(lambda: models.create(arch, num_classes, in_channels=3))
    state = nnx.state(model)
    flat = flatten_with_paths(state)
    stats = set(flatten_with_paths(nnx.state(model, nnx.BatchStat)))
    names = models.torchvision_names(state)
    params: dict = {}
    batch_stats: dict = {}
    used = set()
    for flax_path, (key, transform) in names.items():
        if not flax_path.startswith("backbone/"):
            continue
        if key not in sd:
            raise TorchImportError(f"{path}: {key!r} (for {flax_path!r}) is missing; is it a "
                                   f"{arch} backbone state dict?")
        used.add(key)
        value = models.torch_to_flax(sd[key], transform)
        target = tuple(flat[flax_path].shape)
        if tuple(value.shape) != target:
            raise TorchImportError(f"{path}: {key!r} has torch shape {tuple(sd[key].shape)}, "
                                   f"which gives {tuple(value.shape)}; {flax_path!r} is {target}")
        _put(batch_stats if flax_path in stats else params, flax_path,
             np.array(value, dtype=np.dtype(flat[flax_path].dtype)))
    extra = [k for k in sd if k not in used and not k.endswith("num_batches_tracked")
             and not k.startswith("fc.")]
    if extra:
        raise TorchImportError(f"{path}: unexpected keys for a {arch} backbone: {extra[:5]}")
    return params, batch_stats


def _put(tree: dict, path: str, value) -> None:
    keys = [int(p) if p.isdigit() else p for p in path.split("/")]
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value
