"""The sub-commands of ``mnemo``: their arguments and handlers, one module per group.

Each module gives, per command, a function that adds its parser (help text and
arguments) to the sub-command list, and a handler ``cmd_*`` that converts the
parsed arguments and calls one public function of a part below. mnemo/cli.py
holds the table of which command runs which. Only argparse and the standard
library are imported at module level: torch, deepspeed and the rest load in the
handler that runs, so ``mnemo --help`` and a bad flag answer at once.
"""
