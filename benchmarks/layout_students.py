"""The table of docs/RESULTS.md "View-major stores: views chosen per chunk" and results/frontier/layout.json: each
store's KD students (benchmarks/bench_frontier.py's `students`: last test accuracy, mean and std over seeds), its
layout, and the paired difference to the sample-major store's run of the same seed (same init and batch order: only
the views differ), in points, with its standard error.

    .venv/bin/python benchmarks/layout_students.py     # from the repository root
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_frontier import students  # noqa: E402
from kdcache.store import CacheStore  # noqa: E402

out = {}
for folder, ref in (("layout", "dense_float16"), ("layout-seeds", "dense_float16"), ("layout-all", "layout-all-sample-major")):
    rows = students(Path("results/frontier", folder))
    base = dict(zip(*next((r["seeds"], r["last_accuracy"]) for r in rows if r["store"] == ref)))
    for r in rows:
        s = CacheStore.open(f"stores/frontier/{r['store']}.zarr")
        d = 100 * np.array([a - base[seed] for seed, a in zip(r["seeds"], r["last_accuracy"])])
        r.update(layout=s.layout, samples_per_chunk=s.samples_per_chunk, views=int(s.views.shape[1]),
                 paired_difference_points={"reference": ref, "mean": float(d.mean()),
                                           "standard_error": float(d.std(ddof=1) / np.sqrt(len(d))),
                                           "seeds_lower": int((d < 0).sum())})
    out[folder] = rows
Path("results/frontier/layout.json").write_text(json.dumps(out, indent=1) + "\n")
for folder, rows in out.items():
    for r in rows:
        p = r["paired_difference_points"]
        print(f"| {folder} | {r['store']} | {r['layout']} | {r['samples_per_chunk']} | {r['views']} | {len(r['seeds'])} | "
              f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {p['mean']:+.2f} ± {p['standard_error']:.2f} | "
              f"{p['seeds_lower']}/{len(r['seeds'])} |")
