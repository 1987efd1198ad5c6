"""Reading at scale: batches per second of stage 3's target sources on a K = 1000 store that the page cache
does not hold, side by side in one run.

The store: N samples x V views x K = 1000 float16 teacher-like logits (`imagenet_like_logits` of
bench_topk.py), written shard by shard with CacheStore as stage 1 writes it (default layout: 256-sample chunks,
16 per shard, digests, blosc zstd 5 + shuffle). Two more stores of the same rows: one with blosc lz4 + shuffle
(the candidate codec of `codec_table` that decodes fastest), and one in the view-major layout (format 1.3,
`cache.layout: view-major`: an inner chunk holds one view of its 256 samples; same chunks, shards and codec). Its
images are a small synthetic data set (4 classes, 16x16, one channel: only CacheDataset replays them, and cheaply)
whose fingerprint the manifest records.

Page-cache budget: zero pages of the stores between epochs. Before every timed epoch of a Zarr reader each file of
every store is fsync'ed and dropped from the page cache with os.posix_fadvise(POSIX_FADV_DONTNEED), so every epoch
reads what it uses from the disk; the bytes read from the block device (/proc/self/io read_bytes: this process
and its DataLoader workers, which are counted when they exit) are recorded per epoch to show it (a view-major
epoch should read ~1/V of a sample-major one). The in-memory sources load the store once (timed apart).

Timed, one epoch each, interleaved `--repeats` times, batch 256, the epoch order and views each source uses in
stage 3 (`epoch_views` with group = the store's `view_group`: 1 per sample, or one view per chunk in a view-major
store):
- memory: MemoryTargets (`train.memory_gb` large enough), the reference, with its own per-sample views;
- memory-grouped: the same with the views chosen per 256-sample chunk (what a view-major store's epoch uses), to
  show the reference does not depend on that choice;
- zarr: ZarrTargets (`train.memory_gb: 0`, `train.chunks_per_block`);
- zarr-lz4-store: the same on the lz4 store;
- zarr-view-major: the same on the view-major store (one view of each chunk read per epoch);
- zarr-compared (with --compare DIR): the ZarrTargets of another version's targets.py and store.py (DIR holds
  both), on the default store, for a before/after;
- dataset-memory / dataset-zarr-w0 / dataset-zarr-w2 / dataset-zarr-view-major: CacheDataset (targets loaded, or
  read from Zarr chunks; the last on the view-major store, 0 workers) + ChunkSampler through a DataLoader with 0
  or 2 workers (these also replay the images).
Ratios are medians of the per-round ratios to the round's reference. Last, where a chunk read's time goes
(`chunk_costs`, `view_chunk_costs`): zarr alone, with the reader's checks, and the codec alone. `--codecs` instead
measures the candidate codecs of the logits (`codec_table`: compression ratio and decode time per chunk).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_reader.py [--samples 16384] [--views 8] [--repeats 5]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_reader.py --codecs --out benchmarks/results/reader_codecs.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_reader.py --write-cost --samples 8192 --views 8 --repeats 3 \
        --out benchmarks/results/reader_write_cost.json     # stage 1's writing cost of each layout
"""
import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_topk import K, imagenet_like_logits  # noqa: E402
from kdcache.data import load_dataset  # noqa: E402
import kdcache.store  # noqa: E402
import kdcache.targets  # noqa: E402
from kdcache.dataset import CacheDataset, ChunkSampler, epoch_views  # noqa: E402
from kdcache.store import CacheStore  # noqa: E402
from kdcache.targets import MemoryTargets, ZarrTargets  # noqa: E402
from kdcache.views import ViewSpace  # noqa: E402

BATCH = 256


