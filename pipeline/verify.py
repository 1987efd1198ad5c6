"""What a cache store holds (`kdcache info`) and whether it is intact (`kdcache verify`).

verify reads every stored object of every array once, at the byte level, as the Zarr v3 specification
lays it out (docs/FORMAT.md), because zarr itself reads a missing object, or a chunk missing from a
shard index, silently as the fill value:

- a shard object is its inner chunks followed by an index of (offset, nbytes) uint64 pairs, one per inner
  chunk in C order, (2^64-1, 2^64-1) for an absent chunk, and the index's crc32c; every chunk ends with
  its own crc32c. Chunks missing from a shard recorded done are lost data: kdcache writes every chunk of
  a shard, even one equal to the fill value (CacheStore.array).
- then it decodes each object through zarr and checks the values: finite logits, labels in 0..K-1, view
  parameters inside the view space, finite per-row statistics; and each chunk of rows against the crc32c
  recorded for it when it was written (format 1.1: `chunk_crc32c`), so a shard file moved to other rows,
  whose own checksums are intact, is caught.

It streams shard by shard and stops at the first problem, raising CorruptStore with a message naming
the array, shard or chunk, sample rows and storage key.
"""
import itertools
import json
import math

import numpy as np
import zarr
from tqdm import tqdm
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from kdcache.errors import StoreDamage, UserError
from kdcache.encodings import array_specs, bad_encoded_rows, describe, spot_check
from kdcache.store import (DIGESTS, EMPTY, FORMAT, VIEW_DIGESTS, CacheStore, bad_digest, bad_values, chunks_of,
                           crc_ok)


class CorruptStore(StoreDamage):
    """A store that fails verification; the message names the first bad array, chunk or row."""


# ---- info ------------------------------------------------------------------------------------------

def store_info(path) -> dict:
    """A JSON-able summary of the store at `path`: teacher, data set, views, arrays, size, statistics."""
    store = CacheStore.open(path)
    m = store.manifest
    t, d, v = m["teacher"], m["dataset"], m["views"]
    _check_metadata(store.group, f"store {store.path}")
    arrays = _arrays(store.group)
    raw = sum(a.nbytes for _, a in arrays)
    stored = sync(store.group.store.getsize_prefix(store.group.path))  # every object: files, or a listing
    stats_bytes = sum(a.nbytes_stored() for name, a in arrays if name.startswith("stats/"))
    fingerprint = store.fingerprint()
    stats = {name.removeprefix("stats/"): _stat_state(a, fingerprint)
             for name, a in arrays if name.startswith("stats/")}
    N, V = store.views.shape[:2]
    return {
        "store": str(store.path), "format": f"{FORMAT} v{store.group.attrs['format_version']}.{store.minor_version}",
        "layout": store.layout, "samples_per_chunk": store.samples_per_chunk,
        "status": store.status, "shards_done": int(store.done().sum()), "shards": store.num_shards,
        "teacher": {"arch": t["arch"], "checkpoint_sha256": t["checkpoint_sha256"],
                    "test_accuracy": t.get("test_accuracy")},
        "dataset": {"name": d["name"], "split": d["split"], "num_samples": d["num_samples"],
                    "num_classes": d["num_classes"]},
        "views": {"kind": v["kind"], "num_views": v["num_views"], "total_views": v.get("total_views"),
                  "seed": v["seed"]},
        "rows": N * V, "logits": dict(m["logits"]),
        "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)}
                   for name, a in arrays if not name.startswith("stats/")},
        "bytes_stored": stored, "bytes_raw": raw, "bytes_stats": stats_bytes,
        "compression_ratio": raw / stored if stored else None,
        "statistics": stats, "fingerprint": fingerprint,
    }


