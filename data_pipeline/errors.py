"""Errors of the data pipeline that the CLI prints as one line, and how every error message quotes a value."""

from __future__ import annotations

import errno
import reprlib
from collections.abc import Callable
from typing import Any


class DataError(Exception):
    """Bad corpus, tokenizer or shard: the message names the file, field or shard."""


class InputError(DataError):
    """A corpus input that could not be read as planned: bad data, a --strict error, a file that changed.

    A conversion that stopped on one cannot be finished by rerunning it (prepare records it, so that
    the next run with fixed inputs starts over instead of being refused).
    """


# The machine's state, not bad input nor a bug: a full disk or quota, a read-only file system, and a
# permission refused on a named path (found after the checks before a command, or changed since).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_NEEDS_PATH = frozenset({errno.EACCES, errno.EPERM})  # without one, EPERM is e.g. a signal to another user's process


def storage_error(e: BaseException | None) -> OSError | None:
    """The OSError of a full disk or quota, a read-only file system or a refused path in ``e`` or the
    exceptions it was raised from or while handling (``__cause__``, else ``__context__`` unless
    suppressed), or None.

    Libraries wrap it: torch.save's "unexpected pos" RuntimeError has it as its context.
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            if e.errno not in _NEEDS_PATH or e.filename is not None:
                return e
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch's and pyarrow's are paragraphs), else its type's name."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def clip(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, "..." where cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    the token for a redaction of the message to miss).
    """
    try:
        return clip(_Repr(hide).repr(value), limit)
    except Exception:  # a repr that fails (an int past str()'s digit limit): name the type
        return f"<{type(value).__name__}>"
