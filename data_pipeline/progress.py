"""What `mnemo prepare` tells the user while it works: one-line notes, and a bar over input bytes.

The counters (bytes, documents, tokens done) live in shared memory when units
run in worker processes, so the bar in the main process sees every worker.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time


def note(msg: str) -> None:
    print(f"mnemo: {msg}", file=sys.stderr, flush=True)


# How long an update waits for the counters' lock. A worker ended inside an update (a --strict stop
# terminates the pool; the OOM killer) never releases it: the main process then waited for ever in the bar's
# last refresh (a test run hung there). The counters are for display only: an update that cannot get the
# lock in this time is dropped, and reads take no lock.
COUNTERS_LOCK_WAIT_S = 2.0


class Counters:
    """bytes, documents, tokens done; shared with worker processes when ``shared``."""

    def __init__(self, shared: bool, ctx: mp.context.BaseContext | None = None):
        self.arr = (ctx or mp).Array("q", 3, lock=True) if shared else [0, 0, 0]
        self.shared = shared

    def add(self, nbytes: int, docs: int, tokens: int) -> None:
        if self.shared:
            lock = self.arr.get_lock()
            if not lock.acquire(timeout=COUNTERS_LOCK_WAIT_S):
                return
            try:
                raw = self.arr.get_obj()
                raw[0] += nbytes
                raw[1] += docs
                raw[2] += tokens
            finally:
                lock.release()
        else:
            self.arr[0] += nbytes
            self.arr[1] += docs
            self.arr[2] += tokens

    def get(self) -> tuple[int, int, int]:
        raw = self.arr.get_obj() if self.shared else self.arr  # no lock: see COUNTERS_LOCK_WAIT_S
        return int(raw[0]), int(raw[1]), int(raw[2])


class Progress:
    """tqdm bar over input bytes with documents/s and tokens/s (on a terminal only)."""

    def __init__(self, total: int, initial: int, counters: Counters, enabled: bool | None):
        from tqdm import tqdm

        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="B",
            unit_scale=True,
            desc="prepare",
            disable=not show,
            dynamic_ncols=True,
        )
        self.counters = counters
        self.start = time.monotonic()
        self.shown = 0
        self.last = 0.0

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        nbytes, docs, tokens = self.counters.get()
        el = max(now - self.start, 1e-9)
        self.bar.set_postfix_str(f"{docs / el:,.0f} docs/s {tokens / el:,.0f} tok/s", refresh=False)
        self.bar.update(nbytes - self.shown)
        self.shown = nbytes

    def close(self) -> None:
        self.refresh(force=True)
        self.bar.close()
