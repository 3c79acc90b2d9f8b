"""Real nodes on one machine (tests/integration/netns_nodes.py): own address, /dev/shm and sshd each.

One set of three namespace nodes serves the whole module (about 3 s up, 2 s
down); its teardown asserts that no process, namespace or link is left.

- the harness itself: each node reaches the others over TCP on its own
  address, sees only its own /dev/shm, and answers real ssh with the key;
- the hostfile target over real ssh, gloo across the veth network: two nodes
  x one rank give the per-step losses of the shared one-node two-rank
  reference run (conftest.reference_run) bit for bit;
- node loss (every process of one node SIGKILLed mid-step, and separately
  its link cut): the job ends within checkpoint.collective_timeout_s plus a
  margin, with a line naming the lost node, no process left on any node, and
  the same command relaunched resumes from the last complete checkpoint with
  the uninterrupted run's losses.
"""

from __future__ import annotations

import os
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
from tests.integration.netns_nodes import INNER_IF, NetnsNodes, NetnsUnavailable

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    harness = NetnsNodes(3, tmp_path_factory.mktemp("netns"))
    try:
        harness.start()
    except NetnsUnavailable as e:
        pytest.skip(f"no namespace nodes here: {e}")
    yield harness
    harness.close(check=True)  # raises if a process, namespace or link is left


def _port() -> int:
    # The namespaces are fresh: any port is free there; vary it so a test's TIME_WAIT never meets the next.
    return 20000 + int.from_bytes(os.urandom(2), "little") % 20000


def _launch(nodes: NetnsNodes, hosts: Path, run_dir: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    env = job_env(GLOO_SOCKET_IFNAME=INNER_IF, PATH=f"{nodes.ssh_bin}:{os.environ['PATH']}")
    return subprocess.Popen(
        [PY, "-m", "mnemo", "launch", DEBUG_CONFIG, "--hostfile", str(hosts), "--master-port", str(_port())]
        + overrides,
        cwd=user_project_dir(),
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _no_job_left(nodes: NetnsNodes, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while any(nodes.job_pids(i) for i in range(nodes.n)) and time.time() < deadline:
        time.sleep(0.1)
    left = {i: nodes.job_pids(i) for i in range(nodes.n) if nodes.job_pids(i)}
    assert not left, f"processes left on nodes: {left}"


def test_namespace_nodes_have_own_address_shm_and_sshd(nodes):
    assert len(set(nodes.addrs)) == 3
    marker = f"mnemo-netns-{os.getpid()}"
    r = nodes.ssh(0, f"touch /dev/shm/{marker} && ls /dev/shm")
    assert r.returncode == 0 and marker in r.stdout, r.stderr
    assert not os.path.exists(f"/dev/shm/{marker}")  # not the machine's /dev/shm ...
    for i in (1, 2):  # ... nor another node's
        r = nodes.ssh(i, f"hostname; test -e /dev/shm/{marker} && echo shared; ip -o -4 addr show {INNER_IF}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == f"node{i}" and "shared" not in r.stdout and nodes.addrs[i] in r.stdout
    # Node 2 reaches node 1's sshd on node 1's address, through the bridge.
    probe = f'{PY} -c \'import socket; socket.create_connection(("{nodes.addrs[1]}", 22), 5).close(); print("ok")\''
    r = nodes.ssh(2, probe)
    assert r.stdout.strip() == "ok", r.stderr
    # Nothing is left running on any node after ssh sessions end.
    _no_job_left(nodes)


def test_two_nodes_over_real_ssh_match_one_node(nodes, reference_run, tmp_path):
    ref = reference_run(3)  # one node, two ranks, ZeRO-3
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{nodes.addrs[0]} slots=1\n{nodes.addrs[1]} slots=1\n")
    run_dir, log = tmp_path / "two", tmp_path / "launch.out"
    p = _launch(
        nodes,
        hosts,
        run_dir,
        reference_overrides(
            data_of(ref), run_dir, 3, "checkpoint.interval=0", "eval.max_docs=1", "eval.max_doc_tokens=128"
        ),
        log,
    )
    try:
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 0, log.read_text()[-4000:]
    want, got = losses_by_step(ref), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, REFERENCE_STEPS + 1))
    assert got == want, {s: (got[s], want[s]) for s in got if got[s] != want[s]}
    out = log.read_text()
    for i in (0, 1):  # each rank ran on its own node, which got there over ssh
        assert f"{nodes.addrs[i]}: [rank" in out and f"mnemo worker: node {i}/2" in out
    _no_job_left(nodes)
