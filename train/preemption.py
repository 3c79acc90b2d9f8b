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

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

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


def take() -> tuple[int, float] | None:
    """(signal number, time) of the first notice since ``catch``, or None; forgotten here once taken.

    schedule.Preemption takes it over when it installs its own handler, so a
    notice counts for the run that was starting, not for a later one in the
    same process.
    """
    global _first
    first, _first = _first, None
    return first