def format_info(info: dict) -> str:
    """The summary as a few aligned lines for a terminal."""
    t, d, v = info["teacher"], info["dataset"], info["views"]
    acc = "unknown" if t["test_accuracy"] is None else f"{t['test_accuracy']:.4f}"
    total = "sampled" if v["total_views"] is None else f"of {v['total_views']}"
    arrays = ", ".join(f"{n} {tuple(a['shape'])} {a['dtype']}" for n, a in info["arrays"].items()
                       if n not in ("views", "labels", "shard_done", DIGESTS, VIEW_DIGESTS))
    arrays = f"{describe(info['logits'])}: {arrays}"
    states = info["statistics"]
    stats = (f"{len(states)} arrays, {sum(s == 'fresh' for s in states.values())} fresh: "
             + ", ".join(n if s == "fresh" else f"{n} ({s})" for n, s in states.items())
             if states else "none (kdcache stats computes them)")
    ratio = info["compression_ratio"]
    lines = [
        ("store", f"{info['store']} ({info['format']})"),
        ("status", f"{info['status']}, {info['shards_done']}/{info['shards']} shards done"),
        ("teacher", f"{t['arch']}, checkpoint sha256 {t['checkpoint_sha256'][:12]}, test accuracy {acc}"),
        ("data set", f"{d['name']} {d['split']}, N = {d['num_samples']}, {d['num_classes']} classes"),
        ("views", f"{v['kind']}, {v['num_views']} {total} per sample, seed {v['seed']}"),
        ("rows", f"{d['num_samples']} x {v['num_views']} = {info['rows']} (sample, view) rows; {arrays}"),
        ("layout", f"{info['layout']}: a chunk holds {info['samples_per_chunk']} samples x "
                   f"{'1 view' if info['layout'] == 'view-major' else 'all views'}"),
        ("size", f"{_size(info['bytes_stored'])} stored (stats/ {_size(info['bytes_stats'])}), "
                 f"{_size(info['bytes_raw'])} raw: compression {'n/a' if ratio is None else f'{ratio:.2f}x'}"),
        ("statistics", stats),
    ]
    return "\n".join(f"{k:<11}{val}" for k, val in lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _stat_state(a: zarr.Array, fingerprint: str) -> str:
    """fresh | stale (from other logits) | incomplete (interrupted: no fingerprint recorded yet)."""
    recorded = a.attrs.get("logits_fingerprint")
    return "incomplete" if recorded is None else "fresh" if recorded == fingerprint else "stale"


def _arrays(group: zarr.Group) -> list[tuple[str, zarr.Array]]:
    """Every array of the store (stats/ included), top-level first, by name."""
    found = [(name, a) for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)]
    return sorted(found, key=lambda x: (x[0].count("/"), x[0]))


# ---- verify ----------------------------------------------------------------------------------------

