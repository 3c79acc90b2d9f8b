"""The node launcher (launch/local.py) against torchrun's ends it cannot see coming: stand-ins for torchrun."""

from __future__ import annotations

import io
import sys
import time

import pytest

from mnemo.launch import local
from mnemo.launch.local import NodeRunner
from mnemo.launch.torchrun import NodePlan

# A rank: leaves its exit code as launch/worker.py does, then exits with it.
WORKER = """
import os, sys
from mnemo.launch.worker import report_exit
code = int(sys.argv[1])
print("[rank0]: worker done", flush=True)
report_exit(code, os.environ)
sys.exit(code)
"""
# torchrun of a two-node job whose other node died: its worker exits, then it waits in its exit barrier (300 s
# in torch) and says so in a traceback when that times out.
BARRIER_TORCHRUN = """
import subprocess, sys, time
code = subprocess.call([sys.executable, "-c", sys.argv[1], sys.argv[2]])
if code:
    time.sleep(5)  # torchrun's stop and exit after a failed worker (or its rendezvous for a restart)
    print("torchrun: worker failed", flush=True)
    sys.exit(1)
time.sleep(2)
print("E1205 api.py:1008] Error waiting on exit barrier. Elapsed: 300.1 seconds", flush=True)
print("E1205 api.py:1008] Traceback (most recent call last):", flush=True)
time.sleep(300)
"""


def _run(tmp_path, monkeypatch, worker_code: int, nnodes: int = 2):
    monkeypatch.setattr(local, "EXIT_BARRIER_GRACE_S", 3.0)
    monkeypatch.setattr(
        local,
        "torchrun_command",
        lambda plan, log_dir: [sys.executable, "-c", BARRIER_TORCHRUN, WORKER, str(worker_code)],
    )
    plan = NodePlan(
        config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1, nnodes=nnodes
    )
    console = io.StringIO()
    start = time.monotonic()
    rc = NodeRunner(plan, console=console).run()
    return rc, time.monotonic() - start, console.getvalue().splitlines(), plan.log_path.read_text()


def test_the_exit_barrier_of_a_lost_node_is_not_waited_for(tmp_path, monkeypatch):
    # Was: after its workers saved and exited 0, the launcher waited on torchrun's exit barrier for the killed
    # node's agent (300 s), then printed torchrun's 11-line "Error waiting on exit barrier" traceback.
    rc, took, shown, log = _run(tmp_path, monkeypatch, 0)
    assert rc == 0  # the workers' outcome
    assert took < 30, took
    assert "[launch node0] another node left the job; not waiting for its exit barrier" in shown
    assert "[rank0]: worker done" in shown
    assert not [line for line in shown if "Error waiting" in line or "Traceback" in line]  # the node log's
    assert "Error waiting on exit barrier" in log and "Traceback" in log


def test_a_failed_worker_leaves_torchrun_to_its_own_end(tmp_path, monkeypatch):
    # After a failure torchrun restarts the group (a rendezvous that may take long) or exits: not cut short.
    rc, took, shown, log = _run(tmp_path, monkeypatch, 1)
    assert rc == 1
    assert "torchrun: worker failed" in shown
    assert not [line for line in shown if "another node" in line]


@pytest.mark.parametrize("nnodes", [1])
def test_one_node_has_no_exit_barrier_to_cut(tmp_path, monkeypatch, nnodes):
    monkeypatch.setattr(local, "EXIT_BARRIER_GRACE_S", 1.0)
    monkeypatch.setattr(
        local,
        "torchrun_command",
        lambda plan, log_dir: [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.call([sys.executable, '-c', sys.argv[1], '0']); time.sleep(3)",
            WORKER,
        ],
    )
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    console = io.StringIO()
    assert NodeRunner(plan, console=console).run() == 0
    assert "another node" not in console.getvalue()


# torchrun of node 1 started without node 0 (its last lines; 86 in all with the C++ frames).
NO_NODE0 = """
import sys
for line in [
    "[E1205 09:16:47.785086839 socket.cpp:1028] [c10d] The client socket has timed out after 60000ms",
    "Traceback (most recent call last):",
    '  File "torch/distributed/elastic/rendezvous/c10d_rendezvous_backend.py", line 156, in _create_tcp_store',
    "torch.distributed.DistNetworkError: The client socket has timed out after 60000ms while trying to connect",
    "torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The connection to the C10d store has "
    "failed. See inner exception for details.",
]:
    print(line, flush=True)
sys.exit(1)
"""
RDZV_TIMEOUT = """
import sys
print("Traceback (most recent call last):", flush=True)
print("torch.distributed.elastic.rendezvous.api.RendezvousTimeoutError", flush=True)
sys.exit(1)
"""
STARTS = """
import sys
print("W1205 torch/distributed/run.py:1 a warning of torchrun's", flush=True)
print("[rank1]: training", flush=True)
print("RendezvousConnectionError in a later re-rendezvous", flush=True)
sys.exit(1)
"""