def write_store(path: Path, n: int, v: int, layout: str = "sample-major") -> CacheStore:
    """A complete K = 1000 store of n samples x v views in `layout`, written shard by shard as stage 1 writes it."""
    data = load_dataset("synthetic", "train", num_samples=n, num_classes=4, channels=1, size=16)
    space = ViewSpace.from_config({"kind": "crop_flip", "padding": 2, "flip": True, "views": v, "seed": 0},
                                  data.image_size)
    manifest = {"teacher": {"arch": "synthetic (bench_topk.imagenet_like_logits)", "num_classes": K},
                "dataset": data.describe(), "views": space.to_manifest(), "logits": {"dtype": "float16"},
                "preprocessing": {"mean": list(data.mean), "std": list(data.std), "resolution": space.output_size}}
    store = CacheStore.create(path, manifest, num_samples=n, num_views=v, num_classes=K,
                              num_params=space.num_params, layout=layout)
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        ids = np.arange(rows.start, rows.stop)
        z, y = imagenet_like_logits(len(ids), v, seed=shard)
        store.write_shard(shard, z.astype(np.float16), space.sample_params(ids, data.image_size), y)
    store.mark_complete_if_done()
    return store


@contextlib.contextmanager
def store_codec(codec: dict):
    """Stores created inside are given blosc `codec` (the benchmark's lz4 store)."""
    default, kdcache.store.CODEC = kdcache.store.CODEC, codec
    try:
        yield
    finally:
        kdcache.store.CODEC = default


def load_version(folder: str):
    """ZarrTargets and CacheStore of another version: folder/store.py and folder/targets.py (`git show`), the
    targets module reading through that store module."""
    modules = {}
    for name in ("store", "targets"):
        spec = importlib.util.spec_from_file_location(f"compared_{name}", Path(folder) / f"{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return modules["targets"].ZarrTargets, modules["store"].CacheStore


def evict(path: Path) -> None:
    """Drop every page of the store's files from the page cache (after writing back any dirty ones)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_bytes() -> int:
    """Bytes this process (and its exited children) has read from the block device so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def source_epoch(source, n: int, v: int, seed: int, epoch: int, group: int = 1) -> int:
    """Batches of one epoch of a stage-3 source, with stage 3's views (`epoch_views`; group: `view_group`)."""
    views = epoch_views(n, v, seed, epoch, group)
    return sum(1 for _ in source.batches(source.blocks(n, seed, epoch), views, BATCH, epoch))


def dataset_epoch(ds: CacheDataset, workers: int, seed: int, epoch: int) -> int:
    ds._chunks.clear()  # no chunk kept from the last epoch: the page-cache budget applies to it too
    sampler = ChunkSampler(ds, seed=seed)
    ds.set_epoch(epoch)
    sampler.set_epoch(epoch)
    return sum(1 for _ in DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers))


