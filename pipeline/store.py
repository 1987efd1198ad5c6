"""The logit cache: one Zarr v3 group per teacher x data set x view space (spec: docs/FORMAT.md).

    logits      (N, V, K) float16|float32   teacher logits of every (sample, view)
    views       (N, V, P) int32             view parameters that re-create the teacher's input
    labels      (N,)      int32
    shard_done  (S,)      uint8             completion record, one element (and one file) per shard

All per-sample arrays share one sharding along N, so a shard of work is one shard file per array and
is only ever written by one process. Group attributes hold the format, the status and the manifest;
everything is JSON and codecs from the Zarr v3 spec (blosc, crc32c, sharding) - no pickles.
"""
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import UserError

FORMAT = "kdcache-logit-cache"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")


class CacheStore:
    """A cache store on disk: its arrays, manifest and per-shard completion record."""

    def __init__(self, group: zarr.Group, path: str):
        self.group, self.path = group, path
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise UserError(f"{path} is not a kdcache store (no '{FORMAT}' format attribute)")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{path} has format version {version}; this kdcache reads version {FORMAT_VERSION}")
        for name in ("logits", "views", "labels", "shard_done"):
            if name not in group:
                raise UserError(f"store {path} has no '{name}' array: it is damaged or not a kdcache store")
        self.logits, self.views = group["logits"], group["views"]
        self.labels, self.shard_done = group["labels"], group["shard_done"]
        self.samples_per_shard = self.logits.shards[0]

    # ---- opening and creating -------------------------------------------------------------------
    @classmethod
    def open(cls, path, mode: str = "r") -> "CacheStore":
        if not Path(path).exists():
            raise UserError(f"no cache store at {path}")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError) as e:
            raise UserError(f"cannot open cache store {path}: {e}") from None
        return cls(group, str(path))

    @classmethod
    def create(cls, path, manifest: dict, *, num_samples: int, num_views: int, num_classes: int,
               num_params: int, dtype: str = "float16", samples_per_chunk: int = 256,
               chunks_per_shard: int = 16) -> "CacheStore":
        """Create an empty store atomically: build it beside `path`, then rename it into place.

        When several processes race to create the same store, exactly one rename wins; the others
        find the winner's store and check that its manifest is theirs.
        """
        if dtype not in DTYPES:
            raise UserError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if samples_per_chunk < 1 or chunks_per_shard < 1:
            raise UserError("cache.samples_per_chunk and cache.chunks_per_shard must be >= 1")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _build(tmp, manifest, num_samples, num_views, num_classes, num_params, dtype,
                   samples_per_chunk, samples_per_chunk * chunks_per_shard)
            os.rename(tmp, path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not path.exists():
                raise UserError(f"cannot write cache store {path}: {e.strerror or e}") from None
        return cls.open(path, mode="r+")

    @classmethod
    def open_or_create(cls, path, manifest: dict, *, overwrite: bool = False, **layout) -> "CacheStore":
        """Open the store at `path` if its manifest matches, else create it (replace it with `overwrite`)."""
        path = Path(path)
        manifest = json.loads(json.dumps(manifest))  # compare in the stored (JSON) form: tuples -> lists
        if path.exists() and overwrite:
            shutil.rmtree(path)
        if not path.exists():
            return cls.create(path, manifest, **layout)
        store = cls.open(path, mode="r+")
        diff = manifest_difference(store.manifest, manifest)
        if diff:
            raise UserError(f"store {path} was built from a different manifest ({diff}); "
                            "use --overwrite to replace it or --out for a new store")
        return store

    # ---- reading ----------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return self.group.attrs["manifest"]

    def fingerprint(self) -> str:
        """sha256 of the manifest without its software versions: what the cached logits came from.

        Stage 2 statistics and stage 3 runs record it, so a store rebuilt from another teacher, data set
        or view space is detected. Two stores with the same fingerprint hold the same logits.
        """
        content = {k: v for k, v in self.manifest.items() if k not in _VOLATILE}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @property
    def status(self) -> str:
        return self.group.attrs["status"]

    @property
    def num_shards(self) -> int:
        return self.shard_done.shape[0]

    def shard_rows(self, shard: int) -> slice:
        start = shard * self.samples_per_shard
        return slice(start, min(start + self.samples_per_shard, self.logits.shape[0]))

    def done(self) -> np.ndarray:
        """Boolean (S,): which shards are complete."""
        return self.shard_done[:].astype(bool)

    # ---- writing ----------------------------------------------------------------------------------
    def write_shard(self, shard: int, logits: np.ndarray, views: np.ndarray, labels: np.ndarray) -> None:
        """Write one whole shard, then record it done: a crash before the record means it is redone."""
        rows = self.shard_rows(shard)
        self.logits[rows] = logits
        self.views[rows] = views
        self.labels[rows] = labels
        self.shard_done[shard] = 1

    def mark_complete_if_done(self) -> bool:
        """Set status 'complete' once every shard is recorded done (idempotent; safe from any process)."""
        if self.done().all():
            if self.status != "complete":
                self.group.attrs["status"] = "complete"
            return True
        return False


def _build(path, manifest, n, v, k, p, dtype, chunk, shard):
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                        "status": "incomplete", "manifest": manifest})

    def per_sample(name, shape, dtype, itemsize, dims):
        group.create_array(
            name, shape=shape, dtype=dtype, chunks=(chunk,) + shape[1:], shards=(shard,) + shape[1:],
            compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize),
                         Crc32cCodec()],
            fill_value=0, dimension_names=dims)

    per_sample("logits", (n, v, k), dtype, np.dtype(dtype).itemsize, ("sample", "view", "class"))
    per_sample("views", (n, v, p), "int32", 4, ("sample", "view", "param"))
    per_sample("labels", (n,), "int32", 4, ("sample",))
    num_shards = -(-n // shard)
    group.create_array("shard_done", shape=(num_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=[Crc32cCodec()], dimension_names=("shard",))


# Keys that describe the environment, not the content: they may differ between compatible writers.
_VOLATILE = ("software",)


def manifest_difference(old: dict, new: dict, where: str = "") -> str:
    """'' when two manifests describe the same cache, else the first differing key and both values."""
    for key in sorted(set(old) | set(new)):
        if not where and key in _VOLATILE:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff = manifest_difference(a, b, f"{where}{key}.")
            if diff:
                return diff
        elif a != b:
            return f"{where}{key}: {a!r} in the store, {b!r} now"
    return ""
