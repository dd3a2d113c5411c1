"""``bayes-transfer priors import-torch``: convert a reference PyTorch prior into an artifact.

The conversion itself is :func:`bayes_transfer.interop.import_torch_prior`; this module
only adds the command to an argparse parser and prints what was converted.
"""
from __future__ import annotations

from bayes_transfer.interop import CONVENTIONS, SUPPORTED_ARCHS, import_torch_prior

__all__ = ["add_import_parser", "cmd_import_torch"]


def add_import_parser(subparsers):
    """Add ``import-torch PREFIX --arch resnet50 --out DIR`` to an argparse subparsers."""
    p = subparsers.add_parser(
        "import-torch",
        help="convert a reference PyTorch prior (PREFIX_{model,mean,variance,covmat}.pt)",
        description="Convert the learned-prior authors' reference PyTorch prior files into a "
                    "prior artifact. No pickle is executed. The reference scaled its low-rank "
                    "part by λ² (prior_scale); the artifact reproduces its density exactly at "
                    "--scale and records the conversion in its metadata.")
    p.add_argument("prefix", metavar="PREFIX",
                   help="common prefix of the four files, e.g. downloads/resnet50_ssl_prior")
    p.add_argument("--arch", default="resnet50", choices=SUPPORTED_ARCHS)
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="head size recorded in the metadata (default: %(default)s)")
    p.add_argument("--objective", "--method", dest="method", default=None,
                   help="source objective: supervised or simclr (--method: its old name)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="the reference's prior_scale λ at which to reproduce its density "
                        "(default: %(default)s; the reference's own default was 1e10)")
    p.add_argument("--eps", type=float, default=0.0,
                   help="the reference's prior_eps, stored as the floor ε (its default was 0.1)")
    p.add_argument("--rank", type=int, default=None,
                   help="number_of_samples_prior k: covmat rows kept (the reference's default "
                        "was 5; default: all rows)")
    p.add_argument("--no-scale-low-rank", action="store_true",
                   help="the reference was run with scale_low_rank=False (factor not scaled)")
    p.add_argument("--convention", default="reference", choices=CONVENTIONS,
                   help="reference: reproduce its density at --scale; swag: store the SWAG "
                        "posterior in this toolkit's convention")
    p.add_argument("--covmat", default="normalized", choices=["normalized", "raw"],
                   help="with --convention swag: the covmat holds D̂/√(K−1) or raw deviations")
    p.add_argument("--check-model", default="error", choices=["error", "warn", "ignore"],
                   help="PREFIX_model.pt must equal the mean (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_import_torch)
    return p


def cmd_import_torch(args) -> None:
    prior = import_torch_prior(
        args.prefix, arch=args.arch, out=args.out, num_classes=args.num_classes,
        method=args.method, scale=args.scale, floor=args.eps, rank=args.rank,
        scale_low_rank=not args.no_scale_low_rank, convention=args.convention,
        covmat=args.covmat, check_model=args.check_model, dtype=args.dtype,
        overwrite=args.overwrite)
    meta = prior.metadata
    ref = meta["reference"]
    check = ref["model_check"]
    print(f"imported {prior} from {args.prefix} ({args.arch}, d = {prior.dim})")
    print(f"  converted from: reference-torch ({ref['rows_used']} of {ref['rows_in_file']} "
          f"covmat rows, convention {ref['convention']})")
    print(f"  reference λ = {ref['prior_scale']:g}, ε = {ref['prior_eps']:g} -> stored "
          f"scale {float(prior.scale):g}, floor {float(prior.floor):g}")
    if check["checked"]:
        print("  model file: " + ("matches the mean" if check["matches"]
                                  else "DOES NOT match the mean: " + check["problem"]))
    else:
        print("  model file: not checked")
    print(f"  scale note: {meta['scale_note']}")
    print(f"saved to {args.out}")
