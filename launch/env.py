"""Environment of the processes the launcher starts (PATH, PYTHONPATH) and the ranks per node.

A rank's own variables (DS_ACCELERATOR, LOCAL_WORLD_SIZE, ...) are set by the
rank itself at the start of `mnemo train`: mnemo.train.rankenv.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


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
