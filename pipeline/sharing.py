"""Sharing stores: where they live (local paths and fsspec URLs), who may write them (the writer lock),
and statistics for stores their users cannot write (the stats overlay). Spec: docs/FORMAT.md.

A location is a local path, a file:// URL or any URL fsspec knows: s3:// (s3fs), gs:// (gcsfs, install
it yourself), http(s):// (read-only). Credentials and endpoints come from each backend's standard
environment, never from kdcache configs: for S3, botocore's AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL (an S3-compatible server).

The writer lock is one small object per writer inside the store, `locks/NAME/zarr.json`: a valid Zarr
v3 group document whose attributes say who holds it, so plain zarr readers see an ordinary (empty)
group. It is taken by an exclusive create (O_EXCL locally, a conditional put `If-None-Match: *` on S3)
and released when the block ends, also on errors.
"""
import contextlib
import datetime
import logging
import json
import os
import shlex
import socket
import sys
from pathlib import Path

import fsspec
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from kdcache.errors import UserError

log = logging.getLogger(__name__)
READ_ONLY_PROTOCOLS = ("http", "https")
OVERLAY_FORMAT = "kdcache-stats-overlay"
OVERLAY_VERSION = 1


# ---- locations ----------------------------------------------------------------------------------

def local_path(location) -> Path | None:
    """The file-system path of a local location (a path or file:// URL); None for a remote URL."""
    s = str(location)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return None if "://" in s or "::" in s else Path(s)


def protocol(location) -> str:
    """'file' for local locations, else the URL scheme (of the outermost fsspec chain element)."""
    return "file" if local_path(location) is not None else str(location).split("::")[0].split("://")[0]


def is_read_only(location) -> bool:
    """Whether the location's protocol can only be read (http, https)."""
    return protocol(location) in READ_ONLY_PROTOCOLS


def join(location, *keys) -> str:
    return "/".join([str(location).rstrip("/"), *keys])


