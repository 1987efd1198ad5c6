"""Stage 1: run the teacher once over data set x views and write its logits to the cache store.

Work is split into shards of samples. A shard is computed, handed to a background writer thread (so
the teacher never waits for compression or the disk), written whole, and only then recorded done; a
restarted run skips done shards. Shards are dealt round-robin to processes (--num-shards/--shard-index,
or torchrun's WORLD_SIZE/RANK), so no shard is ever written by two processes.

A store whose encoding loses information (bfloat16, quantized, top-k, sampled) cannot give back the std, min or power
sums of the logits, so for those stage 1 also writes, from the float32 logits before encoding, the exact per-row
statistics (`kdcache.stats.exact_outputs`, in stats/) with each shard, before it is recorded done, and seals
them with the fingerprint when the store is complete: stage 2 and stage 3 use them instead of decoded values.
"""
import logging
import os
import queue
import threading

import numpy as np
import torch
import zarr
from tqdm import tqdm

import kdcache
from kdcache.config import check_cache, check_memory
from kdcache.data import load_dataset
from kdcache.errors import UserError
from kdcache.files import disk_full
from kdcache.inference import accuracy, model_logits
from kdcache.models import load_checkpoint, select_device
from kdcache.sharing import writer_lock
from kdcache.encodings import encode_logits, is_lossless, logits_entry
from kdcache.stats import block_statistics, check_settings, exact_arrays, seal_exact
from kdcache.store import CacheStore
from kdcache.views import ViewSpace

log = logging.getLogger(__name__)
SHARED_CROP_CHUNK = 32  # view-major with `views: all`: above this many samples per chunk, students measurably lose


def cache_teacher(cfg: dict, *, num_shards: int = 1, shard_index: int = 0, overwrite: bool = False,
                  progress: bool = True) -> CacheStore:
    """Fill the store cfg['cache']['store'] with the teacher's logits for this process's shards."""
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index must be in 0..{num_shards - 1}, got {shard_index}")
    if overwrite and num_shards > 1:
        raise UserError("--overwrite cannot be combined with several processes; delete the store first")
    torch.manual_seed(cfg["seed"])
    dcfg, ccfg = cfg["dataset"], check_cache(cfg["cache"])  # load_config checked it; again for a dict from Python
    data = load_dataset(dcfg["name"], "train", root=dcfg["root"], subset=dcfg["subset"], **dcfg["options"])
    space = ViewSpace.from_config(cfg["views"], data.image_size)
    entry = logits_entry(ccfg, data.num_classes)  # checks cache.encoding before the teacher runs
    if ccfg["layout"] == "view-major" and space.all_views and ccfg["samples_per_chunk"] > SHARED_CROP_CHUNK:
        log.warning(f"view-major with every crop_flip view cached: the {ccfg['samples_per_chunk']} samples of a chunk "
                    "will share one crop per epoch in stage 3 (-0.28 points at 256 on Fashion-MNIST, docs/RESULTS.md); "
                    f"use cache.samples_per_chunk <= {SHARED_CROP_CHUNK} or the sample-major layout")
    # a lossy store gets the exact per-row statistics at the stats section's gammas (checked before the teacher runs)
    settings = None if is_lossless(entry) else check_settings(cfg["stats"])
    rows = ccfg["samples_per_chunk"] * ccfg["chunks_per_shard"]  # zarr holds a whole shard in memory
    check_memory(rows * space.num_views * 4 * (data.num_classes + space.num_params + 1) + 16 * ccfg["chunks_per_shard"],
                 f"a shard of cache.samples_per_chunk x cache.chunks_per_shard = {rows} samples x {space.num_views} views")
    device = select_device(cfg["device"])
    teacher, info = load_checkpoint(cfg["teacher"]["checkpoint"], arch=cfg["teacher"]["arch"],
                                    num_classes=data.num_classes, in_channels=data.channels, device=device)
    manifest = {
        "teacher": {
            "arch": cfg["teacher"]["arch"],
            "num_classes": data.num_classes,
            "in_channels": data.channels,
            "checkpoint_sha256": info["sha256"],
            "test_accuracy": _teacher_accuracy(teacher, info, dcfg, device),
        },
        "dataset": data.describe(),
        "preprocessing": {"mean": list(data.mean), "std": list(data.std), "resolution": space.output_size},
        "views": space.to_manifest(),
        "logits": entry,
        "software": {"kdcache": kdcache.__version__, "torch": torch.__version__, "zarr": zarr.__version__},
    }
    store = CacheStore.open_or_create(
        ccfg["store"], manifest, overwrite=overwrite, num_samples=len(data), num_views=space.num_views,
        num_classes=data.num_classes, num_params=space.num_params, dtype=ccfg["dtype"],
        samples_per_chunk=ccfg["samples_per_chunk"], chunks_per_shard=ccfg["chunks_per_shard"], layout=ccfg["layout"])

    done = store.done()
    todo = [s for s in range(store.num_shards) if s % num_shards == shard_index and not done[s]]
    # the processes of one job (--num-shards N) share the store; a second job is refused
    lock = writer_lock(store.path, f"cache-teacher-{shard_index}-of-{num_shards}", job=f"cache-teacher-of-{num_shards}")
    with disk_full(store.path, lambda: f"{int(store.done().sum())}/{store.num_shards} shards are written and "
                   "recorded done, the others are redone next time; the store stays incomplete"):
        with lock, ShardWriter(store, exact_arrays(store, settings) if settings and todo else []) as writer:
            for shard in tqdm(todo, desc=f"stage 1 shards (process {shard_index}/{num_shards})",
                              disable=not progress, unit="shard"):
                rows = store.shard_rows(shard)
                ids = np.arange(rows.start, rows.stop)
                params = space.sample_params(ids, _image_sizes(data, ids))
                logits = model_logits(teacher, data, ids, params, space, batch_size=ccfg["batch_size"],
                                      device=device, amp=ccfg["amp"], workers=ccfg["workers"])
                stored = _checked_cast(logits, entry, shard, ids)
                writer.put(shard, stored, params, data.labels[ids].astype(np.int32), logits)
        if settings and store.status != "complete" and store.done().all():
            seal_exact(store)  # before the status: a kill in between leaves them to seal at the next run
        store.mark_complete_if_done()
    return store


