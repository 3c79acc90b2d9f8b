"""Shared memory that mosaicml-streaming leaked for this run's own cache folder, and only that.

Over 500 lines: one naming scheme (streaming's ``NNNNNN_*`` segments and their lock files) and every rule
about it: what a job may release, what it retires, and how its ranks pick a prefix at start
(``streaming_dataset``), each relying on the others' invariants.

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
can be using it. A run that ends removes its own prefix's lock files in the temp folder
(``release_lock_files``), which streaming never removes; a run's start removes those of
dead mnemo jobs (``release_dead_jobs_lock_files``: a readers file that no live process holds).

Linux keeps POSIX shared memory under /dev/shm; elsewhere nothing is released.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import random
import re
import stat
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.files import LockBusy, free_bytes, take_flock
from mnemo.data_pipeline.lean_imports import import_streaming
from mnemo.data_pipeline.paths import is_inside

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# A streaming segment: ``<prefix:06d>_<kind>`` (``_locals``, ``_barrier``, ...).
_SEGMENT = re.compile(r"^(\d{6})_([a-z_]+)$")
# A StreamingDataset picks the first free prefix, then creates its ``_locals`` segment: two processes
# starting at the same moment can pick the same one, and the second's create fails (FileExistsError).
PREFIX_RACE = re.compile(r"\d{6}_locals")
PREFIX_TRIES = 5
# How long a job's local leader waits for another's (one StreamingDataset construction, ~a second) before
# going on without the lock: two multi-node jobs could otherwise wait for each other's lock at a barrier.
PREFIX_LOCK_WAIT_S = 60.0
PREFIX_LOCK = "mnemo-streaming-prefix.lock"

T = TypeVar("T")


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


def _segments_by_prefix(shm_dir: Path, kinds: set[str]) -> dict[int, dict[str, Path]]:
    """streaming's segments in ``shm_dir`` (the names in ``kinds``): {prefix: {kind: path}}."""
    found: dict[int, dict[str, Path]] = {}
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return found
    for name in names:
        m = _SEGMENT.match(name)
        if m is not None and m.group(2) in kinds:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = shm_dir / name
    return found


