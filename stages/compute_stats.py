"""Stage 2: per-(sample, view) temperatures and statistics of the cached logits, with Dask.

The logits are read with `da.from_zarr` in blocks aligned with the store's shards: a block is a whole
number of the store's chunks inside one shard (the whole shard when it holds at most 8 MiB of logits,
see `block_samples`), so a task reads only its own chunks and its memory stays bounded whatever the
layout stage 1 chose. Each block runs `kdcache.stats.block_statistics`. Per-row results go to (N, V)
arrays in the store's `stats/` group, laid out like the logits (a chunk per block, a shard per logits
shard, each shard written by one task: no two tasks write the same file); per-class sums are added
up in float64 along a fixed binary tree and written at the end. Array names and meanings: the
docstring of pipeline/stats.py.

Every output array records in its attributes the statistic, its parameters (std convention, T_base,
gamma, bins), and the fingerprint of the logits it was computed from (`CacheStore.fingerprint`). The
fingerprint is written last, so an array without one is an interrupted computation. Re-running with the
same settings does nothing; new settings add arrays; arrays from other logits (stale) are recomputed
by `compute_stats` and refused by `read_stat` (kdcache.stats).

Lossy stores (top-k, quantized, sampled: `kdcache.encodings.is_lossless`) come with exact per-row arrays that
stage 1 wrote from the teacher's float32 logits (kdcache.stats, "Exact statistics"): those are up to date here, and
so are the population std and max |Z| (either convention), which readers derive from stage 1's arrays
(`kdcache.stats.Derived`: not written, 12 bytes per row saved); the LS and max-logit temperatures are derived from them
(`kdcache.stats.derivation`, through the population std when asked for, `exact: true`), and only
the rest is computed from the decoded logits (`exact: false`, with a warning for a value a method reads). A
store without dense logits (sampled targets) gives only those: the rest is skipped with a warning.

Consumers of a shared store need not write it: with `out`, the same stats/ arrays go to a separate
statistics overlay store tied to the cache by its fingerprint (pipeline/sharing.py), which is how a
read-only store (http(s), no write permission) gets statistics; `read_stat(..., overlay=...)` reads them.

Schedulers: the local threaded one by default; `workers=N` starts a dask.distributed LocalCluster of N
single-threaded processes; `scheduler=ADDRESS` uses a running cluster, whose workers must see the
store at the same path (a shared file system) or URL (with the credentials in their environment) and
have kdcache installed.
"""
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch

from kdcache.cluster import dask_client
from kdcache.config import check_processes
from kdcache.errors import UserError
from kdcache.files import disk_full
from kdcache.stats import (Derived, Output, block_statistics, check_settings, class_statistics, computed_record,
                            create_array, exact_array, given_exact, plan_outputs, read_rows, read_stat, stat_state,
                            uncomputable)
from kdcache.sharing import ReadOnlyStore, open_overlay, writer_lock
from kdcache.encodings import decode_logits, describe, is_lossless
from kdcache.store import CacheStore, check_rows, chunks_of, reading

log = logging.getLogger(__name__)


def compute_stats(path, settings: dict, *, out=None, scheduler: str | None = None, workers: int | None = None,
                  progress: bool = True) -> dict:
    """Compute the statistics that `settings` (the config's `stats` section) asks for and are not
    already up to date in the store at `path` (a path or URL).

    They go to the store's own stats/ group, or with `out` to the statistics overlay at `out` (created
    when missing; pipeline/sharing.py): consumers of a shared store never modify it, and a read-only
    one (http(s), no write permission) needs `out`. The `stats` writer lock of what is written is held
    throughout, so two stage-2 runs (or stage 2 and stage 1) never write one store together.

    Returns {"store", "overlay", "computed", "stale" (recomputed because their logits changed),
    "up_to_date"}: lists of array names under stats/.
    """
    if scheduler is not None and not (isinstance(scheduler, str) and scheduler):
        raise UserError(f"stats.scheduler must be the address of a dask scheduler (e.g. tcp://host:8786), got {scheduler!r}")
    check_processes(workers, "--workers")
    if scheduler and workers:
        raise UserError("give either --scheduler ADDRESS or --workers N, not both")
    settings = check_settings(settings)
    store = CacheStore.open(path, mode="r" if out else "r+")
    _check_store(store)
    try:
        target = store.path if out is None else out
        with _scheduler(scheduler, workers, progress) as run:  # connect first: a refusal writes nothing
            root = store.group if out is None else open_overlay(out, store.fingerprint(), store.path, create=True)
            with disk_full(target, "the statistics finished before are kept; the unfinished ones have no "
                           "fingerprint (refused by stage 3) and are recomputed next time"), writer_lock(target, "stats"):
                return _compute(store, root, out, settings, run)
    except ReadOnlyStore as e:
        if out is not None:
            raise
        raise UserError(f"{e}: write the statistics to a separate overlay with `kdcache stats {path} --out "
                        "OVERLAY.zarr` and train with `--stats OVERLAY.zarr`") from None


