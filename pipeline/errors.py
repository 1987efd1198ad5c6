"""The exception for user mistakes (the CLI prints its message on one line and exits 1), its kind for damaged
stores, and the two value checks every config check uses."""
import math


class UserError(Exception):
    """Bad input from the user (config, paths, checkpoints, stores). Message: one line, says what to fix."""


def is_int(v, low: float = -math.inf) -> bool:
    """An integer >= low; YAML's true/false are not integers here (Python's bool is)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_number(v) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class StoreDamage(UserError):
    """A damaged store met while reading it (bytes that fail their checksums, edited metadata, values that cannot
    be right). Raised by the store layer whatever zarr raised, so callers and the CLI need not recognise zarr's
    errors; the message names the store, the array and the rows, and points to `kdcache verify`."""
