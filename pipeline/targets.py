"""Where a training batch's targets come from: one interface for stage 3's three modes.

- cached (offline KD): the store's logits and stage-2 statistics for the view each sample draws, loaded into
  memory once when they fit (`train.memory_gb`), else read from Zarr a block of `chunks_per_block` chunks at a
  time (the next block in a background thread, its chunks by a pool of threads; the epoch order shuffles blocks
  of randomly chosen chunks);
- live teacher (online KD): view parameters of the config's view space; the teacher runs on the very images
  the student sees;
- no teacher (cross-entropy): the same views, no logits.

`targets(...)` picks the mode; its `batches` give every batch's replayed input `x`, labels `y`, teacher logits
`z_t` (None without a teacher) and the statistics the method reads, so the training loop never asks which.
The student's input is re-created from the view's parameters by `apply_views`, the function stage 1 fed the
teacher with, so cached targets match the inputs exactly; it runs in `kdcache.inference.ViewBatches`, the
Dataset stage 1 and `CacheDataset` read images through, in `train.workers` DataLoader processes.
"""
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from kdcache.dataset import block_shuffled, cached_stats, mix, store_bytes
from kdcache.encodings import batch_targets, decode_targets
from kdcache.errors import UserError
from kdcache.inference import ViewBatches, replay_loader
from kdcache.models import load_checkpoint
from kdcache.sharing import group_exists
from kdcache.store import CacheStore
from kdcache.views import ViewSpace

READ_ROWS = 4096  # rows per read of the in-memory and live sources (lets the next read overlap training)
READ_THREADS = min(8, 2 * (os.cpu_count() or 1))  # threads reading a Zarr block's chunks (they wait on the disk too)


def targets(cfg: dict, data, method, device) -> "Targets":
    """The run's targets for `method` (a built kdcache.methods.Method): cached unless the method is CE or
    `train.online`; a live teacher for online KD."""
    t = cfg["train"]
    fresh = t["augment"] == "fresh"
    if method.name != "ce" and not t["online"]:
        if fresh:
            raise UserError("train.augment 'fresh' draws views the cache holds no targets for: use it with "
                            "train.online: true (online KD) or method ce, or augment 'cached' to read the store")
        store = open_store(cfg["cache"]["store"], data, cfg["views"])
        stats = cached_stats(store, method, cfg["cache"]["stats"])
        in_memory = store_bytes(store) <= t["memory_gb"] * 2**30
        source = MemoryTargets(store, stats) if in_memory else ZarrTargets(store, stats, t["chunks_per_block"])
        return CachedTargets(source, store, cfg["cache"]["stats"])
    space = ViewSpace.from_config(cfg["views"], data.image_size)
    source = LiveViews(space, data, fresh_seed=cfg["seed"] if fresh else None)
    if method.name == "ce":
        return Targets(source, space)
    teacher, _ = load_checkpoint(cfg["teacher"]["checkpoint"], arch=cfg["teacher"]["arch"],
                                 num_classes=data.num_classes, in_channels=data.channels, device=device)
    return LiveTeacher(source, space, teacher, cfg["teacher"])