def _node(tmp_path, monkeypatch, script: str, node_rank: int):
    from mnemo.train.errors import UserError

    monkeypatch.setattr(local, "torchrun_command", lambda plan, log_dir: [sys.executable, "-c", script])
    monkeypatch.setattr(local, "check_port_free", lambda port: None)  # port 29641 may be taken here
    plan = NodePlan(
        config=str(tmp_path / "c.yaml"),
        overrides=[],
        run_dir=tmp_path / "run",
        nproc_per_node=1,
        nnodes=2,
        node_rank=node_rank,
        master_addr="10.0.0.1",
        master_port=29641,
    )
    console = io.StringIO()
    try:
        rc = NodeRunner(plan, console=console).run()
    except UserError as e:
        rc = e
    return rc, console.getvalue().splitlines(), plan.log_path.read_text()


def test_a_node_that_cannot_reach_node_0_says_so_in_one_line(tmp_path, monkeypatch):
    # Was: 86 lines of C++ frames and tracebacks ending in RendezvousConnectionError, exit 1, no mnemo: error.
    err, shown, log = _node(tmp_path, monkeypatch, NO_NODE0, 1)
    assert str(err) == (
        "cannot reach the rendezvous of node 0 at 10.0.0.1:29641 "
        "(is node 0 started, with the same --master-addr and --master-port?)"
    )
    assert [line for line in shown if not line.startswith("[launch node1] start ")] == []
    assert "RendezvousConnectionError" in log and "Traceback" in log and f"mnemo: error: {err}" in log


def test_a_rendezvous_that_times_out_says_so_in_one_line(tmp_path, monkeypatch):
    err, shown, log = _node(tmp_path, monkeypatch, RDZV_TIMEOUT, 0)
    assert str(err).startswith("the rendezvous at 10.0.0.1:29641 timed out before all 2 nodes joined")
    assert len(shown) == 1 and "RendezvousTimeoutError" in log


def test_torchruns_lines_before_the_workers_reach_the_console_once_they_start(tmp_path, monkeypatch):
    rc, shown, log = _node(tmp_path, monkeypatch, STARTS, 1)
    assert rc == 1  # a failure after the workers started is torchrun's to report, as before
    assert shown[1:] == [
        "W1205 torch/distributed/run.py:1 a warning of torchrun's",
        "[rank1]: training",
        "RendezvousConnectionError in a later re-rendezvous",
        "[launch node1] torchrun exited with code 1",
    ]


PORT_TAKEN = """
import sys
print("Traceback (most recent call last):", flush=True)
print("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. "
      "port: 29641, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use", flush=True)
print("torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The connection to the C10d store has "
      "failed. See inner exception for details.", flush=True)
sys.exit(1)
"""


def test_node_0_refuses_a_master_port_in_use_before_starting_torchrun(tmp_path, monkeypatch):
    # Was: two tracebacks (DistNetworkError ... EADDRINUSE, RendezvousConnectionError) and exit 1.
    import socket

    from mnemo.launch.local import run_node
    from mnemo.train.errors import UserError

    def no_start(self, log_dir):
        raise AssertionError("started")

    monkeypatch.setattr(NodeRunner, "_spawn", no_start)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        plan = NodePlan(
            config=str(tmp_path / "c.yaml"),
            overrides=[],
            run_dir=tmp_path / "run",
            nproc_per_node=1,
            nnodes=2,
            master_port=port,
        )
        with pytest.raises(UserError, match=rf"^--master-port {port} is already in use on this host$"):
            run_node(plan)
        assert not plan.log_path.exists()
        plan.node_rank = 1  # not the rendezvous host: its port is node 0's
        with pytest.raises(AssertionError, match="started"):
            run_node(plan)


def test_a_port_left_in_time_wait_is_not_in_use(tmp_path):
    import socket

    from mnemo.launch.local import check_port_free

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server's side closes first: its end of the connection stays in TIME_WAIT
        client.close()
    check_port_free(port)


def test_a_master_port_taken_after_the_check_is_one_line_too(tmp_path, monkeypatch):
    err, shown, log = _node(tmp_path, monkeypatch, PORT_TAKEN, 0)
    assert str(err) == "--master-port 29641 is already in use on this host"
    assert len(shown) == 1 and "EADDRINUSE" in log
