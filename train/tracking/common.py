"""What the trainer side and the sender process of tracking share: names, constants and small helpers.

- ``resolve_uri`` / ``resolve_experiment``: where a job's run goes (config >
  environment > default);
- ``system_tags`` (host, git commit, library versions) and ``memory_stats``
  (host RSS, CUDA peak), which the trainer and the sender put on the run;
- the constants of the user interface: ``DEFAULT_EXPERIMENT``,
  ``PARENT_RUN_TAG``, ``FALLBACK_FILE`` and ``HTTP_ENV_DEFAULTS``;
- ``append_points``, the one writer of the fallback file format (one JSON
  line per metric point), used by the sender while the server is away and by
  the trainer side once the sender process has died.

Imports nothing else of the package.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import socket
import subprocess
import sys
from pathlib import Path

DEFAULT_EXPERIMENT = "mnemo"
PARENT_RUN_TAG = "mnemo.parent_run_id"
FALLBACK_FILE = "logs/metrics_fallback.jsonl"

# What each rank puts in its own environment (with setdefault, so a
# user's own values win). MLflow reads these from os.environ on every request
# and offers no per-client argument; library code must not write os.environ,
# so a rank applies them at start-up (train/rankenv.py). Without them the sender's health probe
# still catches a dead server; they bound the rare request that is already in
# flight when the server dies (default: 7 retries, backoff 2 s doubling up to
# 120 s, 120 s timeout = minutes of a stuck sender, with points piling up).
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def resolve_uri(uri: str, run_dir: str | os.PathLike) -> str:
    """Tracking URI: explicit > $MLFLOW_TRACKING_URI > sqlite file in the run dir."""
    if uri:
        return uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    return "sqlite:///" + str(Path(run_dir).resolve() / "mlflow.db")


def resolve_experiment(experiment: str) -> str:
    """Experiment name: explicit > $MLFLOW_EXPERIMENT_NAME > "mnemo"."""
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _dist_version(name: str) -> str:
    # importlib.metadata, not `import deepspeed`: importing it costs seconds
    # and probes accelerators.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def system_tags() -> dict[str, str]:
    """Host, code version and library versions, as run tags."""
    tags = {
        "mnemo.hostname": socket.gethostname(),
        "mnemo.python_version": platform.python_version(),
        "mnemo.platform": platform.platform(),
        "mnemo.torch_version": _dist_version("torch"),
        "mnemo.deepspeed_version": _dist_version("deepspeed"),
        "mnemo.mlflow_version": _dist_version("mlflow"),
        "mnemo.version": _dist_version("mnemo"),
    }
    code_dir = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], code_dir)
    if commit:
        tags["mnemo.git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
        dirty = _git(["status", "--porcelain", "--untracked-files=no"], code_dir)
        if dirty is not None:
            tags["mnemo.git_dirty"] = "true" if dirty else "false"
    return tags


def _host_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # Not Linux: peak RSS is the best the stdlib offers (KiB on Linux, bytes on macOS).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def memory_stats() -> dict[str, float]:
    """{'sys/host_rss_gb': current RSS, 'sys/device_mem_gb': CUDA max allocated (if CUDA)}."""
    out = {"sys/host_rss_gb": _host_rss_bytes() / 2**30}
    torch = sys.modules.get("torch")  # never import torch (or create a CUDA context) just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["sys/device_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def append_points(f, run_id: str | None, step: int, ts: int, values: dict[str, float]) -> None:
    """One JSON line per metric point: the fallback file format."""
    for key, value in values.items():
        rec = {"run_id": run_id, "key": key, "value": value, "step": step, "timestamp": ts}
        f.write(json.dumps(rec, allow_nan=True) + "\n")
