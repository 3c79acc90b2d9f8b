"""When the step loop stops, evaluates and saves: preemption signals, the time limit, the intervals; how
many steps a run makes (train.max_steps or train.max_tokens) of what global batch (train.global_batch_size)."""

from __future__ import annotations

import dataclasses
import signal
import sys
import time

import torch

from mnemo.train import preemption
from mnemo.train.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class Batching:
    """The global batch of one optimizer step: ``world_size`` ranks x ``batch_size`` slots x ``accum`` micro-steps."""

    world_size: int
    batch_size: int
    accum: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accum

    def describe(self) -> str:
        """'global batch 8 = 1 rank x 4 slots x 2 accumulation'."""
        ranks = "rank" if self.world_size == 1 else "ranks"
        slots = "slot" if self.batch_size == 1 else "slots"
        return (
            f"global batch {self.global_batch} = {self.world_size} {ranks} x {self.batch_size} {slots} "
            f"x {self.accum} accumulation"
        )


def batching(cfg: Config, world_size: int) -> Batching:
    """train.global_batch_size over ``world_size`` ranks of train.batch_size slots (ConfigError if it does not divide).

    0 (unset) = no accumulation: the global batch is world size x batch size, as before the key existed.
    """
    b, gb = cfg.train.batch_size, cfg.train.global_batch_size
    if gb == 0:
        return Batching(world_size, b, 1)
    if gb % (world_size * b):
        raise ConfigError(
            f"train.global_batch_size: {gb} is not a multiple of world size {world_size} x train.batch_size {b} "
            f"= {world_size * b}"
        )
    accum = gb // (world_size * b)
    if accum > 1 and cfg.train.passkey.fraction > 0:
        raise ConfigError(
            f"train.global_batch_size: {gb} needs {accum} accumulation micro-steps on {world_size} x {b} slots, "
            "which passkey episode steps do not support (train.passkey.fraction > 0)"
        )
    return Batching(world_size, b, accum)


