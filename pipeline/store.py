"""The logit cache: one Zarr v3 group per teacher x data set x view space (spec: docs/FORMAT.md).

    logits      (N, V, K) float16|float32   teacher logits of every (sample, view) (bfloat16: uint16 bit patterns)
  or the arrays of another encoding (kdcache.encodings.array_specs: top-k, quantized, sampled targets)
    views       (N, V, P) int32             view parameters that re-create the teacher's input
    labels      (N,)      int32
    shard_done  (S,)      uint8             completion record, one element (and one file) per shard
    chunk_crc32c (C, A)   uint32            per inner chunk of rows and per-sample array, a digest of the rows
                                            written there (format 1.1; one file per shard)
    view_crc32c (C, V, L) uint32            view-major stores (format 1.3): per chunk of rows, view and logit
                                            array, a digest of that view's rows (what a reader of one view checks)

All per-sample arrays share one sharding along N, so a shard of work is one shard file per array and
is only ever written by one process. Layout: an inner chunk of the logit arrays holds c samples x all V views
(sample-major, the default), or c samples x one view (view-major): an epoch that uses one view per sample then
reads 1/V of the store, when views are chosen per chunk of samples (`CacheStore.view_group`). Group attributes
hold the format, the layout, the status and the manifest; everything is JSON and codecs from the Zarr v3 spec
(blosc, crc32c, sharding) - no pickles.
"""
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import google_crc32c  # zarr's own crc32c implementation (a dependency of zarr)
import numcodecs.blosc  # zarr's own blosc implementation (a dependency of zarr)
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from kdcache.errors import StoreDamage, UserError, first_difference, is_int
from kdcache.encodings import (array_specs, check_entry, class_id_arrays, decoded_itemsize, describe, is_lossless,
                                logit_array_names)
from kdcache.sharing import (check_output, check_unlocked, filesystem, group_exists, is_read_only, join,
                              local_path, open_group, protocol, reaching, remove)

FORMAT = "kdcache-logit-cache"
FORMAT_VERSION = 1
FORMAT_MINOR_VERSION = 3  # 1.1: chunk_crc32c digests; manifest_sha256 required. 1.2: bfloat16, quantized, sampled.
#                            1.3: the view-major layout (layout attribute, view_crc32c)
DIGESTS = "chunk_crc32c"
VIEW_DIGESTS = "view_crc32c"
LAYOUTS = ("sample-major", "view-major")
DTYPES = ("float16", "float32", "bfloat16")
# Blosc settings of new stores' per-sample arrays (a store is read with those its zarr.json names): of the codecs
# within 5 % of the best compression of teacher logits, the fastest to decode (docs/BENCHMARKS.md, "Reading at scale").
CODEC = {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}


