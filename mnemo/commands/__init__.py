"""The sub-commands of ``mnemo``: their arguments and handlers, one module per group.

Each module gives, per command, a function that adds its parser (help text and
arguments) to the sub-command list, and a handler ``cmd_*`` that converts the
parsed arguments and calls one public function of a part below. mnemo/cli.py
holds the table of which command runs which. Only argparse, the standard
library and mnemo's light error helpers are imported at module level: torch,
deepspeed and the rest load in the handler that runs, so ``mnemo --help`` and a
bad flag answer at once.
"""

from __future__ import annotations

import argparse
import re

from mnemo.data_pipeline.errors import clip
from mnemo.data_pipeline.paths import tilde_problem

_PROG = "_mnemo_prog"  # the namespace attribute naming the deepest (sub-)command parsed


class OneLineParser(argparse.ArgumentParser):
    """argparse with the one-line error every other bad input gets; every command's parser is of this class.

    argparse's own answer to a bad flag was its usage block and ``mnemo data inspect: error: ...``, and an
    unknown flag after a command was blamed on ``mnemo`` itself (the top parser reports leftovers).
    """

    def error(self, message: str):
        self.fail(message, self.prog)

    def fail(self, message: str, prog: str):
        """Exit 2 with ``message`` on one line. It quotes the arguments, which may be a URI with credentials
        (``--tracking-uri http://u:pass@h``, a URI given to an integer flag): hidden as every other error
        hides them, control characters escaped (train/errors.py exit_status)."""
        from mnemo.train.errors import visible
        from mnemo.data_pipeline.redact import redact_uri

        self.exit(2, f"mnemo: error: {visible(redact_uri(message))} (see: {prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if not hasattr(ns, _PROG):  # a command's parser returns before the parsers above it
            setattr(ns, _PROG, self.prog)
        return ns, extras

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        prog = getattr(ns, _PROG, self.prog)
        if hasattr(ns, _PROG):
            delattr(ns, _PROG)
        if extras:
            self.fail(f"unrecognized arguments: {' '.join(extras)}", prog)
        return ns


def path_arg(text: str) -> str:
    """The argparse type of every argument of mnemo's commands that names a file or folder (or URL): ``text`` as
    given, but one that starts with ``~`` or ``~user`` is argparse's one-line error naming the flag, with the
    expanded path to write instead, as a config path key gets (``tilde_problem``). The shell expands a ``~`` it
    sees; one that reaches mnemo was left alone on purpose or by accident (quoted, ``--out=~/x``), and some
    flags expanded it and others wrote ``./~/x``."""
    problem = tilde_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


# An integer as a flag's value: ASCII digits and one optional sign, as config overrides read one. int() also
# reads other scripts' digits ("١٢" is 12), "1_000" and surrounding blanks; and over 4,300 digits it raises.
# 30 digits hold every value any flag takes (2**64 has 20); more is a slip, not a number.
_DECIMAL = re.compile(r"[+-]?[0-9]{1,30}", re.ASCII)


def decimal(text: str) -> int | None:
    """The integer ``text`` writes in ASCII decimal digits (one optional sign, at most 30 digits), else None."""
    return int(text) if _DECIMAL.fullmatch(text) else None


def int_arg(text: str) -> int:
    """The argparse type of every integer flag of mnemo's commands: ``decimal``'s integer, else argparse's
    one-line error naming the flag ("argument --seed: expected an integer ..."). Ranges are the commands' own
    checks, beside the rules that depend on other flags."""
    value = decimal(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"expected an integer in ASCII digits (at most 30), got {clip(text, 40)!r}")
    return value


# A real number as a flag's value: ASCII digits, one optional sign, point and exponent (or inf, nan: the commands'
# range checks name them). float() also reads other scripts' digits ("٢" is 2.0), "1_0" (10.0) and surrounding
# blanks; 40 characters are plenty.
_DECIMAL_FLOAT = re.compile(
    r"[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?|inf|infinity|nan)", re.ASCII | re.IGNORECASE
)


def decimal_float(text: str) -> float | None:
    """The number ``text`` writes in ASCII decimal (``0.5``, ``-2``, ``1e-3``, or inf, nan; at most 40 characters),
    else None.

    Past the float range it is inf or 0.0, as float() reads it: the commands' range checks answer that."""
    return float(text) if len(text) <= 40 and _DECIMAL_FLOAT.fullmatch(text) else None


def float_arg(text: str) -> float:
    """The argparse type of every real-number flag of mnemo's commands: ``decimal_float``'s number, else
    argparse's one-line error naming the flag, as ``int_arg``. Ranges are the commands' own checks."""
    value = decimal_float(text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"expected a number in ASCII digits (such as 0.5 or 1e-3; at most 40 characters), got {clip(text, 40)!r}"
        )
    return value
