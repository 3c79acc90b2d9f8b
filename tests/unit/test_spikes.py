"""Loss spikes (train/spikes.py): the detector's statistics and state, its config checks, and each policy on a
real DeepSpeed engine of the `debug` size on CPU (one-rank gloo group in this process).

The policy tests inject a spike through the trainer's seam (MNEMO_FAULT_SPIKE_AT_STEP: that step's loss x 10).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.unit.test_hardening_trainer import config as hardening_config
from tests.unit.test_hardening_trainer import data, world1  # noqa: F401 (fixtures: corpus, one-rank process group)

REPO = Path(__file__).resolve().parents[2]
DEBUG = REPO / "configs" / "debug.yaml"


def spike_cfg(**kw):
    from mnemo.train.config import SpikeConfig

    return SpikeConfig(**{"policy": "skip", "warmup": 5, "window": 20, **kw})


def noisy_losses(n: int, seed: int = 0) -> list[float]:
    """A falling training loss with +-2% noise: what a clean run looks like to the detector."""
    rng = random.Random(seed)
    return [3.0 + 3.0 * 0.98**i + rng.uniform(-0.06, 0.06) for i in range(n)]


# ----------------------------------------------------------------------------- the detector


def test_detector_flags_a_spike_after_warmup_only_and_keeps_it_out_of_its_statistics():
    from mnemo.train.spikes import SpikeDetector

    det = SpikeDetector(spike_cfg())
    # Before warmup nothing fires, however high.
    assert [det.check(i, "loss", x) for i, x in enumerate([5.0, 50.0, 5.0, 5.1])] == ["ok"] * 4
    det = SpikeDetector(spike_cfg())
    losses = noisy_losses(200)
    assert [det.check(i, "loss", x) for i, x in enumerate(losses)] == ["ok"] * 200  # no false positive
    mean = det.stats["loss"].mean
    assert det.check(200, "loss", 10 * losses[-1]) == "skip"
    assert det.stats["loss"].mean == mean and det.stats["loss"].n == 200  # the spike is not in the statistics
    assert (det.events, det.skipped, det.rollbacks) == (1, 1, 0)
    assert det.metrics()["spike/loss_z"] > 6
    # A value above the z threshold but within ratio x mean is not a spike (tiny late-training variance).
    assert det.check(201, "loss", mean * 1.1) == "ok"
    assert det.check(202, "loss", float("nan")) == "ok"  # NaN is train.nan_policy's case
    # policy=log, the dry run: the same decision, counted as an event, nothing skipped or rolled back.
    det = SpikeDetector(spike_cfg(policy="log"))
    assert [det.check(i, "loss", x) for i, x in enumerate(losses)].count("ok") == 200
    assert det.check(200, "loss", 10 * losses[-1]) == "log" and (det.events, det.skipped, det.rollbacks) == (1, 0, 0)


def test_detector_state_resumes_exactly():
    from mnemo.train.spikes import SpikeDetector

    xs = noisy_losses(120, seed=1)
    xs[60] *= 5  # one spike in the middle
    whole = SpikeDetector(spike_cfg())
    first = SpikeDetector(spike_cfg())
    a = [whole.check(i, "loss", x) for i, x in enumerate(xs)]
    b = [first.check(i, "loss", x) for i, x in enumerate(xs[:70])]
    sd = torch.load(_saved(first.state_dict()), weights_only=True)  # through a file, as in a rank file
    second = SpikeDetector(spike_cfg())
    second.load_state_dict(sd)
    b += [second.check(i, "loss", x) for i, x in enumerate(xs[70:], start=70)]
    assert a == b and a.count("skip") == 1
    assert second.state_dict() == whole.state_dict()


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_rollbacks_in_a_row_stop_the_run_after_max_rollbacks(tmp_path):
    from mnemo.train.checkpoint import CheckpointManager
    from mnemo.train.errors import UserError
    from mnemo.train.spikes import SpikeDetector

    mgr = CheckpointManager(tmp_path)
    ck = mgr.root / "step_00000004"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"step": 4, "world_size": 1}))
    (ck / "COMPLETE").write_text("1\n")
    torch.save({}, ck / "rank_00000.pt")
    det = SpikeDetector(spike_cfg(policy="rollback", max_rollbacks=2), mgr)
    for i in range(20):
        det.check(i, "loss", 5.0 + 0.01 * (i % 3))
    assert det.check(20, "loss", 50.0) == "rollback" and det.rollback_to == ck
    assert det.check(19, "loss", 50.0) == "rollback"  # again, before getting past step 21: 2 in a row
    with pytest.raises(UserError, match=r"train\.spike: 3 rollbacks in a row \(train\.spike\.max_rollbacks=2\)"):
        det.check(19, "loss", 50.0)
    det = SpikeDetector(spike_cfg(policy="rollback", max_rollbacks=1), mgr)
    for i in range(20):
        det.check(i, "loss", 5.0 + 0.01 * (i % 3))
    assert det.check(20, "loss", 50.0) == "rollback"
    assert det.check(25, "loss", 50.0) == "rollback"  # past the previous bad step: a new series
    # The checkpoint is of another ZeRO stage (a run resumed through a universal conversion): skipped instead.
    det = SpikeDetector(spike_cfg(policy="rollback"), mgr, {"zero": {"stage": 3}})
    for i in range(20):
        det.check(i, "loss", 5.0 + 0.01 * (i % 3))
    assert det.check(20, "loss", 50.0) == "skip" and det.rollback_to is None
    # A gradient-norm spike (its update is applied already): rolled back, or with nothing to go back to only logged.
    det = SpikeDetector(spike_cfg(policy="rollback", grad_norm=True), mgr)
    for i in range(20):
        assert det.check(i, "grad_norm", 1.0 + 0.01 * (i % 3)) == "ok"
    assert det.check(20, "grad_norm", 30.0) == "rollback" and det.metrics()["spike/grad_norm_z"] > 6
    det = SpikeDetector(spike_cfg(policy="rollback", grad_norm=True), CheckpointManager(tmp_path / "empty"))
    for i in range(20):
        det.check(i, "grad_norm", 1.0 + 0.01 * (i % 3))
    assert det.check(20, "grad_norm", 30.0) == "log" and (det.events, det.skipped, det.rollbacks) == (1, 0, 0)
    # No checkpoint to roll back to: a loss spike is skipped instead.
    det = SpikeDetector(spike_cfg(policy="rollback"), CheckpointManager(tmp_path / "empty"))
    for i in range(20):
        det.check(i, "loss", 5.0 + 0.01 * (i % 3))
    assert det.check(20, "loss", 50.0) == "skip" and det.rollback_to is None and det.skipped == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.spike.policy=sometimes", r"train\.spike\.policy: 'sometimes' is not one of off, log, skip, rollback"),
        ("train.spike.z=0", r"train\.spike\.z: must be > 0"),
        ("train.spike.ratio=0.5", r"train\.spike\.ratio: must be >= 1"),
        ("train.spike.window=0", r"train\.spike\.window: must be >= 1"),
        ("train.spike.warmup=1", r"train\.spike\.warmup: must be >= 2"),
        ("train.spike.max_rollbacks=0", r"train\.spike\.max_rollbacks: must be >= 1"),
    ],
)
def test_bad_spike_config_is_a_one_line_error_naming_the_key(override, message):
    from mnemo.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG, [override])


def test_gradient_norm_spikes_cannot_be_skipped():
    from mnemo.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train\.spike\.grad_norm: .*use train\.spike\.policy=rollback or log"):
        load_config(DEBUG, ["train.spike.policy=skip", "train.spike.grad_norm=true"])
    assert load_config(DEBUG, []).train.spike.policy == "off"


# ----------------------------------------------------------------------------- the policies on a real engine


# world1: the one-rank process group fixture of test_hardening_trainer (imported above).


def config(data: Path, run_dir: Path, *overrides: str):  # noqa: F811 (a parameter, not the fixture)
    """test_hardening_trainer's one-rank run config, with a small evaluation and the detector warm after 2 steps."""
    return hardening_config(
        data,
        run_dir,
        "eval.max_docs=1",
        "eval.max_doc_tokens=128",
        "train.warmup_steps=0",
        "train.spike.warmup=2",
        *overrides,
    )


