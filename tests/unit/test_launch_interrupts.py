"""Ctrl-C to the node launcher (launch/local.py) at the moments a terminal's user hits: stand-ins for torchrun.

The launcher gets the signals itself (os.kill of this process, as a terminal signals its foreground group);
torchrun is a stand-in started by the launcher's own _spawn, in a session of its own as the real one is.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time

import psutil
import pytest

from mnemo.launch import local
from mnemo.launch.local import NodeRunner
from mnemo.launch.torchrun import NodePlan

# torchrun that trains to its end unless stopped: leaves a file when it got there.
TRAINS_TO_THE_END = """
import sys, time
time.sleep(3)
open(sys.argv[1], "w").close()
print("[rank0]: trained to the end", flush=True)
"""
# torchrun still importing torch when its SIGINT comes: its traceback, "Fatal Python error" and exit 1.
IMPORTING = """
import signal, sys, time
def stop(s, f):
    print("Traceback (most recent call last):", flush=True)
    print("KeyboardInterrupt", flush=True)
    print("Fatal Python error: init_import_site: Failed to import the site module", flush=True)
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
open(sys.argv[1], "w").close()
time.sleep(20)
"""
# torchrun with one worker that goes on (SIGTERM ignored, as torchrun's own disposition leaves it before the
# trainer's handler), waiting for it; SIGINT, which torchrun handles, does not stop it either.
WITH_A_WORKER = """
import signal, subprocess, sys
signal.signal(signal.SIGINT, lambda s, f: None)
sys.exit(subprocess.call([sys.executable, "-c", "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(20)",
                          sys.argv[1]]))
