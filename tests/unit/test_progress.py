"""`mnemo prepare`'s progress counters: a worker that dies inside an update does not hang the main process."""

import multiprocessing as mp
import os
import signal
import threading
import time

from mnemo.data_pipeline import progress
from mnemo.data_pipeline.progress import Counters, Progress


def _die_holding_the_lock(counters: Counters) -> None:
    counters.arr.get_lock().acquire()
    os.kill(os.getpid(), signal.SIGKILL)  # as a pool's terminate() or the OOM killer ends a worker mid-update


def test_a_worker_killed_inside_an_update_does_not_hang_the_bar(monkeypatch):
    """A --strict stop terminates the pool; a worker ended while it held the counters' lock left it held for
    ever, and the main process waited in the bar's last refresh (a CI run hung there for 600 s)."""
    monkeypatch.setattr(progress, "COUNTERS_LOCK_WAIT_S", 0.2)
    ctx = mp.get_context("fork")
    counters = Counters(shared=True, ctx=ctx)
    counters.add(10, 1, 5)
    p = ctx.Process(target=_die_holding_the_lock, args=(counters,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    t0 = time.monotonic()
    got: list = []

    def read_and_add() -> None:
        bar = Progress(total=100, initial=0, counters=counters, enabled=False)
        bar.close()  # reads the counters
        counters.add(1, 1, 1)  # dropped after the wait: display only
        got.append(counters.get())

    # In a thread: were the hang back, this test fails in 10 s instead of holding the suite until its timeout.
    t = threading.Thread(target=read_and_add, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the bar's read or an update waited on the dead worker's lock"
    assert got == [(10, 1, 5)]
    assert time.monotonic() - t0 < 5
