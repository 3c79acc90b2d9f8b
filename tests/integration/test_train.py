"""Real 2-rank DeepSpeed training on CPU: learning, checkpoints, resume, faults (issues 2 and 6).

Runs are shared through module-scoped fixtures: one uninterrupted 40-step
reference run per ZeRO stage; every fault scenario is compared with it.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.integration.jobs import (PY, REPO, job_env, kill_group, losses_by_step, mlflow_runs, run, start, steps,
                                    train_cmd, wait_for_step, worker_pids)

pytestmark = pytest.mark.integration

STEPS = 40


def overrides(data: Path, run_dir: Path, stage: int, *extra: str) -> list[str]:
    return [f"data.path={data}", f"run.dir={run_dir}", f"zero.stage={stage}", f"train.max_steps={STEPS}",
            "checkpoint.interval=10", "checkpoint.keep=5", "train.log_interval=5",
            # Every 4th step a passkey episode: resume must continue its curriculum and documents exactly.
            "train.passkey.fraction=0.25", *extra]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def reference(request, tiny_data, tmp_path_factory):
    stage = request.param
    run_dir = tmp_path_factory.mktemp(f"ref{stage}") / "run"
    run(train_cmd(2, overrides(tiny_data, run_dir, stage)), timeout=400)
    return stage, run_dir


def final_weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    from train.checkpoint import consolidated_state_dict

    return consolidated_state_dict(run_dir / "checkpoints" / f"step_{step:08d}")


def test_learns_checkpoints_and_logs_one_mlflow_run(reference):
    stage, run_dir = reference
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 1.0, f"loss did not go down: {first:.3f} -> {last:.3f}"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts[-1] == f"step_{STEPS:08d}" and (run_dir / "checkpoints" / ckpts[-1] / "COMPLETE").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpts[-1]

    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1
    hist = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(5, STEPS + 1, 5))


def test_relaunch_resumes_without_repeating_steps(reference, tmp_path):
    stage, ref_dir = reference
    if stage != 2:
        pytest.skip("one stage is enough: ZeRO-3's resume is checked bit-exactly by the SIGKILL test")
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    res = run(train_cmd(2, overrides(_data_of(ref_dir), run_dir, stage, f"train.max_steps={STEPS + 5}")), timeout=300)
    recs = steps(run_dir)
    new = [r["step"] for r in recs[STEPS:]]
    assert new == list(range(STEPS + 1, STEPS + 6)), new
    assert "resumed from" in res.stderr

    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1
    hist = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(5, STEPS + 6, 5))


def _data_of(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"]


def test_sigkill_mid_run_resumes_bit_exactly(reference, tmp_path):
    """Every rank SIGKILLed at a random step between checkpoints; the relaunch equals the reference."""
    stage, ref_dir = reference
    if stage != 3:
        pytest.skip("one stage is enough: ZeRO-2's bit-exact resume is checked by the SIGTERM test")
    run_dir = tmp_path / "run"
    cmd = train_cmd(2, overrides(_data_of(ref_dir), run_dir, stage))
    kill_at = random.Random(stage).randint(22, 28)
    proc = start(cmd, log=tmp_path / "killed.log")
    wait_for_step(run_dir, kill_at, proc)
    kill_group(proc, signal.SIGKILL)
    done_before = max(r["step"] for r in steps(run_dir))
    assert 20 < done_before < 30
    run(cmd, timeout=300)
    recs = steps(run_dir)
    resumed = [r["step"] for r in recs if r["step"] <= done_before][-(done_before - 20):]
    assert resumed == list(range(21, done_before + 1)), "the relaunch did not restart at the last checkpoint (20)"
    ref, got = losses_by_step(ref_dir), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    mismatched = [s for s in range(21, STEPS + 1) if got[s] != ref[s]]
    assert not mismatched, f"losses differ after resume at steps {mismatched[:5]}: " \
                           f"{[(got[s], ref[s]) for s in mismatched[:3]]}"
    a, b = final_weights(ref_dir), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # MLflow: one run; every logged step at most once and none missing, though steps 21.. ran twice
    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1
    hist = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(5, STEPS + 1, 5))


def test_crash_during_save_falls_back_to_previous_checkpoint(reference, tmp_path):
    stage, ref_dir = reference
    if stage != 3:
        pytest.skip("one stage is enough: the commit protocol does not depend on ZeRO")
    run_dir = tmp_path / "run"
    cmd = train_cmd(2, overrides(_data_of(ref_dir), run_dir, stage))
    res = subprocess.run(cmd, cwd=REPO, env=job_env(MNEMO_FAULT_CRASH_IN_SAVE="20:1"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode != 0
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000010"
    assert list(ck.glob(".tmp-step_00000020")), "the interrupted save should have left a partial directory"
    res = run(cmd, timeout=300)
    assert "removing incomplete checkpoint" in res.stderr and "step_00000020" in res.stderr
    assert not list(ck.glob(".tmp-*"))
    recs = steps(run_dir)
    after = [r["step"] for r in recs][20:]
    assert after[0] == 11, "relaunch should resume from the previous complete checkpoint (step 10)"
    ref, got = losses_by_step(ref_dir), losses_by_step(run_dir)
    assert all(got[s] == ref[s] for s in range(11, STEPS + 1))


def test_sigterm_saves_and_exits_zero_then_continues(reference, tmp_path):
    stage, ref_dir = reference
    if stage != 2:
        pytest.skip("one stage is enough")
    run_dir = tmp_path / "run"
    cmd = train_cmd(2, overrides(_data_of(ref_dir), run_dir, stage, "checkpoint.grace_period_s=60"))
    proc = start(cmd, log=tmp_path / "term.log")
    wait_for_step(run_dir, 13, proc)
    t0 = time.time()
    for pid in worker_pids(proc):
        import os

        os.kill(pid, signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 0, (tmp_path / "term.log").read_text()[-3000:]
    assert time.time() - t0 < 60
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(saved.split("_")[1])
    assert 13 <= step < 20 and (run_dir / "PREEMPTED").is_file()
    run(cmd, timeout=300)
    recs = steps(run_dir)
    after_resume = [r["step"] for r in recs if r["step"] > step]
    assert after_resume == list(range(step + 1, STEPS + 1)), "steps repeated or skipped after the preemption save"
    assert not (run_dir / "PREEMPTED").exists()
    ref, got = losses_by_step(ref_dir), losses_by_step(run_dir)
    assert all(got[s] == ref[s] for s in range(1, STEPS + 1))


def test_resume_on_one_rank(reference, tmp_path):
    """2 ranks -> 1 rank through DeepSpeed's universal checkpoint (stage changes: test_universal.py)."""
    stage, ref_dir = reference
    if stage != 3:
        pytest.skip("one stage is enough: test_universal.py converts from both stages")
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    res = run(train_cmd(1, overrides(_data_of(ref_dir), run_dir, stage, f"train.max_steps={STEPS + 6}",
                                     "train.batch_size=8")), timeout=400)
    assert "re-partitioned from 2 to 1 ranks" in res.stderr
    recs = steps(run_dir)
    new = [r for r in recs if r["step"] > STEPS]
    assert [r["step"] for r in new] == list(range(STEPS + 1, STEPS + 7))
    before = sum(r["loss"] for r in recs if STEPS - 5 < r["step"] <= STEPS) / 5
    after = sum(r["loss"] for r in new[:3]) / 3
    assert after < before * 1.10, f"loss jumped after the world-size change: {before:.3f} -> {after:.3f}"


