"""A real 2-rank `mnemo launch --max-restarts 1` job against a real `mlflow server` that dies and comes back,
then loses a worker and is restarted by torchrun.

One MLflow run per job through both faults: the restarted ranks resume from
the last checkpoint (the step counter never goes back past it, no step is
skipped) and continue the same run, which ends with every logged step once,
holding the value the job computed.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from mlflow import MlflowClient

from tests.integration.jobs import (
    DEBUG_CONFIG,
    PY,
    kill_group,
    launch_worker_pid,
    losses_by_step,
    start,
    steps,
    wait_for_step,
)
from tests.integration.test_tracking_server import mlflow_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

STEPS = 30


@pytest.mark.timeout(600)
def test_one_run_per_job_through_outage_and_worker_restart(mlflow_server, tiny_data, tmp_path):  # noqa: F811
    server = mlflow_server
    run_dir = tmp_path / "run"
    proc = start(
        [
            PY,
            "-m",
            "mnemo",
            "launch",
            DEBUG_CONFIG,
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            f"data.path={tiny_data}",
            f"run.dir={run_dir}",
            f"train.max_steps={STEPS}",
            "train.log_interval=2",
            "checkpoint.interval=10",
            f"tracking.uri={server.uri}",
            "tracking.experiment=job-test",
            "zero.stage=2",
            "eval.max_docs=1",
            "eval.max_doc_tokens=128",
        ],
        log=tmp_path / "launch.out",
    )
    try:
        wait_for_step(run_dir, 6, proc)
        server.stop()  # the tracking server crashes mid-run ...
        wait_for_step(run_dir, 12, proc)
        # ... a worker dies past the checkpoint at step 10 (torchrun restarts both ranks) ...
        os.kill(launch_worker_pid(proc, 1), signal.SIGKILL)
        server.start()  # ... and the server comes back on the same port
        assert proc.wait(timeout=400) == 0, (tmp_path / "launch.out").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            kill_group(proc)

    # The restart resumed right after the last checkpoint written before the kill and ran to the end.
    records = steps(run_dir)
    boundary = next(i for i in range(1, len(records)) if records[i]["step"] <= records[i - 1]["step"])
    before, after = records[:boundary], records[boundary:]
    node_log = (run_dir / "logs" / "node0.log").read_text()
    head = node_log[: node_log.index("restart 1")]
    saved_before = [int(s) for s in re.findall(r"saved checkpoint \S*step_0*(\d+)", head)]
    assert saved_before, "no checkpoint was saved before the kill"
    assert after[0]["step"] == max(saved_before) + 1, "resumed from the last complete checkpoint"
    assert after[0]["step"] <= before[-1]["step"] + 1
    assert [r["step"] for r in after] == list(range(after[0]["step"], STEPS + 1)), "no step skipped, run completed"
    assert "[rank1]: mnemo worker: node 0/1, rank 1/2, local_rank 1, restart 1" in node_log
    assert "resumed from" in node_log[node_log.index("restart 1") :]

    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("job-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "a resumed job must continue its MLflow run"
    r = runs[0]
    deadline = time.time() + 60
    while True:  # points buffered during the outage may still be in flight from the first ranks' sender
        hist = client.get_metric_history(r.info.run_id, "train/loss")
        logged = sorted(m.step for m in hist)
        if logged == list(range(2, STEPS + 1, 2)) or time.time() > deadline:
            break
        time.sleep(1)
    assert logged == list(range(2, STEPS + 1, 2)), f"steps missing or duplicated: {logged}"
    # The values are the per-step losses the job computed (rank-averaged), logged once each.
    losses = losses_by_step(run_dir)
    for m in hist:
        # The same float64 arithmetic on the same values (steps.jsonl keeps every digit; re-done steps
        # equal the first ranks' bit for bit on CPU in fp32): equal, not close.
        window = [losses[s] for s in (m.step - 1, m.step)]
        assert m.value == sum(window) / 2, (m.step, m.value, window)
    params = r.data.params
    for key in ("train.lr", "model.size", "zero_stage", "world_size", "model.num_params", "data.num_documents"):
        assert key in params, key
    assert params["world_size"] == "2"
    metric_keys = set(r.data.metrics)
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "time/data_s",
        "memory/reset_rate",
        "memory/ltm_fill",
        "eval/loss",
    ):
        assert key in metric_keys, key
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "tokenizer.model", "manifest.json"} <= arts, arts