@contextlib.contextmanager
def reaching(location):
    """Turn a backend's failure to reach `location` (no such bucket, connection refused, access denied,
    timeouts, unknown protocol, backend not installed) into one UserError line."""
    errors = [OSError]
    with contextlib.suppress(ImportError):
        import aiohttp
        errors.append(aiohttp.ClientError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions
        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    try:
        yield
    except UserError:
        raise
    except tuple(errors) as e:
        raise UserError(f"cannot reach {location}: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return f"permission denied ({_first_line(e)})"
    if isinstance(e, FileNotFoundError):
        return f"not found ({_first_line(e)})"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _check_protocol(location) -> None:
    name = protocol(location)
    if name == "file":
        return
    try:
        fsspec.get_filesystem_class(name)
    except ValueError:
        raise UserError(f"unknown storage protocol '{name}://' in {location}: use a local path, file://, "
                        "s3://, gs:// or http(s)://") from None
    except ImportError as e:
        raise UserError(f"{location} needs a storage backend that is not installed: {_first_line(e)}") from None


def filesystem(location) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec file system, path in it) of a location, with no cached listings: what other processes
    wrote since is seen."""
    _check_protocol(location)
    path = local_path(location)
    with reaching(location):
        fs, root = fsspec.url_to_fs(str(path.absolute()) if path is not None else str(location))
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def zarr_store(location, *, read_only: bool):
    """The zarr store object of a location: LocalStore for local ones, FsspecStore for URLs (always
    read-only for http(s))."""
    path = local_path(location)
    if path is not None:
        return LocalStore(path, read_only=read_only)
    _check_protocol(location)
    with reaching(location):
        return FsspecStore.from_url(str(location), read_only=read_only or is_read_only(location))


def group_exists(location) -> bool:
    """Whether a Zarr v3 group is at `location` (its zarr.json exists). UserError when the location
    cannot be reached (so a refused connection is not mistaken for an absent store)."""
    path = local_path(location)
    if path is not None:
        return (path / "zarr.json").is_file()
    store = zarr_store(location, read_only=True)
    with reaching(location):
        found = sync(store.get("zarr.json", prototype=default_buffer_prototype())) is not None
    if found and is_read_only(location):
        _check_ranges(location)
    return found


def _check_ranges(location) -> None:
    """Sharded arrays are read by byte ranges: an HTTP server that ignores Range headers would hand
    back whole files in their place (zarr then fails on checksums). Refuse such a server up front."""
    fs, root = filesystem(location)
    with reaching(location):
        head = fs.cat_file(join(root, "zarr.json"), start=0, end=1)
    if len(head) != 1:
        raise UserError(f"the HTTP server of {location} ignores Range requests, which sharded Zarr stores "
                        "need: serve the store with one that supports them (nginx, Apache, any object store)")


def open_group(location, mode: str = "r", *, what: str = "zarr store") -> zarr.Group:
    """The Zarr v3 group at `location`, read-only (mode 'r') or writable ('r+'; http(s) are always
    read-only). UserError when there is none or it cannot be reached or read."""
    if not group_exists(location):
        raise UserError(f"no {what} at {location}")
    read_only = mode == "r" or is_read_only(location)
    store = zarr_store(location, read_only=read_only)
    with reaching(location):
        try:
            return zarr.open_group(store, mode="r" if read_only else mode, zarr_format=3)
        except (zarr.errors.BaseZarrError, ValueError) as e:
            raise UserError(f"cannot open {what} {location}: {_first_line(e)}") from None


def enclosing_store(location, *, itself: bool = False) -> str | None:
    """The Zarr group (a folder holding zarr.json) that `location` lies inside, or is with `itself`; None
    when there is none. Anything written there would be a stray in that store: `info` lists it and
    `verify` passes the store anyway."""
    local = local_path(location)
    if local is not None:
        folder = local.absolute()
        folders = [folder, *folder.parents] if itself else list(folder.parents)
        return next((str(f) for f in folders if (f / "zarr.json").is_file()), None)
    fs, root = filesystem(location)
    parts = root.split("/")
    with reaching(location):
        for i in range(len(parts) if itself else len(parts) - 1, 0, -1):
            if fs.exists(join("/".join(parts[:i]), "zarr.json")):
                return f"{protocol(location)}://{'/'.join(parts[:i])}"
    return None


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "result.json")  # what stage 3 writes into a run folder


def check_output(location, what: str) -> None:
    """Refuse to create or write a store where it would not persist (memory://), inside another Zarr
    store, or inside a stage-3 run folder (whose files a store would mix with)."""
    if protocol(location) == "memory":
        raise UserError(f"cannot write {what} {location}: memory:// lives only inside this process and vanishes "
                        "when it exits; write to a local path or an object store (s3://, gs://)")
    if is_read_only(location):
        return  # refused by the writer itself, with its own words
    store = enclosing_store(location)
    if store is not None:
        raise UserError(f"cannot write {what} {location}: it would be inside the Zarr store {store}, whose "
                        "contents kdcache does not check; choose a path outside any store")
    local = local_path(location)
    run = local and next((f for f in local.absolute().parents if any((f / n).is_file() for n in RUN_FILES)), None)
    if run:
        raise UserError(f"cannot write {what} {location}: it would be inside the stage-3 run folder {run}; "
                        "choose a path outside run folders")


def remove(location) -> None:
    """Delete the store at `location` and everything in it (callers check that kdcache made it)."""
    fs, root = filesystem(location)
    with reaching(location):
        if fs.exists(root):
            fs.rm(root, recursive=True)


# ---- the writer lock ----------------------------------------------------------------------------

LOCKS = "locks"


def lock_key(name: str) -> str:
    return f"{LOCKS}/{name}/zarr.json"


@contextlib.contextmanager
def writer_lock(location, name: str, *, job: str | None = None):
    """Hold the lock `locks/NAME` of the store at `location` while the block runs.

    Locks with the same `job` coexist (the processes of one stage-1 job: `cache-teacher-0-of-2` and
    `cache-teacher-1-of-2`, job `cache-teacher-of-2`); any other held lock is a second writer and
    refused with who holds it. Acquiring = exclusive create of our key, then a look at the others: two
    jobs starting at the same instant both see each other and both back off (never both write).
    A lock left by a dead process on this host (SIGKILL) is stale and taken over with a warning; one
    from another host cannot be checked and is reported with how to delete it.
    UserError "read-only" when the store cannot be written at all (http(s), permissions).
    """
    if is_read_only(location):
        raise ReadOnlyStore(f"{location} is read-only ({protocol(location)})")
    fs, root = filesystem(location)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "command": _command(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    key = join(root, lock_key(name))
    with reaching(location):
        _acquire(fs, root, key, mine, location, name)
    try:
        with reaching(location):
            for other, holder in held_locks(location, fs=fs, root=root).items():
                if other != name and (job is None or holder.get("job") != job):
                    raise UserError(_held_message(location, other, holder))
        yield
    finally:
        with contextlib.suppress(Exception):  # never hide the block's own error behind a failed release
            fs.rm(join(root, LOCKS, name), recursive=True)


class ReadOnlyStore(UserError):
    """The store cannot be written by this user (http(s), no write permission)."""


def _acquire(fs, root, key, mine, location, name):
    """Exclusive create of our lock key; takes over a stale one once."""
    for attempt in range(2):
        try:
            fs.makedirs(join(root, LOCKS, name), exist_ok=True)
            if not fs.exists(join(root, LOCKS, "zarr.json")):  # the parent group, so readers see a hierarchy
                fs.pipe_file(join(root, LOCKS, "zarr.json"), _group_doc({}))
            with fs.open(key, "xb") as f:
                f.write(_group_doc({"kdcache_lock": mine}))
            return
        except FileExistsError:
            holder = _read_lock(fs, key)
            if holder is None and not attempt:
                continue  # released meanwhile
            if holder is None or not _stale(holder) or attempt:
                raise UserError(_held_message(location, name, holder or {})) from None
            _take_over(fs, root, name, holder)
        except PermissionError as e:
            raise ReadOnlyStore(f"{location} is not writable ({_first_line(e)})") from None


def held_locks(location, *, fs=None, root=None) -> dict:
    """{lock name: holder} of the live locks in the store; stale ones are taken over (removed) on the way."""
    if fs is None:
        fs, root = filesystem(location)
    found = {}
    try:
        entries = fs.ls(join(root, LOCKS), detail=False)
    except FileNotFoundError:
        return found
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name == "zarr.json":
            continue
        holder = _read_lock(fs, join(root, LOCKS, name, "zarr.json"))
        if holder is None:
            continue  # released meanwhile
        if _stale(holder):
            _take_over(fs, root, name, holder)
        else:
            found[name] = holder
    return found


def check_unlocked(location) -> None:
    """UserError when another process holds a lock on the store (e.g. before replacing it)."""
    with reaching(location):
        held = held_locks(location)
    if held:
        name, holder = next(iter(held.items()))
        raise UserError(_held_message(location, name, holder))


def _read_lock(fs, key) -> dict | None:
    try:
        doc = json.loads(fs.cat_file(key))
        return doc["attributes"]["kdcache_lock"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return {"host": "?", "pid": "?", "command": "unreadable lock document", "started": "?"}


def _stale(holder: dict) -> bool:
    """A lock of a process that no longer runs on this host (checkable only on the same host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def _take_over(fs, root, name, holder):
    log.warning(f"taking over the stale lock {LOCKS}/{name} of pid {holder.get('pid')} on {holder.get('host')} "
                f"(since {holder.get('started')}): that process is gone")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(join(root, LOCKS, name), recursive=True)


def _held_message(location, name, holder) -> str:
    return (f"{location} is being written by another process: {LOCKS}/{name} held by pid {holder.get('pid')} on "
            f"{holder.get('host')} since {holder.get('started')} ({holder.get('command')}); wait for it to "
            f"finish, or if that process is gone, delete {join(location, LOCKS, name)} and retry")


def _command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])[:300]


def _group_doc(attributes: dict) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=1).encode()


