"""`mnemo launch --slurm` on a real two-node SLURM cluster (this host, see slurm_cluster.py).

One job does both things the launcher promises: it trains the debug config
across both nodes (one rank each) and writes checkpoints; then a preemption
notice (`scancel --batch --signal=USR1`, what `--signal=B:USR1@T` sends)
makes it save, requeue itself and resume from that checkpoint to completion.

Where the cluster's nodes are namespace nodes (own address each), the test
also checks that each node's rank runs in that node's namespace and that
rank 1 talks to rank 0 over the veths, from n2's address to n1's; on the
127.0.0.1 fallback it prints why (``SlurmCluster.note``).
"""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.integration.jobs import DEBUG_CONFIG, PY, job_env, mlflow_runs, run, steps
from tests.integration.netns_nodes import netns_pids
from tests.integration.slurm_cluster import NODES
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


def _workers(ns: str) -> list[int]:
    """pids of mnemo's rank processes in network namespace ``ns``."""
    out = []
    for pid in netns_pids(ns):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        # The rank itself (python -u -m mnemo.launch.worker ...), not torchrun, whose arguments end with it too.
        if b"mnemo.launch.worker" in cmd and b"torch.distributed.run" not in cmd:
            out.append(pid)
    return out


def _tcp_peers(pid: int) -> set[tuple[str, str]]:
    """(local address, remote address) of the established IPv4 TCP connections in ``pid``'s network namespace."""
    peers = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] != "01":  # TCP_ESTABLISHED
            continue
        # "0100007F:1F90": the address as a little-endian hex u32, then the port
        local, remote = (socket.inet_ntoa(struct.pack("<I", int(a.split(":")[0], 16))) for a in f[1:3])
        peers.add((local, remote))
    return peers


def _check_ranks_on_their_nodes(cluster) -> None:
    """Each node's rank runs in that node's namespace; rank 1 (n2) holds connections to rank 0's node (n1)."""
    workers = {n: _workers(cluster.nodes.nodes[i].ns) for i, n in enumerate(NODES)}
    assert all(len(w) == 1 for w in workers.values()), f"rank processes per node: {workers}"
    a1, a2 = cluster.addrs["n1"], cluster.addrs["n2"]
    peers = _tcp_peers(workers["n2"][0])
    assert (a2, a1) in peers, f"no connection from n2 ({a2}) to n1 ({a1}) in n2's namespace: {sorted(peers)}"


def test_slurm_job_trains_on_two_nodes_then_preempts_requeues_and_resumes(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    cluster = slurm_cluster
    where = "namespace nodes" if cluster.nodes is not None else cluster.note or "127.0.0.1"
    print(f"\nSLURM nodes {cluster.addrs} ({where})")
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
        env=job_env(SLURM_CONF=str(cluster.conf), **cluster.job_env),
        timeout=60,
    )
    t0 = time.time()
    m = re.search(r"^submitted job (\d+)$", res.stdout, re.M)
    assert m, res.stdout + res.stderr
    job = m.group(1)
    # scontrol prints "2" or, once the job has been (re)scheduled, the range "2-2"
    assert cluster.job_field(job, "NumNodes").split("-")[0] == "2"

    # Past the first checkpoint, send the preemption notice to the batch shell.
    _wait_for_step(cluster, job, run_dir, 6, timeout=420)
    if cluster.nodes is not None:
        _check_ranks_on_their_nodes(cluster)
    cluster.cmd(["scancel", "--batch", "--signal=USR1", job])
    state = cluster.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=600)
    out = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", out[-5000:]
    print(f"job {job}: submitted to COMPLETED (preempted, requeued, resumed) in {time.time() - t0:.1f} s")
    assert cluster.job_field(job, "Restarts") == "1"

    # The batch script forwarded the signal, saw the marker, requeued; the second start ran to the end.
    assert "SLURM_RESTART_COUNT=0, 2 node(s)" in out and "SLURM_RESTART_COUNT=1, 2 node(s)" in out
    # Both starts met at n1's NodeAddr (its namespace address where the nodes are namespace nodes).
    assert out.count(f"rendezvous {cluster.addrs['n1']}:") == 2, out[-3000:]
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

    # MLflow: the requeued start continued the first start's run; every logged step once (log_interval 5, and
    # the preempted step k: the stop logs the steps since the last log before its checkpoint).
    client, runs = mlflow_runs(run_dir)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    hist = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == sorted(set(range(5, MAX_STEPS + 1, 5)) | {k})
    assert runs[0].info.status == "FINISHED"
