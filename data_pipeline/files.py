"""Files written whole or not at all, and fsync: what prepare, checkpoints and exports commit with."""

from __future__ import annotations

from collections.abc import Callable

import datetime
import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any


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


def make_dirs(folder: str | Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, outermost first.

    What a command made for output it then failed to write: ``remove_made_dirs`` takes them away
    again, and nothing that was there before.
    """
    folder = Path(folder)
    missing = []
    p = folder
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not missing and not folder.is_dir():  # as mkdir(exist_ok=True): a file there is no folder
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(folder))
    # One at a time, each recorded: mkdir(parents=True) failing deeper down (a name too long) left the
    # parents it had made, which no caller knew of. On a failure the ones made here are removed again.
    made: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue  # made meanwhile by someone else: not ours to remove
            made.append(d)
    except BaseException:
        remove_made_dirs(made)
        raise
    return made


def remove_made_dirs(made: list[Path]) -> None:
    """Remove the folders ``make_dirs`` created, innermost first, each only while empty (what was
    written into them stays, and so do they)."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            pass


def new_file_mode() -> int:
    """The permissions open() gives a new file: 0o666 less the process's umask.

    For files made another way (mkstemp and safetensors make them 0600) that should read like the
    rest of the folder. The umask is read by setting it and setting it back (there is no getter).
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


# The most bytes in one name (a path component) on Linux's file systems (ext4, xfs, btrfs, tmpfs, NFS).
NAME_MAX = 255
# The most bytes mnemo adds after a user's name in a name of its own beside it (``sibling``'s tag:
# ".mnemo-export-new-PID" with a 7-digit pid is 25, mkstemp's ".XXXXXXXX.tmp" 13).
SIBLING_TAG_ROOM = 32


def fit_name(name: str, room: int) -> str:
    """``name`` as the start of a longer name of mnemo's (a temporary file, a lock), leaving ``room``
    bytes of NAME_MAX for what is added: ``name`` itself when it fits, else its start cut (whole
    characters) and ``~`` + 8 hex digits of its sha256, so two long names cut alike still differ.

    A legal name of up to 255 bytes plus mnemo's few bytes was over NAME_MAX: the temporary file could
    not be made ("File name too long"), after the work it was to hold had been done.
    """
    raw = os.fsencode(name)
    if len(raw) + room <= NAME_MAX:
        return name
    mark = "~" + hashlib.sha256(raw).hexdigest()[:8]
    cut = name
    while len(os.fsencode(cut)) > NAME_MAX - room - len(mark):
        cut = cut[:-1]
    return cut + mark


def sibling(path: str | os.PathLike, tag: str) -> Path:
    """The hidden name mnemo makes beside ``path`` for a file or folder of its own: ``.NAME`` + ``tag``
    (``tag``: ".tmp1234", ".mnemo-export.lock"...), NAME cut by ``fit_name`` where the whole would be
    over NAME_MAX. All the siblings of one ``path`` start alike (the cut does not depend on ``tag``), so
    ``sibling(path, "")`` + a pattern finds them."""
    if len(os.fsencode(tag)) > SIBLING_TAG_ROOM:
        raise ValueError(f"sibling tag {tag!r}: longer than {SIBLING_TAG_ROOM} bytes")
    path = Path(path)
    return path.parent / f".{fit_name(path.name, 1 + SIBLING_TAG_ROOM)}{tag}"


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove the file ``path`` if there, ignoring every OSError: a clean-up that must not hide the error
    being raised (unlink(missing_ok=True) still raises for a name too long or a folder without permission)."""
    try:
        os.unlink(path)
    except OSError:
        pass


class OutputTaken(FileExistsError):
    """``publish`` found at ``path`` a file it may not replace, put there while the output was being made
    (the command's start-up check had found nothing there, or a file mnemo wrote). ``kept``: where the new
    file was kept instead (``kept_note``), or None when it was discarded."""

    def __init__(self, path: str | Path, kept: Path | None):
        super().__init__(errno.EEXIST, "exists and is not mnemo's to replace", str(path))
        self.kept = kept

    def kept_note(self, what: str) -> str:
        """The caller's one-line error's part saying so: "the new WHAT is in KEPT" or "... was discarded"."""
        return f"the new {what} is in {self.kept}" if self.kept is not None else f"the new {what} was discarded"


# link(2) errors of a file system without hard links (some FUSE and SMB/CIFS mounts, vfat).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def publish(tmp: str | Path, path: str | Path, may_replace: Callable[[Path], bool] | None = None) -> None:
    """Move the finished file ``tmp`` to ``path`` (same file system).

    ``may_replace`` None: renamed over whatever is at ``path`` (files only mnemo writes: a run or state
    dir's). Otherwise ``path`` is a user's output, checked when the command started, minutes or hours ago:
    what is there now is replaced only if ``may_replace(path)`` (e.g. "mnemo wrote it") says so, asked
    again just before the rename; where nothing is there, the file is hard-linked in, since link(2), unlike
    a rename, fails when the name was taken meanwhile (a user's file, a second mnemo writing the same
    output). A name taken is OutputTaken, the new file kept beside it under a name of its own (never
    replacing anything) or else removed.
    """
    tmp, path = Path(tmp), Path(path)
    if may_replace is not None and not os.path.lexists(path):
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # taken since the look above: judged below like a file found there
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
            # No hard links on this file system: the rename, the name looked at just before it (a file
            # made in between is replaced, as before this check existed; nothing better is portable).
            if not os.path.lexists(path):
                os.replace(tmp, path)
                return
        else:
            os.unlink(tmp)
            return
    if may_replace is not None and not may_replace(path):
        raise OutputTaken(path, _keep_aside(tmp, path))
    os.replace(tmp, path)


def _keep_aside(tmp: Path, path: Path) -> Path | None:
    """``tmp`` linked in as ``STEM.mnemo-new-PID.SUFFIX`` beside ``path`` when that name is free (then
    returned), else removed (None)."""
    tag = f".mnemo-new-{os.getpid()}"
    name = f"{path.stem}{tag}{path.suffix}"
    if len(os.fsencode(name)) > NAME_MAX:  # a long name: its start and a hash, then the tag (no suffix)
        name = fit_name(path.name, len(tag)) + tag
    kept: Path | None = path.with_name(name)
    try:
        os.link(tmp, kept)
    except OSError:
        kept = None
    remove_quietly(tmp)
    return kept


def atomic_write(
    path: str | Path,
    data: bytes,
    tmp_dir: str | Path | None = None,
    mode: int | None = None,
    may_replace: Callable[[Path], bool] | None = None,
) -> None:
    """Write ``path`` whole or not at all, durably (data and rename fsynced).

    The temporary file goes into ``tmp_dir`` (default: beside ``path``, hidden);
    it must be on the same file system as ``path``. ``mode``: the file's
    permissions, set before the rename (a chmod of ``path`` afterwards would
    follow a link put there meanwhile). The rename replaces a symbolic link
    at ``path``; it never writes through it. ``may_replace``: for a user's
    output, what ``publish`` may replace (OutputTaken otherwise).
    """
    path = Path(path)
    tmp = Path(tmp_dir or path.parent) / sibling(path, f".tmp{os.getpid()}").name
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path, may_replace)
    except BaseException as e:  # a full disk, a target that is a directory, Ctrl-C: no temp file left behind
        remove_quietly(tmp)  # never raising itself: the error to report is e
        if isinstance(e, OSError) and e.filename is None:  # a failed write or fsync names no file: name the target
            e.filename = str(path)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    atomic_write(path, text.encode(), mode=mode)


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


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged process may still write on ``path``'s file system; None when unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def unwritable_dir(folder: str | os.PathLike) -> str | None:
    """Why no file can be made in the existing directory ``folder`` ("Read-only file system", "Permission
    denied"), or None.

    Asked ahead of a write that comes later (in another process, after other files were written). access()
    answers EROFS and EACCES alike (and root passes permission bits), so a read-only mount is told by statvfs.
    """
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    except OSError:
        pass
    return os.strerror(errno.EACCES)


