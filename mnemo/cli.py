"""The one command-line entry point, ``mnemo``: the top layer.

It only parses arguments and dispatches: each part below registers its
sub-commands (``register(subparsers)``) and each sub-command calls one public
function. Every user error is a one-line message and a non-zero exit;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from mnemo.data_pipeline import commands as data_commands
    from mnemo.launch import commands as launch_commands
    from mnemo.train import commands as train_commands

    p = argparse.ArgumentParser(prog="mnemo", description="Pretrain transformer language models with memory.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # The dispatch table, in --help order.
    for commands in (data_commands, train_commands, launch_commands):
        commands.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from mnemo.train.errors import exit_status

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MNEMO_DEBUG") == "1"
    args = build_parser().parse_args(argv)
    return exit_status(lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
