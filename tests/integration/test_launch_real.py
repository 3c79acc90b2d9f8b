"""Real training through `mnemo launch`: two nodes on one host through the hostfile target.

- The hostfile target with two "hosts" (a stand-in ssh that runs the remote
  command locally), one rank each, ZeRO-3: each node runs `mnemo launch
  --nnodes 2 --node-rank I --master-addr ...` (node 1 first: order must not
  matter), and the job's per-step losses equal those of the shared one-node
  two-rank reference run (conftest.reference_run) bit for bit. Each "node"
  gets its own /dev/shm (a private mount namespace): mosaicml-streaming keys
  its shared memory per host, so two nodes on one host would otherwise collide.
(`--max-restarts` with a worker killed mid-run: test_tracking_job.py.)
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.jobs import (
    DEBUG_CONFIG,
    PY,
    REFERENCE_STEPS,
    data_of,
    job_env,
    losses_by_step,
    reference_overrides,
    user_project_dir,
)
from tests.integration.slurm_cluster import PRIVATE_SHM

pytestmark = pytest.mark.integration

# Stand-in for ssh: every host is this machine, each in its own /dev/shm; the
# remote commands are recorded, and node 0 starts 1 s late (order must not matter).
FAKE_SSH = """#!/bin/bash
while [ "$1" = -o ]; do shift 2; done
[ "$1" = -- ] && shift
host="$1"; shift
echo "$host: $*" >> "$(dirname "$0")/ssh.log"
case "$*" in *"--node-rank 0 "*) sleep 1;; esac
exec {private_shm} bash -c "$*"
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], log: Path, env: dict, prefix: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*prefix, PY, "-m", "mnemo", "launch", DEBUG_CONFIG, *args],
        cwd=user_project_dir(),
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


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


def test_two_nodes_through_the_hostfile_match_one_node(reference_run, tmp_path):
    """Two launchers on 127.0.0.1 through a fake ssh: the hostfile launch where namespace nodes can't be made.

    Where they can, test_netns_nodes.py runs the same comparison over real ssh between two network
    namespaces (own addresses, sshd and /dev/shm), and this weaker copy is skipped (suite time)."""
    from tests.integration.netns_nodes import NetnsNodes

    if NetnsNodes.prerequisites_missing() is None:
        pytest.skip("covered by test_netns_nodes.py::test_two_nodes_over_real_ssh_match_one_node (real ssh)")
    if subprocess.run(PRIVATE_SHM + ["true"], capture_output=True).returncode != 0:
        pytest.skip("cannot give each node its own /dev/shm here (unshare --mount needs root)")
    ref = reference_run(3)  # one node, two ranks, ZeRO-3
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "ssh").write_text(FAKE_SSH.format(private_shm=shlex.join(PRIVATE_SHM)))
    (fakebin / "ssh").chmod(0o755)
    (tmp_path / "hosts").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = job_env(NCCL_DEBUG="WARN", PATH=f"{fakebin}:{os.environ['PATH']}")
    two, log = tmp_path / "two", tmp_path / "hostfile.out"
    p = _launch(
        [
            "--hostfile",
            str(tmp_path / "hosts"),
            "--master-port",
            str(_free_port()),
            *reference_overrides(
                data_of(ref), two, 3, "checkpoint.interval=0", "eval.max_docs=1", "eval.max_doc_tokens=128"
            ),
        ],
        log,
        env,
    )
    _finish([p], [log], timeout=600)

    # The same two-operand reductions in the same order as on one node: equal, not close.
    want, got = losses_by_step(ref), losses_by_step(two)
    assert sorted(got) == list(range(1, REFERENCE_STEPS + 1))
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}

    # Per-node logs with rank-prefixed lines; host-prefixed lines on the console; each node was
    # started with the multi-node flags and the launcher's forwarded environment.
    # (The rendezvous may give either node global rank 0.)
    ranks = set()
    for node, host in enumerate(("localhost", "127.0.0.1")):
        node_log = (two / "logs" / f"node{node}.log").read_text()
        assert f"[launch node{node}] start" in node_log
        m = re.search(rf"\[rank([01])\]: mnemo worker: node {node}/2, rank \1/2, local_rank 0, restart 0", node_log)
        assert m, node_log[-3000:]
        ranks.add(m.group(1))
        assert f"{host}: [rank{m.group(1)}]: mnemo worker: node {node}/2" in log.read_text()
    assert ranks == {"0", "1"}
    remote = [ln for ln in (fakebin / "ssh.log").read_text().splitlines() if "--node-rank" in ln]
    assert len(remote) == 2 and all("NCCL_DEBUG=WARN" in ln and "--nnodes 2" in ln for ln in remote), remote
