"""Process environment for one training rank.

The environment belongs to launch/: library code reads it, only this module
writes it. ``apply_rank_env()`` runs at the start of `mnemo train`, before
deepspeed or streaming are imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always present in practice
        return False


def rank_env(environ: Mapping[str, str], use_cuda: bool) -> dict[str, str]:
    """Variables to add for one rank, given what the launcher already set."""
    out: dict[str, str] = {}
    if not use_cuda and "DS_ACCELERATOR" not in environ:
        # DeepSpeed would otherwise probe for CUDA and fail on a CPU machine.
        out["DS_ACCELERATOR"] = "cpu"
    # The deepspeed launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE;
    # mosaicml-streaming needs the latter to lay out its shared memory.
    if "LOCAL_WORLD_SIZE" not in environ:
        if "LOCAL_SIZE" in environ:
            out["LOCAL_WORLD_SIZE"] = environ["LOCAL_SIZE"]
        elif "WORLD_SIZE" not in environ:
            out["LOCAL_WORLD_SIZE"] = "1"
    if "WORLD_SIZE" not in environ:
        # A bare `mnemo train` is a one-rank job.
        out.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        if "MASTER_PORT" not in environ:
            out["MASTER_PORT"] = str(_free_port())
    # Avoid oversubscribing CPU cores: each local rank gets its share.
    if not use_cuda and "OMP_NUM_THREADS" not in environ:
        local = int(environ.get("LOCAL_WORLD_SIZE") or out.get("LOCAL_WORLD_SIZE") or 1)
        out["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, local)))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def apply_rank_env() -> dict[str, str]:
    added = rank_env(os.environ, cuda_available())
    # MLflow reads its HTTP retry/timeout settings only from the environment: bounded
    # values keep a dead tracking server from stalling the tracker for minutes.
    from mnemo.train.tracking import HTTP_ENV_DEFAULTS

    added.update({k: v for k, v in HTTP_ENV_DEFAULTS.items() if k not in os.environ})
    os.environ.update(added)
    return added


def default_nproc_per_node() -> int:
    """Ranks per node when not given: one per GPU, or 2 processes on CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
    except Exception:  # pragma: no cover - torch always present in practice
        pass
    return 2


def package_root() -> str:
    """The directory holding the mnemo packages (train/, launch/, ...)."""
    return str(Path(__file__).resolve().parent.parent)


def mnemo_installed() -> bool:
    """Whether this interpreter has mnemo installed (pip, editable or not), so its ranks need no PYTHONPATH."""
    from importlib import metadata

    try:
        metadata.distribution("mnemo")
    except metadata.PackageNotFoundError:
        return False
    return True


def pythonpath_with_root(environ: Mapping[str, str]) -> str:
    """PYTHONPATH for processes the launcher starts: mnemo's root first, only where mnemo is not installed.

    Ranks run ``python -m mnemo.launch.worker``. An installed mnemo needs
    nothing (and the checkout root on the path would make its bare folders,
    ``train``, ``model``, ..., importable in the ranks); a checkout run without
    installing needs its root.
    """
    rest = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if mnemo_installed():
        return os.pathsep.join(rest)
    root = package_root()
    return os.pathsep.join([root, *[p for p in rest if p != root]])


def path_with_venv(environ: Mapping[str, str], python: str) -> str:
    """PATH for the ranks: the launcher's own, with the venv's bin dir appended if missing.

    Appended, not prepended: tools the user's PATH finds first stay first.
    torch JIT-builds DeepSpeed ops with whichever ``ninja`` PATH finds, and two
    ninja versions (system 1.11 and the venv's pip 1.13) hash build commands
    differently, so every switch between them rebuilds the op (minutes on 2
    cores). Ranks started by mnemo therefore see the same PATH order as a
    plain ``mnemo train`` in the same shell.
    """
    venv_bin = str(Path(python).parent)
    parts = [p for p in environ.get("PATH", "").split(os.pathsep) if p]
    if venv_bin not in parts:
        parts.append(venv_bin)
    return os.pathsep.join(parts)
