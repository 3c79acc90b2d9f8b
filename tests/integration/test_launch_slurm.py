"""`mnemo launch --slurm` on a real two-node SLURM cluster (this host, see slurm_cluster.py).

One job does both things the launcher promises: it trains the debug config
across both nodes (one rank each) and writes checkpoints; then a preemption
notice (`scancel --batch --signal=USR1`, what `--signal=B:USR1@T` sends)
makes it save, requeue itself and resume from that checkpoint to completion.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.integration.jobs import DEBUG_CONFIG, PY, job_env, run, steps
from tests.integration.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

MAX_STEPS = 40


def _wait_for_step(cluster, job_id: str, run_dir: Path, step: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in steps(run_dir)):
            return
        state = cluster.job_field(job_id, "JobState")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "COMPLETED"):
            break
        time.sleep(0.1)
    files = sorted((run_dir / "logs").glob("*.log*")) + sorted((run_dir / "logs").glob("*.out"))
    logs = "\n".join(p.read_text()[-3000:] for p in files)
    raise AssertionError(f"job {job_id} ({cluster.job_field(job_id, 'JobState')}) did not reach step {step}:\n{logs}")


def test_slurm_job_trains_on_two_nodes_then_preempts_requeues_and_resumes(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    if not cluster.private_shm:
        pytest.skip("the two SLURM nodes cannot get their own /dev/shm here (mosaicml-streaming would collide)")
    run_dir = tmp_path / "run"
    res = run(
        [
            PY,
            "-m",
            "mnemo",
            "launch",
            DEBUG_CONFIG,
            "--slurm",
            "--nodes",
            "2",
            "--nproc-per-node",
            "1",
            f"data.path={tiny_data}",
            f"run.dir={run_dir}",
            f"train.max_steps={MAX_STEPS}",
            "checkpoint.interval=5",
            "eval.max_docs=1",
            "eval.max_doc_tokens=128",
        ],
        env=job_env(SLURM_CONF=str(cluster.conf)),
        timeout=60,
    )
    m = re.search(r"^submitted job (\d+)$", res.stdout, re.M)
    assert m, res.stdout + res.stderr
    job = m.group(1)
    # scontrol prints "2" or, once the job has been (re)scheduled, the range "2-2"
    assert cluster.job_field(job, "NumNodes").split("-")[0] == "2"

    # Past the first checkpoint, send the preemption notice to the batch shell.
    _wait_for_step(cluster, job, run_dir, 6, timeout=420)
    cluster.cmd(["scancel", "--batch", "--signal=USR1", job])
    state = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=600)
    out = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", out[-5000:]
    assert cluster.job_field(job, "Restarts") == "1"

    # The batch script forwarded the signal, saw the marker, requeued; the second start ran to the end.
    assert "SLURM_RESTART_COUNT=0, 2 node(s)" in out and "SLURM_RESTART_COUNT=1, 2 node(s)" in out
    assert "mnemo: got SIGUSR1, forwarding it to the training processes" in out
    assert f"requeueing job {job}" in out
    assert "mnemo: training exited with code 0" in out
    assert not (run_dir / "PREEMPTED").exists()

    logs = {i: (run_dir / "logs" / f"node{i}.log").read_text() for i in (0, 1)}
    for i, log in logs.items():
        for restart in (0, 1):
            assert re.search(
                rf"mnemo worker: node {i}/2, rank [01]/2, local_rank 0, restart 0, "
                rf"slurm job {job} restart {restart}",
                log,
            )
        assert "got SIGUSR1: sent SIGUSR1 to 1 worker(s)" in log
    both = logs[0] + logs[1]
    saved = re.findall(r"saved checkpoint \S*step_0*(\d+) \(preempted\)", both)
    assert len(saved) == 1, "one checkpoint saved because of the signal"
    k = int(saved[0])
    assert re.search(rf"resumed from \S*step_0*{k} at step {k}", both)

    records = [r["step"] for r in steps(run_dir)]
    first = records[: records.index(k) + 1]
    assert first == list(range(1, k + 1)), "the first start trained up to the preemption checkpoint"
    assert records[len(first) :] == list(range(k + 1, MAX_STEPS + 1)), "the requeued start resumed right after it"
    assert (run_dir / "checkpoints" / "latest").exists()