def _teacher_accuracy(teacher, info, dcfg, device) -> float:
    """The checkpoint's recorded test accuracy, or measured now on the test split (identity view)."""
    recorded = info.get("meta", {}).get("test_accuracy")
    if recorded is not None:
        return float(recorded)
    test = load_dataset(dcfg["name"], "test", root=dcfg["root"], **dcfg["options"])
    return accuracy(teacher, test, ViewSpace.identity(test.image_size), device=device)


def _image_sizes(data, ids):
    return data.image_size if data.image_size is not None else data.image_sizes(ids)


def _checked_cast(logits: np.ndarray, entry: dict, shard: int, ids: np.ndarray) -> dict:
    """The arrays the store holds of the float32 logits of samples `ids` (`encode_logits` by the manifest's `logits`
    entry, what `CacheStore.write_shard` takes; a sampled store's draws keyed by sample id); refuse NaN/Inf teacher
    outputs (and float16 overflow) instead of caching garbage."""
    bad = int((~np.isfinite(logits)).sum())
    if bad:
        raise UserError(f"the teacher produced {bad} NaN/Inf logits in shard {shard}; nothing of it was "
                        "written and the store stays incomplete (check the checkpoint and input normalisation)")
    stored = encode_logits(logits, entry, ids=ids)
    over = sum(int((~np.isfinite(v)).sum()) for v in stored.values() if v.dtype.kind == "f")
    if over:
        raise UserError(f"{over} logits in shard {shard} exceed the float16 range; "
                        "set cache.dtype: float32")
    return stored


class ShardWriter:
    """A background thread that writes finished shards while the teacher computes the next ones.

    The queue holds at most two shards, so a slow disk applies back-pressure instead of filling memory.
    An error in the writer is re-raised in the caller at the next put() or at exit. `exact`: the (output,
    array) pairs of a lossy store's exact statistics (`kdcache.stats.exact_arrays`): the writer computes them
    from the float32 logits (off the teacher's thread too) and writes them before the shard's data and record,
    so a shard recorded done has them, and a redone one rewrites them.
    """

    def __init__(self, store: CacheStore, exact=()):
        self.store, self.exact, self.queue, self.error = store, list(exact), queue.Queue(maxsize=2), None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def put(self, shard, stored, views, labels, logits=None):
        """`stored`: what `write_shard` takes; `logits`: the float32 logits, for the exact statistics."""
        self._raise()
        self.queue.put((shard, stored, views, labels, logits))

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    shard, stored, views, labels, logits = item
                    if self.exact:
                        rows = block_statistics(logits, labels, [o for o, _ in self.exact], 1)[0]
                        for j, (_, a) in enumerate(self.exact):
                            a[self.store.shard_rows(shard)] = rows[..., j]
                    self.store.write_shard(shard, stored, views, labels)
                except BaseException as e:  # handed to the main thread
                    self.error = e

    def _raise(self):
        if self.error is not None:
            raise self.error

    def __exit__(self, exc_type, exc, tb):
        self.queue.put(None)
        self.thread.join()
        if exc_type is None:
            self._raise()


def shards_from_env(num_shards, shard_index):
    """Under torchrun (WORLD_SIZE/RANK set) each rank takes its share unless told otherwise."""
    if num_shards is None and shard_index is not None:
        raise UserError(f"--shard-index {shard_index} needs --num-shards (how many processes share the work)")
    if num_shards is not None and num_shards > 1 and shard_index is None:
        raise UserError(f"--num-shards {num_shards} needs --shard-index (this process's index in 0..{num_shards - 1})")
    if num_shards is None:
        size, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
        if not (size.isdigit() and rank.isdigit() and int(rank) < int(size)):
            raise UserError(f"WORLD_SIZE={size!r} and RANK={rank!r} (from torchrun) must be integers with "
                            "0 <= RANK < WORLD_SIZE; or give --num-shards and --shard-index")
        return int(size), int(rank)
    return num_shards, shard_index or 0
