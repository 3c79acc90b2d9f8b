"""User-facing errors: caught by the CLI and printed as one line."""


class UserError(Exception):
    """Bad input from the user (config, paths, checkpoints): message names the culprit."""
