"""Stage 3: what the cache costs and what it buys, side by side in one run on the default pair.

Four trainings of the same student with the same seed and views, interleaved `--repeats` times: CE
only (no teacher at all), offline KD (targets from the cache, loaded in memory), online KD (the
teacher run live on the same images) and offline KD reading the store from Zarr blocks (as for a
store that does not fit in memory; its batch order shuffles within blocks of chunks). Each is timed
per optimiser step over steps skip+1 .. skip+steps of its first epoch, in wall time and in CPU time
of the process (all its threads: on a shared machine the CPU time is what other jobs disturb least);
the epoch time is that times the steps per epoch. Ratios are the medians of the per-round ratios
(the modes of one round ran back to back, so they shared the machine's state). Because the extra work
of offline KD is far below the timing noise of a shared machine, it is also timed on its own, over
one epoch of batches: fetching the targets from memory plus the KD loss forward and backward.
Finally the target sources alone, without training: batches per second over one epoch from memory
and from Zarr blocks.

    .venv/bin/python benchmarks/bench_stage3.py [--config configs/train/fashion-mnist/kd.yaml] [--steps 150]
"""
import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdcache.config import load_config
from kdcache.models import select_device
from kdcache.store import CacheStore
from kdcache.dataset import epoch_views, store_bytes
from kdcache.stages.train_student import train_student
from kdcache.targets import MemoryTargets, ZarrTargets


class Enough(Exception):
    """Raised from the step callback once the timed steps are done."""


def seconds_per_step(cfg: dict, skip: int, steps: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds of one training step (batch, forward, loss, backward, update) after `skip`
    warm-up steps."""
    ticks = []

    def tick(_):
        ticks.append((time.perf_counter(), time.process_time()))
        if len(ticks) > skip + steps:
            raise Enough

    with tempfile.TemporaryDirectory() as out:
        cfg = copy.deepcopy(cfg)
        cfg["train"].update(out=out, epochs=1)
        try:
            train_student(cfg, progress=False, on_step=tick)
        except Enough:
            pass
    if len(ticks) <= skip + 1:
        raise SystemExit(f"an epoch has only {len(ticks)} steps: lower --skip")
    n = len(ticks) - 1 - skip
    return (ticks[-1][0] - ticks[skip][0]) / n, (ticks[-1][1] - ticks[skip][1]) / n


def kd_extra_seconds(store, kd: dict, n: int, views) -> float:
    """Per batch: what offline KD adds to a CE step (targets from memory, KD loss forward + backward)."""
    from kdcache.methods import distill_loss

    source = MemoryTargets(store, {})
    bs, K = kd["train"]["batch_size"], store.logits.shape[-1]
    z_s = torch.randn(bs, K, requires_grad=True)
    y = torch.zeros(bs, dtype=torch.long)
    count, start = 0, time.perf_counter()
    for b in source.batches(source.blocks(n, kd["seed"], 0), views, bs):
        z_t = torch.from_numpy(b["logits"])
        if len(z_t) != bs:
            break
        distill_loss("kd", z_s, z_t, y, params=kd["train"]["params"], epoch=1).backward()
        count += 1
    return (time.perf_counter() - start) / count


def batches_per_second(source, n: int, views, batch_size: int, seed: int) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in source.batches(source.blocks(n, seed, 0), views, batch_size))
    return count / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train/fashion-mnist/kd.yaml", help="a KD config of the pair")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps before timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/stage3.json")
    args = ap.parse_args()
    kd = load_config(args.config)
    kd["train"].update(method="kd", params={}, online=False)
    modes = {"ce": dict(method="ce"), "offline_kd": {}, "online_kd": dict(online=True),
             "offline_kd_zarr": dict(memory_gb=0)}  # the store read from Zarr blocks, not loaded
    store = CacheStore.open(kd["cache"]["store"])  # fail early when the store is missing
    if store_bytes(store) > kd["train"]["memory_gb"] * 2**30:
        raise SystemExit(f"{store.path} does not fit train.memory_gb: the offline timing would read Zarr")

    wall, cpu = {m: [] for m in modes}, {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, change in modes.items():
            cfg = copy.deepcopy(kd)
            cfg["train"].update(change)
            w, c = seconds_per_step(cfg, args.skip, args.steps)
            wall[mode].append(w)
            cpu[mode].append(c)
            print(f"{mode}: {w * 1000:.1f} ms/step wall, {c * 1000:.1f} ms/step CPU", flush=True)

    N, V, K = store.logits.shape
    steps = math.ceil(N / kd["train"]["batch_size"])
    epoch = {m: statistics.median(v) * steps for m, v in wall.items()}
    epoch_cpu = {m: statistics.median(v) * steps for m, v in cpu.items()}

    def ratio(times, a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    views = epoch_views(N, V, kd["seed"], 0)
    kd_extra = statistics.median(kd_extra_seconds(store, kd, N, views) for _ in range(args.repeats))
    start = time.perf_counter()
    memory = MemoryTargets(store, {})
    load_seconds = time.perf_counter() - start
    zarr_source = ZarrTargets(store, {}, kd["train"]["chunks_per_block"])
    reading = {"memory": [], "zarr": []}
    for _ in range(args.repeats):
        reading["memory"].append(batches_per_second(memory, N, views, kd["train"]["batch_size"], kd["seed"]))
        reading["zarr"].append(batches_per_second(zarr_source, N, views, kd["train"]["batch_size"], kd["seed"]))

    result = {
        "config": args.config, "store": store.path, "logits_shape": [N, V, K], "dtype": str(store.logits.dtype),
        "student": kd["train"]["student"], "teacher": store.manifest["teacher"]["arch"],
        "batch_size": kd["train"]["batch_size"], "steps_per_epoch": steps, "timed_steps": args.steps,
        "device": str(select_device(kd["device"])), "torch_threads": torch.get_num_threads(),
        "wall_seconds_per_step": wall, "cpu_seconds_per_step": cpu,
        "epoch_seconds": epoch, "epoch_cpu_seconds": epoch_cpu,
        "ratio_offline_kd_over_ce": ratio(wall, "offline_kd", "ce"),
        "ratio_online_kd_over_offline_kd": ratio(wall, "online_kd", "offline_kd"),
        "ratio_offline_kd_zarr_over_memory": ratio(wall, "offline_kd_zarr", "offline_kd"),
        "cpu_ratio_offline_kd_over_ce": ratio(cpu, "offline_kd", "ce"),
        "cpu_ratio_online_kd_over_offline_kd": ratio(cpu, "online_kd", "offline_kd"),
        "cpu_ratio_offline_kd_zarr_over_memory": ratio(cpu, "offline_kd_zarr", "offline_kd"),
        "kd_extra_seconds_per_step": kd_extra, "kd_extra_over_ce_step": kd_extra / statistics.median(wall["ce"]),
        "load_logits_seconds": load_seconds, "loaded_bytes": store_bytes(store),
        "batches_per_second": reading,
        "ratio_zarr_over_memory_batches_per_second":
            statistics.median(reading["zarr"]) / statistics.median(reading["memory"]),
        "training_steps_per_second_offline_kd": 1 / statistics.median(wall["offline_kd"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    shown = ("ratio", "cpu_ratio", "epoch", "batches", "training", "kd_extra")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(shown)}, indent=1))


if __name__ == "__main__":
    main()
