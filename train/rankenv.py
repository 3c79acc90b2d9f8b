"""Process environment of one training rank.

Library code reads the environment; only this module writes it.
``apply_rank_env()`` runs at the start of `mnemo train`, before deepspeed or
streaming are imported (both read it at import time).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always present in practice
        return False


def uses_cuda(device: str) -> bool:
    """Whether a rank with ``train.device`` = ``device`` trains on CUDA (auto: when a device is available)."""
    return device == "cuda" or (device == "auto" and cuda_available())


def uses_bf16(dtype: str, cuda: bool) -> bool:
    """Whether a rank with ``model.dtype`` = ``dtype`` trains in bf16 (auto: on CUDA), ``cuda`` from ``uses_cuda``."""
    return dtype == "bf16" or (dtype == "auto" and cuda)


def check_train_device(device: str, ranks: int = 1) -> None:
    """train.device=cuda on a machine without a usable CUDA device, or ``ranks`` ranks on this machine that
    will use CUDA (cuda, or auto with a device) and fewer devices than ranks: a UserError.

    Run before ranks start (``mnemo train``, ``mnemo launch`` on the node that
    starts them) and again by the trainer; without it torch fails later in
    ``torch.cuda.set_device`` ("Found no NVIDIA driver", or "invalid device
    ordinal" for the ranks past the last device), once per rank. Other values
    need no device (auto without one trains on the CPU).
    """
    from mnemo.train.errors import UserError

    if device == "cuda" and not cuda_available():
        raise UserError(
            "train.device=cuda: no CUDA device available on this machine (train.device=auto or cpu trains on the CPU)"
        )
    if device == "cpu" or ranks <= 1 or (device == "auto" and not cuda_available()):
        return
    import torch

    n = torch.cuda.device_count()
    if ranks > n:
        raise UserError(
            f"{ranks} ranks on this machine, {n} CUDA device(s) visible: each rank trains on a device of its own"
            f" (--nproc-per-node {n} or fewer; or train.device=cpu)"
        )


# Whole numbers a launcher (torchrun, the deepspeed launcher, SLURM) hands a rank, with their least value. A
# leftover or mistyped one in the shell was int()'s traceback ("invalid literal for int()") or torch's.
DIST_INT_ENV = {
    "WORLD_SIZE": 1,
    "RANK": 0,
    "LOCAL_RANK": 0,
    "LOCAL_WORLD_SIZE": 1,
    "LOCAL_SIZE": 1,
    "GROUP_RANK": 0,
    "TORCHELASTIC_RESTART_COUNT": 0,
    "SLURM_RESTART_COUNT": 0,
}

# Set in a rank's environment by the launchers that start several: torchrun (mnemo launch's too), mnemo
# launch's node launcher, the deepspeed launcher. Without one, a WORLD_SIZE > 1 is most likely left over in
# the shell, and `mnemo train` would wait for ranks nobody starts.
LAUNCHER_MARKERS = ("TORCHELASTIC_RUN_ID", "MNEMO_NODE_RANK", "LOCAL_SIZE")


def env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    """The whole number in ``environ[name]`` (unset or blank: ``default``); a UserError naming ``name`` for
    anything else, or for one below its least value in DIST_INT_ENV (a MASTER_PORT: outside [1, 65535])."""
    from mnemo.data_pipeline.errors import brief
    from mnemo.train.errors import UserError

    raw = environ.get(name, "").strip()
    if not raw:
        return default
    low, high = (1, 65535) if name == "MASTER_PORT" else (DIST_INT_ENV.get(name, 0), None)
    try:
        value = int(raw, 10)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UserError(f"{name}={brief(raw)} in the environment: not a whole number {bound} (unset it to train alone)")
    return value


# What deepspeed.init_distributed reads from a launcher: without any one of them it falls back to MPI
# discovery (a traceback: "No module named 'mpi4py'").
DIST_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def alone(environ: Mapping[str, str]) -> bool:
    """Whether this rank is a job of its own (a bare `mnemo train`): no WORLD_SIZE in the environment, or
    WORLD_SIZE=1 with no launcher around (left over in the shell: the rank needs no other, so the other
    launcher variables there are ignored rather than read)."""
    world = environ.get("WORLD_SIZE", "").strip()
    return not world or (world == "1" and not any(environ.get(k) for k in LAUNCHER_MARKERS))


def check_dist_env(environ: Mapping[str, str]) -> str | None:
    """Check the launcher variables this rank reads (UserError naming one that is wrong); the line to print
    before waiting for the other ranks when WORLD_SIZE > 1 comes from the environment with no launcher (else None).
    Not alone, every one of DIST_REQUIRED_ENV must be set (a UserError naming those missing).

    Alone, MASTER_ADDR and MASTER_PORT are not read: the rank serves its own store on a free port (rank_env).
    """
    from mnemo.train.errors import UserError, visible

    values = {name: env_int(environ, name, 0) for name in DIST_INT_ENV}
    if alone(environ):
        return None
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if rank >= world:
        raise UserError(f"RANK={rank} in the environment: not below WORLD_SIZE={world} (unset them to train alone)")
    port = env_int(environ, "MASTER_PORT", 0)
    missing = [k for k in DIST_REQUIRED_ENV if not environ.get(k, "").strip()]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world} in the environment without {', '.join(missing)}: a launcher sets all of"
            f" {', '.join(DIST_REQUIRED_ENV)} (unset WORLD_SIZE to train alone, or start the ranks with mnemo launch)"
        )
    if any(environ.get(k) for k in LAUNCHER_MARKERS):
        return None
    where = visible(f"{environ.get('MASTER_ADDR', '')}:{port or ''}")
    return (
        f"mnemo train: waiting for {world} ranks at {where} (WORLD_SIZE={world} RANK={rank} from the environment;"
        " unset them to train alone, or start the others with mnemo launch)"
    )


def rank_env(environ: Mapping[str, str], use_cuda: bool) -> dict[str, str]:
    """Variables to add for one rank, given what the launcher already set."""
    out: dict[str, str] = {}
    # DeepSpeed follows train.device: told cpu (it would otherwise probe for CUDA, and on a machine with GPUs
    # move the model there), and a DS_ACCELERATOR left in the shell for the other device is replaced (cuda on
    # a machine without a GPU was "Found no NVIDIA driver" with train.device=cpu). On CUDA, unset stays unset.
    accel = "cuda" if use_cuda else "cpu"
    if environ.get("DS_ACCELERATOR", accel if use_cuda else "") != accel:
        out["DS_ACCELERATOR"] = accel
    # The deepspeed launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE;
    # mosaicml-streaming needs the latter to lay out its shared memory.
    if "LOCAL_WORLD_SIZE" not in environ and "LOCAL_SIZE" in environ:
        out["LOCAL_WORLD_SIZE"] = environ["LOCAL_SIZE"]
    if alone(environ):
        # A bare `mnemo train` is a one-rank job, which serves its own store: on a free port, not on a
        # MASTER_PORT left over in the shell (in use: EADDRINUSE, a traceback).
        out.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        out.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # Avoid oversubscribing CPU cores: each local rank gets its share.
    if not use_cuda and "OMP_NUM_THREADS" not in environ:
        local = int(out.get("LOCAL_WORLD_SIZE") or env_int(environ, "LOCAL_WORLD_SIZE", 1))
        out["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, local)))
    return out


def rendezvous_error(environ: Mapping[str, str], error: Exception) -> str:
    """One line for torch's DistNetworkError / DistStoreError while the ranks meet (a port in use, a peer
    that never came: a traceback after the store's timeout), naming MASTER_ADDR:MASTER_PORT."""
    from mnemo.data_pipeline.errors import clip, first_line
    from mnemo.train.errors import visible

    g = environ.get
    return visible(
        f"cannot meet the other ranks at MASTER_ADDR:MASTER_PORT {g('MASTER_ADDR', '')}:{g('MASTER_PORT', '')}"
        f" (WORLD_SIZE={g('WORLD_SIZE', '1')} RANK={g('RANK', '0')}): {clip(first_line(error).strip(), 240)}"
    )


def op_cache_env(environ: Mapping[str, str], prefix: str, torch_version: str) -> dict[str, str]:
    """TORCH_EXTENSIONS_DIR of this environment's own, unless the user set one.

    DeepSpeed JIT-builds its CPU communication op into torch's one cache
    directory per user (``~/.cache/torch_extensions/py311_cpu``). Two
    environments (two checkouts, a CI clone next to a working tree) write
    different include paths into its build file, so each rank of one
    rebuilds what the other just built, and ranks waiting on the build lock
    were seen stuck for 10 minutes. A directory per interpreter prefix and
    torch version keeps each environment's build its own.

    The ninja that builds it is part of the key too: torch runs the first
    ``ninja`` on PATH, and a venv's pip ninja (1.13: log format v7) and a
    system one (1.11) each read the other's build log as foreign and rebuild
    everything, so processes of one environment with and without the venv's
    bin on PATH rebuilt the op in turn (seen: every 1.5 min, ranks waiting on
    its lock for 5 min, under `mnemo launch` and the tests alike).
    """
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return {}
    import hashlib
    import shutil

    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    ninja = shutil.which("ninja", path=environ.get("PATH", os.defpath))
    ninja = os.path.realpath(ninja) if ninja else ""
    tag = hashlib.sha256(f"{prefix}\0{torch_version}\0{ninja}".encode()).hexdigest()[:10]
    name = f"py{sys.version_info.major}{sys.version_info.minor}-mnemo-{tag}"
    return {"TORCH_EXTENSIONS_DIR": os.path.join(cache, "torch_extensions", name)}


def check_op_cache(environ: Mapping[str, str]) -> None:
    """A UserError naming the variable it comes from when the folder torch builds DeepSpeed's ops in
    (``op_cache_env``) cannot be made or written: a TORCH_EXTENSIONS_DIR or XDG_CACHE_HOME that is a file
    was torch's NotADirectoryError traceback in every rank, after its start-up."""
    from pathlib import Path

    from mnemo.train.errors import UserError, path_errors
    from mnemo.train.rundir import folder_unwritable

    folder = (
        environ.get("TORCH_EXTENSIONS_DIR")
        or op_cache_env(environ, sys.prefix, _torch_version())["TORCH_EXTENSIONS_DIR"]
    )
    var = next((v for v in ("TORCH_EXTENSIONS_DIR", "XDG_CACHE_HOME") if environ.get(v)), "HOME")
    with path_errors(var):
        why = folder_unwritable(Path(folder))
    if why:
        raise UserError(f"{var}={environ.get(var, '')}: {why} (torch builds DeepSpeed's ops there)")


# The open files (ulimit -n) each process of a run needs at least, with ``ranks`` ranks in all: its sockets
# to the store and to every other rank, pipes, shared memory, shard and log files. Measured on the debug size
# (segment_len 32, batch 2, one data worker): `mnemo train` ran at 48 (warm op cache) and failed at 32; a
# 2-rank `mnemo launch` failed at 128 and ran at 144. A bigger run (more ranks, workers or data.sources) needs
# more. Refused below these (check_open_files): a run that works must not be refused, so the one-rank figure is
# the lowest seen to work, not the highest seen to fail.
_OPEN_FILES_ONE_RANK = 64
_OPEN_FILES_PER_PEER = 80


def open_files_needed(ranks: int = 1) -> int:
    """The fewest open files a process of a run with ``ranks`` ranks can do with (measured; each rank connects
    to every other)."""
    return _OPEN_FILES_ONE_RANK + _OPEN_FILES_PER_PEER * (max(ranks, 1) - 1)


# Files a data.sources entry keeps open in each rank (measured: its dataset's 6 shared-memory segments, 2 files
# each, and its shards' files): a mixture of 500 sources needs ~6,000 beyond the CLI's 4,096.
OPEN_FILES_PER_SOURCE = 16


def raise_open_files_limit(want: int) -> None:
    """Raise this process's soft limit of open files to ``want`` (at most its hard limit) where it is lower; what
    the process starts (torchrun, its ranks, data workers) inherits it. The hard limit is the user's ceiling and
    stays as it is; a system that caps it lower (macOS's OPEN_MAX) leaves it as it was."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(hard, want), hard))
    except (ValueError, OSError):
        pass


def check_open_files(ranks: int = 1, warn: bool = True) -> None:
    """Make sure this process may open the files a run with ``ranks`` ranks in all needs (``open_files_needed``):
    its soft limit is raised to that where the hard one allows (mnemo.cli raised it to 4096 at most; what this
    process starts inherits it), else a UserError naming `ulimit -n`. Below it the run hung in c10d's store for
    600 s (`ulimit -n 16`) or stopped on a gloo traceback after its start-up. ``warn``: whether to print the
    warning for a hard limit below a large job's extrapolated need (one rank of a job says it, not each)."""
    import resource

    from mnemo.train.errors import UserError

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_files_needed(ranks)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        raise_open_files_limit(need)
        return
    run = "a run" if ranks <= 1 else f"a run of {ranks} ranks"
    # Measured on one machine with 1 and 2 ranks: below a few ranks' need a run surely fails, so it is refused;
    # beyond, the per-peer figure is an extrapolation (a large job may need fewer), so a warning, not a refusal.
    if hard < open_files_needed(min(ranks, 2)):
        raise UserError(
            f"ulimit -n is {soft} (its hard limit, ulimit -Hn, is {hard}); {run} needs at least {need} open "
            "files per process: raise the hard limit"
        )
    raise_open_files_limit(hard)
    if not warn:
        return
    print(
        f"mnemo: warning: ulimit -Hn is {hard}; {run} may need about {need} open files per process (raise the hard "
        "limit if ranks fail with 'Too many open files')",
        file=sys.stderr,
    )


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")  # without importing torch
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        return "unknown"


def use_own_op_cache() -> dict[str, str]:
    """Set ``op_cache_env`` in this process and return what it added: a rank (``apply_rank_env``) and the
    test session (its in-process engines then build where the ranks it starts do, one build instead of two)."""
    added = op_cache_env(os.environ, sys.prefix, _torch_version())
    os.environ.update(added)
    return added


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported by deepspeed at its import, never used by a rank: DeepSpeed's autotuner imports mlflow (for
# DeepSpeed's own autotuning). scikit-learn, held off here too until streaming was imported without
# transformers (import_streaming), came in only through transformers' generation code; deepspeed does not
# import it.
HELD_OFF = ("mlflow",)


def import_rank_libraries(held: tuple[str, ...] = HELD_OFF) -> None:
    """Import deepspeed with the ``held`` packages unimportable meanwhile, and streaming without
    transformers (``mnemo.data_pipeline.lean_imports``); all of them import normally afterwards: the
    tracker imports mlflow when it tracks."""
    from mnemo.data_pipeline.lean_imports import import_held_off, import_streaming

    import_held_off("deepspeed", held)
    import_streaming()


def apply_rank_env(device: str = "auto") -> dict[str, str]:
    """Set this rank's environment for ``train.device`` = ``device`` and import the rank's libraries."""
    from mnemo.train.tracking import HTTP_ENV_DEFAULTS

    # The configured device, not the hardware: train.device=cpu on a machine with GPUs must tell
    # DeepSpeed so (DS_ACCELERATOR=cpu), or it moves the model to CUDA while the trainer builds on the CPU.
    added = rank_env(os.environ, uses_cuda(device))
    added.update(use_own_op_cache())
    # MLflow reads its HTTP retry/timeout settings only from the environment: bounded
    # values keep a dead tracking server from stalling the tracker for minutes.

    added.update({k: v for k, v in HTTP_ENV_DEFAULTS.items() if k not in os.environ})
    os.environ.update(added)
    import_rank_libraries()  # after the environment both read at import
    return added
