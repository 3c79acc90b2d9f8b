"""benchmarks/gpu_e2e.sh without running its steps: syntax, arguments, and the failure paths.

Every step is a separate process under `timeout`; a failed or timed-out step
prints one `failed` line and the others still run; the exit status says
whether any failed. The full CPU dry run is tests/integration/test_gpu_e2e_script.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_e2e.sh"


def e2e(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    full.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd="/", env=full, capture_output=True, text=True, timeout=120)


def test_bash_syntax_help_and_bad_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0
    res = e2e("--help")
    assert res.returncode == 0
    for step in ("prepare", "train_zero2_kill", "resume_zero2", "train_zero3", "eval", "generate", "export", "mfu"):
        assert step in res.stdout, step
    res = e2e("--bogus")
    assert res.returncode == 2 and res.stderr.strip() == "gpu_e2e: unknown argument: --bogus (see --help)"
    res = e2e("--cpu", "--only", "eval,evl")
    assert res.returncode == 2 and res.stderr.strip() == "gpu_e2e: --only: no step named evl"


def test_failed_steps_do_not_stop_the_others_and_set_the_exit_status(tmp_path):
    # Nothing prepared in the work dir: the resume has no killed run to continue, training has no data.
    res = e2e("--cpu", "--work", str(tmp_path), "--only", "resume_zero2,train_zero3")
    lines = res.stdout.splitlines()
    assert res.returncode == 1, res.stdout + res.stderr
    assert lines[1].startswith("failed resume_zero2 rc 1: ") and "zero2.latest" in lines[1]
    assert lines[2].startswith(f"failed train_zero3 rc 1: mnemo: error: data.path: no such directory: {tmp_path}/data")
    assert lines[3] == f"summary: 0 ok, 2 failed (resume_zero2 train_zero3); logs in {tmp_path}/logs"


def test_a_step_over_its_time_limit_fails_and_is_killed(tmp_path):
    res = e2e("--cpu", "--work", str(tmp_path), "--only", "prepare", GPU_E2E_TIMEOUT_S="1")
    assert res.returncode == 1
    assert res.stdout.splitlines()[1].startswith("failed prepare timed out after 1 s")
    assert not (tmp_path / "data" / "index.json").exists()
    # The whole run's budget spent: the remaining steps are not started.
    res = e2e("--cpu", "--work", str(tmp_path), "--only", "prepare,eval", GPU_E2E_BUDGET_S="0")
    assert res.returncode == 1
    assert res.stdout.splitlines()[1:3] == [
        "failed prepare skipped: the 0 s budget is spent",
        "failed eval skipped: the 0 s budget is spent",
    ]


def test_gpu_mode_without_a_gpu_reports_every_step_failed(tmp_path):
    res = e2e("--work", str(tmp_path), "--only", "install,mfu", CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    assert res.returncode == 1
    assert res.stdout.splitlines()[1:] == [
        f"failed env no CUDA GPU visible to {sys.executable} (a CPU dry run: --cpu)",
        "failed install skipped: no GPU",
        "failed mfu skipped: no GPU",
        f"summary: 0 ok, 3 failed (env install mfu); logs in {tmp_path}/logs",
    ]
