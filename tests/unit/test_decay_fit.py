"""train.decay_within_time: the learning-rate decay re-planned to end where train.max_time_s stops the run.

The rule (train/schedule.py DecayFit) on simulated clocks, then one real run in this process whose steps are
slowed so that its time limit comes long before train.max_steps, and its resume.
"""

from __future__ import annotations

import json
import time

import pytest

from mnemo.train.engine import lr_lambda
from mnemo.train.schedule import FIT_AFTER, DecayFit
from tests.unit.test_hardening_trainer import config, data, world1  # noqa: F401 (fixtures)


def _cfg(*overrides: str):
    from mnemo.train.config import load_config

    return load_config("configs/debug.yaml", ["data.path=/nonexistent", *overrides])


def _run(total: int, warmup: int, limit: float, rate) -> tuple[DecayFit, list[float], int]:
    """Steps of ``rate(step)`` seconds each until ``limit`` runs out (or ``total``): the fit, each step's LR factor
    (lr_lambda of the fit, read when the step runs, as the optimizer does) and the steps made."""
    cfg = _cfg(f"train.max_steps={total}", f"train.warmup_steps={warmup}")
    fit = DecayFit(total, warmup)
    f = lr_lambda(cfg, total, fit)
    factors, elapsed, step = [], 0.0, 0
    while step < total and elapsed <= limit:
        factors.append(f(step))
        elapsed += rate(step)
        step += 1
        fit.refit(step, step, elapsed, limit)
    return fit, factors, step


def test_a_run_that_fits_in_its_time_keeps_the_steps_schedule_bit_for_bit():
    fit, factors, steps = _run(900, 50, 633.0, lambda s: 0.6)  # 540 s of 633
    plain = lr_lambda(_cfg("train.max_steps=900", "train.warmup_steps=50"), 900)
    assert steps == 900 and fit.end is None and fit.state_dict() is None
    assert factors == [plain(i) for i in range(900)]


@pytest.mark.parametrize(
    "rate",
    [
        lambda s: 1.0,  # 600 of 900 steps fit
        lambda s: 0.8 if s < 200 else 1.3,  # slower later (an episode curriculum's documents grow): re-planned again
        lambda s: 3.0,  # 200 of 900 steps
    ],
)
def test_a_run_its_time_limit_stops_ends_at_the_floor_without_a_jump(rate):
    floor = _cfg().train.min_lr_ratio
    fit, factors, steps = _run(900, 50, 600.0, rate)
    assert steps < 900 and fit.end is not None and fit.end <= steps
    # The last steps before the limit run at the floor; the steps' schedule had them at 0.25-0.97 of the peak.
    assert factors[-1] == pytest.approx(floor)
    # After the warmup the rate only falls, and a re-plan does not jump: no step falls by more than the
    # steepest of a cosine over the steps the run made (pi/2 x (1 - floor) / steps after the warmup), x 1.2.
    after = factors[50:]
    assert all(b <= a for a, b in zip(after, after[1:]))
    steepest = max(a - b for a, b in zip(after, after[1:]))
    assert steepest <= 1.2 * (3.1416 / 2) * (1 - floor) / (steps - 50), steepest


def test_no_replan_before_the_warmup_ends_nor_within_the_first_steps_of_a_process():
    fit = DecayFit(900, 50)
    assert fit.refit(20, 20, 100.0, 60.0) is None  # in the warmup, however late
    assert fit.refit(100, FIT_AFTER - 1, 100.0, 60.0) is None  # this process's first steps pay its start-up
    assert fit.refit(100, FIT_AFTER, 20.0, 60.0) == (100 + 20, 2.0)  # 40 s left at 2 s/step
    assert fit.end == 101 + int(0.95 * 20) and fit.start == 100


def test_a_replanned_decay_survives_a_checkpoint_and_a_lower_max_steps():
    cfg = _cfg("train.max_steps=900", "train.warmup_steps=50")
    fit = DecayFit(900, 50)
    fit.refit(300, 300, 300.0, 500.0)
    sd = json.loads(json.dumps(fit.state_dict()))  # as meta.json holds it
    again = DecayFit(900, 50)
    again.load_state_dict(sd)
    f, g = lr_lambda(cfg, 900, fit), lr_lambda(cfg, 900, again)
    assert [f(i) for i in range(300, 900)] == [g(i) for i in range(300, 900)]
    lower = DecayFit(400, 50)
    lower.load_state_dict(sd)
    assert lower.end == 400 and fit.end > 400
    untouched = DecayFit(900, 50)
    untouched.load_state_dict(None)  # a checkpoint of a run never re-planned
    assert untouched.end is None


def test_a_slowed_run_decays_in_time_and_resumes_at_the_floor(world1, data, tmp_path, monkeypatch, caplog):  # noqa: F811
    """A run of 1,000 steps with 6 s: its last step ran at the peak rate (~0.99 of it). Now the decay is
    re-planned once its first steps show the rate, the last step runs at the floor, and a resume goes on there."""
    from mnemo.train import trainer
    from mnemo.train.engine import applied_lr

    lrs: list[float] = []
    step_once = trainer.Trainer.train_step

    def slow_step(self, step):
        ok = step_once(self, step)
        time.sleep(0.15)
        lrs.append(applied_lr(self.engine))
        return ok

    monkeypatch.setattr(trainer.Trainer, "train_step", slow_step)
    run_dir = tmp_path / "run"
    args = ["train.max_steps=1000", "train.warmup_steps=2", "train.max_time_s=6", "train.decay_within_time=true"]
    args += ["eval.interval=0", "checkpoint.interval=0", "train.log_interval=1000", "eval.max_docs=1"]
    cfg = config(data, run_dir, *args)
    peak, floor = cfg.train.lr, cfg.train.lr * cfg.train.min_lr_ratio
    with caplog.at_level("INFO", logger="mnemo.train"):
        summary = trainer.train(cfg)
    assert summary["exit"] == "time_limit" and summary["step"] < 200, summary
    assert "(train.decay_within_time)" in caplog.text
    assert lrs[-1] < floor + 0.1 * (peak - floor), (lrs[-1], floor, peak)
    assert all(b <= a for a, b in zip(lrs[2:], lrs[3:]))  # after the warmup, never up
    meta = json.loads((run_dir / "checkpoints" / f"step_{summary['step']:08d}" / "meta.json").read_text())
    assert meta["lr_decay"]["end"] <= summary["step"] + 1

    lrs.clear()
    again = trainer.train(config(data, run_dir, *args))
    assert again["step"] > summary["step"]
    assert lrs[0] == pytest.approx(floor)  # the resume goes on from the re-planned end, not the steps' schedule
