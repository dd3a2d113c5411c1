"""Start one process of a multi-process (multi-host) run: ``jax.distributed``, then a program.

Run the same command on every host, changing only ``--process-id``::

    python -m bayes_transfer.launch --coordinator 10.0.0.1:1234 --num-processes 2 \\
        --process-id 0 -m bayes_transfer.cli learn-prior --dataset fashion_mnist ...
    python -m bayes_transfer.launch --coordinator 10.0.0.1:1234 --num-processes 2 \\
        --process-id 0 my_script.py ARGS

It calls ``jax.distributed.initialize`` (which must come before any other JAX call) and
then runs the program in this interpreter, as ``python -m MODULE`` or ``python SCRIPT``
would. Options left out are found by JAX's own detection (SLURM, Open MPI, Cloud TPU;
``JAX_COORDINATOR_ADDRESS`` for the address). See ``docs/scaling.md``.
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher options, program): the program starts at ``-m`` or at the first word
    that is not an option, so its own options are never read as the launcher's."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2
    return argv[:i], argv[i:]


def main(argv: list[str] | None = None) -> None:
    own, program = _split(sys.argv[1:] if argv is None else list(argv))
    parser = argparse.ArgumentParser(
        prog="python -m bayes_transfer.launch",
        usage="%(prog)s [--coordinator HOST:PORT] [--num-processes N] [--process-id I] "
              "(-m MODULE | SCRIPT) [ARGS ...]",
        description="Join a jax.distributed run, then run a module or script.")
    parser.add_argument("--coordinator", default=None,
                        help="HOST:PORT that process 0 listens on, reachable from all hosts")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None, help="0 .. N-1")
    parser.add_argument("--timeout", type=int, default=300,
                        help="seconds to wait for all processes to join (default 300)")
    args = parser.parse_args(own)
    if not program or program == ["-m"]:
        parser.error("give the program to run: -m MODULE [ARGS] or SCRIPT [ARGS]")

    import jax
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               initialization_timeout=args.timeout)
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        sys.path.insert(0, str(Path(program[0]).resolve().parent))   # as `python SCRIPT` does
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main()
