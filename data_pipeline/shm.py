"""Shared memory that mosaicml-streaming leaked for this run's own cache folder, and only that.

A StreamingDataset registers its local folders in POSIX shared memory named
``<prefix:06d>_locals`` (the folders, NUL-separated, after an int32 byte count)
next to ``<prefix>_barrier``, ``_next_epoch`` and ``_cache_usage``; a process
killed without cleanup leaves them behind. For a remote dataset the local folder
is a download cache, and a leaked registration of it can make the next job on
that cache fail ("Reused local directory"; streaming 0.13 checks a prefix only
once its /tmp lock files are gone, and otherwise skips it, so leaks pile up
instead). streaming's own remedy,
``clean_stale_shared_memory()``, unlinks every prefix on the machine: the shared
memory of other live jobs too (another user's run, an evaluation starting at the
same moment). mnemo unlinks a prefix only when every folder it registers lies
inside a folder this job owns exclusively (the trainer: its run directory's
download cache, the run directory being held under ``run.lock``): no live process
can be using it.

Linux keeps POSIX shared memory under /dev/shm; elsewhere nothing is released.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import tempfile
from pathlib import Path

from mnemo.data_pipeline.lean_imports import import_streaming
from mnemo.data_pipeline.paths import is_inside

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_LOCALS = re.compile(r"^(\d{6})_locals$")


def registered_locals(data: bytes) -> list[str]:
    """The local folders in a ``<prefix>_locals`` segment's bytes ([] when malformed)."""
    if len(data) < 4:
        return []
    (size,) = struct.unpack("=i", data[:4])
    if not 4 <= size <= len(data):
        return []
    try:
        text = data[4:size].decode("utf-8")
    except UnicodeDecodeError:
        return []
    return text.split("\0")[:-1]  # the last field is the prefix number


def release_stale_shm(owned_dir: str | os.PathLike, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink streaming's shared memory whose registered local folders all lie inside ``owned_dir``.

    The caller must own ``owned_dir`` exclusively (no other live process may read a dataset cached
    there): then such segments are leaks of an earlier, killed job of this run. Their prefix's file locks
    in the temp folder go too. Returns the names unlinked.
    """
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

    if not shm_dir.is_dir():
        return []
    removed = []
    for entry in sorted(shm_dir.iterdir()):
        m = _LOCALS.match(entry.name)
        if m is None:
            continue
        try:
            with open(entry, "rb") as fh:
                folders = registered_locals(fh.read(1 << 20))  # a few paths; never a whole hostile file
        except OSError:  # another user's segment, or gone meanwhile
            continue
        if not folders or not all(is_inside(f, owned_dir) for f in folders):
            continue
        prefix = m.group(1)
        # Its segments, then its file locks in the temp folder (streaming skips a prefix whose lock files exist:
        # left behind, they would retire the number for good).
        files = [shm_dir / f"{prefix}_{kind}" for kind in SHM_TO_CLEAN]
        files += [Path(tempfile.gettempdir()) / f"{prefix}_{kind}" for kind in (BARRIER_FILELOCK, CACHE_FILELOCK)]
        for f in files:
            try:
                f.unlink()
                removed.append(f.name)
            except OSError:  # gone meanwhile, or another user's (a sticky /tmp): not ours to remove
                pass
    if removed:
        log.info("released shared memory leaked by an earlier job of this run: %s", ", ".join(removed))
    return removed
