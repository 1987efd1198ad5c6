"""The cache from any training loop: `open_cache` reads a store, `CacheDataset` serves replayed views with their
teacher logits to a torch DataLoader, `ChunkSampler` orders an epoch so that stores larger than memory are read
in whole chunks. docs/API.md shows a loop with DataLoader workers and DistributedSampler.

Stage 3 draws its views (`epoch_views`, `view_subset`) and its Zarr-block order (`block_shuffled`) with the
functions below, so a loop built on them sees what `kdcache train` sees: one cached view per sample per epoch,
every view once per cycle of V epochs.

Processes: a `Cache` (and so a `CacheDataset`) pickles without its Zarr handle and reopens the store in every
process that reads it, forked or spawned DataLoader workers alike; only paths and numpy arrays cross processes.
"""
import math
import os
from collections import OrderedDict
from functools import cached_property

import numpy as np
import torch
import torch.distributed as dist

from kdcache.data import ImageDataset, load_dataset
from kdcache.errors import StoreDamage, UserError, is_int, is_number
from kdcache.methods import build
from kdcache.sharing import group_exists, open_overlay
from kdcache.stats import load_stat, read_stat
from kdcache.encodings import decode_logits, dense_logits_available, describe, is_lossless, sampled_temperature
from kdcache.store import CacheStore, bad_values, reading
from kdcache.inference import ViewBatches
from kdcache.views import ViewSpace

MEMORY_GB = 4.0  # targets up to this size are loaded whole (stage 3's train.memory_gb default)
CHUNKS_PER_BLOCK = 16  # store chunks read together and shuffled together (stage 3's train.chunks_per_block)


def open_cache(path, overlay=None) -> "Cache":
    """The complete store at `path` (a local path or URL: file://, s3://, gs://, http(s)://), with its statistics
    read from the overlay at `overlay` (`kdcache stats STORE --out OVERLAY`) when given."""
    return Cache(path, overlay)