def read_steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "steps.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from mnemo.train.checkpoint import consolidated_state_dict

    return consolidated_state_dict(ckpt)


@pytest.mark.parametrize("accum", [1, 2])
def test_skip_policy_applies_nothing_of_the_spike_step(world1, data, tmp_path, monkeypatch, accum):  # noqa: F811
    """A spike at step 3 under skip: the checkpoint after it holds the weights, optimizer moments and LR
    schedule of step 2 (checkpoint.interval=1), the step's data is consumed, and the event is logged. With 2
    accumulation micro-steps the first one's gradients are already in the engine: DeepSpeed must refuse them."""
    from mnemo.train import trainer
    from mnemo.train.checkpoint import load_torch_file

    monkeypatch.setenv("MNEMO_FAULT_SPIKE_AT_STEP", "3:0")
    run = tmp_path / "run"
    over = ("train.max_steps=4", "checkpoint.interval=1", "checkpoint.keep=3", "train.spike.policy=skip")
    summary = trainer.train(config(data, run, *over, f"train.global_batch_size={4 * accum}"))
    assert summary["step"] == 4
    ck = run / "checkpoints"
    w2, w3, w4 = (weights(ck / f"step_{s:08d}") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2), "the spike step's update was applied"
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # training went on
    steps = read_steps(run)
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 4]
    (ev,) = [r for r in steps if r.get("event") == "spike"]
    assert (ev["step"], ev["what"], ev["action"]) == (3, "loss", "skip") and ev["ratio"] > 2
    r2, r3 = (load_torch_file(ck / f"step_{s:08d}" / "rank_00000.pt") for s in (2, 3))
    streams2, streams3 = (r["streams"].get("groups", [r["streams"]]) for r in (r2, r3))
    assert [s["batches"] + 1 for s in streams2] == [s["batches"] for s in streams3]  # its data was read
    assert r3["spikes"]["skipped"] == 1 and r3["spikes"]["events"] == 1


