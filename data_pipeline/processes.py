"""Child processes that do not outlive their parent."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` (SIGKILL by default) to this process when its parent dies (Linux; elsewhere
    nothing).

    A parent killed without the chance to stop its children (SIGKILL, the OOM
    killer) would otherwise leave them running: torchrun's ranks writing
    checkpoints into a run directory a relaunch is about to use, or `mnemo
    prepare`'s pool workers writing shards. The request covers only a parent
    that dies after it is made, so a parent already gone means exiting at
    once: gone when this process's parent is no longer ``parent`` (the pid
    the parent passed down), or, without it, when the parent is init (pid 1:
    the orphan was re-parented).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent if parent is not None else os.getppid() == 1:
        os._exit(1)


# `python -m MODULE` and `python -c CODE` put the working directory first on sys.path, before the standard
# library and site-packages: a yaml.py, json.py or random.py lying where the user starts `mnemo launch` (or in a
# checkpoint folder the converter runs in) would be imported, and so run, in torchrun and in every rank. -P
# (Python 3.11+; PYTHONSAFEPATH=1 for the processes those start, which inherit it) leaves it off the path.
SAFE_PATH_ENV = {"PYTHONSAFEPATH": "1"}


def python_command(python: str) -> list[str]:
    """The start of a command line that runs ``python`` with ``-m`` or ``-c``: the interpreter and ``-P``."""
    return [python, "-P"] if sys.version_info >= (3, 11) else [python]
