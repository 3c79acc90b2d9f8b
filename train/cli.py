"""The one command-line entry point, ``mnemo``.

Each package registers its own sub-commands (``register(subparsers)``) and
each sub-command calls one importable function. Every user error is a
one-line message and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    from mnemo.data_pipeline.errors import DataError
    from mnemo.train.errors import UserError

    return (UserError, DataError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    from mnemo.data_pipeline import commands as data_commands
    from mnemo.launch import commands as launch_commands
    from mnemo.train import commands as train_commands

    p = argparse.ArgumentParser(prog="mnemo", description="Pretrain transformer language models with memory.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    data_commands.register(sub)
    train_commands.register(sub)
    launch_commands.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MNEMO_DEBUG") == "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("mnemo: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            raise
        from mnemo.train.redact import redact_uri

        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # A bad value may be a URI with credentials (tracking.uri, a data URL): never print them.
        print(f"mnemo: error: {redact_uri(msg)}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
