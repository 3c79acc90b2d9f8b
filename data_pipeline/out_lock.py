"""One ``mnemo prepare`` per --out at a time: an flock on a lock file in each state dir it writes.

Where the lock files are: data_pipeline/outputs.py (``lock_paths``); the lock itself: ``take_flock``
(data_pipeline/files.py), which train/runlock.py's run directory lock also takes.
"""

from __future__ import annotations

import os

from mnemo.data_pipeline.errors import DataError, clip
from mnemo.data_pipeline.files import LockBusy, make_dirs, take_flock_at

# In the state dir of --out (of the staging dir, and of a file:// target): held by the run that owns them.
LOCK_NAME = "lock"
_held_fds: set[int] = set()  # this process's lock descriptors (a forked worker closes its copies)


def close_inherited_locks() -> None:
    """In a forked worker: close the copies of the parent's lock descriptors.

    A flock belongs to the open file, which fork shares: a worker outliving its parent by a moment
    (terminated, not yet reaped) would otherwise still hold --out against the rerun.
    """
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


class OutLock:
    """Exclusive ownership of --out by one ``mnemo prepare``: an ``fcntl.flock`` on ``STATE_DIR/lock``.

    The lock of train/runlock.py's run directory, on --out (``take_flock``, data_pipeline/files.py): the
    kernel releases it when the process exits however it exits, so a rerun after kill -9 is never
    blocked, and the file records who holds it. Two runs on one --out would otherwise mix parts of
    both under one manifest, or one's --overwrite would delete the other's parts mid-write.

    The lock file lives in the state dir, which a finished run removes with the lock still held;
    a run that was waiting on the old file then finds another (or no) file at the path and takes
    the lock again on the file there. State dirs this lock made and that hold nothing but the lock
    (the run was refused, or had nothing to do) are removed on ``release``; a crash leaves one
    behind, which the next run's ``claim_out`` accepts (a state dir is mnemo's own).
    """

    def __init__(self, url: str, paths: list[str]):
        self.url = url
        self.paths = paths  # the lock files (outputs.lock_paths)
        self.held: list[tuple[int, str]] = []  # (fd, path)
        self.created: list[str] = []  # directories made here, deepest last

    def acquire(self) -> OutLock:
        try:
            for path in self.paths:
                self._take(path)
        except BaseException:
            self.release()
            raise
        return self

    def _makedirs(self, path: str) -> None:
        self.created += [str(d) for d in make_dirs(path)]  # none left behind when it fails part way

    def _take(self, path: str) -> None:
        try:
            fd = take_flock_at(path, before=lambda: self._makedirs(os.path.dirname(path)))
        except LockBusy as e:
            raise DataError(
                f"--out {clip(self.url, 200)}: another mnemo prepare is running on it ({e.holder}); wait for it to "
                f"end or stop it"
            ) from None
        except OSError as e:  # paths clipped: one over PATH_MAX made an 8 KB line
            raise DataError(f"--out {clip(self.url, 200)}: cannot lock {clip(path, 200)} ({e.strerror or e})") from None
        self.held.append((fd, path))
        _held_fds.add(fd)

    def release(self) -> None:
        for fd, path in reversed(self.held):
            state = os.path.dirname(path)
            if state in self.created and os.path.isdir(state) and os.listdir(state) == [LOCK_NAME]:
                os.remove(path)  # still held: nobody else can be using it
            _held_fds.discard(fd)
            os.close(fd)  # releases the flock (the workers closed their copies when they started)
        self.held = []
        for d in reversed(self.created):
            try:
                os.rmdir(d)  # made here and empty now (a run that wrote nothing there)
            except OSError:
                pass
        self.created = []

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
