"""Resume on another world size AND another ZeRO stage through DeepSpeed's universal checkpoint.

The two 2-rank reference runs of test_train.py (conftest.reference_run:
ZeRO-3 and ZeRO-2, identical up to float reduction order) are each cut back
to their checkpoint at step SAVE and resumed on 1 rank at the other stage
with the same global batch (batch_size 8 = 2 x 4):

    2 ranks ZeRO-3 --(universal)--> 1 rank ZeRO-2
    2 ranks ZeRO-2 --(universal)--> 1 rank ZeRO-3

The converter and the stage-1/2 and stage-3 loaders read different layouts,
so the two directions exercise different code; both must restore the same
weights, Adam moments and step, hence give the same resumed losses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.integration.jobs import data_of, kill_group, losses_by_step, reference_overrides, start, steps, train_cmd

pytestmark = pytest.mark.integration

SAVE, STEPS = 10, 15  # the references' first checkpoint; 5 steps after the resume
# Every step logged, cheap final eval, no MLflow: these runs are about the optimizer state.
RESUME = [
    f"train.max_steps={STEPS}",
    "train.batch_size=8",
    "train.log_interval=1",
    "tracking.enabled=false",
    "eval.max_docs=1",
    "eval.max_doc_tokens=128",
]


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def references(reference_run) -> dict[int, Path]:
    """ZeRO stage -> a finished 2-rank run dir with a checkpoint at SAVE."""
    return {stage: reference_run(stage) for stage in (3, 2)}


def cut_back(ref_dir: Path, run_dir: Path) -> None:
    """Copy ref_dir as it was right after its save at SAVE: later checkpoints and step records dropped."""
    shutil.copytree(ref_dir, run_dir)
    for d in (run_dir / "checkpoints").glob("step_*"):
        if int(d.name.split("_")[1]) > SAVE:
            shutil.rmtree(d)
    (run_dir / "checkpoints" / "latest").write_text(ckpt(run_dir, SAVE).name + "\n")
    log = run_dir / "logs" / "steps.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in steps(run_dir) if r["step"] <= SAVE))


def start_resume(data: str, ref_dir: Path, run_dir: Path, stage: int) -> subprocess.Popen:
    """Start a 1-rank relaunch of a cut-back copy of ref_dir at `stage` up to STEPS (auto-resume from SAVE)."""
    cut_back(ref_dir, run_dir)
    ds = ckpt(run_dir, SAVE) / "ds"
    # Leftovers the conversion must not trust: an interrupted one, and one in an older layout.
    (ds / ".tmp-universal_state" / "zero").mkdir(parents=True)
    (ds / "universal_state").mkdir()
    (ds / "universal_state" / "COMPLETE").write_text("ok\n")
    return start(train_cmd(1, reference_overrides(data, run_dir, stage, *RESUME)), log=run_dir.parent / "job.log")


@pytest.fixture(scope="module")
def resumed(references, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """'3to2' and '2to3' -> (run dir, output) of the 1-rank resumes.

    One after the other: two mosaicml-streaming jobs that start at the same
    moment on one host can pick the same shared-memory prefix and remove each
    other's ('/000000_locals': No such file or directory).
    """
    out = {}
    for src, dst in ((3, 2), (2, 3)):
        # A name DeepSpeed's converter and loaders once read as glob and regex patterns (train/universal.py).
        run_dir = tmp_path_factory.mktemp(f"u{src}to{dst}") / "exp (1)[x]+$"
        proc = start_resume(data_of(references[src]), references[src], run_dir, dst)
        try:
            rc = proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                kill_group(proc)
        text = (run_dir.parent / "job.log").read_text()
        assert rc == 0, f"{src}to{dst}: exit {rc}\n{text[-6000:]}"
        out[f"{src}to{dst}"] = run_dir, text
    return out


def adam_steps(step_dir: Path) -> set[float]:
    """Adam's step count of every optimizer group, read from the DeepSpeed shards as written."""
    found: set[float] = set()
    for f in sorted((step_dir / "ds" / "state").glob("*optim_states.pt")):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        base = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")  # ZeRO-1/2 | ZeRO-3
        found |= {float(s["step"]) for s in base["state"].values()}
    return found


