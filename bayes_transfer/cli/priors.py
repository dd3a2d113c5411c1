"""``bayes-transfer priors ...``: list, show, download, verify, register, pack and publish.

    bayes-transfer priors list                          registered priors and where they are
    bayes-transfer priors show fashion-mnist/small-cnn  the entry and its model card
    bayes-transfer priors download fashion-mnist/small-cnn
    bayes-transfer priors verify                        every registered prior
    bayes-transfer priors verify NAME_OR_PATH ...
    bayes-transfer priors register priors/my-prior --name my/prior --model-card card.md
    bayes-transfer priors pack priors/my-prior          priors/my-prior.tar.gz, reproducible
    bayes-transfer priors publish priors/my-prior --name me/my-prior --registry my.json \
        [--to hf://me/my-prior]                         pack, check the card, upload, register
    bayes-transfer priors import-torch PREFIX --arch resnet50 --out priors/imagenet-r50
"""
from __future__ import annotations

import argparse
import json

from bayes_transfer import hub
from bayes_transfer.cli.import_torch import add_import_parser
from bayes_transfer.errors import BayesTransferError, HubError

def _common(args) -> dict:
    return {"registry": args.registry, "cache_dir": args.cache_dir,
            "offline": True if args.offline else None}


def cmd_list(args) -> None:
    entries = hub.list_priors(**_common(args))
    rows = []
    for e in entries:
        state, path = hub.status(e, cache_dir=args.cache_dir)
        rows.append({"name": e.name, "architecture": (e.architecture or {}).get("arch"),
                     "source": (e.source or {}).get("dataset"), "method": e.method,
                     "status": state if e.pinned else f"{state}, unpinned",
                     "path": str(path) if path else None, "sha256": e.sha256,
                     "location": e.locations[0]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"no priors registered in {hub.load_registry(**_common(args)).source}")
        return
    cols = ("name", "architecture", "source", "method", "status")
    widths = {c: max(len(c), *(len(str(r[c] or "-")) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(str(r[c] or "-").ljust(widths[c]) for c in cols).rstrip())


def cmd_show(args) -> None:
    info = hub.show(args.name, **_common(args))
    card = info.pop("model_card_text")
    if args.json:
        print(json.dumps({**info, "model_card_text": card}, indent=2))
        return
    print(info["name"])
    skip = {"name", "model_card", "location", "locations"}
    print(f"  {'locations':18s} {', '.join(info['locations'])}")
    for key, value in info.items():
        if key in skip or value is None:
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        print(f"  {key:18s} {value}")
    if not info["pinned"]:
        print("  (no sha256 pinned yet: run `bayes-transfer priors register PATH --name "
              f"{info['name']}`)")
    if card is not None:
        print(f"\n--- model card ({info['model_card']}) ---\n{card.rstrip()}")
    elif info["model_card"]:
        print(f"  {'model_card':18s} {info['model_card']}")


def cmd_download(args) -> None:
    for ref in args.refs:
        path = hub.download(ref, sha256=args.sha256, timeout=args.timeout,
                            progress=False if args.no_progress else None, **_common(args))
        print(f"{ref}: {path}")


def cmd_verify(args) -> None:
    refs = args.refs or [e.name for e in hub.list_priors(**_common(args))]
    if not refs:
        print("no priors registered; nothing to verify")
        return
    failed = 0
    for ref in refs:
        try:
            meta = hub.verify(ref, timeout=args.timeout,
                              progress=False if args.no_progress else None, **_common(args))
        except BayesTransferError as e:
            failed += 1
            print(f"FAIL  {ref}: {e}")
            continue
        print(f"ok    {ref}  sha256 {meta['sha256'][:16]}…  kind={meta['kind']} "
              f"d={meta['dim']} K={meta['rank']}")
    if failed:
        raise HubError(f"{failed} of {len(refs)} prior(s) failed verification (see above)")


def cmd_register(args) -> None:
    entry = hub.register_prior(
        args.path, args.name, registry=args.registry, location=args.location,
        model_card=args.model_card, license=args.license, description=args.description)
    print(f"registered {entry.name} (sha256 {entry.sha256}) at {', '.join(entry.locations)} "
          f"in {args.registry or hub.default_registry()}")


def cmd_pack(args) -> None:
    packed = hub.pack_prior(args.dir, args.out, overwrite=args.overwrite)
    print(f"packed {args.dir} into {packed.path} ({packed.size} bytes)\n"
          f"  file sha256      {packed.file_sha256}\n"
          f"  artifact sha256  {packed.sha256}  (what a registry pins)")


def cmd_publish(args) -> None:
    done = hub.publish_prior(args.dir, args.name, registry=args.registry, to=args.to,
                             model_card=args.model_card, out=args.out, base_url=args.base_url,
                             license=args.license, description=args.description,
                             overwrite=args.overwrite)
    print(f"packed {args.dir} into {done.packed.path} ({done.packed.size} bytes, artifact "
          f"sha256 {done.packed.sha256})")
    if done.uploaded:
        print(f"uploaded it and the model card {done.model_card} to {done.location}")
    print(f"registered {done.name} in {done.registry} at {done.location}")
    if not done.uploaded:
        print(f"nothing was uploaded: put {done.packed.path} at {done.location} (as is: its "
              f"size is pinned), then check it with `bayes-transfer priors verify {done.name} "
              f"--registry {done.registry}`")


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """Add ``priors list | show | download | verify | register`` to ``subparsers``.

    ``subparsers`` is what ``parser.add_subparsers()`` returned; each action sets
    ``func`` (call ``args.func(args)``; errors are ``BayesTransferError``).
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None,
                        help="registry file or URL (default: the package's built-in registry "
                             "merged with those $BAYES_TRANSFER_REGISTRY names)")
    common.add_argument("--cache-dir", default=None,
                        help="download cache (default: $BAYES_TRANSFER_CACHE or "
                             "~/.cache/bayes_transfer/priors)")
    common.add_argument("--offline", action="store_true",
                        help="never use the network (also: BAYES_TRANSFER_OFFLINE=1)")
    fetch = argparse.ArgumentParser(add_help=False)
    fetch.add_argument("--timeout", type=float, default=60.0,
                       help="seconds a connection or read may stall (default: %(default)s)")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")

    priors = subparsers.add_parser(
        "priors", help="list, show, download, verify and register published priors",
        description="Published priors by name, like pretrained weights: sha256-pinned in a "
                    "registry, downloaded once into a cache.")
    sub = priors.add_subparsers(dest="priors_command", required=True, metavar="ACTION")
    add_import_parser(sub)

    p = sub.add_parser("list", parents=[common], help="registered priors and their status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="a prior's registry entry and model card")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("download", parents=[common, fetch],
                       help="fetch priors into the cache (verified); print their paths")
    p.add_argument("refs", nargs="+", metavar="NAME", help="registered name(s) or URL(s)")
    p.add_argument("--sha256", default=None, help="expected artifact digest (pins a URL)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("verify", parents=[common, fetch],
                       help="check priors completely (default: every registered prior)")
    p.add_argument("refs", nargs="*", metavar="NAME|PATH",
                   help="names, artifact paths or URLs (none: all registered priors)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("register", help="add or update a registry entry from an artifact",
                       description="Verify the artifact at PATH and write its sha256, "
                                   "architecture, source, method and recommended scale into "
                                   "the registry entry NAME.")
    p.add_argument("path", metavar="PATH", help="artifact directory or packed .tar/.tar.gz")
    p.add_argument("--name", required=True, help="registered name, e.g. fashion-mnist/small-cnn")
    p.add_argument("--registry", default=None,
                   help="registry file to edit (default: the one $BAYES_TRANSFER_REGISTRY "
                        "names; the package's built-in registry is never edited implicitly)")
    p.add_argument("--model-card", default=None, help="markdown model card (path or URL)")
    p.add_argument("--location", action="append", default=None,
                   help="where users fetch it (path or URL; default PATH); repeat for mirrors")
    p.add_argument("--license", default=None)
    p.add_argument("--description", default=None)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("pack", help="pack an artifact directory into one reproducible .tar.gz",
                       description="Verify the artifact directory DIR and pack it into one "
                                   ".tar.gz whose bytes depend only on the artifact (sorted "
                                   "members, fixed times, owners and modes), ready to upload.")
    p.add_argument("dir", metavar="DIR", help="artifact directory (metadata.json, arrays/)")
    p.add_argument("--out", default=None, help="packed file (default: DIR.tar.gz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "publish", help="pack a prior, check its model card, upload it if asked, register it",
        description="Pack the artifact DIR (reproducibly), check that its model card is "
                    "there and not empty, upload the packed file and the card to a Hugging "
                    "Face repository when --to is given (needs `pip install "
                    "'bayes_transfer[hf]'` and a token: `hf auth login`), and write the "
                    "registry entry NAME. Without --to nothing is uploaded: the entry's "
                    "location is --base-url + the packed file's name.")
    p.add_argument("dir", metavar="DIR", help="artifact directory (metadata.json, arrays/)")
    p.add_argument("--name", required=True, help="registered name, e.g. my-lab/fmnist-cnn")
    p.add_argument("--registry", default=None,
                   help="your registry file to write (default: the one "
                        "$BAYES_TRANSFER_REGISTRY names); never the installed package's")
    p.add_argument("--to", default=None, metavar="hf://OWNER/REPO[@BRANCH][/PATH]",
                   help="upload to this Hugging Face model repository; the entry pins the "
                        "commit (default PATH: prior.tar.gz, the card as README.md)")
    p.add_argument("--model-card", default=None,
                   help="markdown model card (default: DIR.md beside DIR); required")
    p.add_argument("--out", default=None,
                   help="packed file (default: NAME with '/' as '-' + .tar.gz beside DIR)")
    p.add_argument("--base-url", default=None,
                   help=f"where you will upload the packed file, without --to (default: "
                        f"{hub.PUBLISH_BASE_URL})")
    p.add_argument("--license", default=None)
    p.add_argument("--description", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_publish)
    return priors
