"""The experiment runner: priors × target × shots × seeds × methods, tuned alike, resumable.

    python experiments/run.py experiments/configs/bayes_mnist5k_10shot.json
    python experiments/run.py CONFIG.json --seeds 2 --shots 10 --out /tmp/try   # overrides
    python experiments/run.py CONFIG.json --seeds 3 --estimate   # how long, from past runs
    python experiments/run.py CONFIG.json --report-only   # summary and figures again

The config format is described in ``experiments/runner/config.py``; the runner itself is
the package ``experiments/runner/``.
"""
from runner.cli import main

from bayes_transfer.training import use_cpu_cores

if __name__ == "__main__":
    use_cpu_cores()     # one JAX device per core (BAYES_TRANSFER_CPU_DEVICES=1: one)
    main()
