"""Starting several JAX processes from a test (jax.distributed on one machine)."""
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, devices: int, log):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    # Output to files, not pipes: a process we wait on can never block on a full pipe.
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=err)


def finish(procs, logs, timeout: float):
    """(stdout, stderr) of each process. On a hang or a failure, kill them all (a dead
    peer leaves the other waiting in a collective; SIGTERM is caught by JAX) and fail
    with their output."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    outs = [(Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()) for log in logs]
    if any(p.returncode for p in procs):
        report = "\n".join(f"--- process {i} rc={p.returncode}\n{err[-3000:]}"
                           for i, (p, (_, err)) in enumerate(zip(procs, outs)))
        pytest.fail(f"a subprocess failed or hung (limit {timeout:.0f} s)\n{report}")
    return outs
