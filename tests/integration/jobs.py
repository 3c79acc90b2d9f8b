"""Helpers for integration tests: prepare a tiny corpus, run real multi-process jobs, read their logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
DEBUG_CONFIG = str(REPO / "configs" / "debug.yaml")

# Jobs start from a user's project folder holding the most common file names
# in ML (train.py, model.py, model/, ...): each fails loudly when imported, so
# every launch, SLURM job and demo run below also shows that mnemo never
# imports a bare `train`, `model`, `launch` or `data_pipeline`.
_SHADOWS = (
    "train.py",
    "model.py",
    "model/__init__.py",
    "launch.py",
    "data_pipeline.py",
    "evaluation.py",
    "train/__init__.py",
)


def user_project_dir() -> Path:
    """A folder (made once per process) whose would-be shadowing modules raise on import."""
    import tempfile

    root = Path(tempfile.gettempdir()) / f"mnemo-user-project-{os.getpid()}"
    for name in _SHADOWS:
        f = root / name
        if not f.is_file():
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"raise ImportError('the user\\'s own {name} was imported instead of mnemo')\n")
    return root


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # No PYTHONPATH: jobs find mnemo the way a user's do, through the installed package.
    env.pop("PYTHONPATH", None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def train_cmd(nproc: int, overrides: list[str], config: str = DEBUG_CONFIG) -> list[str]:
    """`mnemo train` under torchrun standalone (one rank: no torchrun)."""
    if nproc == 1:
        return [PY, "-m", "mnemo", "train", config, *overrides]
    return [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "mnemo",
        "train",
        config,
        *overrides,
    ]


def run(
    cmd: list[str], timeout: float = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    res = subprocess.run(
        cmd, cwd=user_project_dir(), env=env or job_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
        )
    return res


def start(cmd: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        cmd, cwd=user_project_dir(), env=env or job_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def steps(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "logs" / "steps.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            pass
    return out


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(r["step"] >= step for r in steps(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a job started with start(), and wait for its leader.

    torchrun's workers run in sessions of their own: with sig = SIGKILL, they
    are killed one by one first (they would outlive torchrun).
    """
    ranks = worker_pids(proc) if sig == signal.SIGKILL and proc.poll() is None else []
    for pid in ranks:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    import psutil

    for pid in ranks:  # gone, not merely signalled, before the test looks at the run directory
        try:
            psutil.Process(pid).wait(timeout=30)
        except psutil.Error:
            pass


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """PIDs of the training ranks (children of torchrun) of a job started with start()."""
    import psutil

    def cmdline(c: psutil.Process) -> str:
        # A child that has just exited (a zombie until its parent reaps it) has no command line to read:
        # psutil.ZombieProcess failed a whole module's fixture in CI.
        try:
            return " ".join(c.cmdline())
        except psutil.Error:
            return ""

    return [c.pid for c in psutil.Process(proc.pid).children(recursive=True) if "-m mnemo train" in cmdline(c)]


def launch_worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """PID of global rank `rank` of a local `mnemo launch` job started with start() (its torchrun agent has no RANK)."""
    import psutil

    for c in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "mnemo.launch.worker" in " ".join(c.cmdline()) and c.environ().get("RANK") == str(rank):
                return c.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker of rank {rank} under the launcher")


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Last logged loss of each step (a resumed run re-logs the steps it re-does)."""
    return {r["step"]: r["loss"] for r in steps(run_dir)}


def mlflow_runs(run_dir: Path):
    """(client, runs) of the job's default sqlite store, without touching the process-wide MLflow URI."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(run_dir) / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps)


# The shared reference job (conftest.reference_run): an uninterrupted 2-rank run per ZeRO stage that the
# fault scenarios of test_train.py and the stage/world conversions of test_universal.py start from.
REFERENCE_STEPS = 40


def reference_overrides(data: Path, run_dir: Path, stage: int, *extra: str) -> list[str]:
    return [
        f"data.path={data}",
        f"run.dir={run_dir}",
        f"zero.stage={stage}",
        f"train.max_steps={REFERENCE_STEPS}",
        "checkpoint.interval=10",
        "checkpoint.keep=5",
        "train.log_interval=5",
        # Every 4th step a passkey episode: resume must continue its curriculum and documents exactly.
        "train.passkey.fraction=0.25",
        *extra,
    ]


def data_of(run_dir: Path) -> str:
    """The data.path a run was started with (from its saved config)."""
    import yaml

    return yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["data"]["path"]
