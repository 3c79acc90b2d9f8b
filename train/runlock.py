"""A run directory belongs to one job at a time: an flock held by the job's owner process.

Two jobs on one ``run.dir`` would delete each other's in-progress
``.tmp-step_*`` directories, prune each other's checkpoints and overwrite
``latest``. So before anything is written there, the process that owns the
job (global rank 0; the trainer tells the other ranks the outcome with a
collective) takes an exclusive ``fcntl.flock`` on ``<run.dir>/run.lock`` and
writes who it is into the file (host, pid, start time).

The lock lives exactly as long as that process: the kernel releases it when
the process exits, however it exits (SIGKILL included), so a relaunch after a
crash, a torchrun restart (``--max-restarts``: the old rank 0 is dead by then)
and a SLURM requeue are never blocked by their own earlier incarnation, and
there is no stale-lock file to clean up. The file itself stays (deleting a
lock file races with the next job opening it). The descriptor is not
inherited by the programs rank 0 starts (Python opens it non-inheritable).

Node 0's ``mnemo launch`` holds a second lock, ``<run.dir>/launch.lock``, for its job's whole life
(``LaunchLock``): a second launcher is refused from the first one's start, not only once its rank 0
holds ``run.lock``.

On a shared filesystem the lock covers every node: NFS (v3 with lockd, v4)
implements flock with its byte-range locks; Lustre needs the ``flock`` mount
option.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mnemo.data_pipeline.files import LockBusy, make_dirs, remove_made_dirs, take_flock, take_flock_at
from mnemo.train.errors import UserError
from mnemo.train.rundir import run_dir_unusable

LOCK_NAME = "run.lock"
# Held by node 0's launcher for its job's life (``LaunchLock``), removed (still held) when it ends.
LAUNCH_LOCK_NAME = "launch.lock"


class RunDirBusy(UserError):
    """Another live job holds the run directory."""


class RunLock:
    """Exclusive ownership of one run directory by this process (``acquire`` / ``release``).

    ``name``: the lock file in it; one with ``transient`` set is removed when released (LaunchLock's), so it is
    taken on the file at the path (``take_flock_at``), never on one its holder removed meanwhile."""

    def __init__(self, run_dir: str | Path, name: str = LOCK_NAME, transient: bool = False):
        self.path = Path(run_dir) / name
        self.fd: int | None = None
        self.transient = transient
        self.made: list[Path] = []  # the folders acquire made (a transient lock removes them when still empty)

    def acquire(self) -> None:
        """Take the lock or raise RunDirBusy naming the holder; UserError naming the lock file when it cannot
        be made or locked (a symbolic link there, a read-only folder). Creates run_dir if needed; the folders
        made for it are removed again when the lock is not taken (a name too long left its parents behind)."""
        why = run_dir_unusable(self.path.parent)
        if why is not None:
            raise UserError(f"run.dir: {why}")
        made: list[Path] = []
        try:
            try:
                made = make_dirs(self.path.parent)
                fd = (take_flock_at if self.transient else take_flock)(self.path)
            except BaseException:
                remove_made_dirs(made)  # only empty ones: a lock file made before the failure keeps its folder
                raise
        except LockBusy as e:
            raise RunDirBusy(
                f"run.dir: {self.path.parent} is in use by another job ({e.holder}); "
                "wait for it to end, stop it, or use another run.dir"
            ) from None
        except OSError as e:
            raise UserError(f"run.dir: cannot lock {self.path}: {e.strerror or e}") from None
        self.fd, self.made = fd, made

    def release(self) -> None:
        if self.fd is not None:
            if self.transient:
                self.path.unlink(missing_ok=True)  # still held: nobody else can be using it
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            if self.transient:
                remove_made_dirs(self.made)  # a run dir made for a job that wrote nothing there goes again

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take_run_dir(run_dir: str | Path, rank: int) -> RunLock | None:
    """Collective: global rank 0 takes the run directory's lock; every rank raises if it could not
    (RunDirBusy: another job holds it; UserError: the lock file cannot be made).

    Returns the held lock on rank 0 (release it when the job ends), None elsewhere.
    """
    from mnemo.train.collectives import broadcast_object

    lock, error = None, None  # error: (busy, one-line message)
    if rank == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except RunDirBusy as e:
            lock, error = None, (True, str(e))
        except UserError as e:  # every rank must hear of it, or the others wait out the collective timeout
            lock, error = None, (False, str(e))
    error = broadcast_object(error, src=0)
    if error is not None:
        busy, msg = error
        raise (RunDirBusy if busy else UserError)(msg)
    return lock


def check_run_dir_free(run_dir: str | Path) -> None:
    """RunDirBusy (or UserError, as ``RunLock.acquire``) unless the run directory's lock can be taken now; it is
    released again at once.

    For a launcher, before it starts any rank (``LaunchLock``): a second job on a busy run.dir then stops at
    once, having written nothing there (no node log), instead of after every rank's start-up. The ranks take
    the lock themselves (``take_run_dir``); the launcher's copy is released before they start, and its
    descriptor is not inherited by them.
    """
    lock = RunLock(run_dir)
    why = run_dir_unusable(lock.path.parent)  # lexists below says False for a loop of links too
    if why is not None:
        raise UserError(f"run.dir: {why}")
    if not os.path.lexists(lock.path):  # no job has held it: nothing to check, and nothing is made here
        return
    lock.acquire()
    lock.release()


class LaunchLock:
    """Node 0's launcher's hold of the run directory for its job's whole life (``acquire`` / ``release``).

    ``check_run_dir_free`` alone lets go of ``run.lock`` at once, and the run directory was nobody's until the
    new job's rank 0 took it after its start-up (seconds of imports): a second ``mnemo launch`` then passed the
    check, appended to the running job's node log and started its ranks, which stopped on the busy run.dir.
    This lock, ``<run.dir>/launch.lock``, is held from before the node log is opened until the launcher ends,
    and a launcher takes it before it checks ``run.lock``: the second launcher is refused by either (RunDirBusy,
    the same line). The ranks never take it: a torchrun restart's ranks run under the same launcher. The
    kernel drops it when the launcher exits, however it exits, so a relaunch after a crash or a SLURM requeue
    (a new launcher; the batch script requeues once srun, and with it the old launcher, has ended) is never
    refused by it; the file is removed when the launcher ends (``RunLock``'s ``transient``), and with it a run
    dir made for a launch that wrote nothing there.
    """

    def __init__(self, run_dir: str | Path):
        self.lock = RunLock(run_dir, LAUNCH_LOCK_NAME, transient=True)

    def acquire(self) -> None:
        self.lock.acquire()
        try:
            check_run_dir_free(self.lock.path.parent)  # a job started by `mnemo train` itself, or an older mnemo's
        except BaseException:
            self.lock.release()
            raise

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> LaunchLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LAUNCH_LOCK_NAME", "LOCK_NAME", "LaunchLock", "RunDirBusy", "RunLock", "check_run_dir_free", "take_run_dir"]
