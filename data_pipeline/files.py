"""Files written whole or not at all, and fsync: what prepare, checkpoints and exports commit with."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory: its entries, e.g. after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root``, ``root`` included."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def atomic_write(path: str | Path, data: bytes, tmp_dir: str | Path | None = None) -> None:
    """Write ``path`` whole or not at all, durably (data and rename fsynced).

    The temporary file goes into ``tmp_dir`` (default: beside ``path``, hidden);
    it must be on the same file system as ``path``.
    """
    path = Path(path)
    tmp = Path(tmp_dir or path.parent) / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text.encode())
