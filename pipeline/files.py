"""Writing files so that nothing half-written is ever taken for a whole file, and a full disk ends in
one line that says what was kept (docs/RELIABILITY.md)."""
import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path

from kdcache.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it, renamed over `path` once flushed: a
    reader (or a kill) finds the old file or the new one. On any error the temporary file is removed,
    so a full disk leaves no 0-byte leftovers."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def torch_bytes(obj) -> bytes:
    """torch.save of `obj` into memory: written then by `write_atomic`, whose errors are plain OSErrors
    (torch.save to a file on a full disk raises an opaque RuntimeError instead)."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


@contextlib.contextmanager
def disk_full(path, kept):
    """Turn 'No space left on device' (or a full quota) while writing `path` into one UserError line
    naming the path and what was `kept` (a string, or a function giving it then); the same command
    resumes once space is freed."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        kept = kept() if callable(kept) else kept
        raise UserError(f"no space left on the device of {path} ({e.strerror}): {kept}; free space and run "
                        "the same command again to go on") from None
