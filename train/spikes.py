"""Loss-spike detection and recovery (``train.spike.*``; docs/spikes.md has the measured defaults).

A spike is a corpus step whose loss (and, with ``train.spike.grad_norm``, whose
gradient norm) lies far above its running statistics: an exponential moving
mean and variance over about ``window`` steps (span ``window``: weight
2 / (window + 1); the first ``window`` values averaged plainly so that the
start is not biased). A value fires when, after ``warmup`` values seen,

    z = (x - mean) / std > train.spike.z   and   x / mean > train.spike.ratio

(the ratio keeps tiny late-training variances from flagging harmless noise).
A flagged value does not enter the statistics. What a spike does
(``train.spike.policy``):

- ``log``: a dry run: the event is logged and counted, training goes on as if off.
- ``skip``: the step's update is not applied: the loss spike is seen after the
  forward pass (the loss is summed over ranks, so every rank decides alike) and
  before ``engine.backward``, so neither the weights, the optimizer moments nor
  the LR schedule see the step. Its data is consumed and the memory state of
  its window goes on (it is finite and came from the unchanged weights), as
  after a NaN/inf gradient skip. The step counts as done (``step`` advances).
- ``rollback``: the engine (weights, optimizer, LR schedule), the counters and
  the RNG come back from the newest complete checkpoint of this run; the
  stream slots keep their position, so the data read since that checkpoint,
  the bad step's included, is skipped (as PaLM did); every slot's memory starts
  empty (it was computed by the discarded weights and belongs to the skipped
  window). Nothing of the bad step is saved: the trainer rolls back before its
  after-step save. More than ``max_rollbacks`` rollbacks in a row (without
  getting past the step of the previous one) stop the run with an error. With
  no checkpoint of this world size, ZeRO stage and dtype yet, a loss spike is skipped
  instead (logged).

The gradient norm is known only inside ``engine.step`` (DeepSpeed computes it
over all ranks and ZeRO partitions while it updates), so a gradient-norm spike
is seen after its update: ``log`` and ``rollback`` only (config check).

The detector is Stateful: its statistics and counters are the same on every
rank (they see the summed loss and the global norm) and travel in every rank
file under ``spikes`` (only when the policy is not ``off``), so a resume
continues them exactly. A rollback keeps them (they describe the good steps).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from mnemo.train.errors import UserError

log = logging.getLogger("mnemo.train")

POLICIES = ("off", "log", "skip", "rollback")


class RunningStats:
    """Exponential moving mean and variance of one series (span ``window``), plain mean for the first values."""

    def __init__(self, window: int):
        self.alpha = 2.0 / (window + 1)
        self.n, self.mean, self.var = 0, 0.0, 0.0

    def score(self, x: float) -> tuple[float, float]:
        """(z-score, ratio to the mean) of ``x`` against the statistics so far. One value has no spread: z is
        0 then (it was (x - mean) / 1e-12, logged as spike/loss_z = -3.8e11 at step 2)."""
        if self.n == 0:
            return 0.0, 1.0
        ratio = x / self.mean if self.mean > 0 else math.inf
        if self.n == 1:
            return 0.0, ratio
        std = max(math.sqrt(max(self.var, 0.0)), 1e-12)
        return (x - self.mean) / std, ratio

    def update(self, x: float) -> None:
        self.n += 1
        a = max(self.alpha, 1.0 / self.n)  # the first 1/alpha values: the plain running mean and variance
        diff = x - self.mean
        self.mean += a * diff
        self.var = (1 - a) * (self.var + a * diff * diff)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "var": self.var}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n, self.mean, self.var = int(sd["n"]), float(sd["mean"]), float(sd["var"])


@dataclasses.dataclass
class SpikeEvent:
    step: int  # 1-based optimizer step
    what: str  # "loss" | "grad_norm"
    value: float
    mean: float
    z: float
    ratio: float
    action: str  # "log" | "skip" | "rollback"


class SpikeDetector:
    """The running statistics, the decision per step and the counters of ``train.spike`` (a Stateful part).

    ``manager`` (a CheckpointManager) is where a rollback finds its checkpoint; the trainer passes its own.
    """

    def __init__(self, cfg, manager=None, engine_form: dict[str, Any] | None = None, run_cfg=None):
        """``engine_form``: what a checkpoint's config must match to load as it is ({"zero": {"stage": 2}, ...}).
        ``run_cfg``: the run's whole Config, whose train.lr, weight_decay and betas a rollback puts back over
        the checkpoint's (as a resume does): the checkpoint rolled back to may predate a change of them."""
        self.cfg, self.manager, self.engine_form, self.run_cfg = cfg, manager, engine_form or {}, run_cfg
        self.stats = {"loss": RunningStats(cfg.window), "grad_norm": RunningStats(cfg.window)}
        self.events = self.skipped = self.rollbacks = 0
        self.in_row = 0  # rollbacks in a row: each at or before the bad step of the one before
        self.last_bad = 0  # bad step (1-based) of the last rollback
        self.last_z = {"loss": 0.0, "grad_norm": 0.0}
        self.rollback_to: Path | None = None  # set by check(): the trainer rolls back before its after-step save

    @property
    def watch_grad_norm(self) -> bool:
        return bool(self.cfg.grad_norm)

    # ------------------------------------------------------------------ the decision
    def check(self, step: int, what: str, x: float, tracker=None, steplog=None, rank: int = 0) -> str:
        """'ok', or what the spike of ``what`` = ``x`` at 0-based ``step`` does: 'log' | 'skip' | 'rollback'.

        Called with the same ``x`` on every rank (summed loss, global norm), so all ranks decide alike.
        """
        st = self.stats[what]
        if not math.isfinite(x):  # train.nan_policy's case, not a statistic
            return "ok"
        z, ratio = st.score(x)
        self.last_z[what] = z
        fired = st.n >= self.cfg.warmup and z > self.cfg.z and ratio > self.cfg.ratio
        if not fired:
            st.update(x)
            return "ok"
        action = self.cfg.policy
        if action == "rollback":
            self.rollback_to = self.usable_checkpoint()
            if self.rollback_to is None:
                action = "skip" if what == "loss" else "log"  # the update of a gradient-norm spike is done
            else:
                # In a row: this spike is not past the step of the previous rollback (training made no progress).
                self.in_row = self.in_row + 1 if step + 1 <= self.last_bad else 1
                self.last_bad = step + 1
                if self.in_row > self.cfg.max_rollbacks:
                    raise UserError(
                        f"train.spike: {self.in_row} rollbacks in a row (train.spike.max_rollbacks="
                        f"{self.cfg.max_rollbacks}), the last for the {what} at step {step + 1} "
                        f"({x:.4g}, running mean {st.mean:.4g}); last checkpoint {self.rollback_to}"
                    )
        self.events += 1
        self.skipped += action == "skip"
        self.rollbacks += action == "rollback"
        self.report(SpikeEvent(step + 1, what, x, st.mean, z, ratio, action), tracker, steplog, rank)
        return action

    def usable_checkpoint(self) -> Path | None:
        """The newest complete checkpoint of this run that loads as it is (same world size, ZeRO stage, dtype),
        as rank 0 sees the checkpoints: UserError on a rank that does not see it."""
        from mnemo.train.checkpoint import LAGGING_LISTING, rank_file_name
        from mnemo.train.collectives import decided_by_rank0

        if self.manager is None:
            return None
        path = decided_by_rank0(self._newest_usable)  # each rank's own listing may lag (checkpoint.resume_point)
        own = None if path is None else path / rank_file_name(self.manager.rank)
        if own is not None and not own.is_file():
            raise UserError(
                f"train.spike.policy=rollback: rank {self.manager.rank} does not see {own} of the checkpoint "
                f"rank 0 rolls back to: {LAGGING_LISTING}"
            )
        return path

    def _newest_usable(self) -> Path | None:
        from mnemo.train.checkpoint import rank_file_name, read_meta

        path = self.manager.latest()
        if path is None:
            return None
        meta = read_meta(path)
        if meta.get("world_size") != self.manager.world or not (path / rank_file_name(self.manager.rank)).is_file():
            return None
        # The checkpoint a run resumed from may be of another ZeRO stage or precision (a universal conversion).
        saved = meta.get("config") or {}
        for section, keys in self.engine_form.items():
            if any((saved.get(section) or {}).get(k) != v for k, v in keys.items()):
                return None
        return path

    def report(self, ev: SpikeEvent, tracker, steplog, rank: int) -> None:
        """One warning line, one step-log record and the spike metrics at the event's step (rank 0)."""
        if rank != 0:
            return
        msg = {
            "log": "logged only (train.spike.policy=log)",
            "skip": "update skipped",
            "rollback": "rolling back to the last checkpoint, data up to here skipped",
        }[ev.action]
        fallback = self.cfg.policy == "rollback" and ev.action != "rollback"
        log.warning(
            "step %d: %s spike %.4g (running mean %.4g, z %.1f, ratio %.2f): %s%s",
            ev.step,
            ev.what,
            ev.value,
            ev.mean,
            ev.z,
            ev.ratio,
            msg,
            " (no checkpoint of this world size, ZeRO stage and dtype to roll back to)" if fallback else "",
        )
        if steplog is not None:
            steplog.write({"event": "spike", **dataclasses.asdict(ev)})
        if tracker is not None:
            tracker.log_metrics({**self.metrics(), f"spike/{ev.what}_ratio": ev.ratio}, ev.step)

    def metrics(self) -> dict[str, float]:
        return {
            "spike/events": float(self.events),
            "spike/skipped_steps": float(self.skipped),
            "spike/rollbacks": float(self.rollbacks),
            "spike/loss_z": float(self.last_z["loss"]),
            **({"spike/grad_norm_z": float(self.last_z["grad_norm"])} if self.watch_grad_norm else {}),
        }

    # ------------------------------------------------------------------ rollback
    def roll_back_if_due(self, engine, parts: dict[str, Any]) -> bool:
        """After a step: roll back if check() asked for it (True: the trainer's step counter moved back)."""
        if self.rollback_to is None:
            return False
        self.roll_back(engine, parts)
        return True

    def roll_back(self, engine, parts: dict[str, Any]) -> Path:
        """Restore the engine, counters and RNG from ``rollback_to``; every slot's memory starts empty.

        ``parts`` are the trainer's Stateful parts (CheckpointManager.states); the streams, the passkey
        episodes and this detector keep their state: the data read since the checkpoint stays skipped.
        """
        from mnemo.train.checkpoint import DS_TAG, load_engine_state, read_meta

        path, self.rollback_to = self.rollback_to, None
        load_engine_state(engine, path, DS_TAG, f"train.spike.policy=rollback: checkpoint {path}")
        if self.run_cfg is not None:  # the config's lr / weight_decay / betas, not those saved in the checkpoint
            from mnemo.train.engine import apply_optimizer_config

            apply_optimizer_config(engine, self.run_cfg)
        meta = read_meta(path)
        own = self.manager.rank_state(path, self.manager.rank)
        parts["rng"].load_state_dict(own["rng"])
        # Every slot (of every accumulation group) empty: MemoryState.reset zeroes every tensor, lengths included.
        mem = parts["memory"]
        mem.load_state_dict({k: torch.zeros_like(v) for k, v in mem.state_dict().items()})
        parts["counters"].load_state_dict({"step": int(meta["step"]), "tokens_seen": int(meta.get("tokens_seen", 0))})
        if self.manager.rank == 0:
            log.warning("rolled back to %s (step %d)", path, int(meta["step"]))
        return path

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": {k: v.state_dict() for k, v in self.stats.items()},
            "events": self.events,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "in_row": self.in_row,
            "last_bad": self.last_bad,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k, v in sd["stats"].items():
            self.stats[k].load_state_dict(v)
        self.events, self.skipped, self.rollbacks = int(sd["events"]), int(sd["skipped"]), int(sd["rollbacks"])
        self.in_row, self.last_bad = int(sd["in_row"]), int(sd["last_bad"])


def spike_detector(cfg, manager=None, parts: dict[str, Any] | None = None) -> SpikeDetector | None:
    """The detector of ``cfg.train.spike`` (added to ``parts`` as ``spikes``), or None when the policy is ``off``."""
    sc = cfg.train.spike
    if sc.policy == "off":
        return None
    det = SpikeDetector(sc, manager, {"zero": {"stage": cfg.zero.stage}, "model": {"dtype": cfg.model.dtype}}, cfg)
    if parts is not None:
        parts["spikes"] = det
    return det
