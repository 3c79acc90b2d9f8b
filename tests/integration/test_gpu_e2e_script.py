"""The CPU dry run of benchmarks/gpu_e2e.sh: every step of the GPU script, on the debug size, passes.

It is what keeps the GPU script from rotting between the rare runs on a GPU:
the same commands (prepare, bf16 training at ZeRO 2 and 3, SIGKILL and
relaunch, eval, generate, export, gpu_check) with CPU sizes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_cpu_dry_run_passes_every_step(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_e2e.sh"), "--cpu", "--work", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(res.stdout)
    lines = res.stdout.splitlines()
    steps = [
        "env",
        "install",
        "mfu",
        "prepare",
        "train_zero2_kill",
        "resume_zero2",
        "train_zero3",
        "eval",
        "generate",
        "export",
    ]
    assert [ln.split()[1] for ln in lines[1:-1]] == steps, res.stdout
    assert all(ln.startswith("ok ") for ln in lines[1:-1]), res.stdout
    assert lines[-1].startswith("summary: 10 ok, 0 failed;") and res.returncode == 0
    fig = {ln.split()[1]: ln for ln in lines[1:-1]}
    # killed between the checkpoints at 10 and 20, resumed right after 10, finished
    assert "(latest checkpoint step_00000010)" in fig["train_zero2_kill"]
    assert "resumed at step 11 after step_00000010, finished 20;" in fig["resume_zero2"]
    assert "passkey accuracy D=1:" in fig["eval"] and "(F32)" in fig["export"]
    assert "memory/none" in fig["mfu"] and "MFU n/a (CPU)" in fig["mfu"]
