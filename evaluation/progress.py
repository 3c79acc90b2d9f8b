"""What a long evaluation tells the user while it reads: a bar over the segments to read.

Reading is the work (a D = 1024 pass key reads 1,025 segments per document,
half an hour on 2 CPU cores), so the unit is the slot-segment: one slot of a
batch reading one segment of T tokens. On a terminal a tqdm bar; in a log
(stderr not a terminal: SLURM, nohup, CI) a line at most every minute.
`mnemo generate` reads a long prompt with it too (a 128K-token prompt is
minutes of reading).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

LOG_EVERY = 60.0  # seconds between two lines of LineProgress (a log is read, not watched)


class LineProgress:
    """Progress for a log (stderr not a terminal): a line at most every ``every`` seconds, the first after
    ``every`` (short evaluations stay silent; None: LOG_EVERY), with the time so far and the time left at the
    rate so far; ``prog`` starts the line (the command)."""

    def __init__(self, total: int, desc: str, unit: str, every: float | None = None, prog: str = "mnemo eval"):
        self.total, self.desc, self.unit = max(int(total), 1), desc, unit
        self.every, self.prog = LOG_EVERY if every is None else every, prog
        self.n, self.t0 = 0, time.monotonic()
        self.last = self.t0

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last, el = now, now - self.t0
        left = el * (self.total - self.n) / max(self.n, 1)
        print(
            f"{self.prog}: {self.desc}: {self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%),"
            f" {el / 60:.1f} min, ~{left / 60:.1f} min left",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "segments", prog: str = "mnemo eval"):
    """A tqdm bar on a terminal, log lines otherwise (``LineProgress``); None when not ``enabled``.

    Units are slot-segments (one slot reading one segment of T tokens) wherever the work is reading."""
    if not enabled:
        return None
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit.rstrip("s"), leave=False, file=sys.stderr)
    return LineProgress(total, desc, unit, prog=prog)


def segments_to_read(lengths: Sequence[int], segment_len: int) -> int:
    """Slot-segments read for sequences of these lengths (a sequence of n tokens has n - 1 inputs)."""
    return sum(-(-(int(n) - 1) // int(segment_len)) for n in lengths)


def teacher_forced_segments(samples: Sequence[dict], segment_len: int) -> int:
    """What ``score_teacher_forced`` reads for these samples (each up to the end of its answer)."""
    return segments_to_read([int(s["answer_start"]) + int(s["answer_len"]) for s in samples], segment_len)
