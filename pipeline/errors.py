"""The one exception for user mistakes: the CLI prints its message on one line and exits 1."""


class UserError(Exception):
    """Bad input from the user (config, paths, checkpoints, stores). Message: one line, says what to fix."""