"""


def _runner(tmp_path, monkeypatch, script: str, flag, nnodes: int = 1) -> tuple[NodeRunner, io.StringIO]:
    monkeypatch.setattr(local, "torchrun_command", lambda plan, log_dir: [sys.executable, "-c", script, str(flag)])
    plan = NodePlan(
        config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1, nnodes=nnodes
    )
    console = io.StringIO()
    return NodeRunner(plan, console=console), console


def _signal_self_when(
    flag, *delays: float, sig: signal.Signals = signal.SIGINT, after: float = 0.0
) -> threading.Thread:
    """``sig`` to this process ``after`` seconds once ``flag`` exists, then once more after each of ``delays``."""

    def send():
        deadline = time.monotonic() + 20
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(after)
        os.kill(os.getpid(), sig)
        for d in delays:
            time.sleep(d)
            os.kill(os.getpid(), sig)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


_ARMED: list[bool] = []


def _interrupt_at_fork() -> None:
    # Where the tester's Ctrl-C landed: in the launcher's fork of torchrun (Popen with a preexec_fn runs the
    # at-fork callbacks, logging's among them), where a KeyboardInterrupt is printed and ignored by Python.
    if _ARMED:
        _ARMED.clear()
        os.kill(os.getpid(), signal.SIGINT)


os.register_at_fork(after_in_parent=_interrupt_at_fork)


def test_a_ctrl_c_as_torchrun_is_forked_stops_the_job(tmp_path, monkeypatch):
    # Was: "Exception ignored in: <function _releaseLock ...> KeyboardInterrupt", the signal handlers were
    # installed after the fork, and the job trained to its end and exited 0.
    flag = tmp_path / "trained"
    runner, console = _runner(tmp_path, monkeypatch, TRAINS_TO_THE_END, flag)
    _ARMED.append(True)
    try:
        with pytest.raises(KeyboardInterrupt):  # the CLI's "mnemo: interrupted", exit 130
            runner.run()
    finally:
        _ARMED.clear()
    assert not flag.exists()
    assert "[launch node0] got SIGINT: no worker started yet; stopping torchrun" in console.getvalue()
    assert runner.proc is not None and runner.proc.returncode is not None


def test_a_signal_before_torchrun_is_started_does_not_start_it(tmp_path, monkeypatch):
    runner, console = _runner(tmp_path, monkeypatch, TRAINS_TO_THE_END, tmp_path / "trained")

    def spawn(log_dir):
        raise AssertionError("torchrun started after a SIGTERM")

    real = runner._stop_before_start

    def stop_before_start():
        runner._on_signal(signal.SIGTERM, None)  # as if it came just before
        return real()

    monkeypatch.setattr(runner, "_spawn", spawn)
    monkeypatch.setattr(runner, "_stop_before_start", stop_before_start)
    assert runner.run() == 128 + signal.SIGTERM
    assert "got SIGTERM before torchrun started: not starting it" in console.getvalue()


def test_a_ctrl_c_while_torchrun_imports_is_one_line_and_an_interrupt(tmp_path, monkeypatch):
    # Was: torchrun's KeyboardInterrupt traceback (10-23 lines), "Fatal Python error: init_import_site" and
    # "torchrun exited with code 1" on the console, exit 1.
    flag = tmp_path / "importing"
    runner, console = _runner(tmp_path, monkeypatch, IMPORTING, flag)
    _signal_self_when(flag)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    shown = console.getvalue().splitlines()
    assert shown[1:] == ["[launch node0] got SIGINT: no worker started yet; stopping torchrun"], shown
    log = runner.plan.log_path.read_text()
    assert "Fatal Python error" in log and "[launch node0] torchrun exited with code 1" in log  # kept there


def test_a_second_ctrl_c_kills_the_job_and_is_an_interrupt(tmp_path, monkeypatch):
    # Was: "torchrun exited with code 137" and exit 137, where Ctrl-C is "mnemo: interrupted" and 130.
    flag = tmp_path / "worker"
    runner, console = _runner(tmp_path, monkeypatch, WITH_A_WORKER, flag)
    _signal_self_when(flag, 0.5)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    assert time.monotonic() - start < 10
    shown = console.getvalue().splitlines()
    assert shown[1:] == [
        "[launch node0] got SIGINT: sent SIGTERM to 1 worker(s)",
        "[launch node0] second SIGINT: killing torchrun and its workers",
    ], shown
    assert "torchrun exited with code 137" in runner.plan.log_path.read_text()
    assert not psutil.pid_exists(runner.proc.pid) or psutil.Process(runner.proc.pid).status() == "zombie"


# torchrun of a two-node job: its worker leaves exit code 0 (as launch/worker.py does) and exits, then torchrun
# waits in its exit barrier for the other node's agent (up to 300 s in torch); the flag once it waits there.
IN_ITS_EXIT_BARRIER = """
import signal, subprocess, sys, time
worker = "import os, sys, time; from mnemo.launch.worker import report_exit; time.sleep(1); report_exit(0, os.environ)"
code = subprocess.call([sys.executable, "-c", worker])
if len(sys.argv) > 2:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a torchrun that does not stop on SIGINT
print("torchrun: waiting in the exit barrier", flush=True)
open(sys.argv[1], "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_once_every_worker_exited_0_ends_the_job_as_done(tmp_path, monkeypatch, sig):
    # Was: "got SIGINT: no worker started yet; stopping torchrun", then "mnemo: interrupted" (exit 130), or exit
    # 143 for SLURM's SIGTERM: a finished job (its summary.json written) recorded as interrupted or failed.
    flag = tmp_path / "barrier"
    runner, console = _runner(tmp_path, monkeypatch, IN_ITS_EXIT_BARRIER, flag, nnodes=2)
    _signal_self_when(flag, sig=sig, after=1.0)  # the launcher has read torchrun's line by then
    start = time.monotonic()
    try:
        rc = runner.run()
    except KeyboardInterrupt:
        pytest.fail("the finished job ended as interrupted")
    assert rc == 0  # the workers' outcome
    assert time.monotonic() - start < 20  # torchrun stopped in its barrier (SIGINT, SIGKILL after STOP_GRACE_S)
    shown = console.getvalue().splitlines()
    assert f"[launch node0] got {sig.name}: every worker already exited 0; stopping torchrun in its exit barrier" in (
        shown
    ), shown
    assert not [line for line in shown if "no worker started" in line], shown


def test_a_second_ctrl_c_in_the_exit_barrier_kills_torchrun_and_the_job_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "STOP_GRACE_S", 60.0)  # only the second Ctrl-C ends this torchrun in time
    flag = tmp_path / "barrier"
    runner, console = _runner(tmp_path, monkeypatch, IN_ITS_EXIT_BARRIER, flag, nnodes=2)
    monkeypatch.setattr(
        local, "torchrun_command", lambda plan, log_dir: [sys.executable, "-c", IN_ITS_EXIT_BARRIER, str(flag), "deaf"]
    )
    _signal_self_when(flag, 0.5, after=1.0)
    start = time.monotonic()
    try:
        rc = runner.run()
    except KeyboardInterrupt:
        pytest.fail("the finished job ended as interrupted")
    assert rc == 0
    assert time.monotonic() - start < 20
    shown = console.getvalue().splitlines()
    assert "[launch node0] second SIGINT: killing torchrun and its workers" in shown, shown