def universal_tensors(step_dir: Path, key: str) -> dict[str, torch.Tensor]:
    zero = step_dir / "ds" / "universal_state" / "zero"
    # (The ZeRO-1/2 converter also leaves a weights-only folder for the tied LM head's alias.)
    return {
        d.name: torch.load(d / f"{key}.pt", map_location="cpu", weights_only=False)
        for d in sorted(zero.iterdir())
        if (d / f"{key}.pt").is_file()
    }


@pytest.mark.parametrize("case", ["3to2", "2to3"])
def test_one_rank_other_stage_resumes_and_continues(resumed, references, case):
    run_dir, output = resumed[case]
    src = int(case[0])
    assert "re-partitioned from 2 to 1 ranks" in output
    assert not (ckpt(run_dir, SAVE) / "ds" / ".tmp-universal_state").exists(), "interrupted conversion left behind"
    new = steps(run_dir)[SAVE:]  # the cut-back log holds the reference's steps 1..SAVE
    assert [r["step"] for r in new] == list(range(SAVE + 1, STEPS + 1))
    pre = losses_by_step(references[src])[SAVE]
    print(
        f"{case}: loss at save step {SAVE} {pre:.4f}; resumed " + " ".join(f"{r['step']}:{r['loss']:.4f}" for r in new)
    )
    assert new[0]["loss"] < pre * 1.10, f"loss jumped at the resume: {pre:.4f} -> {new[0]['loss']:.4f}"
    assert max(r["loss"] for r in new) < pre * 1.10
    # Adam's step survived the conversion (not restarted at 0) and advanced once per step
    # in every group (DeepSpeed's ZeRO-3 loader shares one step tensor between groups).
    assert adam_steps(ckpt(references[src], SAVE)) == {float(SAVE)}
    assert adam_steps(ckpt(run_dir, STEPS)) == {float(STEPS)}


def consolidated_moments(step_dir: Path, key: str, tmp: Path) -> dict[str, torch.Tensor]:
    """Adam's ``key`` (exp_avg | exp_avg_sq) of every parameter, full shape, from the ZeRO shards as written.

    Adam's state is elementwise: each rank's moment partition [numel of its
    flat fp32 partition] lines up with that partition. Written in its place,
    DeepSpeed's zero_to_fp32 (the reference for the weights, a different code
    path from the universal converter) consolidates the moments exactly as it
    consolidates the weights.
    """
    from mnemo.train.checkpoint import DS_TAG, consolidated_state_dict

    src, dst = step_dir / "ds" / DS_TAG, tmp / "ds" / DS_TAG
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith("_optim_states.pt"):
            (dst / f.name).symlink_to(f)
            continue
        sd = torch.load(f, map_location="cpu", weights_only=False)
        osd = sd["optimizer_state_dict"]
        flat_key = "fp32_flat_groups" if "fp32_flat_groups" in osd else "single_partition_of_fp32_groups"  # 3 | 1/2
        base = osd.get("base_optimizer_state") or osd["optimizer_state_dict"]
        moments = [base["state"][g][key] for g in range(len(osd[flat_key]))]
        assert [m.shape for m in moments] == [p.shape for p in osd[flat_key]], f.name
        osd[flat_key] = moments
        torch.save(sd, dst / f.name)
    return consolidated_state_dict(tmp)