def verify_store(path, *, spot_check: int = 0, checkpoint=None, seed: int = 0, progress: bool = True) -> str:
    """Check the store at `path` completely; returns a one-line summary, raises CorruptStore at the first problem.

    Checks, in order: the group attributes (CacheStore.open: format, version, manifest sha256, arrays,
    shard files), array shapes against the manifest, the completion record, then shard by shard every
    chunk's crc32c and presence, finite logits, labels and view parameters in range; then every other
    array (stats/); completion; and with `spot_check` N > 0, the teacher in `checkpoint` re-run on N random
    (sample, view) pairs, which must match the stored logits within float16 rounding.
    """
    from kdcache.views import ViewSpace  # torchvision: slow to import, and `kdcache info` does without

    if spot_check and checkpoint is None:
        raise UserError("--spot-check needs --checkpoint: the teacher checkpoint the store was built with")
    if checkpoint is not None and not spot_check:
        raise UserError("--checkpoint is only used by --spot-check N: give both, or neither")
    store = CacheStore.open(path)
    where = f"store {store.path}"
    _check_metadata(store.group, where)
    arrays = _arrays(store.group)
    sizes = _check_shapes(store, arrays, where)
    done = _check_done(store, where)
    K = sizes["class"]
    space = ViewSpace.from_manifest(store.manifest["views"])
    image_size = store.manifest["dataset"].get("image_size")
    per_sample = [(n, a) for n, a in arrays if "/" not in n and _dims(a)[:1] == ("sample",)]
    others = [(n, a) for n, a in arrays if n not in dict(per_sample) and n != "shard_done"]
    digests, view_digests = store.recorded_digests(), store.recorded_view_digests() or {}
    objects = crc = 0
    for s in tqdm(range(store.num_shards), desc="verify shards", unit="shard",
                  disable=None if progress else True):  # None: only on a terminal
        if not done[s]:
            continue  # stage 1 rewrites it whole
        rows = store.shard_rows(s)
        for name, a in per_sample:
            for coords in _objects_in_rows(a, rows):
                objects += 1
                crc += _check_object(a, coords, where, required=True)
            values = _decode(a, rows, f"{where}: {name} shard {s} (samples {rows.start}..{rows.stop - 1})")
            _check_values(a, values, rows.start, K, space, image_size, where)
            _raise_if(bad_encoded_rows(name, values, store.entry, rows.start), where)
            if name in view_digests:  # a view-major store: each view of each chunk, as a reader of one view checks it
                recorded = view_digests[name][chunks_of(rows, store.samples_per_chunk)]  # (first: it names the view)
                _raise_if(bad_digest(name, values, rows.start, store.samples_per_chunk, recorded), where)
            if digests is not None and name in digests:
                recorded = digests[name][chunks_of(rows, store.samples_per_chunk)]
                _raise_if(bad_digest(name, values, rows.start, store.samples_per_chunk, recorded), where)
    for name, a in others:  # stats/: objects equal to the fill value may be absent
        for coords in _object_grid(a):
            objects += 1
            crc += _check_object(a, coords, where, required=False)
            region = tuple(slice(i * n, (i + 1) * n) for i, n in zip(coords, _object_shape(a)))
            values = _decode(a, region, f"{where}: {name} object {coords} (key {_key(a, coords)})")
            if _dims(a)[:1] == ("sample",):  # per-row statistics of finite logits are finite
                _raise_if(bad_values(name, values, K, np.arange(region[0].start, region[0].start + len(values))),
                          where)
    if store.status != "complete" or not done.all():
        raise CorruptStore(f"{where} is incomplete: {int(done.sum())}/{store.num_shards} shards done (status "
                           f"{store.status}); the finished shards are intact: resume it with `kdcache cache-teacher`")
    summary = (f"OK {store.path}: {store.num_shards}/{store.num_shards} shards, {len(arrays)} arrays, "
               f"{objects} objects read ({crc} with crc32c checksums, all match), values finite and in range, "
               + _unchecked(store, digests))
    if spot_check:
        summary += "; " + _spot_check(store, spot_check, checkpoint, seed, done, where)
    return summary


def _unchecked(store: CacheStore, digests) -> str:
    """What this store's format version lets verify check about where rows are and what the manifest was."""
    if digests is not None:
        views = f" and every view of it ({VIEW_DIGESTS})" if store.view_major else ""
        return f"every chunk of rows is the one written there ({DIGESTS}){views}"
    missing = f"no {DIGESTS}" + ("" if "manifest_sha256" in store.group.attrs else " nor manifest_sha256")
    return (f"but this store predates format 1.1 ({missing}): shard files moved to other rows cannot be "
            "detected (rebuild the store to record them)")


def _raise_if(problem: str | None, where: str) -> None:
    if problem is not None:
        raise CorruptStore(f"{where}: {problem}")


def _check_metadata(group: zarr.Group, where: str) -> None:
    """Every zarr.json in the store is a JSON object (zarr's own error does not say which one is not)."""
    for key in sorted(sync(_keys(group.store, group.path))):
        if key.rsplit("/", 1)[-1] != "zarr.json":
            continue
        try:
            ok = isinstance(json.loads(sync(group.store.get(key, prototype=default_buffer_prototype())).to_bytes()),
                            dict)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CorruptStore(f"{where}: {key} is not valid JSON ({e}): this metadata document is damaged") from None
        if not ok:
            raise CorruptStore(f"{where}: {key} is not a JSON object: this metadata document is damaged")


async def _keys(store, prefix: str) -> list[str]:
    return [key async for key in store.list_prefix(prefix)]


def _dims(a: zarr.Array) -> tuple:
    return tuple(a.metadata.dimension_names or ())