def test_export_matches_zero_to_fp32_and_eval_and_finetune(reference, tmp_path):
    stage, ref_dir = reference
    if stage != 3:
        pytest.skip("the ZeRO-3 checkpoint is the one that needs consolidation")
    ckpt = ref_dir / "checkpoints" / f"step_{STEPS:08d}"
    export_dir = tmp_path / "export"
    run([PY, "-m", "train.cli", "export", str(ckpt), "--out", str(export_dir)])
    from safetensors.torch import load_file

    ours = load_file(str(export_dir / "model.safetensors"))
    # DeepSpeed's own consolidation script, copied by DeepSpeed into the checkpoint
    out = tmp_path / "fp32"
    run([PY, str(ckpt / "ds" / "zero_to_fp32.py"), str(ckpt / "ds"), str(out), "--tag", "state"], timeout=120)
    theirs = {}
    for f in sorted(out.glob("*.bin")) + sorted(out.glob("*.safetensors")) + ([out] if out.is_file() else []):
        theirs.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu"))
    assert theirs, "zero_to_fp32 wrote nothing"
    for k, v in ours.items():
        assert torch.equal(v, theirs[k].float()), k

    # eval of the export == eval of the DeepSpeed checkpoint
    from train.checkpoint import load_for_inference
    from train.evaluate import loss_by_position
    from train.trainer import heldout_docs
    from data_pipeline.streams import MDSSource

    m1, tok, cfg = load_for_inference(ckpt)
    m2, _, _ = load_for_inference(export_dir)
    src = MDSSource(_data_of(ref_dir), cache_dir=str(tmp_path / "cache"))
    docs = heldout_docs(src, cfg)
    l1 = loss_by_position(m1, docs, cfg.model.segment_len, 2)
    l2 = loss_by_position(m2, docs, cfg.model.segment_len, 2)
    assert l1 == l2

    # fine-tune from the export: a new run that starts at the exported weights' loss
    ft_dir = tmp_path / "ft"
    run(train_cmd(1, overrides(_data_of(ref_dir), ft_dir, 2, "train.max_steps=3", f"init_from={export_dir}",
                               "train.warmup_steps=3")), timeout=300)
    ft = losses_by_step(ft_dir)
    ref = losses_by_step(ref_dir)
    start_loss = sum(ref[s] for s in range(1, 4)) / 3
    end_loss = sum(ref[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert ft[1] < (start_loss + end_loss) / 2, f"fine-tune started at {ft[1]:.3f}, not near {end_loss:.3f}"
    _, runs = mlflow_runs(ft_dir)
    assert len(runs) == 1 and runs[0].data.tags.get("mnemo.parent_run_id")