def _stream_batches(rank_file: dict) -> int:
    return rank_file["streams"]["batches"]


def test_rollback_restores_the_last_checkpoint_and_skips_the_data_since(world1, data, tmp_path, monkeypatch):  # noqa: F811
    """A spike at step 6 under rollback (checkpoints every 4 steps): the run goes back to step 4 and trains
    steps 5..8 on the data after step 6. Reference: a clean run's checkpoint 4 with the stream position of its
    step 6 and empty memory, resumed by the ordinary resume: per-step losses of 5..8 and the final weights
    equal (fp32 CPU), so nothing of the bad step (or of step 5 before it) is in them."""
    from mnemo.train import trainer
    from mnemo.train.checkpoint import load_torch_file

    monkeypatch.setenv("MNEMO_FAULT_SPIKE_AT_STEP", "6:0")
    run = tmp_path / "run"
    common = ("checkpoint.keep=10", "train.spike.policy=rollback")
    trainer.train(config(data, run, "train.max_steps=8", "checkpoint.interval=4", *common))
    steps = read_steps(run)
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    (ev,) = [r for r in steps if r.get("event") == "spike"]
    assert (ev["step"], ev["action"]) == (6, "rollback")
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
    final = load_torch_file(run / "checkpoints" / "step_00000008" / "rank_00000.pt")
    assert final["spikes"]["rollbacks"] == 1 and final["spikes"]["events"] == 1

    monkeypatch.delenv("MNEMO_FAULT_SPIKE_AT_STEP")
    clean = tmp_path / "clean"
    trainer.train(config(data, clean, "train.max_steps=8", "checkpoint.interval=2", *common))  # the same LR schedule
    ref_steps = read_steps(clean)
    assert [r["loss"] for r in steps[:5]] == [r["loss"] for r in ref_steps[:5]]  # same run up to the spike
    # The reference checkpoint: step 4's engine, RNG and counters; step 6's stream position; empty memory.
    ref = tmp_path / "ref"
    (ref / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(clean / "checkpoints" / "step_00000004", ref / "checkpoints" / "step_00000004")
    rank_file = ref / "checkpoints" / "step_00000004" / "rank_00000.pt"
    rf = load_torch_file(rank_file)
    at6 = load_torch_file(clean / "checkpoints" / "step_00000006" / "rank_00000.pt")
    rf["streams"] = at6["streams"]
    rf["memory"] = {k: torch.zeros_like(v) for k, v in rf["memory"].items()}  # MemoryState.reset = zeros
    torch.save(rf, rank_file)
    trainer.train(config(data, ref, "train.max_steps=8", "checkpoint.interval=4", *common))
    redone = [r["loss"] for r in steps[5:] if "loss" in r]
    assert redone == [r["loss"] for r in read_steps(ref) if "loss" in r]
    # The resume restored the detector of checkpoint 4 (4 losses seen) and went on: 8 at the end.
    ref8 = load_torch_file(ref / "checkpoints" / "step_00000008" / "rank_00000.pt")["spikes"]
    assert ref8["stats"]["loss"]["n"] == 8 and ref8["events"] == 0
    w, w_ref = weights(run / "checkpoints" / "step_00000008"), weights(ref / "checkpoints" / "step_00000008")
    assert all(torch.equal(w[k], w_ref[k]) for k in w)


def test_a_rollback_keeps_the_lr_a_resume_changed(world1, data, tmp_path, monkeypatch, caplog):  # noqa: F811
    """Resumed with train.lr lowered 100x, then a spike rolls back to the checkpoint resumed from: the
    rollback's load restored that checkpoint's lr (the redone steps ran at 100x the configured lr). The
    steps redone after it must run at the lr of the same steps before it."""
    import logging
    import re

    from mnemo.train import trainer

    run = tmp_path / "run"
    common = ("checkpoint.keep=10", "train.spike.policy=rollback", "checkpoint.interval=4", "train.log_interval=1")
    trainer.train(config(data, run, "train.max_steps=4", *common))
    monkeypatch.setenv("MNEMO_FAULT_SPIKE_AT_STEP", "7:0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mnemo.train"):
        trainer.train(config(data, run, "train.max_steps=8", "train.lr=3e-5", *common))
    # "step 5/8 loss 4.3524 lr 3.00e-05 ...": (step, lr) of each step logged by the resumed run
    lrs = [(int(m[1]), float(m[2])) for m in re.finditer(r"step (\d+)/8 loss \S+ lr (\S+)", caplog.text)]
    assert [s for s, _ in lrs] == [5, 6, 5, 6, 7, 8], caplog.text
    assert lrs[2:4] == lrs[0:2]  # steps 5 and 6 redone after the rollback: the same lr as before it
    assert all(lr <= 3e-5 for _, lr in lrs)


def test_one_value_has_no_spread_so_no_z_score():
    """After the first step the variance is 0: the z of the second was (x - mean) / 1e-12, logged as
    spike/loss_z = -3.8e11. With one value z is 0; from two on it is the usual score."""
    from mnemo.train.spikes import RunningStats

    st = RunningStats(window=5)
    st.update(4.0)
    assert st.score(3.9) == (0.0, 3.9 / 4.0)
    st.update(3.8)
    z, ratio = st.score(3.7)
    assert -10 < z < 0 and ratio == pytest.approx(3.7 / st.mean)
