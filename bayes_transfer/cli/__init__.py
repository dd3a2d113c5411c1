"""The ``bayes-transfer`` command: one parser, one error handler, a module per group.

    bayes-transfer demo                      the main job on the embedded default
    bayes-transfer train --dataset fashion_mnist --arch small_cnn --out runs/fmnist
    bayes-transfer evaluate --model runs/fmnist --dataset fashion_mnist
    bayes-transfer learn-prior --dataset fashion_mnist --arch small_cnn --out priors/my-prior
    bayes-transfer finetune --prior priors/my-prior --dataset mnist_5k --shots 10 --method lowrank
    bayes-transfer suggest --prior priors/my-prior --dataset mnist_5k --shots 10
    bayes-transfer priors list | show | download | verify | register | import-torch

``demo`` (:mod:`.demo`), ``train``/``evaluate``/``learn-prior`` (:mod:`.train`),
``finetune``/``suggest`` (:mod:`.finetune`, segmentation in :mod:`.segmentation`) and
``priors`` (:mod:`.priors`) each add their sub-commands to :func:`build_parser`.
"""
from __future__ import annotations

import argparse
import sys

from bayes_transfer.cli import demo, finetune, priors, train
from bayes_transfer.errors import BayesTransferError
from bayes_transfer.training.distributed import use_cpu_cores

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-transfer",
        description="Bayesian transfer learning with learned priors: learn a SWAG prior on "
                    "a source task, publish it, fine-tune under it.",
        epilog="Start with `bayes-transfer demo`. Each command has --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (demo, train, finetune, priors):
        group.add_parsers(sub)
    return parser


def main(argv=None) -> int:
    """Run one command; a ``BayesTransferError`` is printed as one line (exit 2).

    Run as a program (``argv`` None: ``bayes-transfer ...``), it first splits the CPU
    into one JAX device per core (`use_cpu_cores`), which a call from Python with
    arguments leaves as the caller set it.
    """
    args = build_parser().parse_args(argv)
    try:
        if argv is None:
            use_cpu_cores()
        args.func(args)
    except BayesTransferError as e:
        print(f"bayes-transfer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with the same --checkpoint-dir to resume", file=sys.stderr)
        return 130
    return 0
