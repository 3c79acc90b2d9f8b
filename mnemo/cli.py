"""The one command-line entry point, ``mnemo``: the top layer.

It only parses arguments and dispatches: ``COMMANDS`` below is the table of
every sub-command, the function that adds its parser and arguments, and the
handler that runs it (mnemo/commands/); each handler calls one public function
of a part below. Every user error is a one-line message and a non-zero exit;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from mnemo.data_pipeline.processes import SAFE_PATH_ENV
from mnemo.commands import OneLineParser, data, evaluate, launch, train

# command -> (adds its parser and arguments, handler), in --help order. A group of
# sub-commands maps to (adds its parser, its own table).
COMMANDS = {
    "tokenizer": (data.add_tokenizer, {"train": (data.add_tokenizer_train, data.cmd_tokenizer_train)}),
    "prepare": (data.add_prepare, data.cmd_prepare),
    "data": (
        data.add_data,
        {"verify": (data.add_verify, data.cmd_verify), "inspect": (data.add_inspect, data.cmd_inspect)},
    ),
    "train": (train.add_train, train.cmd_train),
    "export": (train.add_export, train.cmd_export),
    "eval": (evaluate.add_eval, evaluate.cmd_eval),
    "generate": (evaluate.add_generate, evaluate.cmd_generate),
    "lm-eval": (evaluate.add_lm_eval, evaluate.cmd_lm_eval),
    "launch": (launch.add_launch, launch.cmd_launch),
}


def _add_commands(sub: argparse._SubParsersAction, table: dict) -> None:
    for name, (add, handler) in table.items():
        p = add(sub, name)
        if isinstance(handler, dict):  # a group: `mnemo data verify`
            inner = p.add_subparsers(dest=f"{name}_command", metavar="COMMAND")
            inner.required = True
            _add_commands(inner, handler)
        else:
            p.set_defaults(func=handler)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mnemo", description="Pretrain transformer language models with memory.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_commands(sub, COMMANDS)
    return p


def utf8_mode_or_reexec() -> None:
    """Run this command again in Python's UTF-8 mode (PYTHONUTF8=1) if it runs without it in a locale whose
    encoding is not UTF-8 (``LC_ALL=C PYTHONUTF8=0``); return when there is nothing to do.

    Python decodes the command line, the environment and file names with the locale's encoding: in an ASCII
    one ``--text-field tëxt`` became 'tÃ«xt' in surrogates and silently matched nothing, and ``data.path=dCé``
    was "not valid UTF-8". Corpora, configs and mnemo's outputs are UTF-8, so the same bytes are read as
    UTF-8 instead; what mnemo starts (torchrun, its ranks) inherits the mode. Once: a Python that already has
    PYTHONUTF8=1 and still no UTF-8 mode goes on as it is.
    """
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return
    if os.environ.get("PYTHONUTF8") == "1" or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # The same interpreter, options and arguments (each back to the bytes it was given), in the same process.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "PYTHONUTF8": "1"})


# The soft limit of open files (ulimit -n) a command raises its own to, where the hard limit allows: a training
# rank holds sockets, pipes, shared memory and shard files at once (common practice in training tools).
OPEN_FILES_FLOOR = 4096


def check_working_dir() -> None:
    """A one-line error when the working directory is gone (``mkdir g; cd g; rmdir ../g``): every relative path
    and every command's own os.getcwd() failed on it as ``[Errno 2] No such file or directory``, naming no path,
    and train, export and eval died inside torch's import before mnemo could speak. Checked once, before any
    command's work (and its imports)."""
    from mnemo.train.errors import UserError

    try:
        os.getcwd()
    except FileNotFoundError:
        raise UserError(
            "the working directory no longer exists (deleted, or moved away since the shell entered it): "
            "cd to a directory that exists and run the command again"
        ) from None


def run_command(args: argparse.Namespace) -> int | None:
    """The parsed command's handler, in a working directory that exists."""
    check_working_dir()
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    from mnemo.train.errors import exit_status, tolerant_stdout

    entry = argv is None  # the process's own entry point (the `mnemo` command), not a caller in Python
    if entry:  # the process's own decoding and stdout, not a caller's
        utf8_mode_or_reexec()
        tolerant_stdout()
        # Every Python this command starts, however (multiprocessing's resource tracker and spawned children run
        # `python -c`, which puts the working directory first on sys.path), leaves the working directory off the
        # path: a multiprocessing.py where the user typed `mnemo train` was imported, and run, by both.
        os.environ.update(SAFE_PATH_ENV)
        from mnemo.train.rankenv import raise_open_files_limit

        raise_open_files_limit(OPEN_FILES_FLOOR)  # what the command starts inherits it (check_open_files: runs)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MNEMO_DEBUG") == "1"
    args = build_parser().parse_args(argv)
    try:
        return exit_status(lambda: run_command(args), debug)
    finally:
        if entry:  # the command is over and the process exits: a late SIGTERM/SIGHUP must not kill it now, nor a
            # late Ctrl-C print a traceback
            from mnemo.train.preemption import exit_at_next_interrupt, ignore_late_notices

            ignore_late_notices()
            exit_at_next_interrupt()


if __name__ == "__main__":
    sys.exit(main())