def release_stale_shm(owned_dir: str | os.PathLike, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink streaming's shared memory whose registered local folders all lie inside ``owned_dir``.

    The caller must own ``owned_dir`` exclusively (no other live process may read a dataset cached
    there): then such segments are leaks of an earlier, killed job of this run. Their prefix's file locks
    in the temp folder go too. Returns the names unlinked.
    """
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN

    if not shm_dir.is_dir():
        return []
    removed = []
    for prefix, segments in sorted(_segments_by_prefix(shm_dir, {LOCALS}).items()):
        try:
            with open(segments[LOCALS], "rb") as fh:
                folders = registered_locals(fh.read(1 << 20))  # a few paths; never a whole hostile file
        except OSError:  # another user's segment, or gone meanwhile
            continue
        if not folders or not all(is_inside(f, owned_dir) for f in folders):
            continue
        # Its segments, then its file locks in the temp folder (lock_files).
        files = [shm_dir / f"{prefix:06d}_{kind}" for kind in SHM_TO_CLEAN] + lock_files(prefix)
        for f in files:
            try:
                f.unlink()
                removed.append(f.name)
            except OSError:  # gone meanwhile, or another user's (a sticky /tmp): not ours to remove
                pass
    if removed:
        log.info("released shared memory leaked by an earlier job of this run: %s", ", ".join(removed))
    return removed


# A StreamingDataset makes its prefix's other segments right after its ``_locals`` one: a ``_locals`` alone
# after this long belongs to a process killed in between (a SIGKILL while its dataset started, seen here).
UNFINISHED_AFTER_S = 10.0
# A live prefix has its ``_locals`` segment: its leader makes it before any other and, atexit undoing in
# reverse, unlinks it last. Segments without it, all made this long ago, are a killed process's leftovers (or,
# for the moment its other ranks take to exit, an ending job's: retired, its number is lost, nothing else).
ORPHANED_AFTER_S = 60.0


def retire_unfinished_prefixes(shm_dir: Path = SHM_DIR, now: float | None = None) -> list[int]:
    """Retire the leftover prefixes that make streaming pick a prefix whose ``_locals`` is there; the ones retired.

    streaming picks the highest of one search per segment name (``_locals``, ``_barrier``, ``_resume``, ...),
    each the first prefix without that name (and without lock files), then creates the ``_locals`` of the one
    picked. The ``_locals`` search goes past every prefix that has one, so a ``_locals`` alone is never picked
    by itself; but when a lower prefix q has a name X and no ``_locals``, the X search picks a higher prefix p
    that has a ``_locals`` and lacks X: the create fails, and every StreamingDataset on the machine failed
    ("created by another process starting at the same moment") until someone removed q. Retired:

    - a prefix with streaming segments, no ``_locals``, all older than ORPHANED_AFTER_S: a killed process's
      leftovers, never a live prefix (q: the ``_resume`` or ``_epoch_*`` of a killed job of another program,
      which mnemo's datasets never make, below a live job's p; the ``_barrier``, ... a killed rank made);
    - a prefix with a ``_locals`` older than UNFINISHED_AFTER_S without the segments made with it: its maker
      was killed in between (a p whose q may be too young for the first rule yet).

    Nothing is deleted (the segments are not provably mnemo's): the prefix's file locks in the temp folder are
    made (``lock_files``), never through a link planted there; streaming skips a prefix whose lock file
    exists, and its ``_locals`` search then goes past q, to a prefix free of every name.
    """
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base import constant as sc

    # The segments its constructor makes with the ``_locals`` one (the others come later, or never).
    made_with_locals = (sc.BARRIER, sc.NEXT_EPOCH, sc.CACHE_USAGE, sc.SHARD_STATES, sc.SHARD_ACCESS_TIMES)
    if not shm_dir.is_dir():
        return []
    now = time.time() if now is None else now
    unfinished, orphaned = [], []
    for prefix, segments in sorted(_segments_by_prefix(shm_dir, set(sc.SHM_TO_CLEAN)).items()):
        try:
            stats = {kind: os.stat(path, follow_symlinks=False) for kind, path in segments.items()}
        except OSError:  # gone meanwhile
            continue
        if not all(stat.S_ISREG(st.st_mode) for st in stats.values()):
            continue
        if sc.LOCALS in stats:
            if now - stats[sc.LOCALS].st_mtime < UNFINISHED_AFTER_S or all(k in stats for k in made_with_locals):
                continue  # being made, or a prefix streaming skips anyway (every name of it taken)
            kept = unfinished
        elif all(now - st.st_mtime >= ORPHANED_AFTER_S for st in stats.values()):
            kept = orphaned
        else:
            continue
        if _make_lock_files(prefix):
            kept.append(prefix)
    for retired, names, why in (
        (unfinished, "_locals", "left alone by a process killed while it made its segments"),
        (orphaned, "_*", "without a _locals segment, left by a killed process"),
    ):
        if retired:
            log.warning(
                "shared memory: %s %s: mosaicml-streaming skips %s from now on",
                ", ".join(f"{shm_dir}/{p:06d}{names}" for p in retired),
                why,
                "that prefix" if len(retired) == 1 else "those prefixes",
            )
    return sorted(unfinished + orphaned)


def _make_lock_files(prefix: int) -> bool:
    """Make the lock files of ``prefix`` (``lock_files``), which retires it: whether it was retired now (not
    when streaming skips it already: one of them exists).

    Only new files, never through a link: the temp folder is everyone's, and a link planted at such a name
    would make this process create or change the file it points to. A link found there is left alone, with
    a warning."""
    locks = lock_files(prefix)
    if any(os.path.exists(f) for f in locks):  # streaming's own test (a link counts by its target)
        return False
    made, links = False, []
    for f in locks:
        try:
            os.close(os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
            made = True
        except FileExistsError:  # a link to nothing, or made meanwhile
            if f.is_symlink():
                links.append(str(f))
        except OSError:  # another user's temp folder, not writable
            pass
    if links:
        log.warning(
            "shared memory: %s left alone, a symbolic link (never followed): prefix %06d %s",
            ", ".join(links),
            prefix,
            "retired by its other lock file" if made else "not retired",
        )
    return made


def lock_files(prefix: int) -> list[Path]:
    """streaming's file locks of shared-memory prefix ``prefix`` in the temp folder, present or not.

    streaming skips a prefix whose lock files exist when it picks one: left behind, they retire the number
    for good (and pile up in the temp folder, one per job).
    """
    import_streaming()  # without transformers (lean_imports.py)
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK

    return [Path(tempfile.gettempdir()) / f"{prefix:06d}_{kind}" for kind in (BARRIER_FILELOCK, CACHE_FILELOCK)]


# mnemo's own file beside a prefix's lock files: every process of the job on this machine that reads the
# dataset holds a shared flock on it (``hold_lock_files``), so that the last one done can tell it is the last.
READERS_FILE = "mnemo_readers"


def _prefix(dataset: object) -> int | None:
    prefix = getattr(dataset, "_shm_prefix_int", None)  # streaming's own record of the prefix it picked
    return prefix if type(prefix) is int else None


def hold_lock_files(dataset: object) -> int | None:
    """Say that this process reads ``dataset`` (a StreamingDataset) until ``release_lock_files(dataset,
    held)``: a shared flock on its prefix's readers file in the temp folder (made if missing), held by the
    returned descriptor. None when there is no prefix or the file cannot be opened (another user's)."""
    prefix = _prefix(dataset)
    if prefix is None:
        return None
    try:
        fd = os.open(_readers_path(prefix), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        # Freshened before it is locked: a file of an earlier job found here is young again, and
        # release_dead_jobs_lock_files, which checks the time after taking the lock, leaves it.
        os.utime(fd)
        fcntl.flock(fd, fcntl.LOCK_SH)  # a last reader holds it exclusively only while it removes the files
    except OSError:
        os.close(fd)
        return None
    return fd


def _readers_path(prefix: int) -> Path:
    return Path(tempfile.gettempdir()) / f"{prefix:06d}_{READERS_FILE}"


_READERS = re.compile(rf"^(\d{{6}})_{READERS_FILE}$")
# A readers file younger than this may be one that a job has just made (or found and freshened) and not yet
# locked (hold_lock_files): not swept.
DEAD_READERS_AGE_S = 60.0


def release_dead_jobs_lock_files(min_age_s: float = DEAD_READERS_AGE_S) -> list[str]:
    """Remove the temp folder's lock files of prefixes whose mnemo job is dead: the names removed.

    A rank killed with SIGKILL leaves its prefix's lock files (and streaming then skips that number for good).
    A prefix is swept only when its readers file (``hold_lock_files``) proves a mnemo job used it and that no
    process reads it: a regular file of this user (not a link), older than ``min_age_s``, that a
    non-blocking exclusive flock gets (every live reader holds a shared one). Its lock files and the readers
    file go; a lock file with no readers file (another program's job, an older mnemo's) stays. Only in the
    temp folder that streaming uses (``tempfile.gettempdir()``).
    """
    folder = Path(tempfile.gettempdir())
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    removed: list[str] = []
    for name in names:
        m = _READERS.match(name)
        if m is None:
            continue
        path = folder / name
        fd = _lock_alone(path)
        if fd is None:  # a link, another user's, gone meanwhile, or a live reader holds it
            continue
        try:
            st = os.fstat(fd)  # after the lock: a job that freshened it before locking shows a new mtime
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or time.time() - st.st_mtime < min_age_s:
                continue
            now = os.stat(path, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # removed and made again meanwhile
                continue
            removed += _remove_lock_files(int(m.group(1)))
        except OSError:  # it went meanwhile
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("removed the temp folder's lock files of mnemo jobs that were killed: %s", ", ".join(removed))
    return removed


def release_lock_files(dataset: object, held: int | None = None) -> list[str]:
    """Remove the file locks that streaming made in the temp folder for ``dataset`` (a StreamingDataset), and
    its readers file: the names removed.

    They are this job's: streaming picked the dataset's prefix only because no lock file of it existed, and
    no other process picks it while the dataset's ``_locals`` segment registers it. No other process of the
    job on this machine may still read the dataset: one that still took the lock would make a new file, and
    two holders of two files would not exclude each other. Either the caller knows (after a barrier, from
    one process), or it passes what ``hold_lock_files`` returned (``held``), with no collective (a run that
    ends on an exception): its hold ends, and the files go only when no other reader holds one (the last
    one done removes them; an earlier one removes nothing).
    """
    prefix = _prefix(dataset)
    if prefix is None:
        return []
    if held is not None:
        os.close(held)  # this process is done reading
        # Never made again here: a reader that found it gone would hold a file no one else sees.
        fd = _lock_alone(_readers_path(prefix))
        if fd is None:  # removed by the last reader already (or not ours), or another reader still holds it
            return []
        try:
            return _remove_lock_files(prefix)
        finally:
            os.close(fd)
    return _remove_lock_files(prefix)


def _lock_alone(readers: Path) -> int | None:
    """A descriptor holding an exclusive flock on the existing readers file ``readers`` (never through a link),
    or None: it is missing or not ours, or a live reader holds its shared lock."""
    try:
        fd = os.open(readers, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_lock_files(prefix: int) -> list[str]:
    removed = []
    for f in [*lock_files(prefix), _readers_path(prefix)]:
        try:
            f.unlink()
            removed.append(f.name)
        except OSError:  # never made (the barrier's, unless iterated; no readers file), or gone already
            pass
    return removed


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def prefix_lock_path(shm_dir: Path = SHM_DIR) -> str:
    """The lock file of streaming's prefix choice, in the shared memory folder whose names it guards.

    Not the temp folder: nodes that share one (several nodes of a job on one host, each with a /dev/shm of
    its own) then took one lock, and a leader holding it waited in streaming's job-wide barrier for the
    other node's leader, which waited for the lock: 60 s (PREFIX_LOCK_WAIT_S) at every start. Jobs that share
    a /dev/shm, the ones whose prefixes can clash, share the lock; others never meet in it."""
    return str(shm_dir / PREFIX_LOCK) if shm_dir.is_dir() else os.path.join(tempfile.gettempdir(), PREFIX_LOCK)


@contextmanager
def _prefix_lock(wait_s: float) -> Iterator[None]:
    """Held by each job's local leader (LOCAL_RANK 0, or a lone process) while its StreamingDataset picks
    and creates its prefix; mnemo's jobs on one machine then never pick the same one. Without the lock
    (another user's lock file, a lock held for ``wait_s``) the caller goes on unlocked."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        yield
        return
    fd = None
    deadline = time.monotonic() + wait_s
    while fd is None:
        try:
            fd = take_flock(prefix_lock_path())
        except LockBusy:
            if time.monotonic() > deadline:
                break
            time.sleep(random.uniform(0.02, 0.1))
        except OSError:  # another user's lock file (a sticky /tmp), a read-only temp folder
            break
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def _attached_segments() -> Iterator[list]:
    """The shared-memory segments streaming attaches to (opens, not creates) while a StreamingDataset is built
    in the block, for ``_close_walked`` after it."""
    prefix_mod = import_streaming().base.shared.prefix
    original = prefix_mod.SharedMemory
    opened: list = []

    def attach(*args, **kwargs):
        shm = original(*args, **kwargs)
        opened.append(shm)
        return shm

    prefix_mod.SharedMemory = attach
    try:
        yield opened
    finally:
        prefix_mod.SharedMemory = original


def _close_walked(opened: list, kept: object) -> None:
    """Close the segments streaming opened only to look at them while it picked a prefix.

    To pick a prefix, a StreamingDataset opens every existing prefix's segments (``_locals``, ``_barrier``, ...)
    and registers each one's cleanup with atexit, which keeps it and its file open until the process exits. A
    process that builds several datasets (a ``data.sources`` mixture) so held sources x (prefixes on the
    machine) x 6 files: 2,527 open files for 20 sources here, and "too many open files" at ~25 sources among
    other jobs' datasets. Each segment it attached to (not created) other than ``kept`` (the dataset's own
    ``_locals_shm``) is closed and its atexit entry dropped; a segment it created is never touched.
    """
    import atexit

    for shm in opened:
        if shm is kept or getattr(shm, "created_shms", True):
            continue
        atexit.unregister(shm.cleanup)
        try:
            shm.cleanup()  # closes the attached segment; never unlinks it (not this process's)
        except (OSError, BufferError):  # still mapped by a view: left open, as before
            pass


# A rank of a job that looks for its local leader's prefix and finds another (another process's segments came or
# went between their scans of /dev/shm): streaming's get_shm_prefix raises one of these two.
PREFIX_MISMATCH = re.compile(
    r"shared memory prefix=\d+ was not registered by local leader|shared memory registered does not match local leader"
)
# The barriers of one StreamingDataset construction in a process group (streaming 0.13, its ``local`` given): two
# in get_shm_prefix, one at the end of its constructor. A rank whose construction stopped on a prefix race calls
# the ones it missed, so that every rank of the job calls the same collectives (none is left waiting in one).
STREAMING_BARRIERS = 3


def _lost_prefix_race(e: BaseException) -> bool:
    """Whether ``e``, raised by a StreamingDataset construction, says its prefix was taken (FileExistsError on
    ``<prefix>_locals``) or that this rank and its local leader picked different prefixes."""
    if isinstance(e, FileExistsError):
        return PREFIX_RACE.search(str(e.filename or e)) is not None
    return isinstance(e, RuntimeError) and PREFIX_MISMATCH.search(str(e)) is not None


class _CountedBarriers:
    """``torch.distributed`` as streaming's modules see it while a dataset is built: its barriers counted."""

    def __init__(self, dist) -> None:
        self.dist, self.count = dist, 0

    def barrier(self, *args, **kwargs):
        self.count += 1
        return self.dist.barrier(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.dist, name)


@contextmanager
def _counted_barriers() -> Iterator[_CountedBarriers]:
    """The barriers that streaming calls in the block, counted (its modules' ``dist`` swapped for the block)."""
    import importlib

    import torch.distributed

    import_streaming()  # without transformers (lean_imports.py)
    counted = _CountedBarriers(torch.distributed)
    modules = [
        m
        for m in map(importlib.import_module, ("streaming.base.shared.prefix", "streaming.base.dataset"))
        if getattr(m, "dist", None) is torch.distributed
    ]
    for m in modules:
        m.dist = counted
    try:
        yield counted
    finally:
        for m in modules:
            m.dist = torch.distributed


def _any_rank(flag: bool, dist) -> bool:
    """Whether ``flag`` is set on any rank of the process group (``dist``, or None: this process alone)."""
    return _max_over_ranks(float(flag), dist) > 0


def _max_over_ranks(value: float, dist) -> float:
    """The largest of the ranks' ``value`` (``dist``, or None: this process alone): one MAX all-reduce on the
    group's device (the CPU where it has gloo, else this rank's CUDA device), in float64 (a byte count stays
    exact)."""
    if dist is None:
        return value
    import torch

    device = "cpu" if "gloo" in str(dist.get_backend()) else torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.float64, device=device)  # [1]
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# What a StreamingDataset's shared memory takes in /dev/shm (streaming 0.13, read with get_item as mnemo does):
# four segments of a page each (``_locals``, ``_barrier``, ``_next_epoch``, ``_cache_usage``) and two arrays of
# one entry per shard (``_shard_states``, a byte; ``_shard_access_times``, 8 bytes). A tmpfs gives each written
# page on demand: when it has none left, the process writing it gets SIGBUS and dies with no message.
SHM_PAGE_SEGMENTS = 4
# On top of that, room for the rest that passes through /dev/shm: torch's data loader workers hand their
# batches over in it, a path of a few KiB in ``_locals``, another job starting. A machine's /dev/shm has tens of
# MiB at least (docker's default: 64 MiB).
SHM_HEADROOM = 1 << 20


def shm_bytes_needed(shards: int) -> int:
    """The free bytes /dev/shm must have for one StreamingDataset of ``shards`` shards (0: not known yet)."""

    def pages(n: int) -> int:
        return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE

    return SHM_PAGE_SEGMENTS * mmap.PAGESIZE + pages(shards) + pages(8 * shards) + SHM_HEADROOM


def _check_shm_room(key: str, shards: int, dist, shm_dir: Path = SHM_DIR) -> None:
    """DataError on every rank of the job when the /dev/shm of any of its machines has less free space than a
    StreamingDataset of ``shards`` shards needs (``shm_bytes_needed``): its segments would get pages there only
    when written, and a rank killed by SIGBUS says nothing. One collective; every rank calls it."""
    need = shm_bytes_needed(shards)
    free = free_bytes(shm_dir) if shm_dir.is_dir() else None  # no /dev/shm: not Linux, nothing to check
    short_here = free is not None and free < need
    worst = _max_over_ranks(float(free) if short_here else -1.0, dist)  # the short machine's free bytes
    if worst < 0:
        return
    where = str(shm_dir) if short_here else f"the {shm_dir} of another machine of this job"
    raise DataError(
        f"{key}: {where} has {int(worst) >> 10} KiB free and mosaicml-streaming's shared memory for this dataset"
        f" needs {need >> 10} KiB: remove what fills {shm_dir}, or give the machine a bigger one (docker run"
        " --shm-size=1g; a tmpfs mounted there with a larger size=)"
    )


def _dispose(dataset: object) -> None:
    """Undo what a StreamingDataset built in an attempt that its job gives up made: its prefix's lock files
    removed (``release_lock_files``), the shared-memory segments this process created for it unlinked (its own:
    made with O_EXCL), the ones it attached to closed, none left for atexit. Called after a collective: no rank
    of the job reads it any more."""
    import atexit

    streaming_memory = import_streaming().base.shared.memory.SharedMemory
    seen: set[int] = set()

    def segments(obj: object, depth: int) -> Iterator:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, streaming_memory):
            yield obj
        elif depth and type(obj).__module__.startswith("streaming.") and hasattr(obj, "__dict__"):
            for value in vars(obj).values():  # SharedScalar -> SharedArray -> SharedMemory, SharedBarrier -> ...
                yield from segments(value, depth - 1)

    # Its lock files first, by the process that made its ``_locals`` segment (the local leader), before it unlinks
    # it: while that exists no other process picks the prefix and makes them. The other ranks remove nothing (the
    # leader may have unlinked it already, and another job taken the prefix and made its own).
    shms = list(segments(dataset, 3))
    locals_shm = getattr(dataset, "_locals_shm", None)
    if any(locals_shm is shm and shm.created_shms for shm in shms):
        release_lock_files(dataset)
    for shm in shms:
        atexit.unregister(shm.cleanup)
        for made in shm.created_shms:
            try:
                made.unlink()
            except FileNotFoundError:
                pass
        for seg in shm.created_shms + shm.opened_shms:
            try:
                seg.close()
            except (OSError, BufferError):  # still mapped by a view: unmapped at exit
                pass


def _one_try(make: Callable[[], T], dist, wait_s: float) -> tuple[T | None, BaseException | None]:
    """One StreamingDataset construction (``make()``): (the dataset, None), or (None, the error) when it lost
    the prefix race (``_lost_prefix_race``), after the barriers of streaming's constructor it missed; any other
    error is raised."""
    lost: BaseException | None = None
    with _prefix_lock(wait_s), _attached_segments() as opened:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # the one that picks the prefix, under the lock
            retire_unfinished_prefixes()
        if dist is not None:
            dist.barrier()
        with _counted_barriers() as barriers:
            try:
                dataset = make()
            except BaseException as e:
                _close_walked(opened, None)
                if not _lost_prefix_race(e):
                    raise
                lost = e
        if lost is not None:
            for _ in range(STREAMING_BARRIERS - barriers.count if dist is not None else 0):
                dist.barrier()
            return None, lost
    _close_walked(opened, getattr(dataset, "_locals_shm", None))
    return dataset, None


def streaming_dataset(
    make: Callable[[], T], key: str, wait_s: float = PREFIX_LOCK_WAIT_S, shards: int = 0, shm_dir: Path = SHM_DIR
) -> T:
    """``make()`` (a StreamingDataset construction) safe against another one starting or ending on this machine
    at the same moment; DataError naming ``key`` when streaming's shared-memory prefix stays taken, or, before
    anything is made, when /dev/shm has no room for the dataset's segments (``shards``: its number of shards, 0
    when not known yet; ``_check_shm_room``, in ``shm_dir``).

    Each job's local leader picks its prefix under a machine-wide lock (the other local ranks wait at a
    barrier until it holds it, since they look up the prefix too), which settles the race between mnemo's
    jobs. Against any other process, and against a job that ends (unlinks its segments) between the scans of
    /dev/shm of two local ranks (they then pick different prefixes), every rank of the job learns after each
    construction whether any lost such a race (one collective), and then all try again together after a short
    random back-off, up to PREFIX_TRIES times: each rank first removes the segments it created for the attempt
    given up (``_dispose``). A rank whose construction stopped calls the barriers of streaming's constructor it
    missed, so the ranks' collectives pair in every case.
    """
    dist = _dist()
    _check_shm_room(key, shards, dist, shm_dir)
    err: BaseException | None = None
    for attempt in range(PREFIX_TRIES):
        if attempt:
            time.sleep(random.uniform(0.05, 0.25) * attempt)
        dataset, err = _one_try(make, dist, wait_s)
        if not _any_rank(err is not None, dist):
            return dataset  # type: ignore[return-value]  # no rank failed: this one has its dataset
        if dataset is not None:
            _dispose(dataset)  # another rank lost the race: this attempt is given up by all
    if isinstance(err, FileExistsError):
        raise DataError(
            f"{key}: the shared-memory segment {err.filename or err} that mosaicml-streaming chose for this dataset"
            f" was created by another process starting at the same moment ({PREFIX_TRIES} tries): start this job"
            " again"
        ) from None
    raise DataError(
        f"{key}: the ranks of this job on one machine picked different mosaicml-streaming shared-memory prefixes"
        f" for this dataset, as another process's segments came or went while they looked ({PREFIX_TRIES} tries):"
        " start this job again"
    ) from None
