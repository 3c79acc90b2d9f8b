"""A mixture (data.sources) through `mnemo train`: SIGKILL between checkpoints, relaunch, equal fp32 losses.

One 1-rank job on the debug size, killed after step KILL_AT (checkpoints at
SAVE and STEPS) and relaunched with the same command: the steps SAVE+1 ..
KILL_AT run twice, before the kill and after the resume, and their fp32 CPU
losses must be equal, so every source's document sequence (queue, draw
counters, slots) came back exactly. The second source is a copy of the
first dataset under another name: the same tokenizer without another
`mnemo prepare`, its own order and weight. Cost: two short launches.
"""

from __future__ import annotations

import shutil
import signal

import pytest

from tests.integration.jobs import kill_group, run, start, steps, train_cmd, wait_for_step

pytestmark = pytest.mark.integration

SAVE, KILL_AT, STEPS = 4, 5, 8  # checkpoints at 4 and 8; the kill comes after step 5 is logged


def test_mixture_sigkill_then_relaunch_redoes_the_lost_steps_bit_exactly(tiny_data, tmp_path):
    from mnemo.train.checkpoint import load_torch_file

    code = tmp_path / "code"
    shutil.copytree(tiny_data, code)
    run_dir = tmp_path / "run"
    sources = f"[{{path: {tiny_data}, weight: 0.7, name: web}}, {{path: {code}, weight: 0.3}}]"
    cmd = train_cmd(
        1,
        [
            "data.path=",
            f"data.sources={sources}",
            f"run.dir={run_dir}",
            "model.dtype=fp32",
            "train.batch_size=2",
            f"train.max_steps={STEPS}",
            f"checkpoint.interval={SAVE}",
            "tracking.enabled=false",
            "train.log_interval=1",
            "eval.max_docs=1",
        ],
    )
    proc = start(cmd, log=tmp_path / "killed.log")
    wait_for_step(run_dir, KILL_AT, proc)
    kill_group(proc, signal.SIGKILL)
    first = steps(run_dir)
    killed_at = first[-1]["step"]
    assert KILL_AT <= killed_at < STEPS, killed_at
    run(cmd, timeout=300)
    again = steps(run_dir)[len(first) :]
    assert [r["step"] for r in again] == list(range(SAVE + 1, STEPS + 1)), "the relaunch did not resume at SAVE"
    before = {r["step"]: r["loss"] for r in first if r["step"] > SAVE}
    after = {r["step"]: r["loss"] for r in again if r["step"] <= killed_at}
    assert before.keys() == after.keys() and len(before) >= KILL_AT - SAVE
    assert before == after, {s: (before[s], after[s]) for s in before if before[s] != after[s]}
    # The checkpoint holds both sources' positions; both were drawn from.
    state = load_torch_file(run_dir / "checkpoints" / f"step_{STEPS:08d}" / "rank_00000.pt")["streams"]
    assert [s["name"] for s in state["sources"]] == ["web", "code"] and all(s["drawn"] > 0 for s in state["sources"])