def _check_shapes(store: CacheStore, arrays, where: str) -> dict:
    """Every dimension named in FORMAT.md has the size the manifest gives; the per-sample arrays share the
    sharding of the logits; logits have the manifest's dtype. Returns the sizes by dimension name."""
    m = store.manifest
    try:
        sizes = {"sample": m["dataset"]["num_samples"], "view": m["views"]["num_views"],
                 "class": m["teacher"]["num_classes"], "param": m["views"]["num_params"],
                 "shard": store.num_shards}
        specs = array_specs(m["logits"], sizes["class"])
    except (KeyError, TypeError) as e:
        raise CorruptStore(f"{where}: the manifest lacks {e}: its zarr.json is damaged") from None
    for _, tail, dims in specs.values():  # the encoding's own axes (rank, draw): their sizes
        sizes.update(zip(dims, tail))
    S = store.samples_per_shard
    if sizes["shard"] != -(-sizes["sample"] // S):
        raise CorruptStore(f"{where}: shard_done has {sizes['shard']} entries but {sizes['sample']} samples in "
                           f"shards of {S} need {-(-sizes['sample'] // S)}")
    for name, a in arrays:
        for axis, (dim, n) in enumerate(zip(_dims(a), a.shape)):
            if dim in sizes and n != sizes[dim]:
                raise CorruptStore(f"{where}: {name} has {n} along '{dim}' (axis {axis}, shape {a.shape}) but the "
                                   f"manifest says {sizes[dim]}")
        if "/" not in name and _dims(a)[:1] == ("sample",) and (a.shards or a.chunks)[0] != S:
            raise CorruptStore(f"{where}: {name} is sharded by {(a.shards or a.chunks)[0]} samples, the logits by {S}")
    dtypes = {**{n: spec[0] for n, spec in specs.items()}, "views": "int32", "labels": "int32", "shard_done": "uint8"}
    for name, a in arrays:
        if name in dtypes and str(a.dtype) != dtypes[name]:
            raise CorruptStore(f"{where}: {name} is {a.dtype} but format version 1 (and the manifest) says {dtypes[name]}")
    return sizes


def _check_done(store: CacheStore, where: str) -> np.ndarray:
    """The completion record, its chunks checked first (a lost one reads as 'not done')."""
    a = store.shard_done
    for coords in _object_grid(a):
        _check_object(a, coords, where, required=False)
    done = _decode(a, ..., f"{where}: shard_done")
    if not np.isin(done, (0, 1)).all():
        s = int(np.flatnonzero(~np.isin(done, (0, 1)))[0])
        raise CorruptStore(f"{where}: shard_done[{s}] is {done[s]}, not 0 or 1 (key {_key(a, (s,))})")
    if store.status == "complete" and not done.all():
        s = int(np.flatnonzero(done == 0)[0])
        raise CorruptStore(f"{where}: status is 'complete' but shard {s} is not recorded done (shard_done[{s}] = 0, "
                           f"key {_key(a, (s,))} missing or zero): the record or the status was damaged")
    return done.astype(bool)


def _check_values(a: zarr.Array, values: np.ndarray, start: int, K: int, space, image_size, where: str):
    """The first row of one shard whose values cannot be right: NaN/Inf, a label outside 0..K-1, a view outside
    the view space."""
    name = a.path
    if name != "views":
        return _raise_if(bad_values(name, values, K, np.arange(start, start + len(values))), where)
    bad = _bad_views(values, space, image_size)
    if bad.any():
        i, v = np.argwhere(bad)[0]
        raise CorruptStore(f"{where}: views at sample {start + i}, view {v} holds view parameters outside the "
                           f"{space.kind} view space ({_view_rule(space)}): {values[i, v].tolist()}")


def _bad_views(params: np.ndarray, space, image_size) -> np.ndarray:
    """(n, V) True where a row of view parameters is outside the space (bounds only: random draws are not redone)."""
    flip_max = 1 if space.flip else 0
    if space.kind == "crop_flip":
        hi = np.array([2 * space.padding, 2 * space.padding, flip_max])
        return ((params < 0) | (params > hi)).any(-1)
    top, left, h, w, flip = np.moveaxis(params, -1, 0)
    bad = (top < 0) | (left < 0) | (h < 1) | (w < 1) | (flip < 0) | (flip > flip_max)
    if image_size is not None:
        bad |= (top + h > image_size[0]) | (left + w > image_size[1])
    return bad


def _view_rule(space) -> str:
    if space.kind == "crop_flip":
        return f"dy, dx in 0..{2 * space.padding}, flip {'0/1' if space.flip else '0'}"
    return "a box inside the image, flip 0/1"


# ---- stored objects (Zarr v3 core and sharding specifications) --------------------------------------

def _key(a: zarr.Array, coords) -> str:
    return f"{a.path}/{a.metadata.encode_chunk_key(tuple(coords))}"


def _object_shape(a: zarr.Array) -> tuple:
    """The shape one stored object covers: the shard when sharded, else the chunk."""
    return a.shards or a.chunks


def _object_grid(a: zarr.Array):
    """Coordinates of every object of the array's grid."""
    return itertools.product(*(range(math.ceil(n / c)) for n, c in zip(a.shape, _object_shape(a))))


def _objects_in_rows(a: zarr.Array, rows: slice):
    """Coordinates of the objects holding samples `rows` (one shard along the sample axis)."""
    shape = _object_shape(a)
    first = rows.start // shape[0]
    return itertools.product(range(first, first + 1), *(range(math.ceil(n / c)) for n, c in zip(a.shape[1:], shape[1:])))


def _codecs(a: zarr.Array) -> dict:
    """From the array's zarr.json: sharded?, inner chunk shape, crc32c on chunks and on the shard index."""
    codecs = a.metadata.to_dict()["codecs"]
    names = lambda cs: [c["name"] for c in cs]  # noqa: E731
    if codecs[0]["name"] == "sharding_indexed":
        cfg = codecs[0]["configuration"]
        return {"sharded": True, "inner": tuple(cfg["chunk_shape"]), "crc": names(cfg["codecs"])[-1:] == ["crc32c"],
                "index_crc": names(cfg["index_codecs"])[-1:] == ["crc32c"],
                "index_at_end": cfg.get("index_location", "end") == "end"}
    return {"sharded": False, "crc": names(codecs)[-1:] == ["crc32c"]}


def _check_object(a: zarr.Array, coords, where: str, *, required: bool) -> bool:
    """One stored object (chunk or shard), byte by byte; True when it had crc32c checksums to check.
    `required`: it holds rows recorded done, so it and every inner chunk inside the array must be present."""
    key = _key(a, coords)
    shape = _object_shape(a)
    lo = [c * s for c, s in zip(coords, shape)]
    what = f"{where}: {a.path} {'shard' if a.shards else 'chunk'} {tuple(coords)}{_rows(a, lo, shape)} (key {key})"
    buf = sync(a.store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        if required:
            raise CorruptStore(f"{what} is missing: lost data (it reads as zeros)")
        return False
    data = buf.to_bytes()
    c = _codecs(a)
    if not data:
        raise CorruptStore(f"{what} is empty (0 bytes): the object was truncated")
    if not c["sharded"]:
        if c["crc"] and not crc_ok(data):
            raise CorruptStore(f"{what} fails its crc32c checksum: corrupted or truncated")
        return c["crc"]
    inner = c["inner"]
    per_axis = [s // i for s, i in zip(shape, inner)]
    n = math.prod(per_axis)
    size = 16 * n + 4 * c["index_crc"]
    index = data[-size:] if c["index_at_end"] else data[:size]
    if len(data) < size or (c["index_crc"] and not crc_ok(index)):
        raise CorruptStore(f"{what}: its chunk index fails its crc32c checksum ({len(data)} bytes): "
                           "the shard is truncated or corrupted")
    table = np.frombuffer(index[:16 * n], dtype="<u8").reshape(n, 2)
    for j, (offset, nbytes) in enumerate(table.tolist()):
        local = np.unravel_index(j, per_axis)
        start = [first + k * i for first, k, i in zip(lo, local, inner)]
        chunk = f"{what}: inner chunk {tuple(int(k) for k in local)}{_rows(a, start, inner)}"
        if offset == EMPTY and nbytes == EMPTY:
            if required and all(x < extent for x, extent in zip(start, a.shape)):
                raise CorruptStore(f"{chunk} is missing from the shard index: lost data (it reads as zeros)")
            continue
        if offset + nbytes > len(data):
            raise CorruptStore(f"{chunk} lies beyond the end of the shard ({len(data)} bytes): truncated")
        if c["crc"] and not crc_ok(data[offset:offset + nbytes]):
            raise CorruptStore(f"{chunk} fails its crc32c checksum: corrupted")
    return c["crc"] or c["index_crc"]


def _rows(a: zarr.Array, start, shape) -> str:
    if _dims(a)[:1] != ("sample",):
        return ""
    return f" (samples {start[0]}..{min(start[0] + shape[0], a.shape[0]) - 1})"


def _decode(a: zarr.Array, selection, what: str) -> np.ndarray:
    """Read through zarr: whatever the byte checks cannot see (a codec that fails on intact-looking bytes)."""
    try:
        return a[selection]
    except Exception as e:  # numcodecs/zarr raise many types for undecodable data; all mean a damaged chunk
        raise CorruptStore(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None


# ---- spot check ------------------------------------------------------------------------------------

def _spot_check(store: CacheStore, n: int, checkpoint, seed: int, done: np.ndarray, where: str) -> str:
    """Re-run the teacher on `n` random (sample, view) pairs of the done shards; the stored logits must match
    within float16 rounding (2^-10 of the row's largest |logit|, at least 2^-10)."""
    import torch

    from kdcache.data import load_dataset
    from kdcache.inference import model_logits
    from kdcache.models import file_sha256, load_checkpoint
    from kdcache.views import ViewSpace

    m = store.manifest
    t, d = m["teacher"], m["dataset"]
    sha = file_sha256(checkpoint)
    if sha != t["checkpoint_sha256"]:
        raise UserError(f"checkpoint {checkpoint} has sha256 {sha[:12]} but the store's logits came from "
                        f"{t['checkpoint_sha256'][:12]}: give the checkpoint the store was built with")
    data = load_dataset(d["name"], d["split"], root=d["root"], subset=d["subset"], **(d["options"] or {}))
    if data.fingerprint() != d["fingerprint"]:
        raise UserError(f"the data set {d['name']} {d['split']} read from {d['root']} is not the one the store was "
                        f"built on (fingerprint {data.fingerprint()[:12]}, store {d['fingerprint'][:12]})")
    teacher, _ = load_checkpoint(checkpoint, arch=t["arch"], num_classes=t["num_classes"],
                                 in_channels=t["in_channels"], device=torch.device("cpu"))
    space = ViewSpace.from_manifest(m["views"])
    rows = np.concatenate([np.arange(store.shard_rows(s).start, store.shard_rows(s).stop) for s in np.flatnonzero(done)])
    rng = np.random.default_rng(seed)
    V = store.views.shape[1]
    pairs = sorted({(int(i), int(v)) for i, v in zip(rng.choice(rows, n), rng.integers(0, V, n))})
    ids, views = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    samples, owner = np.unique(ids, return_inverse=True)

    def pick(a):  # rows (sample ids[j], view views[j]) of array a
        return a.oindex[samples][owner, views]

    got = model_logits(teacher, data, ids, pick(store.views)[:, None, :], space, batch_size=256)[:, 0]
    err, tol = spot_check({n: pick(a) for n, a in store.logit_arrays.items()}, got, store.entry)
    if (err > tol).any():
        j = int(np.flatnonzero(err > tol)[0])
        raise CorruptStore(f"{where}: logits of sample {ids[j]}, view {views[j]} differ from the teacher's by "
                           f"{err[j]:.4g} (tolerance {tol[j]:.2g}; {int((err > tol).sum())}/{len(pairs)} checked pairs "
                           "differ): the stored logits are not this teacher's on these views")
    return f"spot check: {len(pairs)} (sample, view) pairs match the teacher (max error {err.max():.2g})"