def ms(f, repeats: int = 20) -> float:
    """Median milliseconds of f()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def chunk_costs(store: CacheStore, repeats: int = 20) -> dict:
    """Where a chunk read's time goes, per chunk of the logits (median ms, page cache warm): zarr's read alone,
    `read_rows` (its own read of the chunk + the finite/in-range check + the digest), and the codec alone on the
    same rows (numcodecs Blosc zstd 5 / lz4 + shuffle)."""
    from numcodecs import Blosc
    a, c, digests = store.per_sample["logits"], store.samples_per_chunk, store.recorded_digests()
    rows = slice(0, c)
    values = a[rows]
    out = {"zarr_read": ms(lambda: a[rows], repeats),
           "read_rows": ms(lambda: store.read_rows("logits", rows, digests), repeats)}
    for cname in ("zstd", "lz4"):
        codec = Blosc(cname=cname, clevel=5, shuffle=Blosc.SHUFFLE)
        encoded = codec.encode(values)
        out[f"blosc_{cname}_decode"] = ms(lambda: codec.decode(encoded), repeats)
        out[f"blosc_{cname}_compression_ratio"] = values.nbytes / len(encoded)
    out["chunk_bytes"] = values.nbytes
    return out


def view_chunk_costs(store: CacheStore, repeats: int = 20) -> dict:
    """`chunk_costs` of one view of a chunk of rows of a view-major store: zarr's read of it, `read_view` (kdcache's
    read + the checks + the view digest) and the zstd codec alone (median ms, page cache warm)."""
    from numcodecs import Blosc
    a, c, digests = store.per_sample["logits"], store.samples_per_chunk, store.recorded_view_digests()
    rows = slice(0, c)
    values = a[rows, 0]
    codec = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
    encoded = codec.encode(values)
    return {"zarr_read": ms(lambda: a[rows, 0], repeats),
            "read_view": ms(lambda: store.read_view("logits", rows, 0, digests), repeats),
            "blosc_zstd_decode": ms(lambda: codec.decode(encoded), repeats), "chunk_bytes": values.nbytes}


def bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def codec_table(repeats: int = 15) -> list[dict]:
    """Candidate blosc codecs of the logits: compression ratio and decode ms of one chunk of rows, on teacher-like
    K = 1000 rows (256 samples x 8 views; float16, float32 and bfloat16 bit patterns) and on the Fashion-MNIST
    store's real K = 10 float16 rows (stores/fashion-mnist/*.zarr, 2048 samples x 8 views) when present."""
    from numcodecs import Blosc
    z, _ = imagenet_like_logits(256, 8, seed=1)
    rows = {"K=1000 float16": z.astype(np.float16), "K=1000 float32": z,
            "K=1000 bfloat16": (z.view(np.uint32) >> 16).astype(np.uint16)}  # truncated: the same bytes' statistics
    for store in sorted((REPO / "stores" / "fashion-mnist").glob("*.zarr")):
        rows[f"K=10 float16 ({store.name})"] = CacheStore.open(store).logits[:2048]
    shuffles = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE, "noshuffle": Blosc.NOSHUFFLE}
    table = []
    for what, values in rows.items():
        for cname, level in (("zstd", 1), ("zstd", 3), ("zstd", 5), ("lz4", 5)):
            for shuffle, code in shuffles.items():
                codec = Blosc(cname=cname, clevel=level, shuffle=code)
                encoded = codec.encode(values)
                table.append({"rows": what, "cname": cname, "clevel": level, "shuffle": shuffle,
                              "ratio": values.nbytes / len(encoded), "chunk_bytes": values.nbytes,
                              "decode_ms": ms(lambda: codec.decode(encoded), repeats)})
                print(" ".join(f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}" for k, x in table[-1].items()),
                      flush=True)
    return table


