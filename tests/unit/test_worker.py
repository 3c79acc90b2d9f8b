"""mnemo.launch.worker: a rank does not outlive the torchrun agent that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

# The child: like a torchrun worker, in a session of its own; writes its pid, then sleeps.
CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
if {die!r}:
    from mnemo.launch.worker import die_with_parent
    die_with_parent()
open({pidfile!r}, "w").write(str(os.getpid()))
time.sleep(120)
"""
PARENT = (
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
    "start_new_session=True); time.sleep(120)"
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _child_after_parent_sigkill(tmp_path: Path, die: bool) -> int:
    pidfile = tmp_path / f"child-{die}.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD.format(repo=str(REPO), die=die, pidfile=str(pidfile))]
    )
    deadline = time.time() + 30
    while not (pidfile.is_file() and pidfile.read_text()):
        assert time.time() < deadline, "the child did not start"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return pid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_dies_when_its_parent_is_killed(tmp_path):
    orphan = _child_after_parent_sigkill(tmp_path, die=False)
    try:
        pid = _child_after_parent_sigkill(tmp_path, die=True)
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the worker outlived its SIGKILLed parent"
        # Without die_with_parent the same child lives on (what torchrun's workers did).
        assert _alive(orphan)
    finally:
        if _alive(orphan):
            os.kill(orphan, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_whose_parent_is_already_gone_exits_at_once():
    # `parent` is the pid the parent passed down: a different parent now means the real one died first.
    code = (
        "import os, sys; sys.path.insert(0, {repo!r}); from mnemo.data_pipeline.processes import die_with_parent; "
        "die_with_parent({parent}); print('alive')"
    )
    gone = subprocess.run(
        [sys.executable, "-c", code.format(repo=str(REPO), parent="os.getppid() + 1")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (gone.returncode, gone.stdout) == (1, "")
    here = subprocess.run(
        [sys.executable, "-c", code.format(repo=str(REPO), parent="os.getppid()")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (here.returncode, here.stdout) == (0, "alive\n")


# The rank as torchrun starts it (the node launcher has SIGTERM/SIGUSR1 ignored), with run_train replaced:
# a notice comes during start-up, then the step loop's Preemption is built.
EARLY_SIGNAL = """
import os, signal, sys
sys.path.insert(0, {repo!r})
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
import mnemo.train.entry as entry

def run_train(config, overrides):
    os.kill(os.getpid(), signal.{sig})  # srun signals every process of the step, ranks starting up included
    from mnemo.train.schedule import Preemption

    print("flag", signal.Signals(Preemption().signal).name, "again", Preemption().signal, flush=True)
    return 0

entry.run_train = run_train
from mnemo.launch import worker
sys.exit(worker.main(["c.yaml"]))
"""


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_a_preemption_notice_during_start_up_is_kept_for_the_step_loop(sig):
    # Was: the worker restored the default action, and the notice killed the rank (the SLURM job failed).
    r = subprocess.run(
        [sys.executable, "-c", EARLY_SIGNAL.format(repo=str(REPO), sig=sig)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # Taken over once: a later run in the same process does not see it.
    assert r.stdout.splitlines()[-1] == f"flag {sig} again None"


TRACKER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import psutil
import mnemo.train.entry as entry

def run_train(config, overrides):
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # what shared memory does on first use: the worker's tracker, or a new one
    (tracker,) = psutil.Process().children()
    os.kill(tracker.pid, signal.SIGUSR1)  # srun signals every process of the step
    time.sleep(0.5)
    print("tracker", "alive" if tracker.status() != psutil.STATUS_ZOMBIE else "died", flush=True)
    return 0

entry.run_train = run_train
from mnemo.launch import worker
sys.exit(worker.main(["c.yaml"]))
"""


def test_the_resource_tracker_outlives_a_preemption_notice():
    # Was: started later with the default action for SIGUSR1, it died on every SLURM preemption.
    r = subprocess.run(
        [sys.executable, "-c", TRACKER.format(repo=str(REPO))], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == "tracker alive"


TRAIN_TRACKER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import psutil
import mnemo.train.entry as entry

# As in a terminal, whatever this test run inherited (in the background SIGHUP may be ignored).
signal.signal(signal.SIGHUP, signal.SIG_DFL)

def run_train(config, overrides):
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # what shared memory does on first use
    (tracker,) = psutil.Process().children()
    os.kill(tracker.pid, signal.{sig})  # a terminal's hang-up reaches its whole process group
    time.sleep(0.5)
    print("tracker", "alive" if tracker.status() != psutil.STATUS_ZOMBIE else "died", flush=True)
    return 0

entry.run_train = run_train
from mnemo.cli import main
status = main(["train", "c.yaml"])
print("handler", signal.getsignal(signal.{sig}) is signal.SIG_DFL, flush=True)
sys.exit(status)
"""


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGUSR1"])
def test_the_resource_tracker_of_mnemo_train_alone_outlives_a_hang_up(sig):
    # Was: `mnemo train` (not under launch) left the tracker to shared memory, which started it with the
    # default actions: a SIGHUP to the terminal's process group killed it (KeyError tracebacks at the end).
    r = subprocess.run(
        [sys.executable, "-c", TRAIN_TRACKER.format(repo=str(REPO), sig=sig)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # The tracker lives; this process's own disposition is what it was (after the run: during it the notice
    # is kept for the step loop, test_a_stop_request_during_the_start_up_of_mnemo_train_alone_is_kept).
    assert r.stdout.splitlines()[-2:] == ["tracker alive", "handler True"]


# `mnemo train` alone, as in a terminal, with run_train replaced: a stop request comes during start-up (after
# the MLflow run was opened, say), then the step loop's Preemption is built.
TRAIN_EARLY_SIGNAL = """
import os, signal, sys
sys.path.insert(0, {repo!r})
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # whatever this test run inherited (nohup: ignored)
import mnemo.train.entry as entry

def run_train(config, overrides):
    os.kill(os.getpid(), signal.{sig})
    from mnemo.train.schedule import Preemption

    p = Preemption()
    p.release()
    print("flag", signal.Signals(p.signal).name, flush=True)
    return 0

entry.run_train = run_train
from mnemo.cli import main
status = main(["train", "c.yaml"])
print("after", all(signal.getsignal(s) is signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)))
sys.exit(status)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGUSR1"])
def test_a_stop_request_during_the_start_up_of_mnemo_train_alone_is_kept(sig):
    """Was: `mnemo train` without a launcher left these signals their default action until the step loop: one
    during start-up killed it (exit 143 or 129), with its MLflow run (opened by then) RUNNING for ever. Now
    the step loop takes the notice (it stops before the first step, closing the run KILLED) and afterwards
    the handlers are the caller's again."""
    r = subprocess.run(
        [sys.executable, "-c", TRAIN_EARLY_SIGNAL.format(repo=str(REPO), sig=sig)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.splitlines()[-2:] == [f"flag {sig}", "after True"]


def test_starting_the_resource_tracker_leaves_handlers_and_mask_as_they_were():
    from mnemo.train import preemption

    sigs = (signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in sigs}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    preemption.start_resource_tracker()
    assert {s: signal.getsignal(s) for s in sigs} == before
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


LATE_NOTICE = """
import os, signal, sys, threading, time
sys.path.insert(0, {repo!r})
import mnemo.train.entry as entry


class Slow:
    def __del__(self):  # collected during interpreter shutdown, after the handlers are gone
        os.kill(os.getpid(), signal.SIGUSR1)  # the second notice of a SLURM preemption
        time.sleep(0.2)


def run_train(config, overrides):
    keep = Slow()
    keep.self = keep  # a cycle: finalized late, at shutdown
    return 0

entry.run_train = run_train
from mnemo.launch import worker
sys.argv = ["worker", "c.yaml"]  # as torchrun starts it: the process's own entry point
sys.exit(worker.main())
"""


def test_a_second_notice_while_the_rank_exits_does_not_kill_it():
    """Before: the rank that had saved and returned 0 died of the duplicate notice (exit -10), and the node
    failed with torchrun's traceback."""
    r = subprocess.run(
        [sys.executable, "-c", LATE_NOTICE.format(repo=str(REPO))], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


LATE_NOTICE_IN_CALLER = """
import signal, sys
sys.path.insert(0, {repo!r})
import mnemo.train.entry as entry

entry.run_train = lambda config, overrides: 0
from mnemo.cli import main
from mnemo.launch import worker
assert main(["train", "c.yaml"]) == 0 and worker.main(["c.yaml"]) == 0
print(signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN, signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN)
"""


def test_a_caller_in_python_keeps_its_signal_handlers():
    """main(argv) called from Python (tests, scripts) must not leave the caller ignoring SIGTERM and SIGHUP: a
    pytest run did, after its first in-process `mnemo train`, and its later subprocesses inherited that."""
    r = subprocess.run(
        [sys.executable, "-c", LATE_NOTICE_IN_CALLER.format(repo=str(REPO))],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)],
    )
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["True", "True"], (r.stdout, r.stderr[-2000:])
