"""Temporary folders of one mnemo process that a later one removes when that process was killed.

A folder mnemo makes in the temporary folder for the length of a command (torchrun's copies of the ranks'
output: launch/local.py torchrun_log_dir; a glob-safe link to a checkpoint: train/checkpoint.py
glob_safe_dir) is removed by that command's ``finally``, which SIGKILL, the OOM killer or a power cut never
run. Each such folder is made with ``tempfile.mkdtemp`` under a prefix of its own, and the first thing written
into it is a marker file naming its process (``mark_owner``: host, pid, start time). ``sweep_leftovers``, at
the next such command, removes those whose process no longer runs: provably mnemo's (a directory of this
user under mkdtemp's name with that prefix, holding the marker), of this host, and left by a process that is
gone (its pid free, or reused by a process started at another time). A folder without a readable marker (one
being made this moment, or not mnemo's) is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat

import psutil

from mnemo.data_pipeline.files import open_own_file


def mkdtemp_name_re(prefix: str) -> re.Pattern[str]:
    """The names ``tempfile.mkdtemp(prefix=...)`` gives: ``prefix`` + 8 of ``[a-z0-9_]``; ``prefix`` a regex."""
    return re.compile(rf"^{prefix}[a-z0-9_]{{8}}\Z")


def process_identity(pid: int) -> dict | None:
    """Who process ``pid`` is (host, pid, start time: a pid reused by another process differs); None if gone."""
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return None
    return {"host": socket.gethostname(), "pid": pid, "started": started}


def mark_owner(folder: str, marker: str) -> None:
    """Write ``folder/marker`` (a new file) naming this process, for sweep_leftovers; OSError as open raises it."""
    with open(os.path.join(folder, marker), "x") as f:
        json.dump(process_identity(os.getpid()), f)


def sweep_leftovers(tmp: str, name_re: re.Pattern[str], marker: str, links: frozenset[str] | None = None) -> list[str]:
    """Remove the folders in ``tmp`` named as ``name_re`` says whose marker names a process of this host that is
    gone (the module's docstring); returns the paths removed.

    ``links``: the folder must hold nothing but its marker and symbolic links of these names (never followed);
    one holding anything else is left alone. Without it, the folder is removed with whatever it holds.
    """
    removed: list[str] = []
    try:
        names = sorted(os.listdir(tmp))
    except OSError:
        return removed
    me = socket.gethostname()
    for name in names:
        if not name_re.match(name):
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            fd = open_own_file(os.path.join(path, marker), os.O_RDONLY)
            with open(fd, "rb") as f:
                owner = json.loads(f.read(4096))
            held = set(os.listdir(path)) - {marker}
            if links is not None and not all(
                n in links and stat.S_ISLNK(os.lstat(os.path.join(path, n)).st_mode) for n in held
            ):
                continue  # something mnemo did not put there
        except (OSError, ValueError):
            continue
        if not isinstance(owner, dict) or owner.get("host") != me or type(owner.get("pid")) is not int:
            continue
        if process_identity(owner["pid"]) == owner:
            continue  # that process still runs
        shutil.rmtree(path, ignore_errors=True)  # a link inside is removed, not followed
        removed.append(path)
    return removed
