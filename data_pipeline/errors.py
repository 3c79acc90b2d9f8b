"""Errors of the data pipeline that the CLI prints as one line, and how every error message quotes a value."""

from __future__ import annotations

import errno
import os
import re
import reprlib
from collections.abc import Callable, Iterator
from typing import Any

# Unicode category Cc: C0 controls, DEL and C1 controls (U+009B is a CSI to some terminals); and the format
# characters that reorder or break a line on a terminal: bidi embeddings, overrides and isolates (U+202A-202E,
# U+2066-2069; a file name "n\u202etxt.exe" displays reversed), the directional marks (U+200E, U+200F,
# U+061C) and the line/paragraph separators (U+2028, U+2029).
# Also lone surrogates: a file name's bytes that are not UTF-8 come to Python as U+DC80..U+DCFF, which a
# UTF-8 terminal's stdout cannot encode (a UnicodeEncodeError after the work was done): shown as \xNN.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: str, keep: str = "") -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\x1b``, ``\\u202e``), except ``keep``'s.

    So a value from a file name, a corpus or a dataset can neither break a
    one-line message nor send escape sequences to the terminal.
    """
    return _CONTROL.sub(lambda m: m[0] if m[0] in keep else _NAMED.get(m[0], _escape(m[0])), text)


def _escape(ch: str) -> str:
    if 0xDC80 <= ord(ch) <= 0xDCFF:  # the byte a surrogate-escaped file name held
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


class DataError(Exception):
    """Bad corpus, tokenizer or shard: the message names the file, field or shard."""


class InputError(DataError):
    """A corpus input that could not be read as planned: bad data, a --strict error, a file that changed.

    A conversion that stopped on one cannot be finished by rerunning it (prepare records it, so that
    the next run with fixed inputs starts over instead of being refused).
    """


# The machine's state, not bad input nor a bug: a full disk or quota, a read-only file system, and a
# permission refused on a named path (found after the checks before a command, or changed since).
# EFBIG: a file over this process's size limit (`ulimit -f`, RLIMIT_FSIZE) or the file system's largest file.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
_NEEDS_PATH = frozenset({errno.EACCES, errno.EPERM})  # without one, EPERM is e.g. a signal to another user's process


def storage_error(e: BaseException | None) -> OSError | None:
    """The OSError of a full disk or quota, a read-only file system or a refused path in ``e`` or the
    exceptions it was raised from or while handling (``__cause__``, else ``__context__`` unless
    suppressed), or None.

    Libraries wrap it: torch.save's "unexpected pos" RuntimeError has it as its context.
    """
    for err in error_chain(e):
        if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
            if err.errno not in _NEEDS_PATH or err.filename is not None:
                return err
    return None


def storage_error_path(err: OSError) -> str | None:
    """The file a ``storage_error`` is about, for its one line; None when it names none.

    A copy or move names two (shutil.copy: ``filename`` the source, ``filename2`` the target): a full disk
    or quota or a read-only file system is the target's, which is named alone (a full data.cache_dir was
    reported as the dataset's own index.json or shard: "data/base/index.json: No space left on device");
    a refused path may be either's, and both are named ("SRC -> DST").
    """
    if err.filename is None:
        return None
    if err.filename2 is None:
        return str(err.filename)
    if err.errno in _NEEDS_PATH:
        return f"{err.filename} -> {err.filename2}"
    return str(err.filename2)


def error_chain(e: BaseException | None) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from or while handling (``__cause__``, else ``__context__``
    unless suppressed), each once."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__


def limit_reached(e: BaseException | None) -> str | None:
    """The one-line reason when ``e`` or what it was raised from is the machine or a limit of this process
    running out: open files (``ulimit -n``), memory (``ulimit -v``), threads and processes (``ulimit -u``);
    else None. Libraries wrap these (streaming's shared memory, DeepSpeed importing torch), and they
    are not bugs: the CLI and a rank print this line, not a traceback."""
    for err in error_chain(e):
        if isinstance(err, MemoryError) or _library_unmapped(err):
            return out_of_host_memory(err, host_memory_advice())
        code = err.errno if isinstance(err, OSError) else _quoted_errno(err)
        if code == errno.EMFILE:
            return f"too many open files ({_open_files_limits()})"
        if code == errno.ENFILE:
            return "too many open files on this machine (its limit, sysctl fs.file-max, is reached)"
        # Python's own words, and a C++ library's std::thread refused (std::system_error: sentencepiece's
        # encoding threads under `ulimit -v`, whose stacks did not fit).
        thread = isinstance(err, RuntimeError) and (
            str(err).startswith(("can't start new thread", "can't create new thread"))
            or str(err) == os.strerror(errno.EAGAIN)
        )
        if thread or (isinstance(err, OSError) and err.errno == errno.EAGAIN and _starting_a_process(err)):
            return f"cannot start a thread or process ({_thread_limits()})"
    return None


def _quoted_errno(e: BaseException) -> int | None:
    """EMFILE or ENFILE where a C++ library's RuntimeError quotes it in words only (gloo's "[enforce fail at
    .../loop.cc:48] ... pipe: Too many open files", c10d's "(errno: 24 - Too many open files)"), else None."""
    if not isinstance(e, RuntimeError):
        return None
    text = str(e)
    # ENFILE's words ("Too many open files in system") hold EMFILE's: looked for first.
    return next((code for code in (errno.ENFILE, errno.EMFILE) if os.strerror(code) in text), None)