class Targets:
    """No teacher (cross-entropy): views of the config's view space and no logits. The base of the three modes."""
    mode, views_of = "no teacher (ce)", "of the config"
    store = fingerprint = None
    view_group = 1  # samples that share their epoch's view index (`epoch_views`): a chunk of a view-major store

    def __init__(self, source: "Source", space: ViewSpace):
        self.source, self.space = source, space

    def batches(self, data, views: np.ndarray, batch_size: int, seed: int, epoch: int, device, rank=0, world=1,
                workers: int = 0):
        """The epoch's batches: {ids, views (numpy), x (the replayed views), y, z_t, stats (by the method's
        names)}, in the order `source.blocks` gives. With `world` processes this one reads and trains on rows
        rank, rank + world, ... of every read, in batches of batch_size / world: the ranks' batches together
        are the one process's batches (when reads hold multiples of `world` rows).

        The source's batches (targets, view params; read ahead in its thread) are the keys of a DataLoader over
        `ViewBatches`: `workers` processes decode and replay the inputs x, in order, a few batches ahead."""
        labels = torch.from_numpy(data.labels)
        source = self.source
        blocks = [rows[rank::world] for rows in source.blocks(len(data), seed, epoch)]
        waiting = deque()  # the source's batches whose x the loader is replaying, oldest first

        def keys():
            for b in source.batches(blocks, views, batch_size // world, epoch):
                waiting.append(b)
                yield b["ids"], b["params"]

        for x in replay_loader(ViewBatches(data, self.space), keys(), workers, device):
            b, x = waiting.popleft(), x.to(device, non_blocking=True)
            yield {"ids": b["ids"], "views": b["views"], "x": x, "y": labels[torch.from_numpy(b["ids"])].to(device),
                   "z_t": self.teacher_logits(b, x, device),
                   "stats": {k: torch.from_numpy(b[k]).to(device) for k in source.stat_names}}

    def teacher_logits(self, batch: dict, x, device):
        return None

    def record(self) -> dict:
        """What result.json says about the targets."""
        return {"mode": self.mode, "targets": self.source.kind, "store": None, "store_fingerprint": None,
                "stats_overlay": None, "teacher": None, "store_layout": None, "store_samples_per_chunk": None,
                "view_group": self.view_group}


class CachedTargets(Targets):
    """Offline KD: the store's logits and statistics of the views it caches."""
    mode, views_of = "offline", "the store holds"

    def __init__(self, source: "Source", store: CacheStore, overlay):
        super().__init__(source, ViewSpace.from_manifest(store.manifest["views"]))
        self.store, self.overlay, self.fingerprint = store, overlay, store.fingerprint()
        self.view_group = store.view_group

    def teacher_logits(self, batch, x, device):
        return batch_targets(batch, self.store.entry).to(device)

    def record(self):
        return {**super().record(), "store": self.store.path, "store_fingerprint": self.fingerprint,
                "stats_overlay": self.overlay, "teacher": self.store.manifest["teacher"],
                "store_layout": self.store.layout, "store_samples_per_chunk": self.store.samples_per_chunk}


class LiveTeacher(Targets):
    """Online KD: the teacher runs on the student's very inputs."""
    mode = "online"

    def __init__(self, source: "Source", space: ViewSpace, teacher, teacher_cfg: dict):
        super().__init__(source, space)
        self.teacher, self.teacher_cfg = teacher, teacher_cfg

    def teacher_logits(self, batch, x, device):
        with torch.no_grad():
            return self.teacher(x)

    def record(self):
        return {**super().record(), "teacher": self.teacher_cfg}


# ---- the store ----------------------------------------------------------------------------------

def open_store(path, data, views: dict) -> CacheStore:
    """The complete store at `path`, checked to hold targets for `data` (same fingerprint, classes) on the
    config's `views` (which online KD and CE-only runs draw from: all modes of one config see the same views)."""
    if not group_exists(path):
        raise UserError(f"no cache store at {path}: build it with `kdcache cache-teacher --config ...` "
                        "(make cache-teacher), or point --cache at an existing store")
    store = CacheStore.open(path)
    if store.status != "complete":
        raise UserError(f"store {path} is incomplete ({int(store.done().sum())}/{store.num_shards} shards): "
                        "finish it with `kdcache cache-teacher` first")
    m = store.manifest["dataset"]
    if m["fingerprint"] != data.fingerprint():
        raise UserError(f"store {path} was built on another data set ({m['name']} {m['split']}, N={m['num_samples']}, "
                        f"fingerprint {m['fingerprint'][:12]}) than the config's ({data.name} {data.split}, "
                        f"N={len(data)}, fingerprint {data.fingerprint()[:12]}): fix `dataset` or use that data "
                        "set's store")
    K = store.num_classes
    if K != data.num_classes:
        raise UserError(f"store {path} holds {K}-class teacher logits but the student is built for the data set's "
                        f"{data.num_classes} classes: distil from a teacher of the same label set")
    pre = store.manifest["preprocessing"]
    if list(pre["mean"]) != list(data.mean) or list(pre["std"]) != list(data.std):
        raise UserError(f"store {path} normalised inputs with mean {pre['mean']}, std {pre['std']} but this "
                        f"version uses {list(data.mean)}, {list(data.std)}: rebuild the store")
    cached = ViewSpace.from_manifest(store.manifest["views"])
    wanted = ViewSpace.from_config(views, data.image_size)
    if cached != wanted:
        raise UserError(f"store {path} caches other views ({cached.kind}, {cached.num_views} per sample, seed "
                        f"{cached.seed}) than the config's `views` ({wanted.kind}, {wanted.num_views}, seed "
                        f"{wanted.seed}): make the config's views section describe the store")
    return store


# ---- epoch order ---------------------------------------------------------------------------------

def shuffled(n: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A random permutation of 0..n-1, cut into reads of READ_ROWS rows."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + READ_ROWS] for i in range(0, n, READ_ROWS)]


# ---- target sources: the same batches from memory, Zarr blocks, or live views -------------------

class Source:
    """Yields batches {ids, views, params, [logits], [stats...]} over reads of rows (numpy arrays).

    Subclasses define `blocks` (the epoch order as a list of reads) and `read(rows, views, epoch)`. The
    next read runs in a background thread while the current one's batches train.
    """
    kind, stat_names = "", ()

    def batches(self, blocks, views: np.ndarray, batch_size: int, epoch: int = 0):
        carry = None
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._read, blocks[0], views, epoch) if blocks else None
            for i in range(len(blocks)):
                part = pending.result()
                pending = pool.submit(self._read, blocks[i + 1], views, epoch) if i + 1 < len(blocks) else None
                if carry is not None:
                    part = {k: np.concatenate([carry[k], v]) for k, v in part.items()}
                size = len(part["ids"])
                full = size - size % batch_size
                for s in range(0, full, batch_size):
                    yield {k: v[s:s + batch_size] for k, v in part.items()}
                carry = {k: v[full:] for k, v in part.items()} if full < size else None
        if carry is not None:
            yield carry

    def _read(self, rows, views, epoch):
        return {"ids": rows, "views": views[rows], **self.read(rows, views[rows], epoch)}


class MemoryTargets(Source):
    """Logits (or a top-k store's arrays, rebuilt per read) and view params loaded from the store once, and checked
    as they are loaded: finite, in range, and every chunk of rows the one stage 1 wrote there (its digest)."""
    kind = "memory"

    def __init__(self, store: CacheStore, stats: dict):
        rows, digests = slice(0, store.views.shape[0]), store.recorded_digests()
        self.parts = {n: store.read_rows(n, rows, digests) for n in store.logit_arrays}
        self.params = store.read_rows("views", rows, digests)
        self.num_classes = store.num_classes
        self.stats = {k: a[...] for k, a in stats.items()}
        self.stat_names = tuple(stats)

    def blocks(self, n, seed, epoch):
        return shuffled(n, seed, epoch)

    def read(self, rows, views, epoch=0):
        targets = decode_targets({n: a[rows, views] for n, a in self.parts.items()}, self.num_classes)
        return {"params": self.params[rows, views], **targets,
                **{k: a[rows, views] for k, a in self.stats.items()}}


class ZarrTargets(Source):
    """Logits read from Zarr a block of whole chunks at a time (never row by row), and checked as read like
    MemoryTargets' (finite, in range, each chunk the one stage 1 wrote there): zarr decodes whole chunks anyway.
    The view params, P integers per (sample, view) like P statistics, are loaded whole as the statistics are: a
    Zarr read costs about a millisecond however small, and they would double the reads of a block."""
    kind = "zarr"

    def __init__(self, store: CacheStore, stats: dict, chunks_per_block: int):
        self.store, self.chunks_per_block = store, chunks_per_block
        self.digests, self.view_digests = store.recorded_digests(), store.recorded_view_digests()
        self.params = store.read_rows("views", slice(0, store.views.shape[0]), self.digests)
        self.stats = {k: a[...] for k, a in stats.items()}
        self.stat_names = tuple(stats)

    def blocks(self, n, seed, epoch):
        return block_shuffled(n, seed, epoch, self.store.labels.chunks[0], self.chunks_per_block)

    def read(self, rows, views, epoch=0):
        return {"params": self.params[rows, views], **self.targets(rows, views),
                **{k: a[rows, views] for k, a in self.stats.items()}}

    def targets(self, rows, views) -> dict[str, np.ndarray]:
        """`decode_targets` of view views[i] of sample rows[i], for every i. The chunks the rows lie in are read whole
        and checked (`read_rows`), each run of consecutive chunks in one read, by READ_THREADS threads (file reads,
        decompression, the checks and the decoding release the GIL); each keeps and decodes only the rows' views: no
        copy of the block's other V - 1 views. A view-major store is read by (chunk, view): only the views used."""
        c, n, k = self.store.samples_per_chunk, self.store.views.shape[0], self.store.num_classes
        names, chunk_of = self.store.logit_arrays, rows // c
        if self.store.view_major:
            V = self.store.views.shape[1]
            reads = [(np.array([key // V]), int(key % V)) for key in np.unique(chunk_of * V + views)]
        else:
            reads = [(run, None) for run in chunk_runs(np.unique(chunk_of), c, self.store.samples_per_shard)]

        def read(run_view):
            run, view = run_view
            span = slice(run[0] * c, min((run[-1] + 1) * c, n))
            mine = np.flatnonzero((chunk_of >= run[0]) & (chunk_of <= run[-1]) & ((views == view) | (view is None)))
            if view is None:
                parts = {name: self.store.read_rows(name, span, self.digests)[rows[mine] - span.start, views[mine]]
                         for name in names}
            else:
                parts = {name: self.store.read_view(name, span, view, self.view_digests)[rows[mine] - span.start]
                         for name in names}
            return mine, decode_targets(parts, k)

        out = {}
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for mine, values in pool.map(read, reads):
                for name, v in values.items():
                    out.setdefault(name, np.empty((len(rows), *v.shape[1:]), v.dtype))[mine] = v
        return out


def chunk_runs(chunks: np.ndarray, chunk: int, shard: int) -> list[np.ndarray]:
    """Sorted chunk numbers cut into runs of consecutive chunks within one shard: each run is one read."""
    cut = np.flatnonzero((np.diff(chunks) != 1) | (chunks[1:] * chunk % shard == 0)) + 1
    return np.split(chunks, cut)


class LiveViews(Source):
    """No cache: view params of the config's view space (online KD, CE-only); the teacher runs live.

    Cached augmentation: the V views the store would hold. For fixed-size images the (N, V, P) params
    are drawn once, as stage 1 did: drawing them is a per-sample RNG and should cost no more here than
    reading them from a store does. Fresh augmentation (fresh_seed set): a new view per sample and
    epoch from the whole space, `ViewSpace.random_params` keyed by (training seed, epoch).
    """
    kind = "live"

    def __init__(self, space: ViewSpace, data, fresh_seed: int | None = None):
        self.space, self.data, self.fresh_seed = space, data, fresh_seed
        fixed = data.image_size is not None and fresh_seed is None
        self.params = space.sample_params(np.arange(len(data)), data.image_size) if fixed else None
        self.kind = "live" if fresh_seed is None else "live, fresh views"

    def blocks(self, n, seed, epoch):
        return shuffled(n, seed, epoch)

    def read(self, rows, views, epoch=0):
        if self.fresh_seed is not None:
            sizes = self.data.image_size or self.data.image_sizes(rows)
            return {"params": self.space.random_params(rows, mix(self.fresh_seed, epoch, 3) >> 1, sizes)}
        if self.params is not None:
            return {"params": self.params[rows, views]}
        params = self.space.sample_params(rows, self.data.image_sizes(rows))
        return {"params": params[np.arange(len(rows)), views]}
