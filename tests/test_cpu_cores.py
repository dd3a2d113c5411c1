"""`use_cpu_cores`: the toolkit's processes split the CPU into one JAX device per core.

The device count is fixed when JAX's backend starts, so each case runs in a fresh
subprocess with its own environment.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, jax
from bayes_transfer.training import use_cpu_cores
first = use_cpu_cores(max_devices={max_devices})
again = use_cpu_cores()          # the backend has started now: it reports, changes nothing
print(json.dumps([first, again, len(jax.devices())]))
"""


def _run(env_extra: dict, max_devices: int = 8) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "BAYES_TRANSFER_CPU_DEVICES")}
    env.update(env_extra, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", SCRIPT.format(max_devices=max_devices)],
                          env=env, capture_output=True, text=True, timeout=120)


def _counts(env_extra: dict, max_devices: int = 8) -> list[int]:
    proc = _run(env_extra, max_devices)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_device_per_core_as_a_power_of_two():
    cores = len(os.sched_getaffinity(0))
    expected = 1 << (min(cores, 8).bit_length() - 1)
    assert _counts({}) == [expected] * 3
    assert _counts({}, max_devices=1) == [1, 1, 1]


@pytest.mark.parametrize("env, count", [
    ({"BAYES_TRANSFER_CPU_DEVICES": "3"}, 3),             # the user's count, as given
    ({"BAYES_TRANSFER_CPU_DEVICES": "1"}, 1),             # no split
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}, 5),   # already chosen
    ({"JAX_NUM_CPU_DEVICES": "6"}, 6),
])
def test_a_count_already_chosen_is_kept(env, count):
    assert _counts(env) == [count] * 3


def test_a_bad_count_says_what_to_give():
    proc = _run({"BAYES_TRANSFER_CPU_DEVICES": "two"})
    assert proc.returncode != 0
    assert "BAYES_TRANSFER_CPU_DEVICES='two': give a positive integer" in proc.stderr
