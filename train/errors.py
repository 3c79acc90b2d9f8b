"""User-facing errors: caught by the CLI and printed as one line."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (config, paths, checkpoints): message names the culprit."""


def exit_status(command: Callable[[], int | None], debug: bool = False) -> int:
    """Run one command; its exit status.

    A user error (UserError, DataError, EvalError, a missing file) is one line
    ``mnemo: error: ...`` on stderr and status 2 (with ``debug``: raised, so
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

        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # A bad value may be a URI with credentials (tracking.uri, a data URL): never print them.
        print(f"mnemo: error: {redact_uri(msg)}", file=sys.stderr)
        return 2
    return int(rc or 0)