# ---- statistics overlays ------------------------------------------------------------------------

def open_overlay(location, fingerprint: str, cache, *, create: bool = False) -> zarr.Group:
    """The statistics overlay at `location` of the cache with `fingerprint` (at `cache`): a Zarr v3
    group holding a `stats/` group laid out like a store's own, for caches its users cannot (or should
    not) write. With `create`, a missing overlay is created. UserError for an overlay of another cache.
    """
    if create:
        check_output(location, "statistics overlay")
    if not group_exists(location):
        if not create:
            raise UserError(f"no statistics overlay at {location}: create it with `kdcache stats {cache} "
                            f"--out {location}`")
        if is_read_only(location):
            raise UserError(f"cannot create a statistics overlay at {location}: {protocol(location)} is read-only")
        with reaching(location):
            try:
                # one write of zarr.json with its attributes: a kill (or a racing reader) never finds
                # an overlay without them, which no later run could use
                zarr.open_group(zarr_store(location, read_only=False), mode="w-", zarr_format=3,
                                attributes={"format": OVERLAY_FORMAT, "format_version": OVERLAY_VERSION,
                                            "cache_fingerprint": fingerprint, "cache": str(cache)})
            except zarr.errors.ContainsGroupError:
                pass  # created meanwhile by another process: checked below like any existing one
    group = open_group(location, "r+" if create else "r", what="statistics overlay")
    attrs = group.attrs.asdict()
    if attrs.get("format") != OVERLAY_FORMAT:
        raise UserError(f"{location} is not a kdcache statistics overlay (no '{OVERLAY_FORMAT}' format attribute)")
    if attrs.get("format_version") != OVERLAY_VERSION:
        raise UserError(f"statistics overlay {location} has format version {attrs.get('format_version')}; "
                        f"this kdcache reads version {OVERLAY_VERSION}")
    if attrs.get("cache_fingerprint") != fingerprint:
        raise UserError(f"statistics overlay {location} belongs to another cache (fingerprint "
                        f"{str(attrs.get('cache_fingerprint'))[:12]}, made from {attrs.get('cache')}), not to "
                        f"{cache} (fingerprint {fingerprint[:12]}): use that cache or another overlay")
    return group
