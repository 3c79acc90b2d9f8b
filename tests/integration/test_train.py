"""Real 2-rank DeepSpeed training on CPU: learning, checkpoints, resume, faults (issues 2 and 6).

One uninterrupted 40-step reference run per ZeRO stage (conftest.reference_run,
shared with test_universal.py); every fault scenario is compared with it.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.integration.jobs import (
    PY,
    REFERENCE_STEPS,
    REPO,
    data_of,
    job_env,
    kill_group,
    losses_by_step,
    mlflow_runs,
    reference_overrides,
    run,
    start,
    steps,
    train_cmd,
    wait_for_step,
    worker_pids,
)

pytestmark = pytest.mark.integration

STEPS = REFERENCE_STEPS
overrides = reference_overrides


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def reference(request, reference_run):
    return request.param, reference_run(request.param)


def final_weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    from mnemo.train.checkpoint import consolidated_state_dict

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


def test_crash_in_save_then_sigkill_resume_bit_exactly(reference, tmp_path):
    """Two faults in one job, each followed by the same command again; the end result equals the reference.

    1. A crash inside the save at step 20 (after the first rank has written its
       part): `latest` still names step 10, and the partial directory is removed
       by the relaunch, which resumes from step 10.
    2. That relaunch has every rank SIGKILLed at a random step between the
       checkpoints 20 and 30; the next relaunch resumes from 20.
    Losses from step 11 on and the final weights are bit-equal to the
    uninterrupted reference, and MLflow holds one run with every step once.
    """
    stage, ref_dir = reference
    if stage != 3:
        pytest.skip("one stage is enough: ZeRO-2's bit-exact resume is checked by the SIGTERM test")
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    cmd = train_cmd(2, overrides(data_of(ref_dir), run_dir, stage))
    res = subprocess.run(
        cmd, cwd=REPO, env=job_env(MNEMO_FAULT_CRASH_IN_SAVE="20:1"), capture_output=True, text=True, timeout=300
    )
    assert res.returncode != 0
    assert (ck / "latest").read_text().strip() == "step_00000010"
    assert list(ck.glob(".tmp-step_00000020")), "the interrupted save should have left a partial directory"
    assert max(r["step"] for r in steps(run_dir)) == 20

    kill_at = random.Random(stage).randint(22, 28)
    proc = start(cmd, log=tmp_path / "killed.log")
    wait_for_step(run_dir, kill_at, proc)
    kill_group(proc, signal.SIGKILL)
    log = (tmp_path / "killed.log").read_text()
    assert "removing incomplete checkpoint" in log and "step_00000020" in log
    recs = steps(run_dir)
    assert recs[20]["step"] == 11, "the first relaunch should resume from the last complete checkpoint (10)"
    done_before = recs[-1]["step"]
    assert 20 < done_before < 30 and (ck / "latest").read_text().strip() == "step_00000020"

    run(cmd, timeout=300)
    assert not list(ck.glob(".tmp-*"))
    recs = steps(run_dir)
    second = [r["step"] for r in recs[20 + done_before - 10 :]]
    assert second == list(range(21, STEPS + 1)), "the second relaunch did not restart at the last checkpoint (20)"
    ref, got = losses_by_step(ref_dir), losses_by_step(run_dir)
    mismatched = [s for s in range(11, STEPS + 1) if got[s] != ref[s]]
    assert not mismatched, (
        f"losses differ after resume at steps {mismatched[:5]}: {[(got[s], ref[s]) for s in mismatched[:3]]}"
    )
    a, b = final_weights(ref_dir), final_weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # MLflow: one run; every logged step at most once and none missing, though steps 11.. ran up to three times
    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1
    hist = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(5, STEPS + 1, 5))


def test_sigterm_saves_and_exits_zero_then_continues(reference, tmp_path):
    stage, ref_dir = reference
    if stage != 2:
        pytest.skip("one stage is enough")
    run_dir = tmp_path / "run"
    cmd = train_cmd(2, overrides(data_of(ref_dir), run_dir, stage, "checkpoint.grace_period_s=60"))
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


def test_export_matches_zero_to_fp32_and_eval_and_finetune(reference, tmp_path):
    stage, ref_dir = reference
    if stage != 3:
        pytest.skip("the ZeRO-3 checkpoint is the one that needs consolidation")
    ckpt = ref_dir / "checkpoints" / f"step_{STEPS:08d}"
    export_dir = tmp_path / "export"
    run([PY, "-m", "mnemo", "export", str(ckpt), "--out", str(export_dir)])
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
    from mnemo.train.checkpoint import load_for_inference
    from mnemo.evaluation.scoring import loss_by_position
    from mnemo.train.eval_hook import heldout_docs
    from mnemo.data_pipeline.streams import MDSSource

    m1, tok, cfg = load_for_inference(ckpt)
    m2, _, _ = load_for_inference(export_dir)
    src = MDSSource(data_of(ref_dir), cache_dir=str(tmp_path / "cache"))
    docs = heldout_docs(src, cfg)
    l1 = loss_by_position(m1, docs, cfg.model.segment_len, 2)
    l2 = loss_by_position(m2, docs, cfg.model.segment_len, 2)
    assert l1 == l2

    # fine-tune from the export: a new run that starts at the exported weights' loss
    ft_dir = tmp_path / "ft"
    run(
        train_cmd(
            1,
            overrides(
                data_of(ref_dir), ft_dir, 2, "train.max_steps=3", f"init_from={export_dir}", "train.warmup_steps=3"
            ),
        ),
        timeout=300,
    )
    ft = losses_by_step(ft_dir)
    ref = losses_by_step(ref_dir)
    start_loss = sum(ref[s] for s in range(1, 4)) / 3
    end_loss = sum(ref[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert ft[1] < (start_loss + end_loss) / 2, f"fine-tune started at {ft[1]:.3f}, not near {end_loss:.3f}"
    _, runs = mlflow_runs(ft_dir)
    assert len(runs) == 1 and runs[0].data.tags.get("mnemo.parent_run_id")
