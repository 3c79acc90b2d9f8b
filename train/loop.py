"""The per-step work of one rank: truncated-BPTT corpus steps, passkey episode steps, and their metrics.

Per optimizer step, each rank reads ``memory.bptt_segments`` (k) consecutive
segments from its stream slots, carrying the memory state from segment to
segment (reset where a slot starts a new document), sums their losses,
calls ``engine.backward`` once and ``engine.step``, then detaches the memory:
gradients flow through memory across the k segments of a step and never
further (truncated BPTT). With gradient accumulation (train.global_batch_size)
a step is A such windows, one per slot group (train/slots.py).

Over 500 lines: the corpus, accumulated and episode steps share one NaN/spike policy and one metrics window.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mnemo.data_pipeline.files import NotRegularFile, open_own_file
from mnemo.evaluation.report import json_ready
from mnemo.train.bptt import bptt_window_loss
from mnemo.train.config import Config
from mnemo.train.engine import applied_lr
from mnemo.train.faults import INF_GRAD, SPIKE, SPIKE_FACTOR, InfGradient, fault_step
from mnemo.train.flops import device_peak_flops
from mnemo.train.losses import lm_loss
from mnemo.train.state import Counters, MemoryPart

log = logging.getLogger("mnemo.train")


def eta_text(seconds: float) -> str:
    """'HH:MM:SS', with days in front past 24 h ('11d 13:30:10'): time.gmtime wrapped at 24 h (an 11-day
    run said 13:30:10) and raised OverflowError/OSError past ~1e16 s (a rank's traceback at the first log)."""
    if not math.isfinite(seconds) or seconds >= 1e7 * 86400:  # 27,000 years: say so, not the number
        return "> 10,000,000d"
    days, rest = divmod(int(max(0.0, seconds)), 86400)
    hms = "%02d:%02d:%02d" % (rest // 3600, rest // 60 % 60, rest % 60)
    return f"{days}d {hms}" if days else hms


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    restart: int  # torchrun worker-group restart (--max-restarts)
    requeue: int  # SLURM requeue count of the job


def dist_info() -> DistInfo:
    """This rank's place in the job, from the launcher's variables (a UserError naming one that is not a whole
    number: rankenv.env_int)."""
    from mnemo.train.rankenv import env_int

    env = os.environ
    world = env_int(env, "WORLD_SIZE", 1)
    local_world = env_int(env, "LOCAL_WORLD_SIZE", 1)
    rank = env_int(env, "RANK", 0)
    return DistInfo(
        rank=rank,
        world_size=world,
        local_rank=env_int(env, "LOCAL_RANK", 0),
        local_world_size=local_world,
        node_rank=env_int(env, "GROUP_RANK", rank // max(1, local_world)),
        num_nodes=max(1, world // max(1, local_world)),
        restart=env_int(env, "TORCHELASTIC_RESTART_COUNT", 0),
        requeue=env_int(env, "SLURM_RESTART_COUNT", 0),
    )


class StepLog:
    """Per-step losses of rank 0 as JSON lines (<run.dir>/logs/steps.jsonl): tests and humans read it."""

    def __init__(self, path: Path, enabled: bool):
        self.f = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # never through a link put there: the lines would be appended to its target, wherever it points
                fd = open_own_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            except NotRegularFile as e:  # a warning, not a stop: rank 0 alone opens it, the others go on
                log.warning("%s is %s; mnemo appends its step log only to a file of its own: not writing it", path, e)
                return
            self.f = open(fd, "a", buffering=1)

    def write(self, rec: dict[str, Any]) -> None:
        if self.f:
            self.f.write(json.dumps(json_ready(rec)) + "\n")  # strict JSON: a NaN is null

    def close(self):
        if self.f:
            self.f.close()


def corpus_window_loss(engine, batches: list, state, device) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """One truncated-BPTT window of k segment batches (SegmentBatch, B slots) read from ``state``.

    Returns (loss to backward, state after the window (detached), sum of the plain per-token loss
    over real targets, number of real targets); the last two are detached scalars on ``device``.
    """
    plain_sum = torch.zeros((), device=device)
    n_sum = torch.zeros((), device=device)
    tokens = [bt.tokens.to(device, non_blocking=True) for bt in batches]  # k x [B, T+1]

    def segment_loss(logits: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal plain_sum, n_sum
        opt_loss, plain, n = lm_loss(logits, tokens[i][:, 1:], batches[i].weight.to(device), batches[i].mask.to(device))
        plain_sum = plain_sum + plain.detach() * n
        n_sum = n_sum + n
        return opt_loss

    # The truncated-BPTT rule (train/bptt.py): k segments, memory carried, one backward.
    total, state = bptt_window_loss(
        engine, [t[:, :-1] for t in tokens], state, segment_loss, resets=[bt.reset.to(device) for bt in batches]
    )
    return total, state, plain_sum, n_sum


class TrainLoop:
    """The per-step work, kept apart from start-up and shutdown."""

    def __init__(
        self,
        cfg: Config,
        engine,
        streams,
        memory: MemoryPart,
        info: DistInfo,
        device,
        tracker,
        steplog,
        model_flops: float,
        use_cuda: bool,
        dtype: torch.dtype = torch.float32,
        episodes=None,
        counters: Counters | None = None,
        batching=None,
        max_steps: int | None = None,
        spikes=None,
    ):
        """``memory`` holds the memory state carried from step to step; ``spikes``: train/spikes.py's detector."""
        self.cfg, self.engine, self.streams, self.memory = cfg, engine, streams, memory
        self.info, self.device, self.tracker, self.steplog = info, device, tracker, steplog
        self.model_flops, self.use_cuda = model_flops, use_cuda
        self.dtype, self.episodes = dtype, episodes
        args = engine.module.args
        self.has_memory = args.stm_length > 0 or args.ltm_kind != "none"
        self.counters = counters if counters is not None else Counters()
        # Gradient accumulation micro-steps per optimizer step (train/schedule.py Batching; None = 1), and
        # the run's last step (train.max_steps, or that of train.max_tokens).
        self.accum = batching.accum if batching is not None else 1
        self.max_steps = max_steps if max_steps is not None else cfg.train.max_steps
        self.nonfinite = ""  # what was NaN/inf at the step that stopped the run: "loss" | "gradient norm"
        self.optim_s = 0.0
        self.fault_inf_grad_step = fault_step(INF_GRAD, info.rank)
        self.spikes, self.fault_spike_step = spikes, fault_step(SPIKE, info.rank)
        self._window = self._new_window()
        self.peak = cfg.tracking.peak_flops or device_peak_flops(use_cuda)
        if not self.peak and info.rank == 0:
            log.info("MFU not logged: no peak FLOP/s known for this device (set tracking.peak_flops)")
        # A progress bar when a person watches; periodic log lines otherwise (CI, SLURM logs).
        self.bar = None
        if info.rank == 0 and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, desc="train", unit="step", dynamic_ncols=True)

    @staticmethod
    def _new_window() -> dict[str, Any]:
        return {
            "loss": 0.0,
            "n": 0,
            "tokens": 0,
            "real": 0,
            "resets": 0,
            "slots": 0,
            "data": 0.0,
            "fwd_bwd": 0.0,
            "optim": 0.0,
            "t0": time.time(),
            "last": 0,  # the last step the window holds (0: none)
            "ep_s": 0.0,
            "ep_loss": 0.0,
            "ep_n": 0,
            "ep_exact": 0.0,
            "ep_exact_n": 0,
            "ep_tasks": {},  # task name -> [loss sum, steps, exact sum at max D, max-D steps] (a mixture's)
        }

    def train_step(self, step: int) -> bool:
        """One optimizer step: a corpus step, or a passkey episode step (train.passkey.fraction)."""
        if self.episodes is not None and self.episodes.is_step(step):
            return self._episode_step(step)
        return self._corpus_step(step)

    def _finite_or_skip(self, step: int, bad: bool, what: str = "loss", must_stop: bool = False) -> str:
        """'ok', or what a NaN/inf ``what`` (loss, gradient norm) does under train.nan_policy: 'stop' | 'skip'."""
        if not bad:
            return "ok"
        stop = must_stop or self.cfg.train.nan_policy == "stop"
        self.nonfinite = what
        if self.info.rank == 0:
            if stop:
                log.error("step %d: %s is NaN/inf; stopping (train.nan_policy=stop)", step + 1, what)
            else:
                log.warning("step %d: %s is NaN/inf; skipping the update", step + 1, what)
            self.tracker.log_metrics({"train/nan": 1.0}, step + 1)
        return "stop" if stop else "skip"

    def _backward_and_step(self, step: int, loss: torch.Tensor) -> str:
        """engine.backward + engine.step, then the gradient check: 'ok', 'stop' or 'skip'.

        A finite loss can still have a NaN/inf gradient. DeepSpeed computes the
        global gradient norm (all ranks, every ZeRO stage) inside step() and
        leaves the weights, the optimizer and the LR schedule as they were when
        it is not finite (its overflow path: skipped_steps + 1, norm reported
        inf). The trainer then applies train.nan_policy like for a NaN loss;
        with ``stop`` the loop ends before anything of this step is saved. Should
        an engine ever apply such an update, the run stops whatever the policy.
        """
        if step + 1 == self.fault_inf_grad_step:
            loss = InfGradient.apply(loss)
        skipped = self.engine.skipped_steps
        self.engine.backward(loss)
        t = time.time()
        self.engine.step()
        self.optim_s = time.time() - t
        norm = self.engine.get_global_grad_norm()
        if norm is None or math.isfinite(float(norm)):
            return "ok"
        return self._finite_or_skip(step, True, "gradient norm", must_stop=self.engine.skipped_steps == skipped)

    def _episode_step(self, step: int) -> bool:
        from mnemo.train.collectives import agreed, agreement_parts, sum_

        t0 = time.time()
        res = self.episodes.forward(self.engine, self.device, self.dtype, self.has_memory, step)
        B = res.batch.tokens.shape[0]
        nonfinite = (~torch.isfinite(res.loss.detach())).float()
        # Every rank drew the same task, D and segment count (episodes.py); the sum checks it at no extra cost
        # (in digits that sum exactly in float32: the value itself times the ranks rounds past 2**24).
        drawn = res.batch.n_segments * 1000 + res.batch.task
        world = self.info.world_size
        extra = torch.tensor([float(B), *agreement_parts(drawn, world)], device=self.device)
        stats = torch.cat([torch.stack([res.plain_sum, res.n, nonfinite, res.exact]), extra])
        sum_(stats)  # [5 + AGREE_PARTS] on the engine's device
        if not agreed(stats[5:].tolist(), drawn, world):
            raise RuntimeError(f"step {step + 1}: the ranks drew different episode tasks or segment counts")
        verdict = self._finite_or_skip(step, stats[2].item() > 0)
        if verdict != "ok":
            return verdict == "skip"
        verdict = self._backward_and_step(step, res.loss)
        if verdict != "ok":
            return verdict == "skip"
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        exact = (stats[3] / stats[4]).item()
        k = res.batch.task
        cur, name = self.episodes.curricula[k], self.episodes.names[k]
        mixture = len(self.episodes.curricula) > 1 or name != "passkey"
        D = res.batch.distance
        if res.batch.at_max:
            window = (cur.history + [exact])[-cur.promote_window :]
            if cur.update(exact, step + 1) and self.info.rank == 0:
                log.info("%s", self.episodes.promotion_message(k, step + 1, sum(window) / len(window), D, len(window)))
        w = self._window
        w["last"] = step + 1
        w["ep_s"] += time.time() - t0
        w["ep_loss"] += loss
        w["ep_n"] += 1
        if res.batch.at_max:
            w["ep_exact"] += exact
            w["ep_exact_n"] += 1
        if mixture:
            t = w["ep_tasks"].setdefault(name, [0.0, 0, 0.0, 0])
            t[0], t[1] = t[0] + loss, t[1] + 1
            if res.batch.at_max:
                t[2], t[3] = t[2] + exact, t[3] + 1
        if self.info.rank == 0:
            self.steplog.write(
                {
                    "step": step + 1,
                    "loss": loss,
                    "kind": "passkey",
                    **({"task": name, "facts": res.batch.facts} if mixture else {}),
                    "distance": D,
                    "exact": exact,
                    "restart": self.info.restart,
                    "requeue": self.info.requeue,
                    "time": time.time(),
                }
            )
            if self.bar is not None:
                self.bar.n = step + 1
                self.bar.set_postfix(passkey_D=D, exact=f"{exact:.2f}", refresh=True)
        self._maybe_log(step + 1)
        return True

    def _maybe_log(self, step: int) -> None:
        if step % self.cfg.train.log_interval == 0 or step == self.max_steps:
            self._log(step)

    def log_last_window(self) -> bool:
        """Log the steps since the last log (every rank: the metrics take collectives), at the last of them.

        The trainer calls it when the steps end before train.max_steps (the time limit, a used-up mixture, a stop
        signal, a NaN stop), before the checkpoint's tracker flush: their metrics were in no point and no console
        line (a run that ended at step 12 with train.log_interval=5 had its last points at step 10). Nothing when
        every step was logged. The checkpoint holds this step, so a resume logs only steps after it; after a
        NaN stop (no checkpoint) the resume filter (docs/tracking.md) drops the re-done steps up to it.
        True when it logged.
        """
        if not self._window["last"]:
            return False
        self._log(self._window["last"])
        return True

    def _corpus_step(self, step: int) -> bool:
        from mnemo.train.collectives import sum_

        if self.accum > 1:
            return self._accumulated_step(step)
        cfg, engine = self.cfg, self.engine
        k = cfg.memory.bptt_segments
        t0 = time.time()
        batches = [next(self.streams) for _ in range(k)]
        t1 = time.time()
        total, state, plain_sum, n_sum = corpus_window_loss(engine, batches, self.memory.state, self.device)
        total, plain_sum = self._spike_fault(step, total, plain_sum)
        # Loss of this step averaged over ranks, weighted by real tokens.
        stats = torch.stack([plain_sum, n_sum, (~torch.isfinite(total.detach())).float()])  # [3] on the device
        sum_(stats)
        verdict = self._finite_or_skip(step, stats[2].item() > 0)
        if verdict == "stop":
            return False
        if verdict == "skip":
            self.memory.state = state.reset(torch.ones(state.batch_size, dtype=torch.bool, device=self.device))
            return True
        if self._spike_drops_update(step, stats):  # train.spike: skip or roll back (train/spikes.py)
            self.memory.state = state
            return True
        verdict = self._backward_and_step(step, total)
        t3 = time.time()
        t2 = t3 - self.optim_s  # backward ends where the optimizer step begins
        # The memory state of this window is finite (the loss was): it goes on, also after a skipped update.
        self.memory.state = state
        if verdict != "ok":
            return verdict == "skip"
        if self._spike_in_grad_norm(step):
            return True
        self._record(step, stats, [batches], (t1 - t0, t2 - t1, t3 - t2))
        return True

    def _record(self, step: int, stats: torch.Tensor, micro_batches: list[list], times: tuple) -> None:
        """Counters, log window, step log and bar after a corpus step.

        stats          [plain loss sum, real targets, ...] summed over ranks and micro-steps
        micro_batches  each micro-step's k SegmentBatches (A lists; A = 1 without accumulation)
        times          (data, forward + backward, optimizer) seconds of the step
        """
        cfg = self.cfg
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        real = int(stats[1].item())
        B, T, k, A = cfg.train.batch_size, cfg.model.segment_len, cfg.memory.bptt_segments, len(micro_batches)
        step_tokens = B * T * k * A * self.info.world_size  # every micro-batch of every rank
        self.counters.tokens_seen += step_tokens
        w = self._window
        w["last"] = step + 1
        w["loss"] += loss
        w["n"] += 1
        w["tokens"] += step_tokens
        w["real"] += real
        w["resets"] += int(sum(int(bt.reset.sum()) for batches in micro_batches for bt in batches))
        w["slots"] += B * k * A
        w["data"] += times[0]
        w["fwd_bwd"] += times[1]
        w["optim"] += times[2]
        if self.info.rank == 0:
            self.steplog.write(
                {
                    "step": step + 1,
                    "loss": loss,
                    "restart": self.info.restart,
                    "requeue": self.info.requeue,
                    "time": time.time(),
                }
            )
            if self.bar is not None:
                self.bar.n = step + 1
                tok_s = f"{step_tokens / max(1e-9, sum(times)):.0f}"
                self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=tok_s, refresh=True)
        self._maybe_log(step + 1)

    def _accumulated_step(self, step: int) -> bool:
        """One optimizer step of A > 1 micro-steps (train.global_batch_size, train/slots.py).

        Micro-step i reads slot group i (its own streams and MemoryState of B
        slots), runs its truncated-BPTT window and its backward at once (one
        graph alive at a time); DeepSpeed divides each loss by A, sums the
        gradients and applies the optimizer at the last micro-step's
        engine.step(). The step's loss and tokens count every micro-batch.

        A NaN/inf micro-step loss under train.nan_policy=stop stops before its
        backward. Under skip, earlier micro-steps' gradients are already summed
        inside the engine: the bad loss is backpropagated too, so the step's
        gradient norm is not finite and DeepSpeed leaves the weights, optimizer
        and schedule untouched (the gradient-norm path of _backward_and_step);
        that slot group's memory is emptied.
        """
        from mnemo.train.collectives import sum_

        engine, A, k = self.engine, self.accum, self.cfg.memory.bptt_segments
        stats = torch.zeros(3, device=self.device)  # [plain loss sum, real targets, bad micro-steps] of all ranks
        micro_batches, times, bad = [], [0.0, 0.0, 0.0], False
        for i in range(A):
            t0 = time.time()
            streams = self.streams.group(i)
            batches = [next(streams) for _ in range(k)]
            micro_batches.append(batches)
            t1 = time.time()
            total, state, plain_sum, n_sum = corpus_window_loss(engine, batches, self.memory.states[i], self.device)
            if i == A - 1:
                total, plain_sum = self._spike_fault(step, total, plain_sum)
            micro = torch.stack([plain_sum, n_sum, (~torch.isfinite(total.detach())).float()])  # [3]
            sum_(micro)
            stats += micro
            if micro[2].item() > 0:
                if self._finite_or_skip(step, True) == "stop":
                    return False
                bad = True
                state = state.reset(torch.ones(state.batch_size, dtype=torch.bool, device=self.device))
            self.memory.states[i] = state
            if i < A - 1:
                engine.backward(total)
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                times[0], times[1] = times[0] + t1 - t0, times[1] + time.time() - t1
                continue
            if bad:  # already reported; DeepSpeed must refuse the update (its overflow path)
                skipped = engine.skipped_steps
                engine.backward(total)
                engine.step()
                if engine.skipped_steps == skipped:  # an engine that applied a NaN update: stop whatever the policy
                    self.nonfinite = "gradient norm"
                    return False
                return True
            if self._spike_drops_update(step, stats, total):  # train.spike: skip or roll back (train/spikes.py)
                return True
            verdict = self._backward_and_step(step, total)
            t3 = time.time()
            times[0], times[1], times[2] = times[0] + t1 - t0, times[1] + t3 - self.optim_s - t1, self.optim_s
            if verdict != "ok":
                return verdict == "skip"
        if self._spike_in_grad_norm(step):
            return True
        self._record(step, stats, micro_batches, tuple(times))
        return True

    def _spike_fault(self, step: int, total: torch.Tensor, plain_sum: torch.Tensor) -> tuple:
        """MNEMO_FAULT_SPIKE_AT_STEP (train/faults.py): this step's loss x SPIKE_FACTOR, once (a rollback redoes it)."""
        if step + 1 != self.fault_spike_step:
            return total, plain_sum
        self.fault_spike_step = 0
        return total * SPIKE_FACTOR, plain_sum * SPIKE_FACTOR

    def _spike_drops_update(self, step: int, stats: torch.Tensor, total: torch.Tensor | None = None) -> bool:
        """train.spike on the step's loss (``stats`` [3] summed over ranks and micro-steps): True when the update
        is not applied (skip, or a rollback the trainer does next).

        Without accumulation (``total`` None) nothing was backpropagated yet: backward is not called. With it,
        the earlier micro-steps' gradients sit in the engine: the last micro-step's gradients are made NaN/inf so
        that DeepSpeed refuses the update (its overflow path: weights, optimizer and LR schedule unchanged).
        """
        if self.spikes is None:
            return False
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        if self.spikes.check(step, "loss", loss, **self._spike_out()) not in ("skip", "rollback"):
            return False
        if total is not None:
            skipped = self.engine.skipped_steps
            self.engine.backward(InfGradient.apply(total))
            self.engine.step()
            if self.engine.skipped_steps == skipped:
                raise RuntimeError(f"step {step + 1}: the engine applied an update with NaN/inf gradients")
        return True

    def _spike_in_grad_norm(self, step: int) -> bool:
        """train.spike.grad_norm after an applied update: True when the trainer rolls it back (train/spikes.py)."""
        if self.spikes is None or not self.spikes.watch_grad_norm:
            return False
        norm = float(self.engine.get_global_grad_norm())
        return self.spikes.check(step, "grad_norm", norm, **self._spike_out()) == "rollback"

    def _spike_out(self) -> dict[str, Any]:
        return {"tracker": self.tracker, "steplog": self.steplog, "rank": self.info.rank}

    def metrics(self) -> dict[str, float]:
        """The step metrics, all assembled here: of the steps since the last log (the window) and the run so far."""
        w, engine = self._window, self.engine
        # Throughput is that of the corpus steps: episode steps are timed apart.
        dt = max(1e-9, time.time() - w["t0"] - w["ep_s"])
        n = max(1, w["n"])
        tps = w["tokens"] / dt
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "train/lr": applied_lr(engine),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/tokens_seen": float(self.counters.tokens_seen),
            "train/epoch": float(self.streams.epoch),
        }
        metrics.update(self._source_metrics())
        if w["n"]:
            loss = w["loss"] / n
            metrics.update(
                {
                    "train/loss": loss,
                    "train/ppl": math.exp(min(loss, 50.0)),
                    "train/tokens_per_s": tps,
                    "train/tokens_per_s_per_device": tps / self.info.world_size,
                    "train/pad_fraction": 1.0 - w["real"] / max(1, w["tokens"]),
                    "time/data_s": w["data"] / n,
                    "time/fwd_bwd_s": w["fwd_bwd"] / n,
                    "time/optim_s": w["optim"] / n,
                    "memory/reset_rate": w["resets"] / max(1, w["slots"]),
                }
            )
            if self.peak:
                metrics["train/mfu"] = tps / self.info.world_size * self.model_flops / self.peak
        if self.episodes is not None:
            cur = self.episodes.curriculum
            metrics["passkey/max_distance"] = float(cur.current)
            metrics["passkey/clicked_at"] = float(cur.clicked_at)
            if w["ep_n"]:
                metrics["passkey/loss"] = w["ep_loss"] / w["ep_n"]
                metrics["time/passkey_step_s"] = w["ep_s"] / w["ep_n"]
            if w["ep_exact_n"]:
                metrics["passkey/train_exact_at_max"] = w["ep_exact"] / w["ep_exact_n"]
            # A mixture (train.passkey.tasks): the names above are the first task's curriculum and all episode
            # steps; each task also has its own (docs/tracking.md).
            eps = self.episodes
            if len(eps.curricula) > 1 or eps.names[0] != "passkey":
                for name, c in zip(eps.names, eps.curricula):
                    metrics[f"passkey/{name}/max_distance"] = float(c.current)
                    metrics[f"passkey/{name}/facts"] = float(c.facts)
                    loss_sum, n_steps, exact_sum, n_max = w["ep_tasks"].get(name, [0.0, 0, 0.0, 0])
                    if n_steps:
                        metrics[f"passkey/{name}/loss"] = loss_sum / n_steps
                    if n_max:
                        metrics[f"passkey/{name}/train_exact_at_max"] = exact_sum / n_max
        if self.spikes is not None:
            metrics.update(self.spikes.metrics())
        st = self.memory.state
        if st.ltm_capacity:
            # Every slot group's (train/slots.py); one group without accumulation.
            fill = [float(s.ltm_len.float().mean()) for s in getattr(self.memory, "states", [st])]
            metrics["memory/ltm_fill"] = sum(fill) / len(fill) / st.ltm_capacity
        # Per-head scalars of the long-term layers, averaged over heads (ZeRO-3 shards them: left out there).
        metrics.update({f"memory/{k}": v for k, v in engine.module.memory_scalars().items()})
        return metrics

    def _source_metrics(self) -> dict[str, float]:
        """data.sources: real target tokens per source over all ranks and slot groups, and their share."""
        from mnemo.train.collectives import sum_

        groups = getattr(self.streams, "groups", None) or [self.streams]
        names = getattr(groups[0], "source_names", None)
        if not names:  # a single data.path
            return {}
        per_rank = [sum(g.source_tokens[i] for g in groups) for i in range(len(names))]
        seen = sum_(torch.tensor(per_rank, dtype=torch.float64, device=self.device)).tolist()  # [sources]
        total = max(1.0, sum(seen))
        out = {f"data/{n}/tokens": t for n, t in zip(names, seen)}
        out.update({f"data/{n}/share": t / total for n, t in zip(names, seen)})
        return out

    def _log(self, step: int) -> None:
        metrics = self.metrics()
        w = self._window
        if self.info.rank == 0:
            from mnemo.train.tracking import memory_stats

            # Memory with every window (not only at the end: a run killed or out of memory never got there).
            self.tracker.log_metrics({**metrics, **memory_stats()}, step)
            step_s = (time.time() - w["t0"]) / max(1, w["n"] + w["ep_n"])
            eta = step_s * (self.max_steps - step)
            msg = "step %d/%d" % (step, self.max_steps)
            if w["n"]:
                msg += " loss %.4f" % metrics["train/loss"]
            msg += " lr %.2e grad %.3f" % (metrics["train/lr"], metrics["train/grad_norm"])
            if w["n"]:
                busy = max(1e-9, w["data"] + w["fwd_bwd"] + w["optim"])
                msg += " tok/s %.0f data %.0f%%" % (metrics["train/tokens_per_s"], 100 * w["data"] / busy)
            msg += " eta %s" % eta_text(eta)
            if "passkey/max_distance" in metrics:
                msg += " | passkey loss %.3f exact@maxD %.2f max D %d" % (
                    metrics.get("passkey/loss", float("nan")),
                    metrics.get("passkey/train_exact_at_max", float("nan")),
                    int(metrics["passkey/max_distance"]),
                )
                for name in self.episodes.names if len(self.episodes.names) > 1 else []:
                    msg += " | %s D %d facts %d exact %.2f" % (
                        name,
                        int(metrics[f"passkey/{name}/max_distance"]),
                        int(metrics[f"passkey/{name}/facts"]),
                        metrics.get(f"passkey/{name}/train_exact_at_max", float("nan")),
                    )
            if self.bar is not None:
                self.bar.write(msg)
            else:
                log.info(msg)
        self._window = self._new_window()
