"""The one exception for user mistakes (the CLI prints its message on one line and exits 1), and the
two value checks every config check uses."""
import math


class UserError(Exception):
    """Bad input from the user (config, paths, checkpoints, stores). Message: one line, says what to fix."""


def is_int(v, low: float = -math.inf) -> bool:
    """An integer >= low; YAML's true/false are not integers here (Python's bool is)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_number(v) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
