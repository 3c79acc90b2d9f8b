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


def _run(total: int, warmup: int, limit: float, rate, fit: DecayFit | None = None, first: int = 0):
    """Steps of ``rate(step)`` seconds each from step ``first`` until ``limit`` runs out (or ``total``): the fit,
    each step's LR factor (lr_lambda of the fit, read when the step runs, as the optimizer does), the steps made."""
    cfg = _cfg(f"train.max_steps={total}", f"train.warmup_steps={warmup}")
    fit = DecayFit(total, warmup) if fit is None else fit
    f = lr_lambda(cfg, total, fit)
    factors, elapsed, step = [], 0.0, first
    while step < total and elapsed <= limit:
        factors.append(f(step))
        elapsed += rate(step)
        step += 1
        fit.refit(step, step - first, elapsed, limit)
    return fit, factors, step


PLAIN = lr_lambda(_cfg("train.max_steps=900", "train.warmup_steps=50"), 900)


@pytest.mark.parametrize(
    "rate",
    [
        lambda s: 0.6,  # 540 s of 633
        lambda s: 90.0 if s == 0 else 0.5,  # a first step that compiles: 90 + 450 s of 633
    ],
)
def test_a_run_that_fits_in_its_time_keeps_the_steps_schedule_bit_for_bit(rate):
    fit, factors, steps = _run(900, 50, 633.0, rate)
    assert steps == 900 and fit.plans == [] and fit.state_dict() is None and fit.end == 900
    assert factors == [PLAIN(i) for i in range(900)]


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
    assert steps < 900 and fit.plans and fit.end <= steps
    # The last steps before the limit run at the floor; the steps' schedule had them at 0.25-0.97 of the peak.
    assert factors[-1] == pytest.approx(floor) and PLAIN(steps - 1) > floor + 0.1
    # After the warmup the rate only falls, and a re-plan does not jump: no step falls by more than the
    # steepest of a cosine over the steps the run made (pi/2 x (1 - floor) / steps after the warmup), x 1.2.
    after = factors[50:]
    assert all(b <= a for a, b in zip(after, after[1:]))
    steepest = max(a - b for a, b in zip(after, after[1:]))
    assert steepest <= 1.2 * (3.1416 / 2) * (1 - floor) / (steps - 50), steepest


def test_the_rate_is_measured_after_the_start_up_and_the_floor_comes_at_95_percent():
    fit = DecayFit(900, 50)
    assert fit.refit(20, 20, 100.0, 60.0) is None  # in the warmup, however late
    assert fit.refit(100, FIT_AFTER - 1, 100.0, 60.0) is None  # this process's first steps
    assert fit.refit(100, FIT_AFTER, 30.0, 60.0) is None  # the first look: the rate is measured from here
    # 5 steps in 10 s since: 2 s/step, 20 s left: 10 more steps; the floor on the 9th (95% of 10: 9.5).
    assert fit.refit(105, FIT_AFTER + 5, 40.0, 60.0) == (105 + 10, 2.0)
    assert fit.plans == [(105, PLAIN_PROGRESS(105), 105 + 9)] and fit.end == 114


def PLAIN_PROGRESS(step: int) -> float:
    return DecayFit(900, 50).progress_at(step)


def test_a_rollback_redoes_its_steps_at_the_rates_they_had():
    """train.spike.policy=rollback takes the steps back to the last checkpoint; a re-plan made after it held the
    rates of the steps before its start at 0 (the peak) when they were done again."""
    fit, first, steps = _run(900, 50, 600.0, lambda s: 0.8 if s < 200 else 1.3)  # re-planned more than once
    assert len(fit.plans) >= 2 and fit.plans[-1][0] > 200
    # Every step done again, from any checkpoint, takes the rate it had the first time.
    again = lr_lambda(_cfg("train.max_steps=900", "train.warmup_steps=50"), 900, fit)
    assert [again(i) for i in range(steps)] == first


def test_a_replanned_decay_survives_a_checkpoint_and_a_resume_goes_on_from_its_rate():
    cfg = _cfg("train.max_steps=900", "train.warmup_steps=50")
    fit, _, steps = _run(900, 50, 600.0, lambda s: 1.0)  # re-planned; stopped by the limit at ~600
    sd = json.loads(json.dumps(fit.state_dict()))  # as meta.json holds it
    assert sd == [list(x) for x in fit.plans]
    again = DecayFit(900, 50)
    again.load_state_dict(sd)
    f, g = lr_lambda(cfg, 900, fit), lr_lambda(cfg, 900, again)
    assert [f(i) for i in range(900)] == [g(i) for i in range(900)]
    # Preempted at step 300 (before the plan's floor): the resumed start has its own time, so the decay goes on
    # from the rate step 300 had to the floor on the last step, and re-plans only if its time is short.
    at = 300
    resumed = DecayFit(900, 50)
    resumed.load_state_dict(sd)
    resumed.resume_at(at)
    h = lr_lambda(cfg, 900, resumed)
    assert h(at) == f(at) and h(899) == pytest.approx(cfg.train.min_lr_ratio)
    assert [h(i) for i in range(at)] == [f(i) for i in range(at)]
    assert all(b <= a for a, b in zip([h(i) for i in range(at, 900)], [h(i) for i in range(at + 1, 900)]))
    assert f(600) == pytest.approx(cfg.train.min_lr_ratio) and h(600) > f(600) + 0.1
    # A run never re-planned resumes on the steps' schedule.
    plain = DecayFit(900, 50)
    plain.load_state_dict(None)
    plain.resume_at(at)
    assert plain.plans == [] and plain.state_dict() is None


@pytest.mark.parametrize("bad", ['"x"', "[[1, 0.5]]", "[[1, 1.5, 9]]", "[[1, NaN, 9]]", '[[1, 0.5, "9"]]'])
def test_an_edited_lr_decay_in_meta_json_is_one_line(tmp_path, bad):
    from mnemo.train.errors import UserError
    from mnemo.train.rundir import read_checkpoint_meta

    (tmp_path / "meta.json").write_text('{"step": 3, "lr_decay": %s}' % bad)
    with pytest.raises(UserError, match=r"meta.json: lr_decay is .*, not a list of \[step, progress 0..1, end step\]"):
        read_checkpoint_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"step": 3, "lr_decay": [[60, 0.25, 570]]}')
    assert read_checkpoint_meta(tmp_path)["lr_decay"] == [[60, 0.25, 570]]


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
    assert meta["lr_decay"][-1][2] <= summary["step"]

    lrs.clear()
    again = trainer.train(config(data, run_dir, *args))
    assert again["step"] > summary["step"]
    # The resume goes on from the rate the run had (the floor), not from the steps' schedule's (~0.99 of the peak).
    assert lrs[0] == pytest.approx(floor)
