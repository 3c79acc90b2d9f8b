"""The node launcher and the hostfile orchestrator with stand-in workers.

Real torchrun, real signals, real rendezvous; each rank runs a tiny module
(written below) instead of the trainer, so these take seconds. The real
training runs are in test_launch_real.py and test_launch_slurm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mnemo.launch.env import package_root

pytestmark = pytest.mark.integration

FAKE_WORKER = """
import os, signal, sys, time
rank = os.environ["RANK"]
restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
out = os.environ["FAKE_OUT"]
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
print(f"fake rank {rank} restart {restart} pid {os.getpid()} ready", flush=True)
open(os.path.join(out, f"ready.{rank}.{restart}"), "w").close()
if os.environ.get("FAKE_FAIL") == f"{rank}.{restart}":
    sys.exit(3)
if os.environ.get("FAKE_USER_ERROR") == rank:  # what a rank's exit_status does with a UserError
    print("mnemo: error: data.sources: every source with a weight > 0 reached its max_epochs", file=sys.stderr)
    sys.exit(2)
deadline = time.time() + float(os.environ.get("FAKE_WAIT", "60"))
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.3)  # a second delivery of the signal would land here
open(os.path.join(out, f"got.{rank}.{restart}"), "w").write(",".join(got))
print(f"fake rank {rank} got {','.join(got) or 'nothing'}", flush=True)
"""

NODE = """
import sys
from pathlib import Path
from mnemo.launch.torchrun import NodePlan
from mnemo.launch.local import run_node
from mnemo.train.errors import exit_status
nnodes, node_rank, port, restarts, nproc = (int(a) for a in sys.argv[1:6])
plan = NodePlan(config="c.yaml", overrides=[], run_dir=Path(sys.argv[6]), nproc_per_node=nproc, nnodes=nnodes,
                node_rank=node_rank, master_addr="127.0.0.1", master_port=port, rdzv_id="fake",
                max_restarts=restarts, worker_module="fakeworker")
# As `mnemo launch` runs it (the CLI's exit_status: a Ctrl-C that stopped the job is "mnemo: interrupted", 130).
sys.exit(exit_status(lambda: run_node(plan, stop_on_stdin_eof="--stdin" in sys.argv)))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake(tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "fakeworker.py").write_text(FAKE_WORKER)
    (tmp_path / "node.py").write_text(NODE)
    (tmp_path / "out").mkdir()
    env = dict(os.environ, PYTHONPATH=f"{package_root()}:{tmp_path / 'mods'}", FAKE_OUT=str(tmp_path / "out"))
    return tmp_path, env