def open_own_file(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """A descriptor of the regular file at ``path`` opened with ``flags`` (``O_CREAT``: made with ``mode``
    if missing), never through a symbolic link: NotRegularFile ("a symbolic link", "not a regular file")
    when ``path`` is a link, a FIFO, a device, a socket or a directory. Other OSErrors as os.open raises them.

    For files mnemo writes in place at a fixed name (a lock file, a node log): O_NOFOLLOW, since a link
    put there would have mnemo's text written into its target, wherever it points; O_NONBLOCK for the
    open, since a FIFO there would block it for ever (it is then refused on the descriptor).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile("a symbolic link") from None
        if e.errno == errno.ENXIO:  # a FIFO opened to write, without a reader
            raise NotRegularFile("not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile("not a regular file")
    os.set_blocking(fd, True)
    return fd


class LockBusy(Exception):
    """Another process holds the lock; ``holder``: who, as its lock file says (host, pid, since)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('started', '?')}"
    except (json.JSONDecodeError, AttributeError):
        return "holder unknown"


_HOLDER_KEYS = {"host", "pid", "started"}


def _wrote_holder(raw: bytes) -> bool:
    """Whether ``raw``, a lock file's first bytes, is what ``take_flock`` writes there: nothing yet (made, not
    written), or a holder's JSON line (a longer earlier holder's rest may follow it, when a kill came between
    the write and the cut)."""
    if not raw:
        return True
    try:
        h = json.loads(raw.split(b"\n", 1)[0])
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    return isinstance(h, dict) and set(h) == _HOLDER_KEYS


