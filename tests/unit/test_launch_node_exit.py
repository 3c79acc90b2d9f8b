"""The node launcher (launch/local.py) against torchrun's ends it cannot see coming: stand-ins for torchrun."""

from __future__ import annotations

import io
import sys
import time

import pytest

from mnemo.launch import local
from mnemo.launch.local import NodeRunner
from mnemo.launch.torchrun import NodePlan

# A rank: leaves its exit code as launch/worker.py does, then exits with it.
WORKER = """
import os, sys
from mnemo.launch.worker import report_exit
code = int(sys.argv[1])
print("[rank0]: worker done", flush=True)
report_exit(code, os.environ)
sys.exit(code)
"""
# torchrun of a two-node job whose other node died: its worker exits, then it waits in its exit barrier (300 s
# in torch) and says so in a traceback when that times out.
BARRIER_TORCHRUN = """
import subprocess, sys, time
code = subprocess.call([sys.executable, "-c", sys.argv[1], sys.argv[2]])
if code:
    time.sleep(5)  # torchrun's stop and exit after a failed worker (or its rendezvous for a restart)
    print("torchrun: worker failed", flush=True)
    sys.exit(1)
time.sleep(2)
print("E1205 api.py:1008] Error waiting on exit barrier. Elapsed: 300.1 seconds", flush=True)
print("E1205 api.py:1008] Traceback (most recent call last):", flush=True)
time.sleep(300)
"""


def _run(tmp_path, monkeypatch, worker_code: int, nnodes: int = 2):
    monkeypatch.setattr(local, "EXIT_BARRIER_GRACE_S", 3.0)
    monkeypatch.setattr(
        local,
        "torchrun_command",
        lambda plan, log_dir: [sys.executable, "-c", BARRIER_TORCHRUN, WORKER, str(worker_code)],
    )
    plan = NodePlan(
        config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1, nnodes=nnodes
    )
    console = io.StringIO()
    start = time.monotonic()
    rc = NodeRunner(plan, console=console).run()
    return rc, time.monotonic() - start, console.getvalue().splitlines(), plan.log_path.read_text()


def test_the_exit_barrier_of_a_lost_node_is_not_waited_for(tmp_path, monkeypatch):
    # Was: after its workers saved and exited 0, the launcher waited on torchrun's exit barrier for the killed
    # node's agent (300 s), then printed torchrun's 11-line "Error waiting on exit barrier" traceback.
    rc, took, shown, log = _run(tmp_path, monkeypatch, 0)
    assert rc == 0  # the workers' outcome
    assert took < 30, took
    assert "[launch node0] another node left the job; not waiting for its exit barrier" in shown
    assert "[rank0]: worker done" in shown
    assert not [line for line in shown if "Error waiting" in line or "Traceback" in line]  # the node log's
    assert "Error waiting on exit barrier" in log and "Traceback" in log


def test_a_failed_worker_leaves_torchrun_to_its_own_end(tmp_path, monkeypatch):
    # After a failure torchrun restarts the group (a rendezvous that may take long) or exits: not cut short.
    rc, took, shown, log = _run(tmp_path, monkeypatch, 1)
    assert rc == 1
    assert "torchrun: worker failed" in shown
    assert not [line for line in shown if "another node" in line]


@pytest.mark.parametrize("nnodes", [1])
def test_one_node_has_no_exit_barrier_to_cut(tmp_path, monkeypatch, nnodes):
    monkeypatch.setattr(local, "EXIT_BARRIER_GRACE_S", 1.0)
    monkeypatch.setattr(
        local,
        "torchrun_command",
        lambda plan, log_dir: [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.call([sys.executable, '-c', sys.argv[1], '0']); time.sleep(3)",
            WORKER,
        ],
    )
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    console = io.StringIO()
    assert NodeRunner(plan, console=console).run() == 0
    assert "another node" not in console.getvalue()