class CacheStore:
    """A cache store on disk: its arrays, manifest and per-shard completion record."""

    def __init__(self, group: zarr.Group, path: str):
        self.group, self.path = group, path
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise UserError(f"{path} is not a kdcache store (its zarr.json has no '{FORMAT}' format attribute)")
        version = attrs.get("format_version")
        if type(version) is int and version > FORMAT_VERSION:
            raise UserError(f"store {path} has format version {version}, newer than this kdcache reads "
                            f"({FORMAT_VERSION}): upgrade kdcache to read it")
        if type(version) is not int or version != FORMAT_VERSION:
            raise StoreDamage(f"store {path} has an unknown format version {version!r} (expected the integer "
                            f"{FORMAT_VERSION}): its zarr.json is damaged or was not written by kdcache")
        if not isinstance(attrs.get("manifest"), dict) or attrs.get("status") not in ("incomplete", "complete"):
            raise StoreDamage(f"store {path}: its zarr.json lacks a valid manifest or status: the store is damaged")
        self.minor_version = attrs.get("format_minor_version", 0)  # stores written before 1.1 have none
        if not is_int(self.minor_version, 0):
            raise StoreDamage(f"store {path}: its format_minor_version {self.minor_version!r} is not an integer >= 0: "
                              "its zarr.json is damaged")
        recorded = attrs.get("manifest_sha256")  # stores written before it was recorded have none
        if recorded is None and self.minor_version >= 1:
            raise StoreDamage(f"store {path}: its zarr.json lacks manifest_sha256, which every store of format "
                              f"{FORMAT_VERSION}.{self.minor_version} records: it was removed, so an edited manifest "
                              "would pass unseen; restore zarr.json or rebuild the store")
        if recorded is not None and recorded != manifest_sha256(attrs["manifest"]):
            raise StoreDamage(f"store {path}: the manifest in its zarr.json was edited after creation (sha256 differs "
                            "from manifest_sha256), so it no longer says what the logits came from; restore "
                            "zarr.json or rebuild the store")
        entry = attrs["manifest"].get("logits")
        if entry is not None:  # a store of another encoding than this kdcache knows is refused: upgrade
            try:
                check_entry(entry, f"store {path}")
            except ValueError as e:
                raise StoreDamage(f"store {path}: {e}: its zarr.json is damaged") from None
        self.layout = attrs.get("layout", "sample-major")  # stores before 1.3 have none
        if self.layout not in LAYOUTS:
            raise UserError(f"store {path} has the layout {self.layout!r}, which this kdcache does not read (it reads "
                            f"{', '.join(LAYOUTS)}): it was written by a newer kdcache; upgrade")
        self.views, self.labels, self.shard_done = (self.array(n) for n in ("views", "labels", "shard_done"))
        # The arrays that hold the logits, by the encoding (kdcache.encodings reads them back).
        self.logit_arrays = {n: self.array(n) for n in logit_array_names(attrs["manifest"])}
        self.logits = self.logit_arrays.get("logits")  # None in a store of another encoding than dense
        self.per_sample = {**self.logit_arrays, "views": self.views, "labels": self.labels}
        self.layouts = {name: _direct_layout(a) for name, a in self.per_sample.items()}  # how `read_rows` reads them
        # Format 1.1: a crc32c of every inner chunk of rows of each per-sample array, recorded as it is written.
        self.digests = self.array(DIGESTS) if self.minor_version >= 1 else None
        self.view_digests = self.array(VIEW_DIGESTS) if self.view_major else None
        self.samples_per_shard = self.labels.shards[0]
        self._check_dtypes()
        if self.status == "complete":
            for a in (*self.logit_arrays.values(), self.views, self.labels, self.shard_done):
                _check_objects_present(a, path)

    def array(self, name: str) -> zarr.Array:
        """The top-level array `name`, set to store every chunk it writes, even one equal to the fill value:
        then a chunk missing from a written shard always means lost data (docs/FORMAT.md)."""
        try:
            a = self.group[name]
        except KeyError:
            raise StoreDamage(f"store {self.path} has no '{name}' array (no {name}/zarr.json): it is damaged or not "
                            "a kdcache store; run `kdcache verify` on it") from None
        except (ValueError, TypeError) as e:  # zarr's metadata parsing: JSONDecodeError, bad fields
            raise StoreDamage(f"store {self.path}: the metadata of '{name}' ({name}/zarr.json) is unreadable ({e}): "
                            "the store is damaged") from None
        if not isinstance(a, zarr.Array):
            raise StoreDamage(f"store {self.path}: '{name}' is a group, not an array: the store is damaged")
        return a.with_config({"write_empty_chunks": True})

    def _check_dtypes(self) -> None:
        """Every array has the format's data type: zarr would misread every chunk of one whose `data_type` was
        edited in its zarr.json (a reshape error deep in a read, or silently other numbers of the same size)."""
        expected = {"logits": "float16/float32", "views": "int32", "labels": "int32", "shard_done": "uint8",
                    DIGESTS: "uint32", VIEW_DIGESTS: "uint32"}
        if self.manifest.get("logits") is not None:
            expected.update({n: spec[0] for n, spec in array_specs(self.entry, self.num_classes).items()})
        for name, a in {**self.per_sample, "shard_done": self.shard_done, DIGESTS: self.digests,
                        VIEW_DIGESTS: self.view_digests}.items():
            if a is not None and str(a.dtype) not in expected[name].split("/"):
                raise StoreDamage(f"store {self.path}: {name}/zarr.json says data type {a.dtype}, but the format "
                                  f"(and the manifest) says {expected[name]}: its metadata was edited, every chunk "
                                  "would be misread; restore it or rebuild the store")

    @property
    def view_major(self) -> bool:
        return self.layout == "view-major"

    @property
    def view_group(self) -> int:
        """How many consecutive samples share their epoch's view index in stage 3 (`kdcache.dataset.epoch_views`):
        1, or a chunk's samples in a view-major store, so that an epoch reads one view of each chunk."""
        return self.samples_per_chunk if self.view_major else 1

    # ---- opening and creating -------------------------------------------------------------------
    @classmethod
    def open(cls, path, mode: str = "r") -> "CacheStore":
        """The store at `path`: a local path or a URL (file://, s3://, gs://, http(s):// read-only; see
        pipeline/sharing.py). Mode 'r' or 'r+'. UserError when it is absent or cannot be reached."""
        return cls(open_group(path, mode, what="cache store"), str(path))

    @classmethod
    def create(cls, path, manifest: dict, *, num_samples: int, num_views: int, num_classes: int,
               num_params: int, dtype: str = "float16", samples_per_chunk: int = 256,
               chunks_per_shard: int = 16, layout: str = "sample-major") -> "CacheStore":
        """Create an empty store such that a reader sees either no store or a whole one.

        Local: built beside `path`, then renamed into place. When several processes race to create the
        same store, exactly one rename wins; the others find the winner's store and check that its
        manifest is theirs. Object stores have no rename: the store is built in a local temporary folder
        and its metadata documents (an empty store has no chunks) are put in place, each by an exclusive
        put where the backend has one (S3: If-None-Match), the root zarr.json last: its appearance is the
        commit. Racing processes of one job put identical documents; a racer with other contents is
        detected by comparing the documents afterwards. The writer lock (stage 1) then keeps out a
        second job.
        """
        if dtype not in DTYPES or dtype == "bfloat16" and not manifest.get("logits"):
            raise UserError(f"cache dtype must be one of {', '.join(DTYPES)} (bfloat16 only with the manifest's "
                            f"logits entry, which says how its uint16 array is read), got {dtype!r}")
        if samples_per_chunk < 1 or chunks_per_shard < 1:
            raise UserError("cache.samples_per_chunk and cache.chunks_per_shard must be >= 1")
        if layout not in LAYOUTS:
            raise UserError(f"cache.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        spec = (manifest, num_samples, num_views, num_classes, num_params, dtype,
                samples_per_chunk, samples_per_chunk * chunks_per_shard, layout)
        if is_read_only(path):
            raise UserError(f"cannot write cache store {path}: {protocol(path)} URLs are read-only; "
                            "write to a local path or an object store (s3://, gs://)")
        local = local_path(path)
        if local is None:
            with tempfile.TemporaryDirectory(prefix="kdcache-create-") as tmp:
                _build(Path(tmp) / "store.zarr", *spec)
                _put_documents(Path(tmp) / "store.zarr", path)
            return cls.open(path, mode="r+")
        tmp = local.with_name(f".{local.name}.creating-{uuid.uuid4().hex[:8]}")
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            _build(tmp, *spec)
            os.rename(tmp, local)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not group_exists(local):
                raise UserError(f"cannot write cache store {path}: {e.strerror or e}") from None
        return cls.open(path, mode="r+")

    @classmethod
    def open_or_create(cls, path, manifest: dict, *, overwrite: bool = False, **create_args) -> "CacheStore":
        """Open the store at `path` if its manifest matches, else create it (replace it with `overwrite`,
        unless another writer holds a lock on it)."""
        manifest = json.loads(json.dumps(manifest))  # compare in the stored (JSON) form: tuples -> lists
        if is_read_only(path):
            raise UserError(f"cannot write cache store {path}: {protocol(path)} URLs are read-only; "
                            "write to a local path or an object store (s3://, gs://)")
        check_output(path, "cache store")
        if overwrite and group_exists(path):
            _replace(path)
        if not group_exists(path):
            return cls.create(path, manifest, **create_args)
        store = cls.open(path, mode="r+")
        diff = manifest_difference(store.manifest, manifest)
        if diff:
            raise UserError(f"store {path} was built from a different manifest ({diff}); "
                            "use --overwrite to replace it or --out for a new store")
        # the chunking decides the Zarr-block order of stage 3 and, view-major, the samples that share a view
        asked = {"cache.layout": create_args.get("layout", "sample-major"),
                 "cache.samples_per_chunk": create_args.get("samples_per_chunk", 256),
                 "cache.chunks_per_shard": create_args.get("chunks_per_shard", 16)}
        has = {"cache.layout": store.layout, "cache.samples_per_chunk": store.samples_per_chunk,
               "cache.chunks_per_shard": store.samples_per_shard // store.samples_per_chunk}
        for key, value in asked.items():
            if has[key] != value:
                raise UserError(f"store {path} has {key} {has[key]}, not the {value} asked for; use --overwrite to "
                                "replace it or --out for a new store")
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
    def entry(self) -> dict:
        """The manifest's `logits` entry (kdcache.encodings); a store whose manifest has none holds dense logits."""
        return self.manifest.get("logits") or {"dtype": str(self.logits.dtype)}

    @property
    def num_classes(self) -> int:
        """K, the teacher's class count: the last axis of dense logits or quantized codes, else recorded on the
        array of class ids (`num_classes` attribute)."""
        for name in ("logits", "quant_codes"):
            if name in self.logit_arrays:
                return self.logit_arrays[name].shape[-1]
        name = class_id_arrays(self.entry)[0]
        k = self.logit_arrays[name].attrs.get("num_classes")
        if not isinstance(k, int) or k < 1:
            raise StoreDamage(f"store {self.path}: {name} has no valid num_classes attribute: its zarr.json is damaged")
        return k

    @property
    def logits_shape(self) -> tuple[int, int, int]:
        """(N, V, K) of the logits the store gives (`decode_logits`), whether it holds all K or the top k."""
        return (*self.views.shape[:2], self.num_classes)

    @property
    def logits_dtype(self) -> np.dtype:
        """The dtype the logit values are stored in (a top-k store's `topk_values`)."""
        return next(iter(self.logit_arrays.values())).dtype

    @property
    def read_itemsize(self) -> int:
        """Bytes per logit of rows as `decode_logits(..., keep_dtype=True)` gives them (`decoded_itemsize`)."""
        return decoded_itemsize(self.entry)

    def describe_logits(self) -> str:
        """'logits (N, V, K) DTYPE', or how another encoding holds them: what a message says the store holds."""
        if is_lossless(self.entry):
            return f"logits {self.logits_shape} {self.logits_dtype}"
        return f"logits {self.logits_shape} as {describe(self.entry)}"

    @property
    def num_shards(self) -> int:
        return self.shard_done.shape[0]

    def shard_rows(self, shard: int) -> slice:
        start = shard * self.samples_per_shard
        return slice(start, min(start + self.samples_per_shard, self.labels.shape[0]))

    def done(self) -> np.ndarray:
        """Boolean (S,): which shards are complete."""
        return self.shard_done[:].astype(bool)

    @property
    def samples_per_chunk(self) -> int:
        return self.labels.chunks[0]

    def recorded_digests(self) -> dict[str, np.ndarray] | None:
        """{array name: (C,) uint32 crc32c per inner chunk of rows} as written (`rows_crc32c`); None for a store
        written before format 1.1, which has none. Small (4 bytes per chunk and array): read whole."""
        return self._digest_table(self.digests)

    def read_rows(self, name: str, rows: slice, digests: dict | None) -> np.ndarray:
        """Rows `rows` (whole chunks) of per-sample array `name`, checked as they are read (`check_rows`) against
        `digests` (`recorded_digests`, None for a store without them): StoreDamage names any damage."""
        a = self.per_sample[name]
        with reading(self.path, a, rows):
            values = whole_chunks(a, rows, self.layouts[name])
        c = self.samples_per_chunk
        check_rows(self.path, name, values, rows.start, self.num_classes, c,
                   None if digests is None else digests[name][chunks_of(rows, c)])
        return values

    def recorded_view_digests(self) -> dict[str, np.ndarray] | None:
        """{logit array name: (C, V) uint32 crc32c per inner chunk of rows and view} of a view-major store (what a
        reader of one view checks, `rows_crc32c` with the view); None for a sample-major store."""
        return self._digest_table(self.view_digests)

    def _digest_table(self, a: zarr.Array | None) -> dict[str, np.ndarray] | None:
        """A digest array (`chunk_crc32c`, `view_crc32c`: its last axis the arrays its `arrays` attribute names)
        read whole, split by array; None for a store without it."""
        if a is None:
            return None
        with reading(self.path, a, slice(0, a.shape[0])):
            table = a[...]
        names = a.attrs.get("arrays")
        if not isinstance(names, list) or len(names) != table.shape[-1]:
            raise StoreDamage(f"store {self.path}: {a.basename} has no valid 'arrays' attribute: its zarr.json is "
                              "damaged")
        return {name: table[..., j] for j, name in enumerate(names)}

    def read_view(self, name: str, rows: slice, view: int, view_digests: dict) -> np.ndarray:
        """View `view` of rows `rows` (whole chunks) of logit array `name` of a view-major store, (n, ...): only that
        view's chunks are read; checked like `read_rows`, against `recorded_view_digests`."""
        a = self.per_sample[name]
        with reading(self.path, a, rows):
            values = whole_chunks(a, rows, self.layouts[name], view)
        c = self.samples_per_chunk
        problem = bad_values(name, values, self.num_classes, np.arange(rows.start, rows.stop),
                             np.full(len(values), view))
        if problem is None:
            problem = bad_digest(name, values, rows.start, c, view_digests[name][chunks_of(rows, c), view], view)
        if problem is not None:
            raise StoreDamage(f"store {self.path}: {problem}: the store is damaged; run `kdcache verify {self.path}`")
        return values

    def read_views(self, name: str, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """View views[i] of sample rows[i] of per-sample array `name`, for every i: one coordinate selection (zarr
        decodes each chunk it touches once), checked to be finite and in range (not against the digests: those
        cover whole chunks, which a selection does not hold)."""
        a = self.per_sample[name]
        with reading(self.path, a, rows):
            if a.ndim == 2:
                values = a.vindex[rows, views]
            else:
                values = a.vindex[rows[:, None], views[:, None], np.arange(a.shape[2])[None, :]]
        problem = bad_values(name, values, self.num_classes, rows, views)
        if problem is not None:
            raise StoreDamage(f"store {self.path}: {problem}: the store is damaged; run `kdcache verify {self.path}`")
        return values

    # ---- writing ----------------------------------------------------------------------------------
    def write_shard(self, shard: int, logits: np.ndarray | dict, views: np.ndarray, labels: np.ndarray) -> None:
        """Write one whole shard, then record it done: a crash before the record means it is redone.

        `logits`: the (n, V, K) logits of a full store, or a dict of the store's logit arrays' rows
        (`kdcache.encodings.encode_logits`).
        """
        rows = self.shard_rows(shard)
        parts = logits if isinstance(logits, dict) else {"logits": logits}
        if parts.keys() != self.logit_arrays.keys():
            raise ValueError(f"write_shard got {sorted(parts)}, the store holds {sorted(self.logit_arrays)}")
        written = {**parts, "views": views, "labels": labels}
        for name, values in written.items():
            self.per_sample[name][rows] = values
        if self.digests is not None:  # after the data, before the record: a crash in between redoes the shard
            c = self.samples_per_chunk
            stored = {n: np.asarray(v, dtype=self.per_sample[n].dtype) for n, v in written.items()}
            chunks = slice(rows.start // c, -(-rows.stop // c))
            self.digests[chunks] = np.stack([chunk_crc32c(stored[n], rows.start, c)
                                             for n in self.digests.attrs["arrays"]], axis=1)
            if self.view_digests is not None:
                self.view_digests[chunks] = np.stack([view_chunk_crc32c(stored[n], rows.start, c)
                                                      for n in self.view_digests.attrs["arrays"]], axis=2)
        self.shard_done[shard] = 1

    def mark_complete_if_done(self) -> bool:
        """Set status 'complete' once every shard is recorded done (idempotent; safe from any process)."""
        if self.done().all():
            if self.status != "complete":
                self.group.attrs["status"] = "complete"
            return True
        return False


def _replace(path) -> None:
    """--overwrite: delete the kdcache store at `path`, saying what goes; any other Zarr group there (a user's
    own arrays, a statistics overlay) is refused and left untouched."""
    attrs = open_group(path, "r", what="cache store").attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise UserError(f"--overwrite refused: {path} holds a Zarr group that is not a kdcache cache store (format "
                        f"{attrs.get('format')!r}, not '{FORMAT}'); nothing was deleted: choose another --out")
    check_unlocked(path)
    manifest = attrs.get("manifest") if isinstance(attrs.get("manifest"), dict) else {}
    teacher, data = manifest.get("teacher") or {}, manifest.get("dataset") or {}
    print(f"--overwrite: deleting the cache store {path} (status {attrs.get('status')}; teacher "
          f"{teacher.get('arch') if isinstance(teacher, dict) else '?'}, data set "
          f"{data.get('name') if isinstance(data, dict) else '?'}) and everything in it", file=sys.stderr, flush=True)
    remove(path)


def _build(path, manifest, n, v, k, p, dtype, chunk, shard, layout):
    entry = manifest.get("logits") or {"dtype": dtype}
    try:  # checked before anything is written
        check_entry(entry, "the new store", k)
    except ValueError as e:
        raise UserError(f"cannot create the store: {e}") from None
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                        "format_minor_version": FORMAT_MINOR_VERSION, "status": "incomplete",
                        "manifest": manifest, "manifest_sha256": manifest_sha256(manifest), "layout": layout})

    def per_sample(name, shape, dtype, itemsize, dims, attributes=None, views_per_chunk=v):
        inner = (chunk, views_per_chunk, *shape[2:]) if len(shape) > 1 else (chunk,)
        group.create_array(
            name, shape=shape, dtype=dtype, chunks=inner, shards=(shard,) + shape[1:],
            compressors=[BloscCodec(**CODEC, typesize=itemsize),
                         Crc32cCodec()],
            fill_value=0, dimension_names=dims, attributes=attributes)

    for name, (a_dtype, tail, dims) in array_specs(entry, k).items():
        per_sample(name, (n, v, *tail), a_dtype, np.dtype(a_dtype).itemsize, ("sample", "view", *dims),
                   {"num_classes": k} if name in class_id_arrays(entry) else None,  # K: the range of the ids
                   1 if layout == "view-major" else v)
    per_sample("views", (n, v, p), "int32", 4, ("sample", "view", "param"))
    per_sample("labels", (n,), "int32", 4, ("sample",))
    num_shards = -(-n // shard)
    group.create_array("shard_done", shape=(num_shards,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=[Crc32cCodec()], dimension_names=("shard",))
    names = [*logit_array_names(manifest), "views", "labels"]
    group.create_array(DIGESTS, shape=(-(-n // chunk), len(names)), dtype="uint32", chunks=(shard // chunk, len(names)),
                       fill_value=0, compressors=[Crc32cCodec()], dimension_names=("chunk", "array"),
                       attributes={"arrays": names})
    if layout == "view-major":
        names = logit_array_names(manifest)
        group.create_array(VIEW_DIGESTS, shape=(-(-n // chunk), v, len(names)), dtype="uint32",
                           chunks=(shard // chunk, v, len(names)), fill_value=0, compressors=[Crc32cCodec()],
                           dimension_names=("chunk", "view", "array"), attributes={"arrays": names})


# ---- checks of what a reader reads (cheap: on rows already in memory) ------------------------------

def rows_crc32c(values: np.ndarray, start: int, view: int | None = None) -> int:
    """crc32c of rows start.. of an array: their first and end row (two little-endian int64; with `view`, the rows'
    values of that view of a view-major array, and the view as a third int64), then their values (C order, little
    endian). The row range (and view) is in it, so rows moved elsewhere (a swapped shard file) differ."""
    header = [start, start + len(values)] + ([] if view is None else [view])
    data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return google_crc32c.extend(google_crc32c.value(np.array(header, "<i8").tobytes()), data.view(np.uint8).reshape(-1))


def chunk_crc32c(values: np.ndarray, start: int, chunk: int, view: int | None = None) -> np.ndarray:
    """(C,) uint32: `rows_crc32c` of each inner chunk of `chunk` rows of `values` (rows start.., start a chunk's first)."""
    return np.array([rows_crc32c(values[i:i + chunk], start + i, view) for i in range(0, len(values), chunk)],
                    np.uint32)


def view_chunk_crc32c(values: np.ndarray, start: int, chunk: int) -> np.ndarray:
    """(C, V) uint32: `chunk_crc32c` of each view of rows start.. (n, V, ...) of a view-major array (`view_crc32c`)."""
    return np.stack([chunk_crc32c(values[:, v], start, chunk, v) for v in range(values.shape[1])], axis=1)


def bad_values(name: str, values: np.ndarray, num_classes: int, samples: np.ndarray,
               views: np.ndarray | None = None) -> str | None:
    """Where rows of array `name` hold what cannot be right (NaN/Inf, a class outside 0..K-1), else None.

    values[i] is sample samples[i]; with `views`, of view views[i] (a reader's selection), else axis 1 is the view.
    """
    if name == "logits" and values.dtype == np.uint16:  # bfloat16 bit patterns: all ones in the exponent
        bad, what = nonfinite_bits(values, 0x7F80), "NaN/Inf"
    elif values.dtype == np.float16:  # the same test on its bits: ~13x faster than np.isfinite on float16 here
        bad, what = nonfinite_bits(values.view(np.uint16), 0x7C00), "NaN/Inf"
    elif values.dtype.kind == "f":
        bad, what = ~np.isfinite(values), "NaN/Inf"
    elif name in ("labels", "topk_indices", "sampled_ids"):
        bad, what = (values < 0) | (values >= num_classes), f"a class outside 0..{num_classes - 1}"
    else:
        return None
    if not bad.any():
        return None
    first = np.argwhere(bad)[0]
    at = f"sample {samples[first[0]]}"
    if views is not None:
        at, first = f"{at}, view {views[first[0]]}", first[:1]
    elif values.ndim > 1:
        at, first = f"{at}, view {first[1]}", first[:2]
    return f"{name} at {at} holds {what}: {np.asarray(values[tuple(first)]).tolist()}"


def nonfinite_bits(bits: np.ndarray, mask: int) -> np.ndarray:
    """Which IEEE float bit patterns (an unsigned view) are NaN or Inf: every bit of the exponent `mask` set.
    (np.isfinite is as fast on float32/64, which numpy vectorises; not on float16, nor on bfloat16 patterns.)"""
    return (bits & bits.dtype.type(mask)) == mask


def chunks_of(rows: slice, chunk: int) -> slice:
    """The inner chunks (rows of `chunk_crc32c`) that hold `rows`."""
    return slice(rows.start // chunk, -(-rows.stop // chunk))


def bad_digest(name: str, values: np.ndarray, start: int, chunk: int, recorded: np.ndarray,
               view: int | None = None) -> str | None:
    """Which chunk of rows start.. of `name` is not the one written there: `chunk_crc32c` against `recorded`, the
    digests of those chunks (`chunks_of`). With `view`: `values` are that view's rows, `recorded` from `view_crc32c`;
    a 2-D `recorded` (C, V) checks every view of whole rows against `view_crc32c`."""
    if recorded.ndim == 2:
        wrong = np.argwhere(view_chunk_crc32c(values, start, chunk) != recorded)
    else:
        wrong = np.flatnonzero(chunk_crc32c(values, start, chunk, view) != recorded)[:, None]
    if not len(wrong):
        return None
    lo = start + int(wrong[0][0]) * chunk
    view = int(wrong[0][1]) if recorded.ndim == 2 else view
    what, table = ("", DIGESTS) if view is None else (f" view {view}", VIEW_DIGESTS)
    return (f"{name} samples {lo}..{min(lo + chunk, start + len(values)) - 1}{what} are not the rows written there "
            f"(their crc32c differs from the one {table} recorded): a shard file was moved, swapped or overwritten")


def check_rows(path, name: str, values: np.ndarray, start: int, num_classes: int, chunk: int,
               recorded: np.ndarray | None) -> None:
    """StoreDamage unless rows start.. of array `name`, as a reader holds them, are finite, in range and (when
    `recorded`, the digests of their chunks, is given) the very rows written there."""
    problem = bad_values(name, values, num_classes, np.arange(start, start + len(values)))
    if problem is None and recorded is not None:
        problem = bad_digest(name, values, start, chunk, recorded)
    if problem is not None:
        raise StoreDamage(f"store {path}: {problem}: the store is damaged; run `kdcache verify {path}`")


def whole_chunks(a: zarr.Array, rows: slice, layout: tuple, view: int | None = None) -> np.ndarray:
    """a[rows] (rows: whole inner chunks along the samples), or a[rows, view] of a view-major array, read straight from
    the shard files of a local store in kdcache's layout (docs/FORMAT.md, "Codecs"): per shard one index read, per
    chunk one read, its crc32c and a blosc decode into the result (a view-major array's chunks of other views are
    not read). zarr's own read costs 1-2 ms more per call than these steps take together (its event loop, buffers
    and an extra copy); any other layout or store is read by zarr. Damaged bytes raise ValueError (a checksum) or
    RuntimeError (blosc), which `reading` turns into StoreDamage as it does zarr's. `layout`: `_direct_layout(a)`."""
    shard_of, inner = layout
    if shard_of is None:
        return a[rows] if view is None else a[rows, view]
    start, stop = rows.indices(a.shape[0])[:2]
    c, s = inner[0], a.shards[0]
    per = a.shape[1] // inner[1] if a.ndim > 1 else 1  # inner chunks per chunk of rows: V in a view-major array
    one_view = view is not None and per > 1  # only that view's chunks are read, into (n, ...)
    parts = [view] if one_view else range(per)
    out = np.empty((stop - start, *a.shape[2 if one_view else 1:]), a.dtype)
    chunk_bytes = math.prod(inner) * a.dtype.itemsize
    for first in range(start - start % s, stop, s):  # shard by shard
        lo, hi = max(start, first), min(stop, first + s)
        try:
            fd = os.open(shard_of(first // s), os.O_RDONLY)
        except FileNotFoundError:  # never written: zarr reads the fill value (a complete store has every shard)
            out[lo - start:hi - start] = a.fill_value
            continue
        try:
            table = _shard_index(fd, s // c * per)
            for k in range((lo - first) // c, -(-(hi - first) // c)):
                r0, r1 = first + k * c, min(first + (k + 1) * c, stop)
                for u in parts:
                    dest = out[r0 - start:r1 - start] if per == 1 or one_view else out[r0 - start:r1 - start, u]
                    offset, nbytes = table[k * per + u]
                    if offset == EMPTY:
                        dest[...] = a.fill_value
                        continue
                    data = np.frombuffer(os.pread(fd, nbytes, offset), np.uint8)
                    if len(data) != nbytes or not crc_ok(data):
                        raise ValueError(f"inner chunk {k * per + u} of a shard fails its crc32c checksum")
                    if len(data) < 20 or int.from_bytes(data[4:8].tobytes(), "little") != chunk_bytes:  # blosc header
                        raise ValueError("a chunk decodes to another size than its chunk shape")
                    if r1 - r0 == c and dest.flags.c_contiguous:  # a whole chunk: decoded in place
                        numcodecs.blosc.decompress(data[:-4], dest)
                    else:  # the array's last, partial chunk (stored padded to the whole chunk), or one view of rows
                        full = np.frombuffer(numcodecs.blosc.decompress(data[:-4]), a.dtype)
                        dest[...] = full.reshape(c, *dest.shape[1:])[:r1 - r0]
        finally:
            os.close(fd)
    return out if view is None or one_view else out[:, view]


def _shard_index(fd: int, n: int) -> list[list[int]]:
    """The (offset, nbytes) of the n inner chunks of a shard file (its index at the end, crc32c-checked)."""
    size = os.fstat(fd).st_size
    index = os.pread(fd, 16 * n + 4, size - (16 * n + 4)) if size >= 16 * n + 4 else b""
    if len(index) != 16 * n + 4 or not crc_ok(index):
        raise ValueError("a shard's index fails its crc32c checksum or is truncated")
    table = np.frombuffer(index[:-4], "<u8").reshape(n, 2).tolist()
    if any(off != EMPTY and off + nbytes > size - len(index) for off, nbytes in table):
        raise ValueError("a shard's index points past its chunks")
    return table


def _direct_layout(a: zarr.Array):
    """(shard file path of shard i, inner chunk shape) when `whole_chunks` reads `a` itself: a local store, sharded
    along the samples only, inner chunks of all of a sample's values or (view-major) of one view, inner codecs bytes
    (little endian on a little-endian machine) + blosc + crc32c, index bytes + crc32c at the end (kdcache's layout).
    (None, None) otherwise: zarr reads it."""
    codecs = a.metadata.to_dict()["codecs"] if a.metadata.zarr_format == 3 else ()
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None, None
    cfg = codecs[0]["configuration"]
    inner = tuple(cfg["chunk_shape"])
    names = lambda cs: [(c["name"], (c.get("configuration") or {}).get("endian", "little")) for c in cs]  # noqa: E731
    one_view = a.ndim > 1 and inner[1] == 1 and inner[2:] == a.shape[2:]
    if (not isinstance(a.store, zarr.storage.LocalStore) or sys.byteorder != "little"
            or names(cfg["codecs"]) != [("bytes", "little"), ("blosc", "little"), ("crc32c", "little")]
            or names(cfg["index_codecs"]) != [("bytes", "little"), ("crc32c", "little")]
            or cfg.get("index_location", "end") != "end" or not (inner[1:] == a.shape[1:] or one_view)
            or tuple(a.shards[1:]) != a.shape[1:]):
        return None, None
    root = Path(a.store.root)
    return (lambda i: root / _object_key(a, i).lstrip("/")), inner


@contextlib.contextmanager
def reading(path, a: zarr.Array, rows):
    """Wrap a read of `rows` (a slice or sample ids) of `a`: what zarr or a codec raises on damaged bytes becomes
    StoreDamage naming the store, the array and the rows, and whether a crc32c fails (read back on failure only)."""
    try:
        yield
    except (ValueError, RuntimeError, TypeError) as e:  # a checksum, a decompressor, a reshape: undecodable bytes
        ids = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else np.asarray(rows)
        step = (a.shards or a.chunks)[0]
        failing = next((i for i in np.unique(ids // step) if not _crcs_ok(a, int(i))), None)
        if failing is None:
            what = f"samples {ids.min()}..{ids.max()} cannot be decoded ({type(e).__name__}: {e})"
        else:
            key = _object_key(a, int(failing))
            what = (f"samples {failing * step}..{min((failing + 1) * step, a.shape[0]) - 1} (key {key}): a chunk of "
                    "the cache store fails its crc32c checksum: the store is corrupted or truncated")
        raise StoreDamage(f"store {path}: {a.path} {what}; run `kdcache verify {path}` to name the damaged "
                          "object") from None


@contextlib.contextmanager
def reading_metadata(path, name: str):
    """Wrap the first use of node `name` (zarr parses its zarr.json then): a document that is not JSON, or not
    valid metadata, becomes StoreDamage naming it."""
    try:
        yield
    except (ValueError, TypeError) as e:  # json.JSONDecodeError, zarr's metadata parsing
        what = "is not valid JSON" if isinstance(e, json.JSONDecodeError) else "is not valid metadata"
        raise StoreDamage(f"store {path}: {name}/zarr.json: a zarr.json of the cache store {what} ({e}): the "
                          f"store's metadata is damaged; run `kdcache verify {path}` to name the damaged object") from None


def _object_key(a: zarr.Array, i: int) -> str:
    return f"{a.path}/{a.metadata.encode_chunk_key((i,) + (0,) * (a.ndim - 1))}"


def _crcs_ok(a: zarr.Array, i: int) -> bool:
    """False when object `i` along the sample axis (a shard, or a chunk) fails a crc32c: its shard index's or a
    chunk's (docs/FORMAT.md, "Shard objects"). `kdcache verify` names the chunk; this only tells which object."""
    buf = sync(a.store.get(_object_key(a, i), prototype=default_buffer_prototype()))
    if buf is None:
        return True
    data, codecs = buf.to_bytes(), a.metadata.to_dict()["codecs"]
    crc = lambda cs: [c["name"] for c in cs][-1:] == ["crc32c"]  # noqa: E731
    if codecs[0]["name"] != "sharding_indexed":
        return not crc(codecs) or crc_ok(data)
    cfg = codecs[0]["configuration"]
    n = math.prod(s // c for s, c in zip(a.shards, cfg["chunk_shape"]))
    index = data[-(16 * n + 4):]
    if len(data) < 16 * n + 4 or (crc(cfg["index_codecs"]) and not crc_ok(index)):
        return False
    table = np.frombuffer(index[:16 * n], dtype="<u8").reshape(n, 2).tolist()
    return all(off == EMPTY or (off + nbytes <= len(data) and (not crc(cfg["codecs"]) or crc_ok(data[off:off + nbytes])))
               for off, nbytes in table)


EMPTY = 2**64 - 1  # a shard index entry (offset, nbytes) of an absent chunk holds this twice


def crc_ok(data: bytes | np.ndarray) -> bool:
    """The crc32c codec appends the little-endian crc32c of what precedes it."""
    data = np.frombuffer(data, np.uint8)  # no copy (a slice of bytes would be one)
    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:].tobytes(), "little")


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the whole manifest as sorted-key JSON: recorded at creation, so an edited manifest is detected."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _check_objects_present(a: zarr.Array, path: str) -> None:
    """Every object (shard file, or chunk of shard_done) of a complete store's array exists and, in a local
    store, is not empty: zarr would silently read a missing or empty one as zeros (as 'not done').

    One listing of the array's keys. A remote store that cannot list (plain HTTP without directory pages)
    lists nothing: then only `kdcache verify` checks it (by reading every object).
    """
    if not a.store.supports_listing:
        return
    listed = sync(_listed(a.store, f"{a.path}/"))
    local = isinstance(a.store, zarr.storage.LocalStore)
    if not listed and not local:
        return
    step = (a.shards or a.chunks)[0]
    for i in range(-(-a.shape[0] // step)):
        key = f"{a.path}/{a.metadata.encode_chunk_key((i,) + (0,) * (a.ndim - 1))}"
        rows = f"samples {i * step}..{min((i + 1) * step, a.shape[0]) - 1}" if a.shards else f"shard {i}"
        if key not in listed:
            raise StoreDamage(f"store {path}: {key} ({rows}) is missing: lost data, it would read as zeros; "
                            "run `kdcache verify` on the store")
        if local and (Path(a.store.root) / key).stat().st_size == 0:
            raise StoreDamage(f"store {path}: {key} ({rows}) is empty (0 bytes, truncated): lost data; "
                            "run `kdcache verify` on the store")


async def _listed(store, prefix: str) -> set[str]:
    return {key async for key in store.list_prefix(prefix)}


def _put_documents(built: Path, location) -> None:
    """Put the metadata documents of a store built locally at `built` into the remote `location`, each by
    an exclusive create, the root zarr.json last; then check that what is there is ours."""
    fs, root = filesystem(location)
    keys = sorted((f.relative_to(built).as_posix() for f in built.rglob("*") if f.is_file()),
                  key=lambda k: (k == "zarr.json", k))
    with reaching(location):
        for key in keys:
            try:
                with fs.open(join(root, key), "xb") as out:
                    out.write((built / key).read_bytes())
            except FileExistsError:
                pass  # put by a racing process: compared below
        for key in keys:
            if fs.cat_file(join(root, key)) != (built / key).read_bytes():
                raise UserError(f"another process created a store at {location} at the same time with other "
                                f"contents ({key} differs): run one job per store, and replace it with --overwrite")

# Keys that describe the environment, not the content: they may differ between compatible writers.
_VOLATILE = ("software",)


def manifest_difference(old: dict, new: dict) -> str:
    """'' when two manifests describe the same cache, else the first differing key and both values."""
    return first_difference(old, new, ignore=_VOLATILE, old_name="in the store")
