"""The benchmark scripts run end to end at toy sizes (their figures are not checked here:
timings belong to the scripts, not to tests). The GPU script in particular cannot be run
at full size on the build machine, so this is what keeps it runnable."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def run(script, *args, devices=1):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, str(EXPERIMENTS / script), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_gpu_benchmark_runs_on_eight_cpu_devices(tmp_path):
    result_file = tmp_path / "result.json"
    stdout = run("bench_gpu_resnet50.py", "--arch", "small_cnn", "--batch-size", "8",
                 "--image-size", "28", "--num-classes", "10", "--steps", "1", "--reps", "1",
                 "--json", str(result_file), devices=8)
    result = json.loads(result_file.read_text())
    assert result["devices"] == 8 and result["arch"] == "small_cnn"
    assert result["K"] == 20 and result["d"] > 100_000
    assert result["loss_finite"]
    for key in ("step_ms_without_prior", "step_ms_with_prior", "prior_value_and_grad_ms"):
        assert result[key] > 0
    assert "prior term's share of the step" in stdout


def test_memory_benchmark_runs_at_small_d():
    stdout = run("bench_memory.py", "--d", "1e5", "--dtypes", "float32,bfloat16",
                 "--theta", "flat,tree")
    rows = re.findall(r"^\s*(float32|bfloat16)\s+(flat|tree)\s+.*\s(True|False)$", stdout,
                      re.MULTILINE)
    assert sorted(r[:2] for r in rows) == [("bfloat16", "flat"), ("bfloat16", "tree"),
                                           ("float32", "flat"), ("float32", "tree")], stdout
    assert all(r[2] == "True" for r in rows), stdout        # log p and its gradient finite