def _compute(store: CacheStore, root, out, settings, run) -> dict:
    group = root.require_group("stats")
    fingerprint = store.fingerprint()
    plan = plan_outputs(settings)
    state = {o.name: stat_state(group, o, fingerprint, store.path if out is None else out) for o in plan}
    lossy = not is_lossless(store.entry)
    # up to date: fresh, or an exact array of the store (not copied into an overlay), or derived on read from them
    fresh = [o for o in plan if state[o.name] == "fresh" or lossy and given_exact(store, o) is not None]
    todo, derived, skipped = [], [], []  # from the logits; (output, its Derived of exact arrays); not computable here
    for o in (o for o in plan if o not in fresh):
        exact = exact_array(store, o) if lossy else None
        if exact is not None:
            derived.append((o, exact))
        elif uncomputable(store, o):
            skipped.append(o)
        else:
            todo.append(o)
    summary = {"store": store.path, "overlay": out, "computed": [o.name for o in todo + [d[0] for d in derived]],
               "stale": [o.name for o in todo + [d[0] for d in derived] if state[o.name] == "stale"],
               "up_to_date": [o.name for o in fresh],
               "skipped": [o.name for o in skipped]}
    if skipped:
        log.warning(f"skipped stats/{', stats/'.join(o.name for o in skipped)}: store {store.path} holds "
                    f"{describe(store.entry)}, which give no logits to compute them from (only stage 1's exact "
                    "statistics and the temperatures derived from them)")
    approximate = [o.name for o in todo if lossy and o.statistic in read_by_methods()]
    if approximate:
        log.warning(f"store {store.path} holds {describe(store.entry)} and no exact "
                    f"stats/{', stats/'.join(approximate)} from stage 1: computed from the decoded logits, approximate "
                    "(stage 1 writes exact ones, power sums at stats.gammas, when it builds the store: "
                    "kdcache cache-teacher --overwrite)")
    if not todo and not derived:
        return summary

    attributes = {} if not lossy else {"exact": False, "source": "stage 2, from the decoded logits"}
    for o in todo:
        create_array(group, o, store, block_samples(store), attributes)
    for o, exact in derived:
        create_array(group, o, store, block_samples(store),
                     {"exact": True, "source": f"stage 2, {exact.formula} (exact)"})
    run((_graph(store, group, todo, settings["ece_bins"]) if todo else []) + _derive(store, group, derived))
    record = computed_record(store)
    for o in todo + [d[0] for d in derived]:  # last: an array without a fingerprint is an interrupted run
        group[o.name].update_attributes(record)
    return summary


def read_by_methods() -> set[str]:
    """The statistics some method's loss reads (their approximate values change what a student learns)."""
    from kdcache.methods import METHODS, build
    return {stat for name in METHODS for stat, _ in build(name).statistics().values()}


