"""Resume on another world size AND another ZeRO stage through DeepSpeed's universal checkpoint (issue 6, item 6).

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
from pathlib import Path

import pytest
import torch

from tests.integration.jobs import data_of, losses_by_step, reference_overrides, run, steps, train_cmd

pytestmark = pytest.mark.integration

SAVE, STEPS = 10, 15  # the references' first checkpoint; 5 steps after the resume
# Every step logged, cheap final eval, no MLflow: these runs are about the optimizer state.
RESUME = [f"train.max_steps={STEPS}", "train.batch_size=8", "train.log_interval=1", "tracking.enabled=false",
          "eval.max_docs=1", "eval.max_doc_tokens=128"]


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


def resume_one_rank(data: str, ref_dir: Path, run_dir: Path, stage: int) -> str:
    """Relaunch a cut-back copy of ref_dir on 1 rank at `stage` up to STEPS (auto-resume from SAVE); returns stderr."""
    cut_back(ref_dir, run_dir)
    ds = ckpt(run_dir, SAVE) / "ds"
    # Leftovers the conversion must not trust: an interrupted one, and one in an older layout.
    (ds / ".tmp-universal_state" / "zero").mkdir(parents=True)
    (ds / "universal_state").mkdir()
    (ds / "universal_state" / "COMPLETE").write_text("ok\n")
    res = run(train_cmd(1, reference_overrides(data, run_dir, stage, *RESUME)), timeout=400)
    return res.stderr


@pytest.fixture(scope="module")
def resumed(references, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """'3to2' and '2to3' -> (run dir, stderr) of the 1-rank resumes."""
    out = {}
    for src, dst in ((3, 2), (2, 3)):
        run_dir = tmp_path_factory.mktemp(f"u{src}to{dst}") / "run"
        out[f"{src}to{dst}"] = run_dir, resume_one_rank(data_of(references[src]), references[src], run_dir, dst)
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
    return {d.name: torch.load(d / f"{key}.pt", map_location="cpu", weights_only=False)
            for d in sorted(zero.iterdir()) if (d / f"{key}.pt").is_file()}


@pytest.mark.parametrize("case", ["3to2", "2to3"])
def test_one_rank_other_stage_resumes_and_continues(resumed, references, case):
    run_dir, stderr = resumed[case]
    src = int(case[0])
    assert "re-partitioned from 2 to 1 ranks" in stderr
    assert not (ckpt(run_dir, SAVE) / "ds" / ".tmp-universal_state").exists(), "interrupted conversion left behind"
    new = steps(run_dir)[SAVE:]  # the cut-back log holds the reference's steps 1..SAVE
    assert [r["step"] for r in new] == list(range(SAVE + 1, STEPS + 1))
    pre = losses_by_step(references[src])[SAVE]
    print(f"{case}: loss at save step {SAVE} {pre:.4f}; resumed "
          + " ".join(f"{r['step']}:{r['loss']:.4f}" for r in new))
    assert new[0]["loss"] < pre * 1.10, f"loss jumped at the resume: {pre:.4f} -> {new[0]['loss']:.4f}"
    assert max(r["loss"] for r in new) < pre * 1.10
    # Adam's step survived the conversion (not restarted at 0) and advanced once per step
    # in every group (DeepSpeed's ZeRO-3 loader shares one step tensor between groups).
    assert adam_steps(ckpt(references[src], SAVE)) == {float(SAVE)}
    assert adam_steps(ckpt(run_dir, STEPS)) == {float(STEPS)}


def test_conversions_hold_the_saved_weights_and_optimizer_state(resumed, references):
    from mnemo.train.checkpoint import consolidated_state_dict
    from mnemo.train.universal import FORMAT, UNIVERSAL_TAG, make_universal

    per_source = {}
    for case in ("3to2", "2to3"):
        step_dir = ckpt(resumed[case][0], SAVE)
        assert (step_dir / "ds" / "universal_state" / "COMPLETE").read_text().strip() == FORMAT
        assert (step_dir / "ds" / "latest_universal").read_text().strip() == UNIVERSAL_TAG
        # Every stage's loader finds its model-states file name.
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            assert (step_dir / "ds" / "universal_state" / name).is_file()
        saved = consolidated_state_dict(ckpt(references[int(case[0])], SAVE))  # DeepSpeed's zero_to_fp32
        fp32 = universal_tensors(step_dir, "fp32")
        # The LM head is tied to the embedding: zero_to_fp32 and the converters may each list it or not.
        assert set(fp32) - {"lm_head.weight"} == set(saved) - {"lm_head.weight"}
        for name, d in fp32.items():
            assert torch.equal(d["param"], saved.get(name, saved["tok_emb.weight"])), name  # full shape, bit-equal
        assert {float(v) for v in universal_tensors(step_dir, "step").values()} == {float(SAVE)}
        per_source[case] = {k: universal_tensors(step_dir, k) for k in ("exp_avg", "exp_avg_sq")}
    # The ZeRO-3 and ZeRO-2 writers go through different converter paths; the two
    # runs differ only in reduction order, so their Adam moments must agree: a
    # converter that misplaced or mixed shards would be off by about the tensor's
    # own norm. (Norms, not the largest element: Adam amplifies reduction-order
    # noise in the few elements whose gradient is near zero.)
    for key in ("exp_avg", "exp_avg_sq"):
        for name, d3 in per_source["3to2"][key].items():
            a, b = d3["param"], per_source["2to3"][key][name]["param"]
            assert a.shape == b.shape and a.abs().max() > 0, (key, name)
            rel = float((a - b).norm() / b.norm())
            assert rel <= 1e-3, (key, name, rel)

    # Idempotent: a finished conversion is reused, not redone.
    step_dir = ckpt(resumed["3to2"][0], SAVE)
    marker = step_dir / "ds" / "universal_state" / "COMPLETE"
    before = marker.stat().st_mtime_ns
    assert make_universal(step_dir) == UNIVERSAL_TAG
    assert marker.stat().st_mtime_ns == before


def test_resumed_losses_do_not_depend_on_the_stages(resumed):
    """Same state, same data: ZeRO-3 -> ZeRO-2 and ZeRO-2 -> ZeRO-3 resumes agree step by step."""
    a, b = losses_by_step(resumed["3to2"][0]), losses_by_step(resumed["2to3"][0])
    diffs = {s: abs(a[s] - b[s]) for s in range(SAVE + 1, STEPS + 1)}
    print("3to2 vs 2to3 loss differences:", {s: f"{d:.2e}" for s, d in diffs.items()})
    assert max(diffs.values()) < 1e-4, diffs
