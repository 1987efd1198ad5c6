"""Stage 1 on an image folder of JPEG files: (sample, view) rows per second with 0 and 2 DataLoader workers
decoding and replaying the views, side by side in one run.

Writes `--images` JPEG files of 256 to 500 pixels a side (random sizes and pixels, 10 classes) into a
temporary `root/train/<class>/` folder, a small teacher checkpoint (tiny_teacher, random weights: only time
is measured) and runs stage 1 over random-resized-crop views at `--size` pixels, `--views` per image, with
`cache.workers` 0 and 2, interleaved `--repeats` times; the ratio is the median of the per-round ratios.

    .venv/bin/python benchmarks/bench_stage1_workers.py [--images 4096] [--views 2] [--repeats 3]
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcache.config import load_config
from kdcache.models import build_model, save_checkpoint
from kdcache.stages.cache_teacher import cache_teacher


def write_jpegs(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(256, 501, 2)
        pixels = rng.integers(0, 256, (h // 2, w // 2, 3), dtype=np.uint8)  # detail: JPEG has work to do
        Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/stage1_workers.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpegs(tmp / "data", args.images)
        ckpt = tmp / "teacher.pt"
        save_checkpoint(ckpt, build_model("tiny_teacher", 10, 3), arch="tiny_teacher", num_classes=10, in_channels=3,
                        image_size=args.size, meta={"test_accuracy": 0.0})
        rows = args.images * args.views
        per = {0: [], 2: []}
        for r in range(args.repeats):
            for workers in per:
                cfg = load_config(None, {"device": "cpu", "dataset": {"name": "imagefolder", "root": str(tmp / "data")},
                                         "teacher": {"arch": "tiny_teacher", "checkpoint": str(ckpt)},
                                         "views": {"kind": "resized_crop_flip", "size": args.size, "views": args.views},
                                         "cache": {"store": str(tmp / f"s{r}w{workers}.zarr"), "workers": workers,
                                                   "batch_size": 256}})  # shards of 4096 images (the default)
                start = time.perf_counter()
                cache_teacher(cfg, progress=False)
                per[workers].append(rows / (time.perf_counter() - start))
                print(f"round {r + 1}, {workers} workers: {per[workers][-1]:.0f} rows/s", flush=True)
    ratio = statistics.median(b / a for a, b in zip(per[0], per[2]))
    result = {"images": args.images, "views": args.views, "size": args.size, "torch_threads": torch.get_num_threads(),
              "rows_per_second": {str(k): statistics.median(v) for k, v in per.items()},
              "rounds": {str(k): v for k, v in per.items()}, "workers2_over_workers0": ratio}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
