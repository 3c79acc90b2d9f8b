"""User-facing errors: caught by the CLI and printed as one line."""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

# One escaping of control characters for every layer (evaluation/ prints paths too, and may not import train/);
# re-exported: the name train/, launch/ and the CLI use.
from mnemo.data_pipeline.errors import visible  # noqa: F401


class UserError(Exception):
    """Bad input from the user (config, paths, checkpoints): message names the culprit."""


@contextmanager
def path_errors(what: str, error: type[UserError] = UserError) -> Iterator[None]:
    """An OSError inside, from a path the user gave, as ``error``: "WHAT: PATH: reason", ``what`` the key or flag.

    pathlib's exists/is_dir/is_file answer False only for a missing file (or a
    loop of links); a name too long (a component over 255 bytes), a directory
    without search permission and the like raise, and were tracebacks. Wrap
    the checks of one key's path (and what they call) in this.
    """
    try:
        yield
    except OSError as e:
        from mnemo.data_pipeline.errors import clip
        from mnemo.data_pipeline.redact import redact_uri

        where = f"{clip(redact_uri(str(e.filename)))}: " if e.filename is not None else ""
        raise error(f"{what}: {where}{e.strerror or e}") from None


@contextmanager
def write_errors(what: str, path: str | os.PathLike, hidden: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """A full disk or quota, a read-only file system or a refused path while writing ``path``, as one
    UserError "WHAT: PATH: reason" (exit_status alone could name only the file that failed, or none).

    ``hidden``: a library's exception types that need not chain the OSError (torch.save to a path: a
    RuntimeError "unexpected pos"; safetensors: SafetensorError "... (os error 28)"). Such a failure
    counts when its message ends in Rust's "(os error N)" for one of those errnos, or when the file
    system of ``path`` is read-only or has no free block left right after it. Anything else propagates
    unchanged: a bug stays a traceback.
    """
    try:
        yield
    except Exception as e:
        reason = _storage_reason(e, path, hidden)
        if reason is None:
            raise
        from mnemo.data_pipeline.errors import clip
        from mnemo.data_pipeline.redact import redact_uri

        raise UserError(f"{what}: {clip(redact_uri(str(path)))}: {reason}") from e


def _storage_reason(e: BaseException, path: str | os.PathLike, hidden: tuple[type[BaseException], ...]) -> str | None:
    from mnemo.data_pipeline.errors import STORAGE_ERRNOS, storage_error

    found = storage_error(e)
    if found is not None:
        return found.strerror or str(found)
    if not isinstance(e, hidden):
        return None
    code = re.search(r"\(os error (\d+)\)", str(e))
    if code and int(code[1]) in STORAGE_ERRNOS:
        return os.strerror(int(code[1]))
    where = os.path.abspath(path)
    while not os.path.exists(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    try:
        fs = os.statvfs(where)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if fs.f_bavail == 0:  # nothing left for this user (root's reserve included when root: then f_bfree is 0)
        return os.strerror(errno.ENOSPC)
    import resource

    # A per-process file size limit (`ulimit -f`), which the file system's numbers do not show; Python ignores
    # SIGXFSZ, so the write failed with EFBIG inside the library.
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY:
        return f"{os.strerror(errno.EFBIG)} (this process writes files of at most {soft:,} bytes: ulimit -f)"
    return None


def tolerant_stdout() -> None:
    """Have stdout write what its encoding cannot hold as escapes (``t\\xf6k.model``), as stderr already does.

    Under PYTHONIOENCODING=ascii, or a C locale without UTF-8 mode, a file name, a sample or generated text
    with a non-ASCII character was a UnicodeEncodeError after the work was done (exit 1). A UTF-8 stdout
    is unchanged: every character encodes. Called by the entry points (the CLI, a rank, the demo).
    """
    reconfigure = getattr(sys.stdout, "reconfigure", None)  # not a TextIOWrapper: a caller's stand-in
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")


def stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone: polling its write end reports an error (POLLERR).
    (A flush does not tell: the failed write already dropped what was buffered.)"""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a caller's StringIO), or closed
        return False


# What a collective says when another rank of the job went away (its process died or stopped on its own
# error): gloo's socket errors, NCCL's aborted communicator.
_PEER_LOST = re.compile(
    r"Connection (?:closed|reset) by peer|NCCL communicator was aborted|remote process exited or there was a"
    r" network error"
)


def peer_lost(e: BaseException) -> str | None:
    """The one-line reason when ``e`` is a collective of this rank failing because another rank left the job
    (a rank on another node failed: every other rank then printed a 30-line gloo traceback under the first
    rank's own one-line error), else None."""
    from mnemo.data_pipeline.errors import clip, error_chain, first_line

    for err in error_chain(e):
        if isinstance(err, RuntimeError) and (m := _PEER_LOST.search(str(err))):
            return (
                f"another rank of this job stopped ({m[0]}): this rank stops too; the other rank's error, "
                f"or its node's, tells why ({clip(first_line(err), 200)})"
            )
    return None


def exit_status(command: Callable[[], int | None], debug: bool = False) -> int:
    """Run one command; its exit status.

    A user error (UserError, DataError, EvalError, a missing file; a full disk or quota, a read-only
    file system or a refused path, also inside a library's own error: data_pipeline.errors.storage_error;
    too many open files, no memory left, no thread or process to be had: limit_reached) is one line
    ``mnemo: error: ...`` on stderr (control characters in it, such as a newline in a file name, written
    as escapes: ``visible``) and status 2. Any other error (a bug) prints its traceback, credentials in it
    redacted (``redact_uri``), and status 1; with ``debug`` every error's traceback is printed so, and the
    status is 2 for a user error, 1 for any other. Ctrl-C is ``mnemo: interrupted`` and 130. The CLI
    and the launcher's worker (a rank under torchrun) both run commands so.
    """
    from mnemo.data_pipeline.errors import DataError, error_chain, limit_reached, storage_error, storage_error_path
    from mnemo.data_pipeline.redact import print_traceback, redact_uncaught_errors, redact_uri
    from mnemo.evaluation.errors import EvalError

    redact_uncaught_errors()  # a thread's error, printed by Python, is shown as redacted as the command's own
    try:
        rc = command()
    except KeyboardInterrupt:
        print("mnemo: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if any(isinstance(err, KeyboardInterrupt) for err in error_chain(e)):
            # A Ctrl-C that a library's clean-up turned into its own error: torch.save's zip writer finishes
            # the file in __exit__ while the KeyboardInterrupt unwinds ("unexpected pos ..."): an interrupt.
            print("mnemo: interrupted", file=sys.stderr)
            return 130
        if isinstance(e, BrokenPipeError) and stdout_gone():
            # `mnemo data inspect D | head`: the reader has what it wanted. Quiet, as a Unix tool is; stdout goes
            # to /dev/null so that Python's own flush at exit does not print the error again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        user = (UserError, DataError, EvalError, FileNotFoundError)
        storage = None if isinstance(e, user) else storage_error(e)
        limit = None if isinstance(e, user) or storage is not None else limit_reached(e)
        known = isinstance(e, user) or storage is not None or limit is not None
        lost = None if known or debug else peer_lost(e)
        if lost is not None:  # not this rank's fault: one line, the other rank's own error tells the cause
            print(f"mnemo: error: {visible(redact_uri(lost))}", file=sys.stderr)
            return 1
        if debug or not known:
            # The traceback (asked for, or a bug's), printed here rather than raised: the error and the
            # frames' lines may quote a value that is a URI with credentials (a bug in code that was
            # handed a tracking.uri), hidden as on the one line. The status is the one the error gets
            # without --debug (2), or Python's for an uncaught exception (1).
            print_traceback(e)
            return 2 if known else 1

        if limit is not None:
            msg = limit
        elif storage is None:
            msg = str(e).strip() or type(e).__name__
        else:  # the file at fault where the OSError names it (a write's own error does not)
            reason = storage.strerror or str(storage)
            where = storage_error_path(storage)
            msg = f"{where}: {reason}" if where is not None else reason
        # A bad value may be a URI with credentials (tracking.uri, a data URL): never print them. A value
        # holding a newline or an escape sequence (a file name) is shown escaped, on the one line.
        print(f"mnemo: error: {visible(redact_uri(msg))}", file=sys.stderr)
        return 2
    return int(rc or 0)