class Cache:
    """A store opened for reading: manifest, view space, labels, float32 logits, view parameters, statistics."""

    def __init__(self, path, overlay=None):
        self.path, self.overlay = str(path), None if overlay is None else str(overlay)
        self._store, self._pid, self._digests, self._view_digests = None, None, None, None
        store = self.store
        self.manifest = store.manifest
        self.fingerprint = store.fingerprint()
        self.space = ViewSpace.from_manifest(self.manifest["views"])
        self.num_samples, self.num_views, self.num_classes = store.logits_shape
        self.samples_per_chunk = store.samples_per_chunk
        if self.overlay is not None:
            open_overlay(self.overlay, self.fingerprint, self.path)  # refuses an overlay of another cache

    @property
    def store(self) -> CacheStore:
        """The Zarr handle, opened by the process that uses it: a forked worker must not share its parent's."""
        if self._pid != os.getpid():
            if not group_exists(self.path):
                raise UserError(f"no cache store at {self.path}: build it with `kdcache cache-teacher`")
            store = CacheStore.open(self.path)
            if store.status != "complete":
                raise UserError(f"store {self.path} is incomplete ({int(store.done().sum())}/{store.num_shards} "
                                "shards): finish it with `kdcache cache-teacher` first")
            self._store, self._pid = store, os.getpid()
        return self._store

    def __getstate__(self):
        return {**self.__dict__, "_store": None, "_pid": None}

    def digests(self) -> dict | None:
        """The rows' recorded crc32c per chunk (None for a store written before format 1.1), read once."""
        if self._digests is None:
            self._digests = self.store.recorded_digests() or {}
        return self._digests or None

    def read_chunks(self, names, rows: slice, view: int | None = None) -> dict[str, np.ndarray]:
        """Rows `rows` (whole chunks) of per-sample arrays `names`, as stored, checked against their digests. With
        `view` (a view-major store's logit arrays): that view of the rows, (n, ...), reading only its chunks."""
        if view is None:
            return {n: self.store.read_rows(n, rows, self.digests()) for n in names}
        if self._view_digests is None:
            self._view_digests = self.store.recorded_view_digests()
        return {n: self.store.read_view(n, rows, view, self._view_digests) for n in names}

    @cached_property
    def labels(self) -> np.ndarray:
        """(N,) int64 ground-truth classes."""
        return self.read_chunks(["labels"], slice(0, self.num_samples))["labels"].astype(np.int64)

    def logits(self, samples, views=None) -> np.ndarray:
        """float32 teacher logits: (n, V, K) of sample ids `samples`, or (n, K) of view views[i] of samples[i]
        (rebuilt from the top k in a top-k store, `kdcache.encodings.decode_logits`)."""
        return decode_logits(self._read(self.store.logit_arrays, samples, views), self.num_classes)

    def view_params(self, samples, views=None) -> np.ndarray:
        """int32 view parameters (n, V, P), or (n, P) with `views`: what `apply_views` replays."""
        return self._read(["views"], samples, views)["views"]

    def stat(self, statistic: str, **params) -> np.ndarray:
        """A stage-2 statistic read whole (`kdcache.stats.read_stat` names the settings), e.g. stat("entropy"),
        stat("mlt_temperature", std="unbiased"), stat("wttm_power_sum", gamma=0.1); UserError names the
        `kdcache stats` call that computes a missing or stale one."""
        return load_stat(read_stat(self.store, statistic, overlay=self.overlay, **params), self.overlay or self.path)

    def dataset(self) -> ImageDataset:
        """The data set split the logits are of, loaded as the manifest describes it."""
        d = self.manifest["dataset"]
        data = load_dataset(d["name"], d["split"], root=d["root"], subset=d["subset"], **(d["options"] or {}))
        self.check(data)
        return data

    def check(self, data: ImageDataset) -> None:
        """UserError unless the logits are of `data` (its fingerprint, as stage 3 checks)."""
        m = self.manifest["dataset"]
        if data.fingerprint() != m["fingerprint"]:
            raise UserError(f"store {self.path} was built on another data set ({m['name']} {m['split']}, "
                            f"N={m['num_samples']}) than the one given ({data.name} {data.split}, N={len(data)}): "
                            "pass the data set the store was built from")

    def _read(self, names, samples, views) -> dict[str, np.ndarray]:
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        if len(samples) and (samples.min() < 0 or samples.max() >= self.num_samples):
            raise UserError(f"sample ids must lie in 0..{self.num_samples - 1} (store {self.path})")
        store = self.store
        if views is not None:
            views = np.broadcast_to(np.asarray(views, dtype=np.int64).reshape(-1), samples.shape)
            if len(views) and (views.min() < 0 or views.max() >= self.num_views):
                raise UserError(f"view indices must lie in 0..{self.num_views - 1} (store {self.path})")
            return {n: store.read_views(n, samples, np.ascontiguousarray(views)) for n in names}
        out = {}
        for n in names:
            a = store.per_sample[n]
            with reading(self.path, a, samples):
                out[n] = a.oindex[samples]
            problem = bad_values(n, out[n], self.num_classes, samples)
            if problem is not None:
                raise StoreDamage(f"store {self.path}: {problem}: the store is damaged; run `kdcache verify {self.path}`")
        return out