def take_flock(path: str | Path) -> int:
    """An exclusive ``fcntl.flock`` on ``path`` (made if missing), held by the returned descriptor; the
    file then says who holds it (host, pid, start time). LockBusy when another process holds it;
    NotRegularFile when ``path`` is a symbolic link or not a regular file (``open_own_file``), or a file
    holding other text than a holder's (a user's file: never written over); OSError when it cannot be
    opened or locked.

    The kernel releases the lock when the process exits, however it exits (SIGKILL included), so a
    rerun after a crash is never blocked by its own earlier self and there is no stale lock to clean up
    (train/runlock.py: the run directory's lock; data_pipeline/outputs.py: --out's). The descriptor is
    not inherited by programs the process starts (Python opens it non-inheritable), but a fork shares it.
    """
    # O_RDWR without O_TRUNC: a process that finds the lock held must still read who holds it. Never
    # through a link: the holder's text would be written over the link's target, wherever it points.
    fd = open_own_file(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise LockBusy(_holder_text(raw)) from None
    if not _wrote_holder(os.pread(fd, 4096, 0)):
        os.close(fd)  # the lock goes with it: nothing was written
        raise NotRegularFile("a file mnemo did not write (not a lock file of its own); not writing over it")
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    data = (json.dumps(info) + "\n").encode()
    os.pwrite(fd, data, 0)  # then cut the previous holder's longer text: never an empty file to read
    os.ftruncate(fd, len(data))
    os.fsync(fd)
    return fd


def take_flock_at(path: str | Path, before: Callable[[], None] | None = None) -> int:
    """``take_flock`` on the file that is at ``path`` once the lock is held.

    A lock file that its holder removes when it ends (data_pipeline/out_lock.py, train/export.py) can
    be locked by a waiter just before the removal: that waiter then holds a file no longer at the path,
    and a third process would lock a new one. So the lock is taken again until the descriptor's file is
    the one at the path. ``before`` runs ahead of each try (out_lock makes the folder, which the holder
    may have removed too). LockBusy / OSError as ``take_flock``.
    """
    while True:
        if before is not None:
            before()
        fd = take_flock(path)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


# The most bytes a JSON file of a dataset (index.json, manifest.json) or of prepare's state may have. Real
# ones hold about 600 bytes per shard (index.json: 256 MiB is some 400,000 shards of up to 64 MiB) and 100
# per input file (manifest.json: over 2 million files); a bigger one is not read into memory (a crafted
# dataset dir: a link to a huge file).
MAX_JSON_BYTES = 256 << 20


class NotRegularFile(OSError):
    """A file that was not read or written: a directory, FIFO, device, socket or symbolic link (where
    ``open_own_file`` refuses one), or bigger than the caller's bound.

    An OSError, so that callers already handling a file that cannot be read handle this one too; its
    message is the reason ("a FIFO (named pipe), not a regular file").
    """


def open_regular(path: str | os.PathLike, buffering: int = -1) -> io.BufferedReader:
    """``path`` opened for binary reading when it is a regular file; else NotRegularFile saying what it is.

    What it is is looked at before the open (a device is never opened) and again on the open descriptor
    (a file swapped for a FIFO in between); the open does not block (a FIFO without a writer would wait
    forever). FileNotFoundError, PermissionError...: as open() raises them. ``buffering``: as open()'s.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotRegularFile(not_a_regular_file(path) or "not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile("not a regular file (replaced while being opened)")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


# Deepest nesting of a JSON file mnemo reads (its own: under 10 levels). JSON nested deeper than Python's
# recursion limit fails to parse (RecursionError); nested nearly as deep it parses, and whatever walks it
# next (json.dumps, redact_tree) overflows.
JSON_DEPTH = 100


def load_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES, depth: int = JSON_DEPTH) -> Any:
    """The JSON value in regular file ``path`` (read_bounded), a file someone may have sent.

    OSError (NotRegularFile included) when the file cannot be read; ValueError when its content is not
    UTF-8 JSON or nests more than ``depth`` levels. Callers turn these into their own one-line errors.
    """
    data = read_bounded(path, limit)
    try:
        tree = json.loads(data)
    except RecursionError:
        raise ValueError(f"JSON nested more than {depth} levels deep") from None
    level = [tree]
    for _ in range(depth):  # breadth first, without recursion
        level = [v for o in level if isinstance(o, (dict, list)) for v in (o.values() if isinstance(o, dict) else o)]
    if any(isinstance(o, (dict, list)) for o in level):
        raise ValueError(f"JSON nested more than {depth} levels deep")
    return tree


_GROWTH_CHUNK = 1 << 20  # bytes read at a time from a file that grew while read_bounded read it


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of regular file ``path`` (open_regular), NotRegularFile when it holds more than ``limit``.

    The bound keeps a file that is not what it claims (a huge JSON file in a dataset someone sent)
    from being read into memory whole.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        parts: list[bytes] = []
        got = 0
        # read(n) allocates its n bytes up front: asking for the bound (256 MiB) for every small JSON file
        # reserved that much address space, and `ulimit -v` refused it. Ask for the size (and a byte to see
        # the file grow), then, if it grew, go on in chunks up to one byte past the bound.
        want = size + 1
        while size <= limit and got <= limit:
            chunk = f.read(min(want, limit + 1 - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
            want = _GROWTH_CHUNK
        data = b"".join(parts)
    if size > limit:
        raise NotRegularFile(f"{size:,} bytes, over the {limit:,}-byte bound for this file")
    if len(data) > limit:
        raise NotRegularFile(f"grew past the {limit:,}-byte bound for this file while being read")
    return data