def _library_unmapped(e: BaseException) -> bool:
    """Whether ``e`` is a shared library (torch's libtorch_cpu.so, some 1-3 GB of address space) that the
    dynamic loader could not map under this process's ``ulimit -v``: an ImportError whose message is the
    loader's "failed to map segment from shared object" or "cannot allocate memory"."""
    if not isinstance(e, ImportError) or _soft_limit("RLIMIT_AS") == "unlimited":
        return False
    text = str(e).lower()
    return "failed to map segment" in text or os.strerror(errno.ENOMEM).lower() in text


def _thread_limits() -> str:
    """The limits that refuse a thread or process: ``ulimit -u``, and ``ulimit -v`` where set (a thread's
    stack is address space)."""
    limits = [f"ulimit -u is {_soft_limit('RLIMIT_NPROC')}"]
    space = _soft_limit("RLIMIT_AS", 1024)
    if space != "unlimited":
        limits.append(f"ulimit -v is {space} (KiB)")
    return f"{', '.join(limits)}; raise {'it' if len(limits) == 1 else 'the one that is low'}"


def out_of_host_memory(e: BaseException, advice: str, where: str = "") -> str:
    """The one wording of a MemoryError (or a shared library that could not be mapped): "out of host
    memory{where} (its message): ``advice``", ``where`` saying when (" at step 3")."""
    return f"out of host memory{where} ({first_line(e)}): {advice}"


def host_memory_advice() -> str:
    """What to do about host memory that ran out, the address-space limit named where one is set."""
    limit = _soft_limit("RLIMIT_AS", 1024)
    if limit != "unlimited":
        return f"ulimit -v is {limit} (KiB); raise it, or free memory"
    return "free memory, or use a machine with more"


def _open_files_limits() -> str:
    """What to raise when the files run out: the soft limit (mnemo raises it only so far) up to the hard one
    where that is higher, else the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        most = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        return f"ulimit -n is {soft}; raise it, up to its hard limit {most}: ulimit -n {most}"
    return f"ulimit -n is {_soft_limit('RLIMIT_NOFILE')}, its hard limit too; raise the hard limit (ulimit -Hn)"


def _soft_limit(name: str, unit: int = 1) -> str:
    """This process's soft limit ``resource.NAME`` in ``unit``s, as ``ulimit`` shows it: a number or "unlimited"."""
    import resource

    soft = resource.getrlimit(getattr(resource, name))[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft // unit)


def _starting_a_process(e: OSError) -> bool:
    """Whether ``e`` (EAGAIN) came from a fork, clone or spawn (the line that raised it says so): the same errno
    from a non-blocking read is not a process limit."""
    import linecache

    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return any(word in line for word in ("fork", "spawn", "clone"))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch's and pyarrow's are paragraphs), else its type's name."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, "..." where cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A byte that is not UTF-8 in a name (U+DC80..U+DCFF, surrogate-escaped) as repr() writes it: a backslash and
# "udcNN" after an even run of backslashes (repr doubles each backslash of the value: the text "\\udcff" is
# written "\\\\udcff", which is no escape).
_REPR_SURROGATE = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")


class _Repr(reprlib.Repr):
    """reprlib's bounded repr, with a function applied to each string before it is cut (``brief``'s hide)."""

    def __init__(self, hide: Callable[[str], str] | None):
        super().__init__()
        self.hide = hide
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 100, 100, 60
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 8

    def repr_str(self, x: str, level: int) -> str:
        return super().repr_str(self.hide(x) if self.hide else x, level)


def brief(value: Any, limit: int = 120, hide: Callable[[str], str] | None = None) -> str:
    """repr(value) for an error message, at most ``limit`` characters, nested containers cut short.

    reprlib looks only at what it shows, so a huge value (a pasted 5000-digit number, a "billion laughs"
    of YAML aliases, whose whole repr was 39 MB and 9 s) costs no time. ``hide``: applied to every string
    before it is cut (credentials in a URI: a cut that dropped the "@" of user:token@host would leave
    the token for a redaction of the message to miss). A byte that is not UTF-8 in a file name (which
    comes to Python surrogate-escaped) is shown as the byte, ``\\xff``, as ``visible`` shows it.
    """
    try:
        # the byte a surrogate-escaped name held as visible() shows it ('out\\xff', not 'out\\udcff')
        return clip(_REPR_SURROGATE.sub(r"\1\\x\2", _Repr(hide).repr(value)), limit)
    except Exception:  # a repr that fails (an int past str()'s digit limit): name the type
        return f"<{type(value).__name__}>"