def plot_stats(path, settings: dict, out_dir, *, overlay=None) -> list[Path]:
    """PNG histograms of the temperatures, entropy and margin, and the per-class accuracy and
    similarity matrix, for the statistics `settings` computed (in the store, or in `overlay`);
    returns the files written."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    settings = check_settings(settings)
    store = CacheStore.open(path)
    planned = {o.statistic: o for o in plan_outputs(settings) if not uncomputable(store, o)}  # sampled: fewer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def values(stat):
        return read_stat(store, stat, overlay=overlay, **planned[stat].params)[...]

    def save(fig, name):
        fig.savefig(out_dir / name, dpi=80)
        written.append(out_dir / name)

    written = []
    titles = {"ls_temperature": "logit-standardization temperature T_base * std",
              "mlt_temperature": "max-logit adaptive temperature (teacher)",
              "entropy": "entropy of the teacher softmax (nats)", "margin": "top-1 minus top-2 logit"}
    for stat, title in titles.items():
        if stat not in planned:
            continue
        fig = Figure(figsize=(5, 3.5))
        fig.subplots_adjust(left=0.15, bottom=0.15)
        ax = fig.add_subplot()
        v = values(stat).ravel()
        ax.stairs(*np.histogram(v[np.isfinite(v)], bins=100), fill=True)
        ax.set(xlabel=planned[stat].name, ylabel="(sample, view) rows", title=title)
        save(fig, f"{planned[stat].name}.png")
    if "class_accuracy" in planned:
        acc = values("class_accuracy")
        fig = Figure(figsize=(5, 3.5))
        fig.subplots_adjust(left=0.15, bottom=0.15)
        ax = fig.add_subplot()
        ax.stairs(acc, np.arange(len(acc) + 1) - 0.5, fill=True)
        ax.set(xlabel="class (label)", ylabel="teacher accuracy", ylim=(0, 1), title="per-class teacher accuracy")
        save(fig, "class_accuracy.png")
    if "class_mean_softmax" in planned:
        fig = Figure(figsize=(5.5, 4.5))
        ax = fig.add_subplot()
        im = ax.imshow(values("class_mean_softmax"), cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax)
        ax.set(xlabel="predicted class", ylabel="label", title="mean teacher softmax per label")
        save(fig, "class_mean_softmax.png")
    return written


# ---- helpers ------------------------------------------------------------------------------------

BLOCK_BYTES = 8 * 2**20  # the most logits (in the stored dtype) one Dask task holds, unless one chunk is larger


def block_samples(store: CacheStore) -> int:
    """Samples per Dask block: a whole number of the store's chunks that divides its shard (so no block
    straddles two shards, and a block reads only its own chunks), the most that fit in BLOCK_BYTES.

    The whole shard when it fits (Fashion-MNIST: 4096 samples x 8 views x 10 classes = 640 KiB). Large
    shards are split (ImageNet-shaped: 4096 x 10 x 1000 in float16 = 78 MiB -> 256-sample blocks of
    4.9 MiB), which bounds each task's memory (and the float32 temporaries of the kernel) whatever the
    layout stage 1 chose.
    """
    chunk, shard = store.labels.chunks[0], store.samples_per_shard
    _, V, K = store.logits_shape
    itemsize = store.read_itemsize
    chunk_bytes = chunk * V * K * itemsize
    fit = max(1, BLOCK_BYTES // chunk_bytes)
    chunks_per_shard = shard // chunk
    return chunk * max(d for d in range(1, chunks_per_shard + 1) if chunks_per_shard % d == 0 and d <= fit)


def _graph(store: CacheStore, group, todo: list[Output], ece_bins: int) -> list:
    """Dask collections that compute `todo` and store it into the (created) arrays of `group`.

    One da.store of everything, computed at once: one graph, so each block is read and computed once.
    Each task reads its block's rows and checks them (`_block`).
    """
    N, V, K = store.logits_shape
    S, c = block_samples(store), store.samples_per_chunk
    arrays = {**store.logit_arrays, "labels": store.labels}
    digests = store.recorded_digests()
    task = dask.delayed(_block, pure=True)
    blocks = [slice(start, min(start + S, N)) for start in range(0, N, S)]
    parts = [task(store.path, arrays, rows, c, None if digests is None else
                  {n: digests[n][chunks_of(rows, c)] for n in arrays}, K, todo, ece_bins) for rows in blocks]
    sources, targets = [], []
    row_outs = [o for o in todo if o.per_row]
    if row_outs:
        rows = da.concatenate([da.from_delayed(p[0], shape=(b.stop - b.start, V, len(row_outs)), dtype=np.float32)
                               for p, b in zip(parts, blocks)])
        rows = rows.rechunk({0: store.samples_per_shard})  # one write per output shard (blocks are small)
        sources += [rows[..., j].astype(group[o.name].dtype) for j, o in enumerate(row_outs)]
        targets += [group[o.name] for o in row_outs]
    class_outs = [o for o in todo if not o.per_row]
    if class_outs:
        values = dask.delayed(_class_values, pure=True)(_sum_tree([p[1] for p in parts]), class_outs)
        sources += [da.from_delayed(values[o.name], shape=group[o.name].shape, dtype=group[o.name].dtype)
                    for o in class_outs]
        targets += [group[o.name] for o in class_outs]
    stored = da.store(sources, targets, lock=False, compute=False)  # one source: an Array, else a tuple
    return [stored] if isinstance(stored, da.Array) else list(stored)


def _derive(store: CacheStore, group, derived: list[tuple[Output, Derived]]) -> list:
    """Dask collections that store each derived output's values (its `Derived` of the exact arrays: float32(factor) x
    an exact array for a temperature, as the kernel computes it) into its (created) array, a logits shard per task,
    each reading its rows checked (`kdcache.stats.read_rows`)."""
    if not derived:
        return []
    task, V = dask.delayed(read_rows, pure=True), store.logits_shape[1]
    shards = [store.shard_rows(s) for s in range(store.num_shards)]
    sources = [da.concatenate([da.from_delayed(task(exact, store.path, rows), shape=(rows.stop - rows.start, V),
                                               dtype=np.float32) for rows in shards]) for _, exact in derived]
    stored = da.store(sources, [group[o.name] for o, _ in derived], lock=False, compute=False)
    return [stored] if isinstance(stored, da.Array) else list(stored)


def _block(path, arrays: dict, rows: slice, chunk: int, digests: dict | None, num_classes: int, outputs, ece_bins):
    """The Dask task of one block: read `rows` of the logits (or a top-k store's arrays) and labels, check them as
    they are read (finite, labels in range, the rows recorded there: `check_rows`, StoreDamage naming them), then
    compute their statistics (a top-k block rebuilt into float32 logits first)."""
    values = {}
    for name, a in arrays.items():
        with reading(path, a, rows):
            values[name] = a[rows]
        check_rows(path, name, values[name], rows.start, num_classes, chunk, None if digests is None else digests[name])
    labels = values.pop("labels")
    logits = decode_logits(values, num_classes, keep_dtype=True)  # the kernel upcasts in small batches
    return block_statistics(logits, labels, outputs, ece_bins)


def _class_values(sums, outputs):
    return class_statistics(*sums, outputs)


def _add_class_sums(a, b):
    """(bins, probs) + (bins, probs), in float64; probs may be None."""
    return tuple(None if x is None else np.add(x, y, dtype=np.float64) for x, y in zip(a, b))


def _sum_tree(items):
    """The sum of the blocks' class sums as a binary tree of delayed additions: a fixed order (the same
    result on every scheduler) and, unlike dask's reductions, no concatenation of partial sums, so only
    a few (K, K) partial sums are alive at once."""
    add = dask.delayed(_add_class_sums, pure=True)
    while len(items) > 1:
        items = [add(*items[i:i + 2]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def _check_store(store: CacheStore):
    if store.status != "complete":
        done = int(store.done().sum())
        raise UserError(f"store {store.path} is incomplete ({done}/{store.num_shards} shards done): "
                        "finish stage 1 (kdcache cache-teacher) before computing statistics")
    if store.num_classes < 2:
        raise UserError(f"store {store.path} has {store.num_classes} class(es); statistics need at least 2")


@contextlib.contextmanager
def _scheduler(address, workers, progress):
    """A function that computes dask collections: on the threaded scheduler, a new LocalCluster of
    `workers` processes, or the running cluster at `address`."""
    if not (address or workers):
        from dask.diagnostics import ProgressBar

        def run(collections):
            # our own pool, drained before returning: when a task fails (a full disk) the others already running
            # finish their writes (zarr removes a write it could not finish) before the error reaches the caller
            pool = ThreadPoolExecutor(os.cpu_count() or 1)
            try:
                with _torch_threads(1), (ProgressBar() if progress else contextlib.nullcontext()):
                    dask.compute(*collections, scheduler="threads", pool=pool)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        yield run
        return
    from distributed import progress as show_progress
    with dask_client(address, workers) as client:
        def run(collections):
            futures = client.compute(collections)
            if progress:
                show_progress(futures)
            client.gather(futures)
        yield run


@contextlib.contextmanager
def _torch_threads(n):
    """Dask's threads already use every core: one torch thread each avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