# torchrun whose worker failed (killed: it left no exit code) reporting that failure: exit 1 after its report, or
# (argv[2] "restarts") waiting in the rendezvous of the next group until stopped; the flag once the worker is gone.
AFTER_A_FAILED_WORKER = """
import subprocess, sys, time
worker = "import os, signal, time; time.sleep(1.5); os.kill(os.getpid(), signal.SIGKILL)"
subprocess.call([sys.executable, "-c", worker])
open(sys.argv[1], "w").close()
if len(sys.argv) > 2:
    time.sleep(60)
time.sleep(3)
print("torchrun: ChildFailedError: worker 0 failed (exitcode: -9)", flush=True)
sys.exit(1)
"""


@pytest.mark.parametrize(
    ("nnodes", "sig", "restarts"),
    [(1, signal.SIGTERM, False), (2, signal.SIGTERM, True), (1, signal.SIGINT, True), (2, signal.SIGINT, False)],
)
def test_a_signal_after_a_worker_failed_ends_the_job_as_failed(tmp_path, monkeypatch, nnodes, sig, restarts):
    # Was: "got SIGTERM: no worker started yet; stopping torchrun" and exit 143 (130 for SIGINT): under SLURM
    # (--kill-on-bad-exit) srun's SIGTERM to the other nodes made a failed job read as cancelled.
    flag = tmp_path / "failed"
    runner, console = _runner(tmp_path, monkeypatch, AFTER_A_FAILED_WORKER, flag, nnodes=nnodes)
    argv = [sys.executable, "-c", AFTER_A_FAILED_WORKER, str(flag)] + (["restarts"] if restarts else [])
    monkeypatch.setattr(local, "torchrun_command", lambda plan, log_dir: argv)
    _signal_self_when(flag, sig=sig, after=0.1)
    start = time.monotonic()
    try:
        rc = runner.run()
    except KeyboardInterrupt:
        pytest.fail("the failed job ended as interrupted")
    assert rc == 1  # torchrun's code for a failed worker group
    assert time.monotonic() - start < 20  # a torchrun about to restart is stopped
    shown = console.getvalue().splitlines()
    assert f"[launch node0] got {sig.name}: a worker already failed; stopping torchrun" in shown, shown
    assert not [line for line in shown if "no worker started" in line], shown


# torchrun of a two-node job whose worker trains until a SIGTERM, then saves and exits 0 (leaving its code as
# launch/worker.py does); torchrun then waits in its exit barrier for a node that is gone.
STOPPED_THEN_IN_ITS_EXIT_BARRIER = """
import subprocess, sys, time
worker = '''
import os, signal, sys, time
from mnemo.launch.worker import report_exit
stop = []
signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
open(sys.argv[1], "w").close()
while not stop:
    time.sleep(0.05)
report_exit(0, os.environ)
'''
subprocess.call([sys.executable, "-c", worker, sys.argv[1]])
print("torchrun: waiting in the exit barrier", flush=True)
time.sleep(60)
"""


def test_workers_stopped_by_a_signal_do_not_wait_out_the_exit_barrier_grace(tmp_path, monkeypatch):
    # Was: under SLURM, after srun's SIGTERM the workers saved and exited 0, and the launcher waited in torchrun's
    # exit barrier for a lost node for EXIT_BARRIER_GRACE_S (30 s), SLURM's KillWait: SIGKILLed before its end,
    # its log with no last line and its temporary folder left behind.
    monkeypatch.setattr(local, "EXIT_BARRIER_GRACE_S", 20.0)
    flag = tmp_path / "training"
    runner, console = _runner(tmp_path, monkeypatch, STOPPED_THEN_IN_ITS_EXIT_BARRIER, flag, nnodes=2)
    _signal_self_when(flag, sig=signal.SIGTERM, after=0.5)
    start = time.monotonic()
    assert runner.run() == 0  # the workers' outcome
    assert time.monotonic() - start < 15
    shown = console.getvalue().splitlines()
    assert "[launch node0] got SIGTERM: sent SIGTERM to 1 worker(s)" in shown, shown
    assert (
        "[launch node0] every worker saved and exited 0 on the stop signal; not waiting for the exit barrier" in shown
    ), shown
