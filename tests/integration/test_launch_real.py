"""Real training through `mnemo launch`: two nodes on one host, hostfile, restarts.

- Two separate `mnemo launch --nnodes 2 --node-rank {0,1}` processes (one rank
  each, ZeRO-3, 10 steps) give the same per-step losses as one node with two
  ranks, started through the hostfile target (a stand-in ssh that runs the
  remote command locally). Each "node" gets its own /dev/shm (a private mount
  namespace): mosaicml-streaming keys its shared memory per host, so two
  nodes on one host would otherwise collide.
- `--max-restarts 1` with one worker killed mid-run: the run completes and
  its step counter never goes back past the last checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.jobs import DEBUG_CONFIG, PY, job_env, user_project_dir, losses_by_step, steps, wait_for_step
from tests.integration.slurm_cluster import PRIVATE_SHM

pytestmark = pytest.mark.integration

FAKE_SSH = """#!/bin/bash
# Stand-in for ssh: every host is this machine.
while [ "$1" = -o ]; do shift 2; done
[ "$1" = -- ] && shift
shift  # the host
exec bash -c "$*"
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log: Path, env: dict, prefix: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, PY, "-m", "mnemo.train.cli", "launch", DEBUG_CONFIG, *args], cwd=user_project_dir(), env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.time() + timeout
    try:
        for p, log in zip(procs, logs):
            rc = p.wait(timeout=max(1, deadline - time.time()))
            assert rc == 0, f"{' '.join(map(str, p.args[-6:]))} exited {rc}:\n{log.read_text()[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_two_nodes_on_one_host_match_one_node(tiny_data, tmp_path):
    if subprocess.run(PRIVATE_SHM + ["true"], capture_output=True).returncode != 0:
        pytest.skip("cannot give each node its own /dev/shm here (unshare --mount needs root)")
    common = [f"data.path={tiny_data}", "zero.stage=3", "train.max_steps=10", "checkpoint.interval=0",
              "eval.max_docs=1", "eval.max_doc_tokens=128"]
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "ssh").write_text(FAKE_SSH)
    (fakebin / "ssh").chmod(0o755)
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    env = job_env(NCCL_DEBUG="WARN")
    one, two = tmp_path / "one", tmp_path / "two"
    port = _free_port()
    procs, logs = [], []
    # One node, two ranks, through the hostfile target (ssh, remote command, env forwarding).
    logs.append(tmp_path / "hostfile.out")
    procs.append(_launch(["--hostfile", str(tmp_path / "hosts"), f"run.dir={one}", *common], logs[-1],
                         dict(env, PATH=f"{fakebin}:{env['PATH']}")))
    # Two nodes, one rank each, started by hand (node 1 first: order must not matter).
    for rank in (1, 0):
        logs.append(tmp_path / f"node{rank}.out")
        procs.append(_launch(["--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                              "--master-port", str(port), "--nproc-per-node", "1", f"run.dir={two}", *common],
                             logs[-1], env, prefix=PRIVATE_SHM))
    _finish(procs, logs, timeout=600)

    ref, got = losses_by_step(one), losses_by_step(two)
    assert sorted(ref) == sorted(got) == list(range(1, 11))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), f"step {s}: {got[s]} != {ref[s]}"
    assert ref[10] < ref[1]

    # Per-node logs with rank-prefixed lines; the hostfile run forwarded NCCL_DEBUG and printed host-prefixed lines.
    for rank in (0, 1):
        log = (two / "logs" / f"node{rank}.log").read_text()
        assert f"[launch node{rank}] start" in log
        assert re.search(rf"\[rank[01]\]: mnemo worker: node {rank}/2, rank [01]/2, local_rank 0, restart 0", log)
    hostfile_out = logs[0].read_text()
    assert "localhost: [rank0]: mnemo worker: node 0/1, rank 0/2" in hostfile_out
    assert (one / "logs" / "node0.log").is_file()


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for c in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "mnemo.launch.worker" in " ".join(c.cmdline()) and c.environ().get("RANK") == str(rank):
                return c.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker of rank {rank} under the launcher")


def test_max_restarts_resumes_from_the_last_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "launch.out"
    p = _launch(["--nproc-per-node", "2", "--max-restarts", "1", f"data.path={tiny_data}", f"run.dir={run}",
                 "train.max_steps=24", "checkpoint.interval=4", "eval.max_docs=1", "eval.max_doc_tokens=128"],
                log, job_env())
    try:
        wait_for_step(run, 6, p)
        os.kill(_worker_pid(p, 1), signal.SIGKILL)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    _finish([p], [log], timeout=600)

    records = steps(run)
    boundary = next(i for i in range(1, len(records)) if records[i]["step"] <= records[i - 1]["step"])
    before, after = records[:boundary], records[boundary:]
    node_log = (run / "logs" / "node0.log").read_text()
    head = node_log[: node_log.index("restart 1")]
    saved_before = [int(s) for s in re.findall(r"saved checkpoint \S*step_0*(\d+)", head)]
    assert saved_before, "no checkpoint was saved before the kill"
    assert after[0]["step"] == max(saved_before) + 1, "resumed from the last complete checkpoint"
    assert after[0]["step"] <= before[-1]["step"] + 1
    assert [r["step"] for r in after] == list(range(after[0]["step"], 25)), "no step skipped, run completed"
    assert "[rank1]: mnemo worker: node 0/1, rank 1/2, local_rank 1, restart 1" in node_log
