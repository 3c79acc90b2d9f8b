"""The demo pipeline end to end, tiny: stdlib corpus -> shards with passkey documents -> a memory model and a
no-memory baseline trained by real `mnemo launch` jobs -> evaluation -> runs/demo/summary.json (issues 2, 9).

Sizes are cut to seconds (one rank, T=64, 4 steps, 3 passkey trials at D = 1, 2); the
real demo is `make demo`. What is checked is the pipeline and the summary's
shape, not what the model learned.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from mnemo.demo import REPO, run_demo
from mnemo.demo_report import long_context_loss, side_by_side
from mnemo.train.config import flatten, load_config
from tests.integration.jobs import user_project_dir

pytestmark = pytest.mark.integration


def test_demo_configs_differ_only_in_memory_and_run():
    mem = flatten(load_config(REPO / "configs" / "demo.yaml"))
    base = flatten(load_config(REPO / "configs" / "demo_baseline.yaml"))
    differ = {k for k in mem if mem[k] != base.get(k)} | {k for k in base if k not in mem}
    assert differ and all(k.startswith(("run.", "memory.")) for k in differ), sorted(differ)
    assert mem["memory.long.kind"] == "knn" and mem["memory.short.length"] > 0
    assert base["memory.long.kind"] == "none" and base["memory.short.length"] == 0
    assert mem["zero.stage"] == 2 and mem["train.answer_weight"] > 1


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    lines: list[str] = []
    # Run from a user's project folder whose train.py, model.py, model/ must never be imported.
    cwd = os.getcwd()
    os.chdir(user_project_dir())
    try:
        # One rank per run: what is checked here is the pipeline; 2-rank launches are test_launch_real's.
        summary = run_demo(
            str(out),
            minutes=4,
            echo=lines.append,
            corpus_files=12,
            passkey_docs=40,
            vocab_size=512,
            max_steps=4,
            passkey_trials=3,
            distances=(1, 2),
            eval_docs=2,
            eval_reserve_s=10,
            nproc_per_node=1,
            overrides=[
                "model.segment_len=64",
                "train.batch_size=2",
                "train.log_interval=2",
                "train.warmup_steps=2",
                "train.passkey.fraction=0.8",
            ],
        )
    finally:
        os.chdir(cwd)
    return out, summary, lines


def _check_eval(ev: dict, T: int) -> None:
    lbp = ev["loss_by_position"]
    assert "0" in lbp and all(k.isdigit() and int(k) % T == 0 for k in lbp)
    assert all(math.isfinite(v) and v > 0 for v in lbp.values())
    assert set(ev["passkey"]) == {"1", "2"} and all(0.0 <= a <= 1.0 for a in ev["passkey"].values())
    assert ev["passkey_trials"] == 3


def test_demo_writes_summary(demo):
    out, summary, lines = demo
    path = out / "summary.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["segment_len"] == 64 == summary["segment_len"]
    for name in ("memory", "baseline"):
        _check_eval(on_disk[name], 64)
    # Same documents for both models; the memory model adds ablation columns.
    assert on_disk["memory"]["tokens_by_position"] == on_disk["baseline"]["tokens_by_position"]
    assert set(on_disk["memory"]["ablations"]) == {"memory", "no_ltm", "no_stm", "no_memory"}
    # The memory model's store was sized for the longest passkey document (D=2: 2 segments).
    assert on_disk["memory"]["ltm_capacity"] >= 2 * 64 and on_disk["baseline"]["ltm_capacity"] == 0
    # Same number of steps, both checkpoints and MLflow runs exist.
    assert on_disk["steps"] == {"memory": 4, "baseline": 4}
    # Both runs also train on passkey episodes (train.passkey.fraction 0.8 of 4 steps: 3).
    assert on_disk["passkey_curriculum"]["memory"]["episode_steps"] == 3
    assert on_disk["passkey_curriculum"]["baseline"]["episode_steps"] == 3
    for name in ("memory", "baseline"):
        run = on_disk["runs"][name]
        assert (Path(run["checkpoint"]) / "COMPLETE").is_file() and run["mlflow_run_id"]
    assert isinstance(on_disk["targets"]["loss_ge_4T_memory_lower"], bool)
    # Intervals beside every figure: Wilson for accuracies, document bootstrap for losses, paired differences.
    mem = on_disk["memory"]
    for name in ("memory", "baseline"):
        ev = on_disk[name]
        assert set(ev["passkey_lo"]) == set(ev["passkey_hi"]) == {"1", "2"}
        assert all(ev["passkey_lo"][D] <= a <= ev["passkey_hi"][D] for D, a in ev["passkey"].items())
        assert set(ev["loss_by_position_lo"]) == set(ev["loss_by_position"]) and "doc_loss_sums" not in ev
    assert set(mem["memory_minus"]) == {"no_ltm", "baseline"}
    assert set(mem["memory_minus"]["baseline"]) == set(mem["loss_by_position"])
    text = "\n".join(lines)
    assert f"summary: {path}" in text and "mlflow ui --backend-store-uri sqlite:///" in text
    assert "passkey exact match" in text and "[0, 64)" in text
    assert "memory 95% CI" in text and "mem - baseline [95% CI]" in text


def test_demo_mlflow_holds_both_runs_with_eval(demo):
    out, summary, _ = demo
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    for name in ("memory", "baseline"):
        run = client.get_run(summary["runs"][name]["mlflow_run_id"])
        assert run.info.run_name == f"demo-{name}"
        assert "train/loss" in run.data.metrics and "demo/passkey_d2" in run.data.metrics


def test_side_by_side_and_long_context_loss():
    ev = {
        "loss_by_position": {"0": 3.0, "64": 2.0, "256": 1.0, "512": 2.0},
        "tokens_by_position": {"0": 10, "64": 10, "256": 30, "512": 10},
        "loss": 2.0,
        "passkey": {"8": 1.0},
        "passkey_digit_accuracy": {"8": 1.0},
        "passkey_trials": 3,
    }
    # Tokens with >= 4T = 256 preceding tokens: (1.0 * 30 + 2.0 * 10) / 40.
    assert long_context_loss(ev, 256) == pytest.approx(1.25)
    text = side_by_side({"segment_len": 64, "memory": ev, "baseline": ev})
    assert "[256, 512)" in text and ">= 256 (4T)" in text and "1.000" in text