def batching_of(meta: dict) -> Batching:
    """The batching a checkpoint was written with (its meta.json: world size and saved config)."""
    train = meta.get("config", {}).get("train", {})
    world, b = int(meta["world_size"]), int(train.get("batch_size", 1))
    gb = int(train.get("global_batch_size", 0) or 0)
    return Batching(world, b, gb // (world * b) if gb and gb % (world * b) == 0 else 1)


def repartition_note(old: Batching, now: Batching) -> str:
    """What a resume that re-partitions the streams logs, e.g. 're-partitioned from 2 to 1 ranks: ...'.

    It names each of the world size, the slots per rank and the slot groups (accumulation micro-steps,
    train.global_batch_size) that changed: the slot groups did not survive. The documents in flight restart from
    their first segment with empty memory, so the first steps' loss is that of every slot reading a document's
    opening at once: higher than the running loss, not a damaged conversion.
    """
    changed = [
        f"from {a} to {b} {what}"
        for a, b, what in (
            (old.world_size, now.world_size, "ranks"),
            (old.batch_size, now.batch_size, "slots per rank"),
            (old.accum, now.accum, "slot groups (accumulation steps) per rank"),
        )
        if a != b
    ]
    what = ", ".join(changed) or "the stream slots (their saved shape differs)"
    return f"re-partitioned {what}; documents in flight restart from their beginning with empty memory"


def start_lines(
    cfg: Config, now: Batching, old: Batching | None, max_steps: int, done: tuple[int, int] | None = None
) -> list[str]:
    """What rank 0 logs at start about the batch and the step count, e.g.

    global batch 8 = 1 rank x 4 slots x 2 accumulation (was 2 ranks x 4 x 1)
    token budget: train.max_tokens=100000 -> 49 steps of 2048 tokens (train.max_steps=100 not used)

    ``done``: (steps, tokens) the resumed checkpoint had read, said when the budget was read at another
    tokens per step (``resumed_total_steps``).
    """
    line = now.describe()
    if old is not None and old != now:
        line += f" (was {old.world_size} {'rank' if old.world_size == 1 else 'ranks'} x {old.batch_size} x {old.accum})"
        if old.global_batch != now.global_batch:
            line += f"; the global batch changed from {old.global_batch}"
    lines = [line]
    if cfg.train.max_tokens > 0:
        tps = tokens_per_step(cfg, now.global_batch)
        if done is not None and max_steps != total_steps(cfg, now.global_batch):
            step, tokens = done
            budget = f"{max_steps} steps ({tokens} tokens read in {step} steps, then {max_steps - step} of {tps})"
        else:
            budget = f"{max_steps} steps of {tps} tokens"
        lines.append(
            f"token budget: train.max_tokens={cfg.train.max_tokens} -> {budget}"
            f" (train.max_steps={cfg.train.max_steps} not used)"
        )
    return lines


def resumed_total_steps(cfg: Config, global_batch: int, step: int, tokens_seen: int) -> int:
    """The last step of a run resumed at ``step`` with ``tokens_seen`` tokens read: train.max_steps, or for a
    token budget the tokens already read, then steps of this batch's tokens (ceil, as ``total_steps``). At the
    tokens per step the checkpoint was read at this is ``total_steps``; at others (another world size without
    train.global_batch_size, another train.batch_size or memory.bptt_segments, now or at an earlier resume) a
    count made afresh from the new batch read 1,856 of a 1,200-token budget, or left a quarter unread."""
    if cfg.train.max_tokens <= 0:
        return total_steps(cfg, global_batch)
    left = max(0, cfg.train.max_tokens - tokens_seen)
    return step + -(-left // tokens_per_step(cfg, global_batch))


def warmup_note(cfg: Config, max_steps: int) -> str | None:
    """The warning rank 0 logs at start when the warmup is not shorter than the run, else None: the run
    ends in its warmup (engine.lr_lambda: warmup step i takes (i + 1) / warmup of train.lr), so the rate
    peaks at max_steps / warmup of train.lr on the last step and never decays."""
    warm = cfg.train.warmup_steps
    if warm < max_steps:
        return None
    return (
        f"train.warmup_steps={warm} is not below the run's {max_steps} steps: the run ends in its warmup, the"
        f" learning rate peaks at {cfg.train.lr * max_steps / warm:.3g} (train.lr={cfg.train.lr:g}) on its last"
        " step and never decays (lower train.warmup_steps)"
    )


def tokens_per_step(cfg: Config, global_batch: int) -> int:
    """Tokens one optimizer step reads (train/state tokens_seen counts these): slots x T x bptt segments."""
    return global_batch * cfg.model.segment_len * cfg.memory.bptt_segments


def total_steps(cfg: Config, global_batch: int) -> int:
    """The run's optimizer steps: ceil(train.max_tokens / tokens per step) when a token budget is set,
    else train.max_steps. The LR schedule ends there and so does the loop."""
    if cfg.train.max_tokens > 0:
        return max(1, -(-cfg.train.max_tokens // tokens_per_step(cfg, global_batch)))  # exact: no float to overflow
    return cfg.train.max_steps


# DecayFit measures this process's rate from its FIT_AFTER-th step on (its first steps pay start-up costs: data
# prefetch, allocator warm-up, a torch.compile, which would read as the rate of all), and looks every FIT_EVERY.
FIT_AFTER = 10
FIT_EVERY = 5
# The rate it plans with is the slower of that mean and the rate over about the last FIT_RECENT steps: the rate
# drifts (an episode curriculum's documents grow longer), and the mean alone lags a slowdown.
FIT_RECENT = 50
# The re-planned cosine ends at this fraction of the steps the time is measured to allow: a decay that the limit
# cuts short is what the fit is for.
FIT_MARGIN = 0.95

# One re-plan: (start, progress, end): from the optimizer step after ``start`` steps (lr_lambda's argument), where
# the cosine had reached ``progress``, to its floor on lr_lambda's step end - 1 (the run's end-th step).
Plan = tuple[int, float, int]


@dataclasses.dataclass
class DecayFit:
    """Where the cosine of engine.lr_lambda is: from the warmup's end to the floor on the run's last step, or, once
    re-planned (train.decay_within_time, ``refit``), along its plans, each from its start on, the newest first: a
    re-plan ends the decay about where train.max_time_s stops the run. A re-plan keeps the rate where it is (no
    jump), only moves the end earlier, and is the same on every rank (``refit`` takes the slowest rank's time).
    Steps before a plan's start keep the rates they had, so a spike rollback re-does them at those rates. A run
    that fits in its time is never re-planned: its rates are those of the steps' schedule, bit for bit.

    Its state (``state_dict``, meta.json's ``lr_decay``) lets a resume go on from the rate it had (``resume_at``).
    """

    total: int  # the run's last step (train.max_steps, or the steps of train.max_tokens)
    warmup: int  # train.warmup_steps
    plans: list[Plan] = dataclasses.field(default_factory=list)
    # This process's (steps made, seconds) when it began to measure, and at each look since (not state: a resume
    # measures anew).
    base: tuple[int, float] | None = dataclasses.field(default=None, repr=False, compare=False)
    seen: list[tuple[int, float]] = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def end(self) -> int:
        """The step the floor is reached on (1-based: the run's end-th step), as planned now."""
        return self.plans[-1][2] if self.plans else self.total

    def progress_at(self, step: int) -> float:
        """The cosine's progress (0 .. 1) for the optimizer step after ``step`` steps (lr_lambda's argument);
        only after the warmup. The plan made last among those begun by ``step`` governs; none: the steps'."""
        plan = next((x for x in reversed(self.plans) if x[0] <= step), None)
        if plan is None:
            left, done, p0 = self.total - 1 - self.warmup, step - self.warmup, 0.0
        else:
            left, done, p0 = plan[2] - 1 - plan[0], step - plan[0], plan[1]
        # (A run of warmup + 1 steps: its one step after the warmup is the last.)
        return 1.0 if left <= 0 else max(0.0, min(1.0, p0 + (1.0 - p0) * done / left))

    def due(self, step: int, steps_here: int) -> bool:
        """Whether ``refit`` looks at the time after ``step`` optimizer steps, ``steps_here`` steps of this
        process: the same on every rank (the caller's collective for the time runs only then)."""
        return steps_here >= FIT_AFTER and steps_here % FIT_EVERY == 0 and step >= self.warmup

    def refit(self, step: int, steps_here: int, elapsed: float, limit: float) -> tuple[int, float] | None:
        """After ``step`` optimizer steps (lr_lambda's count), ``steps_here`` steps made by this process in
        ``elapsed`` seconds of its ``limit`` (train.max_time_s): a plan whose floor comes FIT_MARGIN of the way
        to the step the time runs out at, when that is earlier than the end now by 5% of the steps left or more.
        Returns (the step the time is measured to run out at, the seconds per step of that measure) when it
        re-planned, else None."""
        if not self.due(step, steps_here) or elapsed <= 0:
            return None
        if self.base is None or steps_here <= self.base[0]:  # the first look (or one after a rollback past it)
            self.base, self.seen = (steps_here, elapsed), []
            return None
        s0, e0 = self.base
        rate = (elapsed - e0) / (steps_here - s0)  # seconds per step since the start-up
        earlier = [x for x in self.seen if x[0] <= steps_here - FIT_RECENT]
        if earlier:  # the last ~FIT_RECENT steps' rate, where slower
            s1, e1 = earlier[-1]
            rate = max(rate, (elapsed - e1) / (steps_here - s1))
        self.seen = [x for x in self.seen if x[0] > steps_here - 2 * FIT_RECENT] + [(steps_here, elapsed)]
        if rate <= 0:
            return None
        allowed = max(0.0, (limit - elapsed) / rate)  # steps the time left allows
        new = step + int(FIT_MARGIN * allowed)
        if new < step + 2 or new > self.end - max(1, (self.end - step) // 20):
            return None
        self.plans.append((step, self.progress_at(step), new))
        return step + int(allowed), rate

    def resume_at(self, step: int) -> None:
        """A resume at ``step`` of a re-planned run: its time limit is this process's own, so the decay goes on
        from the rate it had to the floor on the run's last step (this process re-plans if it must)."""
        if self.plans and step >= self.warmup:
            self.plans.append((step, self.progress_at(step), self.total))

    def state_dict(self) -> list[list[int | float]] | None:
        """The plans, oldest first; None when never re-planned (nothing to keep)."""
        return [list(x) for x in self.plans] or None

    def load_state_dict(self, sd: list[list[int | float]] | None) -> None:
        """A checkpoint's plans (None: none)."""
        self.plans = [(int(a), float(b), int(c)) for a, b, c in sd or []]


class Preemption:
    """SIGTERM/SIGUSR1 set a flag; the loop saves at the end of the current step and exits 0.

    A notice that came before, during start-up (the worker's handler,
    train/preemption.py), is taken over: the loop stops before its first step.
    Once the loop exists, SIGHUP (a closed terminal) and a first SIGINT (Ctrl-C; torchrun's own stop) do the
    same, as `mnemo launch` does for them: `mnemo train` alone lost the steps since the last checkpoint. A
    second SIGINT stops at once (KeyboardInterrupt, Python's own Ctrl-C). Before the loop, Ctrl-C stays
    Python's: nothing to save, and a long start-up must stop when asked. After the steps (``finishing``), the
    final checkpoint and evaluation run to their end and a first Ctrl-C's message says so.
    """

    def __init__(self):
        self.signal: int | None = None
        self.at = 0.0
        # What a first Ctrl-C does, as its message says: the loop's, until ``finishing`` says the loop is over.
        self._on_interrupt = "saving at the end of this step"
        self._finishing = False
        # SIGHUP and SIGINT that the parent set to ignored stay so: `nohup mnemo train ... &` (and a job started
        # with & from a script, where SIGINT is ignored) must live past a logout, not stop at it.
        user = [s for s in (signal.SIGHUP, signal.SIGINT) if signal.getsignal(s) is not signal.SIG_IGN]
        self._before = {s: signal.signal(s, self._handler) for s in (*preemption.SIGNALS, *user)}
        early = preemption.take()  # after installing: no notice falls between the two handlers
        if early is not None:
            self.signal, self.at = early

    def finishing(self, what: str) -> None:
        """The steps are over and ``what`` (the final checkpoint, evaluation) comes next: a first Ctrl-C now says
        that (there is no step end to save at, and the run ends after it by itself); a second stops at once.

        The message was "saving at the end of this step" during the final evaluation too, which then ran on, and
        during the last step's interval save (the loop calls this as soon as the last step's stop request said
        go on).
        """
        self._on_interrupt = f"the steps are done; stopping after {what}"
        self._finishing = True

    def release(self) -> None:
        """The handlers from before, back (the run is over: a Ctrl-C in the process that called it is its own)."""
        for s, h in self._before.items():
            signal.signal(s, h)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, the checkpoint being written is atomic
        if self.signal is None:
            self.signal, self.at = signum, time.time()
            # A notice during the steps is logged by the loop's save; after them nothing would say why the
            # run goes on (`mnemo launch` passes a Ctrl-C on to the ranks as SIGTERM).
            if signum == signal.SIGINT or self._finishing:
                again = " (Ctrl-C again to stop at once)" if signum in (signal.SIGINT, signal.SIGTERM) else ""
                # One write, its newline in it: print writes the two apart, and a second Ctrl-C between them
                # (its KeyboardInterrupt) glued the CLI's "mnemo: interrupted" to this line.
                sys.stderr.write(f"mnemo: interrupted: {self._on_interrupt}{again}\n")
                sys.stderr.flush()


def stop_requests(preempt: Preemption, cfg: Config, started: float, device: torch.device) -> tuple[bool, bool]:
    """(stop, time_up), the same on every rank after a step: a preemption signal or the time limit on any rank.

    A collective (train/collectives.py) on ``device``, the engine's device.
    """
    from mnemo.train.collectives import any_true

    stop, time_up = any_true(
        [preempt.signal is not None, cfg.train.max_time_s > 0 and time.time() - started > cfg.train.max_time_s], device
    )
    return stop, time_up


def after_step(cfg: Config, step: int, stop: bool, time_up: bool, max_steps: int | None = None) -> tuple[str, ...]:
    """What the loop does after optimizer step ``step`` (steps done), in order: "eval", "save".

    stop      a preemption signal reached some rank: save at once and nothing
              else. The job has checkpoint.grace_period_s in all before it is
              killed, and an evaluation first could outlast it (the evaluation
              of this step is skipped; the resumed run evaluates at its next
              interval).
    time_up   train.max_time_s is spent: nothing here; the loop ends, saves and
              evaluates once.
    max_steps the run's last step (``total_steps``); None = train.max_steps.
    """
    if stop:
        return ("save",)
    if time_up:
        return ()
    out = []
    last = cfg.train.max_steps if max_steps is None else max_steps
    if cfg.eval.interval and step % cfg.eval.interval == 0 and step < last:
        out.append("eval")
    if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
        out.append("save")
    return tuple(out)