class CacheDataset(torch.utils.data.Dataset):
    """Item i: sample i in the cached view it uses this epoch (`set_epoch`), replayed, with its teacher's logits.

    {"image": float32 (C, S, S), normalised as the teacher's input; "label": int64; "logits": float32 (K,);
    "sample": i; "view": the view index; and the statistics `method` reads, by `distill_loss`'s names
    ("temperature" for mlt, "power_sum" for wttm)}. `data` defaults to the data set the manifest describes.

    Targets are loaded whole when they take at most `memory_gb` GiB, else each process reads whole chunks into a
    cache of `cache_chunks` of them: in `ChunkSampler`'s order it then reads every chunk at most once per epoch.
    `seed` and `views_used` choose the views as stage 3's seed and train.views_used do.
    """

    def __init__(self, path, data: ImageDataset | None = None, *, method: str | None = None, params=None,
                 overlay=None, seed: int = 0, views_used: int | None = None, memory_gb: float = MEMORY_GB,
                 cache_chunks: int = CHUNKS_PER_BLOCK):
        if not is_int(seed, 0):
            raise UserError(f"seed must be an integer >= 0, got {seed!r}")
        if not (is_number(memory_gb) and memory_gb >= 0) or not is_int(cache_chunks, 1):
            raise UserError(f"memory_gb must be a number >= 0 and cache_chunks an integer >= 1, got {memory_gb!r}, "
                            f"{cache_chunks!r}")
        self.cache = cache = open_cache(path, overlay)
        if not dense_logits_available(cache.manifest["logits"]):
            raise UserError(f"store {cache.path} holds {describe(cache.manifest['logits'])}, not logits: "
                            "CacheDataset yields logits; train on it with `kdcache train` (method kd at its temperature) "
                            "or read its arrays with open_cache(...).read_chunks and kdcache.losses.sampled_kd_loss")
        N, V = cache.num_samples, cache.num_views
        if views_used is not None and not (is_int(views_used, 1) and views_used <= V):
            raise UserError(f"views_used must be an integer in 1..{V} (the views per sample the store holds), "
                            f"got {views_used!r}")
        if data is None:
            data = cache.dataset()
        else:
            cache.check(data)
        self.data, self.seed, self.cache_chunks = data, seed, cache_chunks
        pre = cache.manifest["preprocessing"]
        self.mean, self.std = pre["mean"], pre["std"]
        store = cache.store
        self.replay = ViewBatches(data, cache.space, self.mean, self.std)  # the trainer's and stage 1's image path
        self.stats = {} if method is None else cached_stats(store, build(method, params), overlay)
        self.targets = tuple(store.logit_arrays)
        self.in_memory = store_bytes(store) <= memory_gb * 2**30
        # view params, P integers per (sample, view) like P statistics: loaded whole as the statistics are
        self.params = cache.read_chunks(["views"], slice(0, N))["views"]
        self.loaded = cache.read_chunks(self.targets, slice(0, N)) if self.in_memory else None
        self.group = store.view_group  # samples sharing a view per epoch: one chunk's in a view-major store
        self.subset = (view_subset(N, V, views_used, cache.space.seed, self.group) if views_used and views_used < V
                       else None)
        self._chunks = OrderedDict()  # chunk index -> its rows of the target arrays, least recently used first
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s views (stage 3's): call it before each epoch's `iter(loader)`, which hands the
        dataset to the workers (not with persistent_workers)."""
        n, V = self.cache.num_samples, self.cache.num_views
        views = epoch_views(n, V if self.subset is None else self.subset.shape[1], self.seed, epoch, self.group)
        self.views = views if self.subset is None else self.subset[np.arange(n), views]
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cache.num_samples

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices) -> list[dict]:
        """The items of a batch (DataLoader passes a batch's indices here): one `apply_views` call renders them
        all, 20x faster than item by item on small images."""
        ids = np.asarray(indices, dtype=np.int64)
        views = self.views[ids]
        target = self._targets(ids, views)
        x = self.replay[(ids, self.params[ids, views])]
        logits = torch.from_numpy(decode_logits(target, self.cache.num_classes))
        labels = torch.from_numpy(self.data.labels[ids])
        stats = {k: torch.from_numpy(a[ids, views]) for k, a in self.stats.items()}
        return [{"image": x[j], "label": labels[j], "logits": logits[j], "sample": int(ids[j]), "view": int(views[j]),
                 **{k: s[j] for k, s in stats.items()}} for j in range(len(ids))]

    def _targets(self, ids: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """The stored rows of the logit arrays (logits, or a top-k store's arrays) of (ids[i], views[i])."""
        if self.in_memory:
            return {n: self.loaded[n][ids, views] for n in self.targets}
        step, V, out = self.cache.samples_per_chunk, self.cache.num_views, {}
        one_view = self.cache.store.view_major  # a chunk read is one view of its rows
        keys = ids // step * V + views if one_view else ids // step
        for key in dict.fromkeys(keys.tolist()):  # in order of first use: block by block in ChunkSampler's order
            rows, mine = self._chunk(key), keys == key
            at = ids[mine] - key // V * step if one_view else (ids[mine] - key * step, views[mine])
            for n in self.targets:
                part = rows[n][at]
                out.setdefault(n, np.empty((len(ids), *part.shape[1:]), part.dtype))[mine] = part
        return out

    def _chunk(self, key: int) -> dict[str, np.ndarray]:
        """Chunk `key` of the logit arrays: chunk c of rows (key c), or in a view-major store its view v
        (key c * V + v)."""
        if key in self._chunks:
            self._chunks.move_to_end(key)
        else:
            step, V = self.cache.samples_per_chunk, self.cache.num_views
            c, view = divmod(key, V) if self.cache.store.view_major else (key, None)
            self._chunks[key] = self.cache.read_chunks(self.targets, slice(c * step, min((c + 1) * step, len(self))),
                                                       view)
            if len(self._chunks) > self.cache_chunks:
                self._chunks.popitem(last=False)
        return self._chunks[key]

    def __getstate__(self):
        return {**self.__dict__, "_chunks": OrderedDict()}  # each worker fills its own chunk cache


class ChunkSampler(torch.utils.data.Sampler):
    """Sample ids in blocks of `chunks_per_block` randomly chosen store chunks, each block's rows shuffled
    (`block_shuffled`, seeded by (seed, epoch): call `set_epoch`). A process reading them in this order through a
    `CacheDataset` that caches at least `chunks_per_block` chunks reads each chunk at most once per epoch.

    With one replica this is exactly stage 3's order when it reads from Zarr (train.memory_gb: 0, the same seed
    and train.chunks_per_block). With `num_replicas` R (default: the torch.distributed world), rank r takes blocks
    r, r+R, ...; every rank's share is padded to the same length (DDP needs as many batches on every rank) by
    repeating rows of its own last block, so no chunk is read by two ranks.
    """

    def __init__(self, dataset: CacheDataset, *, chunks_per_block: int | None = None, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None):
        distributed = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else dist.get_world_size() if distributed else 1
        rank = rank if rank is not None else dist.get_rank() if distributed else 0
        chunks_per_block = dataset.cache_chunks if chunks_per_block is None else chunks_per_block
        if not (is_int(num_replicas, 1) and is_int(rank, 0) and rank < num_replicas):
            raise UserError(f"ChunkSampler needs num_replicas >= 1 and 0 <= rank < num_replicas, got "
                            f"{num_replicas!r}, {rank!r}")
        if not is_int(chunks_per_block, 1) or not is_int(seed, 0):
            raise UserError(f"chunks_per_block must be an integer >= 1 and seed >= 0, got {chunks_per_block!r}, {seed!r}")
        if not dataset.in_memory and chunks_per_block > dataset.cache_chunks:
            raise UserError(f"chunks_per_block {chunks_per_block} is more than the {dataset.cache_chunks} chunks the "
                            "dataset caches: chunks would be read again; raise CacheDataset's cache_chunks")
        self.n, self.chunk = len(dataset), dataset.cache.samples_per_chunk
        blocks = math.ceil(math.ceil(self.n / self.chunk) / chunks_per_block)
        if blocks < num_replicas:
            raise UserError(f"the store's {blocks} blocks of {chunks_per_block} chunks are fewer than the "
                            f"{num_replicas} ranks: lower chunks_per_block")
        self.chunks_per_block, self.seed, self.num_replicas, self.rank = chunks_per_block, seed, num_replicas, rank
        # The most rows a rank can get (its share of blocks, all full), and never more than the data set.
        self.length = min(math.ceil(blocks / num_replicas) * chunks_per_block * self.chunk, self.n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        mine = block_shuffled(self.n, self.seed, self.epoch, self.chunk, self.chunks_per_block)[self.rank::self.num_replicas]
        rows = np.concatenate([*mine, np.resize(mine[-1], self.length - sum(map(len, mine)))])
        return iter(rows.tolist())


# ---- what stage 3 shares: view choice, Zarr-block order, statistics -----------------------------

def mix(*words) -> int | np.ndarray:
    """A 64-bit hash of integers (splitmix64's finaliser, chained): deterministic and vectorised."""
    h = np.zeros(1, np.uint64)
    with np.errstate(over="ignore"):  # multiplication modulo 2^64 is the point
        for w in words:
            x = h ^ np.asarray(w).astype(np.uint64)
            x = (x ^ (x >> 30)) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> 27)) * np.uint64(0x94D049BB133111EB)
            h = x ^ (x >> 31)
    return int(h[0]) if all(np.ndim(w) == 0 for w in words) else h


def epoch_views(n: int, num_views: int, seed: int, epoch: int, group: int = 1) -> np.ndarray:
    """The view index (n,) each sample uses in `epoch`.

    Per group of `group` consecutive samples (1: per sample; a view-major store's chunk: `CacheStore.view_group`)
    and cycle of V epochs, the V views are ranked by a hash of (seed, cycle, group, view); epoch e takes rank
    e mod V. A pure function of its arguments, and no view repeats within a cycle.
    """
    cycle, rank = divmod(epoch, num_views)
    keys = mix(seed, cycle, np.arange(-(-n // group))[:, None], np.arange(num_views)[None, :])
    return np.repeat(np.argpartition(keys, rank, axis=1)[:, rank].astype(np.int64), group)[:n]


def view_subset(n: int, num_views: int, k: int, views_seed: int, group: int = 1) -> np.ndarray:
    """The fixed K of V view indices (n, K) each sample (each group of `group` samples, as `epoch_views`) may use
    (`train.views_used`).

    The K lowest-ranked views by a hash of (views seed, group, view): random per group, independent of the training
    seed (like a store built with K views), and nested (the subset for K holds the one for K-1).
    """
    keys = mix(views_seed, 0x5EED, np.arange(-(-n // group))[:, None], np.arange(num_views)[None, :])
    return np.repeat(np.argsort(keys, axis=1, kind="stable")[:, :k].astype(np.int64), group, axis=0)[:n]


def block_shuffled(n: int, seed: int, epoch: int, chunk: int, chunks_per_block: int) -> list[np.ndarray]:
    """Blocks of `chunks_per_block` randomly chosen chunks of `chunk` rows, each block's rows shuffled."""
    rng = np.random.default_rng([seed, epoch])
    chunks = rng.permutation(math.ceil(n / chunk))
    blocks = []
    for i in range(0, len(chunks), chunks_per_block):
        rows = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, n)) for c in chunks[i:i + chunks_per_block]])
        blocks.append(rng.permutation(rows))
    return blocks


def store_bytes(store: CacheStore) -> int:
    """Memory the logits (or a top-k store's arrays) and view params take when loaded."""
    return sum(a.nbytes for a in store.logit_arrays.values()) + store.views.nbytes


def cached_stats(store: CacheStore, method, overlay=None) -> dict:
    """The stage-2 arrays a built method reads (its `statistics()`, by the names its loss reads them under), read
    whole and checked to be finite (`load_stat`); UserError names the missing call. On a lossy store a method that
    standardizes the teacher (`teacher_moments`) also reads stage 1's exact "mean" and "std"; a method that cannot
    train on a sampled store's targets is refused here, before any training (`check_sampled`).

    From the statistics overlay at `overlay` (`kdcache stats STORE --out OVERLAY`, for stores one cannot
    write) when given, else from the store itself; a lossy store's exact arrays from the store in either case
    (`read_stat`). An overlay of another cache is refused even when the method reads no statistics: the config
    names it, so it should be the right one.
    """
    if overlay is not None:
        open_overlay(overlay, store.fingerprint(), store.path)
    entry, wanted = store.manifest["logits"], dict(method.statistics())
    if sampled_temperature(entry) is not None:
        method.check_sampled(sampled_temperature(entry))
    convention = method.teacher_moments()
    if convention and not is_lossless(entry):
        wanted.update(mean=("mean", {}), std=("std", {"std": convention}))
    arrays = {name: read_stat(store, stat, overlay=overlay, **options) for name, (stat, options) in wanted.items()}
    return {name: load_stat(a, store.path if a.store is store.group.store else overlay) for name, a in arrays.items()}
