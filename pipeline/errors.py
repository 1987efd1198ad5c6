"""The exception for user mistakes (the CLI prints its message on one line and exits 1), its kind for damaged
stores, the two value checks every config check uses, the dict difference that mismatch messages name, and the hint
for a YAML key that swallowed its value."""
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


def first_difference(old: dict, new: dict, *, ignore=(), old_name: str = "there", where: str = "") -> str:
    """'' when two nested dicts (configs, manifests) are equal, top-level keys in `ignore` aside, else the first
    differing dotted key with both values."""
    for key in sorted(set(old) | set(new)):
        if not where and key in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if diff := first_difference(a, b, old_name=old_name, where=f"{where}{key}."):
                return diff
        elif a != b:
            return f"{where}{key}: {a!r} {old_name}, {b!r} now"
    return ""


def colon_hint(keys) -> str:
    """The reason when an unknown key holds a colon: YAML reads `{T:4}` (no space after the colon) as the key 'T:4'
    with no value, a common slip in `--set 'train.params={T:4}'`."""
    return (" (YAML reads {T:4} as the one key 'T:4': put a space after each colon, {T: 4})"
            if any(":" in str(k) for k in keys) else "")
