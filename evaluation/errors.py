"""The user-facing error of evaluation and generation (the CLI prints it as one line)."""


class EvalError(Exception):
    """Bad input to evaluation or generation (data dir, prompt, device, store size): the message names the culprit."""
