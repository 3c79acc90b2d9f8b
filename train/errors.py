"""User-facing errors: caught by the CLI and printed as one line."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

# Unicode category Cc: C0 controls, DEL and C1 controls (U+009B is a CSI to some terminals).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: str, keep: str = "") -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\x1b``), except those in ``keep``.

    So a value from a file name, a corpus or a dataset can neither break a
    one-line message nor send escape sequences to the terminal.
    """
    return _CONTROL.sub(lambda m: m[0] if m[0] in keep else _NAMED.get(m[0], f"\\x{ord(m[0]):02x}"), text)


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
        from mnemo.train.redact import redact_uri

        where = f"{clip(redact_uri(str(e.filename)))}: " if e.filename is not None else ""
        raise error(f"{what}: {where}{e.strerror or e}") from None


def exit_status(command: Callable[[], int | None], debug: bool = False) -> int:
    """Run one command; its exit status.

    A user error (UserError, DataError, EvalError, a missing file) is one line
    ``mnemo: error: ...`` on stderr (control characters in it, such as a
    newline in a file name, written as escapes: ``visible``) and status 2 (with ``debug``: raised, so
    the traceback shows); Ctrl-C is ``mnemo: interrupted`` and 130. The CLI
    and the launcher's worker (a rank under torchrun) both run commands so.
    """
    from mnemo.data_pipeline.errors import DataError
    from mnemo.evaluation.errors import EvalError

    try:
        rc = command()
    except KeyboardInterrupt:
        print("mnemo: interrupted", file=sys.stderr)
        return 130
    except (UserError, DataError, EvalError, FileNotFoundError) as e:
        if debug:
            raise
        from mnemo.train.redact import redact_uri

        msg = str(e).strip() or type(e).__name__
        # A bad value may be a URI with credentials (tracking.uri, a data URL): never print them. A value
        # holding a newline or an escape sequence (a file name) is shown escaped, on the one line.
        print(f"mnemo: error: {visible(redact_uri(msg))}", file=sys.stderr)
        return 2
    return int(rc or 0)
