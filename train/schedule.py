"""When the step loop stops, evaluates and saves: preemption signals, the time limit, the intervals."""

from __future__ import annotations

import signal
import time

import torch

from mnemo.train.config import Config


class Preemption:
    """SIGTERM/SIGUSR1 set a flag; the loop saves at the end of the current step and exits 0."""

    def __init__(self):
        self.signal: int | None = None
        self.at = 0.0
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.signal is None:
            self.signal, self.at = signum, time.time()


def stop_requests(preempt: Preemption, cfg: Config, started: float, device: torch.device) -> tuple[bool, bool]:
    """(stop, time_up), the same on every rank after a step: a preemption signal or the time limit on any rank.

    A collective (train/collectives.py) on ``device``, the engine's device.
    """
    from mnemo.train.collectives import any_true

    stop, time_up = any_true(
        [preempt.signal is not None, cfg.train.max_time_s > 0 and time.time() - started > cfg.train.max_time_s], device
    )
    return stop, time_up


def after_step(cfg: Config, step: int, stop: bool, time_up: bool) -> tuple[str, ...]:
    """What the loop does after optimizer step ``step`` (steps done), in order: "eval", "save".

    stop      a preemption signal reached some rank: save at once and nothing
              else. The job has checkpoint.grace_period_s in all before it is
              killed, and an evaluation first could outlast it (the evaluation
              of this step is skipped; the resumed run evaluates at its next
              interval).
    time_up   train.max_time_s is spent: nothing here; the loop ends, saves and
              evaluates once.
    """
    if stop:
        return ("save",)
    if time_up:
        return ()
    out = []
    if cfg.eval.interval and step % cfg.eval.interval == 0 and step < cfg.train.max_steps:
        out.append("eval")
    if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
        out.append("save")
    return tuple(out)
