"""mnemo.train.tracking against a real `mlflow server` that dies mid-run and comes back.

Also home of `MlflowServer` and of the `mlflow_server` fixture, the one
tracking server that the tracking tests share (import it with
`from tests.integration.test_tracking_server import mlflow_server`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnemo.train.tracking import HTTP_ENV_DEFAULTS, Tracker

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A `mlflow server` subprocess (sqlite backend, local artifacts) that can be stopped and restarted on its port."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        cmd = [
            MLFLOW,
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # The job runner starts ~8 huey worker processes: 3x slower start, unused here.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "ab")
        # Own session: stop() kills the server's whole process group (uvicorn child included).
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.root
        )
        log.close()
        deadline = time.monotonic() + timeout
        import requests

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: see {self.root / 'server.log'}")
            try:
                if requests.get(self.uri + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server not up after {timeout} s: see {self.root / 'server.log'}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server (SIGKILL by default: a crash, not a graceful shutdown)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None


_SHARED: list[MlflowServer] = []


@pytest.fixture
def mlflow_server(session_tmp) -> MlflowServer:
    """The test session's one `mlflow server`, up.

    Started on first use (its start-up, ~10-30 s on 2 cores, is paid once per
    session) and killed when the session's process exits. A test that stops
    it for an outage starts it again on the same port; one that fails with
    it down gets it restarted here. Each test logs to its own experiment.
    """
    if not _SHARED:
        # A session folder: a module's made-folders go at its end (tests/conftest.py), and the server outlives it.
        _SHARED.append(MlflowServer(session_tmp("mlflow_server")))
        atexit.register(_SHARED[0].stop)
    server = _SHARED[0]
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    return server


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_server_dies_and_returns_nothing_lost(mlflow_server, tmp_path, monkeypatch, caplog):
    for k, v in HTTP_ENV_DEFAULTS.items():  # what launch/ puts in the job's environment
        monkeypatch.setenv(k, v)
    server = mlflow_server
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train:\n  lr: 0.001\n")
    (run_dir / "late.txt").write_text("logged while the server was down\n")
    with caplog.at_level(logging.WARNING, logger="mnemo.train.tracking"):
        t = Tracker(
            run_dir=str(run_dir), uri=server.uri, experiment="it", run_name="outage", interval=0.1, retry_interval=0.5
        )
        assert t.run_id
        t.log_params({"train": {"lr": 0.001, "max_steps": 90}})
        t.log_artifact(str(run_dir / "config.yaml"))

        def steps(first: int, last: int) -> None:
            for step in range(first, last + 1):
                t.log_metrics({"train/loss": 1.0 / step, "train/tokens_seen": 64.0 * step}, step=step)
                time.sleep(0.01)

        steps(1, 30)
        t.flush()
        server.stop()  # the server crashes mid-run
        t0 = time.perf_counter()
        steps(31, 60)
        t.log_artifact(str(run_dir / "late.txt"))
        t.flush()
        outage_loop_s = time.perf_counter() - t0
        server.start()  # back on the same port
        steps(61, 90)
        t.close()
    assert outage_loop_s < 5, f"logging blocked while the server was down ({outage_loop_s:.1f} s)"

    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001", "train.max_steps": "90"}
    for key in ("train/loss", "train/tokens_seen"):
        got = sorted(m.step for m in client.get_metric_history(t.run_id, key))
        assert got == list(range(1, 91)), key  # every step, each once
    assert {a.path for a in client.list_artifacts(t.run_id)} == {"config.yaml", "late.txt"}
    # Points logged during the outage were also written to the fallback file.
    recs = [json.loads(line) for line in open(run_dir / "logs" / "metrics_fallback.jsonl")]
    spilled = {r["step"] for r in recs if r["key"] == "train/loss" and r["run_id"] == t.run_id}
    assert set(range(31, 61)) <= spilled
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages


_KILLED_TRAINER = """
import os, signal, sys, time
from mnemo.train.tracking import Tracker
t = Tracker(run_dir=sys.argv[1], uri=sys.argv[2], experiment="killed", interval=60)  # sends nothing before the kill
print(t.run_id, flush=True)
for step in range(1, 51):
    t.log_metrics({"train/loss": 1.0 / step}, step=step)
time.sleep(1)  # a step's worth of time: the points reach the sender process (not MLflow yet)
os.kill(os.getpid(), signal.SIGKILL)  # no flush, no close
"""


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_trainer_killed_sender_still_delivers(mlflow_server, tmp_path):
    run_dir = tmp_path / "run"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_TRAINER, str(run_dir), mlflow_server.uri],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_id = proc.stdout.split()[0]
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    deadline = time.monotonic() + 30
    while True:  # the orphaned sender finishes on its own
        steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
        if steps == list(range(1, 51)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert steps == list(range(1, 51))
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody said it finished
