"""Grid: the same 8 student runs offline (cached targets) and online (teacher live), total wall time.

The offline side pays for the teacher once: its time is stage 1 (caching the teacher's logits into a
fresh store) + stage 2 (statistics) + the grid. The online side is the grid alone, its teacher run in
every step of every run. Both grids run on the same dask LocalCluster size, one after the other; the
8 runs are the 8 distillation settings of configs/grid/demo.yaml (every method but CE) on one student.

    .venv/bin/python benchmarks/bench_grid.py [--config configs/demo.yaml] [--epochs 1] [--workers 2]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from kdcache.config import load_config
from kdcache.stages.cache_teacher import cache_teacher
from kdcache.stages.compute_stats import compute_stats
from kdcache.stages.grid import load_grid, run_grid


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml", help="pipeline config (its teacher checkpoint must exist)")
    ap.add_argument("--grid", default="configs/grid/demo.yaml", help="the methods to take (all but ce)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--subset", type=int, help="training images (overrides dataset.subset; the store is built anew)")
    ap.add_argument("--out", default="benchmarks/results/grid.json")
    args = ap.parse_args()
    methods = {k: v for k, v in load_grid(args.grid)["methods"].items() if v["method"] != "ce"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(args.config, {"cache": {"store": str(tmp / "store.zarr")}, "dataset": {"subset": args.subset}})
        base = tmp / "base.yaml"
        base.write_text(yaml.safe_dump(cfg))
        seconds = {"stage1": timed(lambda: cache_teacher(cfg, progress=False)),
                   "stage2": timed(lambda: compute_stats(cfg["cache"]["store"], cfg["stats"], progress=False))}
        for mode in ("offline", "online"):
            grid = {"config": str(base), "out": str(tmp / mode), "methods": methods, "seeds": [0],
                    "set": {"train": {"epochs": args.epochs, "online": mode == "online"}}}
            path = tmp / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(grid))
            seconds[f"{mode}_grid"] = timed(lambda: run_grid(path, workers=args.workers, progress=False))
    offline = seconds["stage1"] + seconds["stage2"] + seconds["offline_grid"]
    result = {"runs": len(methods), "epochs": args.epochs, "workers": args.workers, "config": args.config,
              "train_images": cfg["dataset"]["subset"],
              "seconds": seconds, "offline_total": offline, "online_total": seconds["online_grid"],
              "online_over_offline": seconds["online_grid"] / offline}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"| {len(methods)} runs x {args.epochs} epoch(s) on {cfg['dataset']['subset']} images, "
          f"{args.workers} workers | wall time (s) |\n|---|---:|\n"
          f"| offline: stage 1 {seconds['stage1']:.0f} + stage 2 {seconds['stage2']:.0f} + grid "
          f"{seconds['offline_grid']:.0f} | {offline:.0f} |\n| online: grid (teacher live) | {seconds['online_grid']:.0f} |\n"
          f"| online / offline | {result['online_over_offline']:.2f}x |")


if __name__ == "__main__":
    main()
