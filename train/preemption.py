"""Preemption signals (SIGTERM, SIGUSR1): remembered from a rank's first moments, acted upon by the step loop.

The worker (launch/worker.py) and ``mnemo train`` alone (``caught_during_run``) call ``catch`` before
anything slow (imports, rendezvous, data, model, the MLflow run), so that a notice arriving during start-up is
kept rather than killing the rank (the default action): the job would then fail instead of being requeued,
and the MLflow run opened by then stayed RUNNING for ever. schedule.Preemption takes the flag over
(``take``) when the step loop is built. No torch here: this module is imported first thing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from multiprocessing import resource_tracker

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# What the resource tracker must ignore: the preemption signals (srun signals every process of the step) and
# SIGHUP (a closed terminal signals its whole process group). It handles SIGINT and SIGTERM itself.
_TRACKER_IGNORES = (*SIGNALS, signal.SIGHUP)

# (signal number, time) of the first notice; later ones change nothing.
_first: tuple[int, float] | None = None


def _remember(signum: int, frame) -> None:
    global _first
    if _first is None:
        _first = (signum, time.time())


def catch(hang_up: bool = False) -> dict[int, object]:
    """From now on SIGTERM and SIGUSR1 (and SIGHUP with ``hang_up``, unless it is ignored: ``nohup``) only set
    the flag (the first one's number and time); the handlers they had before."""
    sigs = [*SIGNALS, signal.SIGHUP] if hang_up and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else SIGNALS
    return {s: signal.signal(s, _remember) for s in sigs}


@contextlib.contextmanager
def caught_during_run() -> Iterator[None]:
    """``catch`` (SIGHUP too) for one run of ``mnemo train`` alone, from its first moments; afterwards the
    handlers from before and no notice left over (one that start-up never took is not a later run's).

    SIGHUP as well: the step loop (schedule.Preemption) treats a closed terminal as a stop request in
    ``mnemo train``, and before the loop the default action killed the process with its MLflow run RUNNING.
    Under ``mnemo launch`` the worker leaves SIGHUP to its node launcher.
    """
    before = catch(hang_up=True)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        take()


def start_resource_tracker() -> None:
    """Start Python's multiprocessing resource tracker now, with SIGTERM, SIGUSR1 and SIGHUP ignored in it.

    The tracker is a process of its own, started on first use of shared memory (the data loaders'), and
    keeps an ignored disposition across exec. Started with the default action, it died of any of these
    sent to every process (srun's forwarded notice; a terminal's hang-up to its process group), and the
    run's exit printed KeyError tracebacks from it. Both entry points call this before anything slow:
    ``mnemo train`` and the launcher's worker. Once running it is reused (a later call starts nothing).

    This process's handlers are as they were afterwards. The signals are blocked meanwhile, not lost: one
    that came while they were ignored here reaches the restored handler (or default action) after.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _TRACKER_IGNORES)
    before = {s: signal.signal(s, signal.SIG_IGN) for s in _TRACKER_IGNORES}
    try:
        resource_tracker.ensure_running()
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def ignore_late_notices() -> None:
    """Ignore SIGTERM, SIGUSR1 and SIGHUP from now on in this process: its run is over (saved, or failed).

    SLURM's notice comes from several places (slurmstepd signals every process of the step, and the node
    launcher and its wrapper pass it on), and a second one can land after the rank has saved: once Python
    shuts down it has put back the default action of every signal with a Python handler, and the notice
    killed the rank (the node then failed with torchrun's traceback). An ignored signal stays ignored.
    """
    for s in _TRACKER_IGNORES:
        signal.signal(s, signal.SIG_IGN)


def exit_at_next_interrupt() -> None:
    """A Ctrl-C from now on ends this process at once, status 130: its command is over (``mnemo: interrupted``
    or its result printed), and a second Ctrl-C that lands while Python shuts down (a process pool's threads
    joined, a library's exit hooks) printed Python's "Exception ignored ... KeyboardInterrupt" traceback from
    wherever it landed. The process's own entry point only (a handler of the whole process)."""
    signal.signal(signal.SIGINT, _exit_now)


def _exit_now(*_: object) -> None:
    """Status 130 at once; what the command printed is flushed first (a result piped to another program)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken pipe: nothing more to give it
            pass
    os._exit(130)


def pending() -> tuple[int, float] | None:
    """(signal number, time) of the first notice since ``catch`` that no step loop took yet (``take``): one that
    came during start-up, still going on; else None. Nothing is taken here."""
    return _first


def take() -> tuple[int, float] | None:
    """(signal number, time) of the first notice since ``catch``, or None; forgotten here once taken.

    schedule.Preemption takes it over when it installs its own handler, so a
    notice counts for the run that was starting, not for a later one in the
    same process.
    """
    global _first
    first, _first = _first, None
    return first