@pytest.mark.parametrize("case", ["3to2", "2to3"])
def test_conversion_holds_the_saved_weights_and_optimizer_state_bit_for_bit(resumed, references, case, tmp_path):
    """The ZeRO-3 and the ZeRO-2 writer take different converter paths; each must
    reproduce its own source checkpoint exactly (data movement only, no arithmetic)."""
    from mnemo.train.checkpoint import consolidated_state_dict
    from mnemo.train.universal import FORMAT, UNIVERSAL_TAG, make_universal

    step_dir = ckpt(resumed[case][0], SAVE)
    source = ckpt(references[int(case[0])], SAVE)
    assert (step_dir / "ds" / "universal_state" / "COMPLETE").read_text().strip() == FORMAT
    assert (step_dir / "ds" / "latest_universal").read_text().strip() == UNIVERSAL_TAG
    # Every stage's loader finds its model-states file name.
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        assert (step_dir / "ds" / "universal_state" / name).is_file()
    expected = {"fp32": consolidated_state_dict(source)}  # DeepSpeed's zero_to_fp32
    for key in ("exp_avg", "exp_avg_sq"):
        expected[key] = consolidated_moments(source, key, tmp_path / key)
    for key, want in expected.items():
        got = universal_tensors(step_dir, key)
        # The LM head is tied to the embedding: zero_to_fp32 and the converters may each list it or not.
        assert set(got) - {"lm_head.weight"} == set(want) - {"lm_head.weight"}, key
        for name, d in got.items():
            w = want.get(name, want["tok_emb.weight"])
            assert w.abs().max() > 0, (key, name)  # a real state, not two empty ones
            assert torch.equal(d["param"], w), (key, name)  # full shape, bit-equal
    assert {float(v) for v in universal_tensors(step_dir, "step").values()} == {float(SAVE)}

    # Idempotent: a finished conversion is reused, not redone.
    marker = step_dir / "ds" / "universal_state" / "COMPLETE"
    before = marker.stat().st_mtime_ns
    assert make_universal(step_dir) == UNIVERSAL_TAG
    assert marker.stat().st_mtime_ns == before


def test_resumed_losses_do_not_depend_on_the_stages(resumed):
    """Same state up to reduction order, same data: ZeRO-3 -> ZeRO-2 and ZeRO-2 -> ZeRO-3 resumes agree step by step.

    The conversions are exact (above), but the two sources are different runs:
    their states differ by ZeRO-3 vs ZeRO-2 reduction order, which moved the
    resumed losses apart by 8e-6 of the loss at most (measured). What must fail:
    a loader that restores Adam's step wrongly (step 20 instead of 10 moved the
    losses of steps 12-15 by up to 1.9e-4 of the loss) or loses the moments
    (up to 8e-3); a misplaced shard of the weights jumps the loss by > 10% at
    once (checked above). 4e-5 of the loss is the geometric middle of 8e-6 and
    1.9e-4, ~5x from each.
    """
    a, b = losses_by_step(resumed["3to2"][0]), losses_by_step(resumed["2to3"][0])
    rel = {s: abs(a[s] - b[s]) / abs(b[s]) for s in range(SAVE + 1, STEPS + 1)}
    print("3to2 vs 2to3 relative loss differences:", {s: f"{d:.1e}" for s, d in rel.items()})
    assert max(rel.values()) < 4e-5, rel


# ------------------------------------------------------------------ a fixed global batch (train.global_batch_size)
# 2 ranks x 2 slots and 1 rank x 2 slots x 2 accumulation micro-steps read the same documents in the same
# slot groups (train/slots.py) and average the same gradients: after 5 steps the weights agree up to float
# summation order. Cost: one 2-rank and two 1-rank runs of <= 7 steps: ~60 s of CPU; 5 min wall measured
# at load average 15 on the shared 2 cores (start-up, the universal conversion and the final evaluations dominate).
GB = ["train.batch_size=2", "train.passkey.fraction=0", "checkpoint.interval=5", *RESUME[2:]]
GB_SAVE, GB_STEPS = 5, 7


