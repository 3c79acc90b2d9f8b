"""Files written whole or not at all, and fsync: what prepare, checkpoints and exports commit with."""

from __future__ import annotations

import os
import stat
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


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file ("a directory, not a file", "no such file"...), or None.

    Found without opening it: opening a FIFO would wait forever for a writer.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "no such file"
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        kinds = (
            (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"),
        )
        what = next((name for test, name in kinds if test(st.st_mode)), "a special file")
        return f"{what}, not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None
