"""Stage 1 against bare teacher inference over the same inputs, side by side in one run.

Both sides load the data set and the checkpoint, draw the same views and run the same teacher with the
same batch size and device; stage 1 also writes the compressed store (in a background thread). The
two are interleaved `--repeats` times and the medians compared, because this machine is noisy.

    .venv/bin/python benchmarks/bench_stage1.py [--config configs/fashion-mnist.yaml] [--subset 8192]
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.config import load_config
from kdcache.data import load_dataset
from kdcache.inference import model_logits
from kdcache.models import load_checkpoint, select_device
from kdcache.store import CacheStore
from kdcache.views import ViewSpace
from kdcache.stages.cache_teacher import cache_teacher


def bare_inference(cfg) -> float:
    """The teacher over every (sample, view) of the store's shards, results kept in memory only."""
    start = time.perf_counter()
    d, c = cfg["dataset"], cfg["cache"]
    data = load_dataset(d["name"], "train", root=d["root"], subset=d["subset"], **d["options"])
    space = ViewSpace.from_config(cfg["views"], data.image_size)
    device = select_device(cfg["device"])
    teacher, _ = load_checkpoint(cfg["teacher"]["checkpoint"], device=device)
    shard = c["samples_per_chunk"] * c["chunks_per_shard"]
    for first in range(0, len(data), shard):
        ids = np.arange(first, min(first + shard, len(data)))
        model_logits(teacher, data, ids, space.sample_params(ids, data.image_size), space,
                     batch_size=c["batch_size"], device=device)
    return time.perf_counter() - start


def stage1(cfg, out: Path) -> float:
    start = time.perf_counter()
    cache_teacher(dict(cfg, cache=dict(cfg["cache"], store=str(out))), overwrite=True, progress=False)
    return time.perf_counter() - start


def store_bytes(path: Path, array: str) -> int:
    return sum(f.stat().st_size for f in (path / array).rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/fashion-mnist.yaml")
    ap.add_argument("--subset", type=int, default=8192, help="training samples to cache")
    ap.add_argument("--views", default="8", help="views per sample (an integer or 'all')")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/stage1.json")
    args = ap.parse_args()
    views = args.views if args.views == "all" else int(args.views)
    cfg = load_config(args.config, {"dataset": {"subset": args.subset}, "views": {"views": views}})
    bare, cached = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.zarr"
        for _ in range(args.repeats):
            bare.append(bare_inference(cfg))
            cached.append(stage1(cfg, out))
        store = CacheStore.open(out)
        n, v, k = store.logits.shape
        on_disk = store_bytes(out, "logits")
        raw = n * v * k * store.logits.dtype.itemsize
        views_disk = store_bytes(out, "views")
    result = {
        "config": args.config, "subset": args.subset, "views_per_sample": v, "classes": k,
        "rows": n * v, "dtype": str(store.logits.dtype), "batch_size": cfg["cache"]["batch_size"],
        "device": str(select_device(cfg["device"])), "torch_threads": torch.get_num_threads(),
        "bare_seconds": bare, "stage1_seconds": cached,
        "ratio_stage1_over_bare": statistics.median(cached) / statistics.median(bare),
        "logit_bytes_per_row_on_disk": on_disk / (n * v),
        "view_bytes_per_row_on_disk": views_disk / (n * v),
        "logits_compression_ratio": raw / on_disk,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