def _node(tmp: Path, env: dict, *, nnodes=1, node_rank=0, port=29500, restarts=0, nproc=2, stdin=False, **extra):
    argv = [
        sys.executable,
        str(tmp / "node.py"),
        str(nnodes),
        str(node_rank),
        str(port),
        str(restarts),
        str(nproc),
        str(tmp / "run"),
    ]
    if stdin:
        argv.append("--stdin")
    return subprocess.Popen(
        argv,
        cwd=tmp,
        env=dict(env, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        text=True,
    )


def _wait_files(d: Path, pattern: str, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while len(list(d.glob(pattern))) < n:
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) early:\n{proc.stdout.read()}")
        assert time.time() - t0 < timeout, f"{pattern}: {len(list(d.glob(pattern)))}/{n} after {timeout}s"
        time.sleep(0.1)


def test_usr1_reaches_each_worker_and_the_job_ends_cleanly(fake):
    tmp, env = fake
    p = _node(tmp, env)
    _wait_files(tmp / "out", "ready.*", 2, p)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    for r in (0, 1):
        assert (tmp / "out" / f"got.{r}.0").read_text() == "USR1"  # not killed by torchrun: they exited on their own
    log = (tmp / "run/logs/node0.log").read_text()
    assert log == out, "the node log holds exactly what the console showed"
    assert "[launch node0] got SIGUSR1: sent SIGUSR1 to 2 worker(s)" in log
    assert "[rank0]: fake rank 0 got USR1" in log and "[rank1]: fake rank 1 got USR1" in log
    assert "[launch node0] torchrun exited with code 0" in log


def test_sigterm_stops_workers_with_sigterm(fake):
    # SIGINT and SIGHUP take the same path (SIGTERM to each worker: save and stop).
    tmp, env = fake
    p = _node(tmp, env)
    _wait_files(tmp / "out", "ready.*", 2, p)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert {(tmp / "out" / f"got.{r}.0").read_text() for r in (0, 1)} == {"TERM"}
    assert "[launch node0] got SIGTERM: sent SIGTERM to 2 worker(s)" in out


def test_two_quick_sigints_stop_everything_without_a_traceback(fake):
    """Ctrl-C twice (or once through `timeout`, which passes it on): the second SIGINT landed while the first
    one's handler was importing psutil, the nested handler crashed the launcher with an AttributeError, and
    torchrun and its ranks (in a session of their own) went on running with nobody watching them."""
    import psutil

    tmp, env = fake
    p = _node(tmp, env, FAKE_WAIT="120")
    _wait_files(tmp / "out", "ready.*", 2, p)
    workers = psutil.Process(p.pid).children(recursive=True)
    p.send_signal(signal.SIGINT)
    time.sleep(0.002)  # into the first handler (two at once may merge into one delivery: a clean stop)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=60)
    assert "Traceback" not in out, out
    assert "got SIGINT: sent SIGTERM to 2 worker(s)" in out
    assert p.returncode == 130 and out.endswith("mnemo: interrupted\n"), out  # was 137, no such line
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"left running: {alive}"


def test_a_killed_launcher_takes_torchrun_and_its_workers_with_it(fake):
    """kill -9 (or the OOM killer) of the node launcher left torchrun, in a session of its own, and its ranks
    training with nobody reading them, holding run.lock; torchrun ignores SIGTERM, so a plain kill did not
    stop it. Now torchrun gets SIGINT when the launcher dies and passes it to its workers (the trainer saves
    and stops on it; these stand-ins just die)."""
    import psutil

    tmp, env = fake
    p = _node(tmp, env, FAKE_WAIT="120")
    _wait_files(tmp / "out", "ready.*", 2, p)
    tree = psutil.Process(p.pid).children(recursive=True)  # torchrun and its 2 workers
    assert len(tree) == 3
    p.kill()
    p.wait(timeout=10)
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"left running: {alive}"


def test_max_restarts_restarts_the_group_and_logs_it(fake):
    tmp, env = fake
    p = _node(tmp, env, restarts=1, FAKE_FAIL="1.0", FAKE_WAIT="0.5")
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 0, out
    assert "[rank1]: fake rank 1 restart 0" in out and "[rank1]: fake rank 1 restart 1" in out
    assert sorted(f.name for f in (tmp / "out").glob("ready.*")) == ["ready.0.0", "ready.0.1", "ready.1.0", "ready.1.1"]


def test_a_ranks_user_error_reaches_the_console_as_one_line_and_the_node_exits_2(fake):
    """Was: the rank's one line, then torchrun's ChildFailedError traceback, and exit 1 (train alone: exit 2)."""
    tmp, env = fake
    p = _node(tmp, env, FAKE_USER_ERROR="1", FAKE_WAIT="30")
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 2, out
    assert "[rank1]: mnemo: error: data.sources: every source" in out
    assert "Traceback" not in out and "ChildFailedError" not in out, out
    assert "[rank0]: fake rank 0 restart 0" in out  # the other ranks' lines still reach the console
    log = (tmp / "run" / "logs" / "node0.log").read_text()
    assert "ChildFailedError" in log and "torchrun exited with code 1" in log  # torchrun's report is kept there
    assert out.rstrip().endswith(f"torchrun's report of it is in {tmp / 'run' / 'logs' / 'node0.log'}"), out


def test_hostfile_orchestrator_runs_and_stops_every_node(fake):
    """Two 'hosts' over a stand-in ssh, one rank each, rendezvous on 127.0.0.1.

    SIGTERM to the orchestrator closes each node's ssh stdin; each node
    launcher then sends SIGTERM to its worker.
    """
    from mnemo.launch.remote import NodeCommand

    tmp, env = fake
    ssh = tmp / "ssh"
    ssh.write_text(
        textwrap.dedent("""\
        #!/bin/bash
        while [ "$1" = -o ]; do shift 2; done
        [ "$1" = -- ] && shift
        shift  # the host
        exec bash -c "$*"
    """)
    )
    ssh.chmod(0o755)
    port = _free_port()
    cmds = [
        NodeCommand(f"host{i}", i, f"cd {tmp} && exec {sys.executable} node.py 2 {i} {port} 0 1 {tmp / 'run'} --stdin")
        for i in (0, 1)
    ]
    script = tmp / "orch.py"
    script.write_text(
        textwrap.dedent(f"""\
        import sys
        from mnemo.launch.remote import NodeCommand, run_hostfile
        cmds = [NodeCommand(h, i, r) for h, i, r in {[(c.host, c.node_rank, c.remote) for c in cmds]!r}]
        sys.exit(run_hostfile(cmds, {str(ssh)!r}))
    """)
    )
    p = subprocess.Popen(
        [sys.executable, str(script)], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_files(tmp / "out", "ready.*", 2, p)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 0, out
    assert {(tmp / "out" / f"got.{r}.0").read_text() for r in (0, 1)} == {"TERM"}
    assert "host0: [launch node0] start" in out and "host1: [launch node1] start" in out
    ranks = set()
    for i in (0, 1):
        log = (tmp / f"run/logs/node{i}.log").read_text()
        assert "stdin closed (launcher gone): sent SIGTERM to 1 worker(s)" in log
        lines = [ln for ln in log.splitlines() if "fake rank" in ln and "ready" in ln]
        assert len(lines) == 1
        ranks.add(lines[0].split("]")[0])  # "[rankN"
    assert ranks == {"[rank0", "[rank1"}, "each node ran one of the two global ranks"