@pytest.fixture(scope="module")
def global_batch_runs(tiny_data, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """'ranks2' (2 ranks x 2 slots, 5 steps), 'accum2' (1 rank x 2 slots x 2, a token budget of 7 steps) and
    'resumed' (ranks2's run dir continued on 1 rank with train.global_batch_size=4 to step 7) -> (run dir, output)."""
    from tests.integration.jobs import run

    root = tmp_path_factory.mktemp("gb")
    out = {}
    for name, nproc, extra in (
        ("ranks2", 2, [f"train.max_steps={GB_SAVE}"]),
        # 7 steps of 4 x 64 tokens: the budget 1700 ends in step 7 (train.max_steps, 40 here, is not used).
        ("accum2", 1, ["train.global_batch_size=4", "train.max_tokens=1700"]),
    ):
        run_dir = root / name
        res = run(train_cmd(nproc, reference_overrides(tiny_data, run_dir, 2, *GB, *extra)))
        out[name] = run_dir, res.stderr
    run_dir = root / "resumed"
    shutil.copytree(out["ranks2"][0], run_dir)
    overrides = reference_overrides(
        tiny_data, run_dir, 2, *GB, f"train.max_steps={GB_STEPS}", "train.global_batch_size=4"
    )
    out["resumed"] = run_dir, run(train_cmd(1, overrides)).stderr
    return out


def test_two_ranks_equal_one_rank_with_two_accumulation_steps(global_batch_runs):
    """Weights after 5 steps agree to 1e-5 of each tensor's largest value (measured: 3.6e-7).

    The two runs sum the same 4 per-slot-group gradients in another order (gloo's all-reduce of two ranks vs
    DeepSpeed's accumulation buffer), so they differ by float32 rounding (eps 1.2e-7), which Adam's
    normalisation can lift to a few ulps of each update over 5 steps: 1e-5 leaves ~30x room for other CPUs'
    kernels. What must fail: a wrong mapping of slots to micro-steps (other documents: the losses differ in
    the first decimal) or a missing 1/A loss scale (every update doubled: weights ~1e-2 apart).
    """
    from mnemo.train.checkpoint import consolidated_state_dict

    a_dir, b_dir = global_batch_runs["ranks2"][0], global_batch_runs["accum2"][0]
    assert "global batch 4 = 1 rank x 2 slots x 2 accumulation" in global_batch_runs["accum2"][1]
    a, b = consolidated_state_dict(ckpt(a_dir, GB_SAVE)), consolidated_state_dict(ckpt(b_dir, GB_SAVE))
    rel = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)
    la, lb = losses_by_step(a_dir), losses_by_step(b_dir)
    loss_rel = max(abs(la[s] - lb[s]) / lb[s] for s in range(1, GB_SAVE + 1))
    print(
        f"2 ranks x 2 vs 1 rank x 2 x 2 accumulation after {GB_SAVE} steps: weights max rel diff {rel:.2e}, "
        f"losses max rel diff {loss_rel:.2e}"
    )
    assert rel < 1e-5 and loss_rel < 1e-5


def test_resume_two_ranks_on_one_keeps_the_global_batch(global_batch_runs):
    """2 ranks -> 1 rank with train.global_batch_size=4: accumulation 1 -> 2 (logged), each slot group's
    streams and memory move exactly, so steps 6-7 equal those of the 1-rank x 2 run (same tolerance)."""
    run_dir, output = global_batch_runs["resumed"]
    assert "global batch 4 = 1 rank x 2 slots x 2 accumulation (was 2 ranks x 2 x 1)" in output
    assert f"at step {GB_SAVE} (exact)" in output
    got, want = losses_by_step(run_dir), losses_by_step(global_batch_runs["accum2"][0])
    assert sorted(got) == list(range(1, GB_STEPS + 1))
    rel = {s: abs(got[s] - want[s]) / want[s] for s in range(GB_SAVE + 1, GB_STEPS + 1)}
    print("resumed 2 -> 1 ranks vs 1 rank x 2 accumulation, relative loss differences:", rel)
    assert max(rel.values()) < 1e-5


def test_max_tokens_stops_at_its_step_and_the_lr_schedule_ends_there(global_batch_runs):
    """train.max_tokens=1700 at 256 tokens a step: ceil(1700 / 256) = 7 steps (logged), the cosine reaches
    train.min_lr_ratio x train.lr = 3e-4 at step 7 (with train.max_steps=40 it would still be near 2.9e-3)."""
    run_dir, output = global_batch_runs["accum2"]
    assert "token budget: train.max_tokens=1700 -> 7 steps of 256 tokens (train.max_steps=40 not used)" in output
    assert sorted(losses_by_step(run_dir)) == list(range(1, GB_STEPS + 1))
    assert "step 7/7 " in output and " lr 3.00e-04 " in output.split("step 7/7 ")[1].splitlines()[0]