def write_cost(n: int, v: int, repeats: int) -> dict:
    """Stage 1's writing cost of each layout: the same rows (precomputed) written shard by shard with
    `CacheStore.write_shard` (encode, compress, digests) into a new store of each layout, interleaved `repeats`
    times; seconds (wall and CPU) per store and the bytes it takes."""
    data = load_dataset("synthetic", "train", num_samples=n, num_classes=4, channels=1, size=16)
    space = ViewSpace.from_config({"kind": "crop_flip", "padding": 2, "flip": True, "views": v, "seed": 0},
                                  data.image_size)
    manifest = {"teacher": {"arch": "synthetic", "num_classes": K}, "logits": {"dtype": "float16"}}
    store_kw = dict(num_samples=n, num_views=v, num_classes=K, num_params=space.num_params)
    shards = -(-n // (256 * 16))
    rows = [imagenet_like_logits(min(4096, n - 4096 * s), v, seed=s) for s in range(shards)]
    params = space.sample_params(np.arange(n), data.image_size)
    times = {layout: [] for layout in LAYOUT_NAMES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for layout in LAYOUT_NAMES if r % 2 == 0 else LAYOUT_NAMES[::-1]:
                path = Path(tmp) / f"{layout}-{r}.zarr"
                store = CacheStore.create(path, manifest, layout=layout, **store_kw)
                wall, cpu = time.perf_counter(), time.process_time()
                for shard, (z, y) in enumerate(rows):
                    at = store.shard_rows(shard)
                    store.write_shard(shard, z.astype(np.float16), params[at], y)
                times[layout].append((time.perf_counter() - wall, time.process_time() - cpu, bytes_on_disk(path)))
                shutil.rmtree(path)
    out = {layout: {"wall_s": statistics.median(t[0] for t in ts), "cpu_s": statistics.median(t[1] for t in ts),
                    "bytes": ts[0][2]} for layout, ts in times.items()}
    out["view_major_over_sample_major_wall"] = out["view-major"]["wall_s"] / out["sample-major"]["wall_s"]
    out["view_major_over_sample_major_cpu"] = out["view-major"]["cpu_s"] / out["sample-major"]["cpu_s"]
    print(json.dumps(out, indent=1), flush=True)
    return out


LAYOUT_NAMES = ("sample-major", "view-major")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16384)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--chunks-per-block", type=int, default=16, help="train.chunks_per_block of the Zarr readers")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-datasets", action="store_true", help="time the stage-3 sources only")
    ap.add_argument("--compare", help="a folder with targets.py and store.py of another version (`git show "
                                      "HEAD:pipeline/targets.py`, ...): its ZarrTargets is timed side by side "
                                      "(zarr-compared)")
    ap.add_argument("--threads", type=int, default=kdcache.targets.READ_THREADS,
                    help="kdcache.targets.READ_THREADS, the threads reading a block's chunks")
    ap.add_argument("--codecs", action="store_true", help="only the codec table (`codec_table`)")
    ap.add_argument("--write-cost", action="store_true", help="only stage 1's writing cost of each layout "
                                                              "(`write_cost`)")
    ap.add_argument("--out", default="benchmarks/results/reader.json")
    args = ap.parse_args()
    if args.codecs:
        Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "codecs": codec_table()}, indent=1))
        return
    if args.write_cost:
        Path(args.out).write_text(json.dumps({"samples": args.samples, "views": args.views, "cpus": os.cpu_count(),
                                              **write_cost(args.samples, args.views, args.repeats)}, indent=1))
        return
    kdcache.targets.READ_THREADS = args.threads
    n, v, seed = args.samples, args.views, 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"k1000-{name}.zarr" for name in ("lz4", "sample-major", "view-major")}
        with store_codec({"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}):
            lz4_store = write_store(paths["lz4"], n, v)
        start = time.perf_counter()
        store = write_store(paths["sample-major"], n, v)
        print(f"store {n} x {v} x {K}: {bytes_on_disk(paths['sample-major']) / 2**20:.0f} MiB on disk, written in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        vm_store = write_store(paths["view-major"], n, v, "view-major")
        group = vm_store.view_group  # stage 3's view choice on it: one view per chunk of rows and epoch
        on_disk = {name: bytes_on_disk(path) for name, path in paths.items()}
        start = time.perf_counter()
        memory = MemoryTargets(store, {})
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        MemoryTargets(vm_store, {})  # loading a view-major store whole: V chunk reads per chunk of rows
        load_seconds_view_major = time.perf_counter() - start
        zarr_source = ZarrTargets(store, {}, args.chunks_per_block)
        lz4_source = ZarrTargets(lz4_store, {}, args.chunks_per_block)
        vm_source = ZarrTargets(vm_store, {}, args.chunks_per_block)
        readers = {"memory": lambda e: source_epoch(memory, n, v, seed, e),
                   "memory-grouped": lambda e: source_epoch(memory, n, v, seed, e, group),
                   "zarr": lambda e: source_epoch(zarr_source, n, v, seed, e),
                   "zarr-lz4-store": lambda e: source_epoch(lz4_source, n, v, seed, e),
                   "zarr-view-major": lambda e: source_epoch(vm_source, n, v, seed, e, group)}
        if args.compare:
            other_targets, other_store = load_version(args.compare)
            compared = other_targets(other_store.open(paths["sample-major"]), {}, args.chunks_per_block)
            readers["zarr-compared"] = lambda e: source_epoch(compared, n, v, seed, e)
        if not args.skip_datasets:
            in_memory = CacheDataset(paths["sample-major"], memory_gb=1e9, cache_chunks=args.chunks_per_block)
            chunked = CacheDataset(paths["sample-major"], memory_gb=0, cache_chunks=args.chunks_per_block)
            vm_chunked = CacheDataset(paths["view-major"], memory_gb=0, cache_chunks=args.chunks_per_block)
            readers.update({"dataset-memory": lambda e: dataset_epoch(in_memory, 0, seed, e),
                            "dataset-zarr-w0": lambda e: dataset_epoch(chunked, 0, seed, e),
                            "dataset-zarr-w2": lambda e: dataset_epoch(chunked, 2, seed, e),
                            "dataset-zarr-view-major": lambda e: dataset_epoch(vm_chunked, 0, seed, e)})
        rate = {name: [] for name in readers}
        cpu_rate = {name: [] for name in readers}  # batches per CPU second of this process: robust to other jobs
        read = {name: [] for name in readers}
        load = []  # the 1-minute load average at the start of each round: the other jobs on the machine
        for r in range(args.repeats):
            load.append(os.getloadavg()[0])
            for name, epoch in readers.items():
                for path in paths.values():
                    evict(path)
                before, start, cpu = disk_bytes(), time.perf_counter(), time.process_time()
                batches = epoch(r)
                rate[name].append(batches / (time.perf_counter() - start))
                cpu_rate[name].append(batches / (time.process_time() - cpu))
                read[name].append(disk_bytes() - before)
                print(f"round {r + 1} {name}: {rate[name][-1]:.1f} batches/s ({cpu_rate[name][-1]:.1f} per CPU s), "
                      f"{read[name][-1] / 2**20:.0f} MiB read from disk", flush=True)

        costs = {"zstd 5 store": chunk_costs(store), "lz4 store": chunk_costs(lz4_store),
                 "view-major store, one view": view_chunk_costs(vm_store)}
        for what, c in costs.items():
            print(f"per chunk (ms), {what}: " + ", ".join(f"{k} {x:.2f}" for k, x in c.items()), flush=True)

    def over(name, ref, rates=rate):
        return statistics.median(a / b for a, b in zip(rates[name], rates[ref]))

    result = {"samples": n, "views": v, "classes": K, "batch_size": BATCH, "chunks_per_block": args.chunks_per_block,
              "store_bytes_on_disk": on_disk["sample-major"], "lz4_store_bytes_on_disk": on_disk["lz4"],
              "view_major_store_bytes_on_disk": on_disk["view-major"], "view_group": group,
              "load_seconds_memory": load_seconds, "load_seconds_memory_view_major": load_seconds_view_major,
              "repeats": args.repeats, "read_threads": args.threads,
              "page_cache": "every store file fsync'ed + POSIX_FADV_DONTNEED before each timed epoch",
              "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average_1min": load,
              "batches_per_second": rate, "batches_per_cpu_second": cpu_rate, "disk_bytes_read_per_epoch": read,
              "median_batches_per_second": {k: statistics.median(x) for k, x in rate.items()},
              "median_batches_per_cpu_second": {k: statistics.median(x) for k, x in cpu_rate.items()},
              "median_disk_bytes_read_per_epoch": {k: statistics.median(x) for k, x in read.items()},
              "ratio_memory-grouped_over_memory": over("memory-grouped", "memory"),
              "ratio_zarr-view-major_over_memory-grouped": over("zarr-view-major", "memory-grouped"),
              "ratio_zarr-view-major_over_zarr": over("zarr-view-major", "zarr"),
              "chunk_costs_ms": costs}
    for name in ("zarr", "zarr-lz4-store", "zarr-view-major"):
        result[f"ratio_{name}_over_memory"] = over(name, "memory")
        result[f"ratio_{name}_over_memory_cpu"] = over(name, "memory", cpu_rate)
    if args.compare:
        result.update(compared=args.compare, ratio_compared_over_memory=over("zarr-compared", "memory"),
                      ratio_zarr_over_compared=over("zarr", "zarr-compared"),
                      ratio_compared_over_memory_cpu=over("zarr-compared", "memory", cpu_rate))
    if not args.skip_datasets:
        result.update({f"ratio_{name}_over_dataset-memory": over(name, "dataset-memory")
                       for name in ("dataset-zarr-w0", "dataset-zarr-w2", "dataset-zarr-view-major")})
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: x for k, x in result.items() if k.startswith(("median", "ratio", "load"))}, indent=1))


if __name__ == "__main__":
    main()
