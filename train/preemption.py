"""Preemption signals (SIGTERM, SIGUSR1): remembered from a rank's first moments, acted upon by the step loop.

The worker (launch/worker.py) calls ``catch`` before anything slow (imports,
rendezvous, data, model), so that a notice arriving during start-up is kept
rather than killing the rank (the default action): the job would then fail
instead of being requeued. schedule.Preemption takes the flag over
(``take``) when the step loop is built. No torch here: this module is imported first thing.
"""

from __future__ import annotations

import signal
import time
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


def catch() -> None:
    """From now on SIGTERM and SIGUSR1 only set the flag (the first one's number and time)."""
    for s in SIGNALS:
        signal.signal(s, _remember)


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


def take() -> tuple[int, float] | None:
    """(signal number, time) of the first notice since ``catch``, or None; forgotten here once taken.

    schedule.Preemption takes it over when it installs its own handler, so a
    notice counts for the run that was starting, not for a later one in the
    same process.
    """
    global _first
    first, _first = _first, None
    return first
