"""Stage 2 against a single-pass in-memory NumPy computation of the same statistics, side by side.

A synthetic ImageNet-shaped float16 store (default 200,000 samples x 10 views = 2,000,000 rows x 1000
classes, 3.7 GiB) is written once: large enough that the memory target (peak <= 1/4 of the array) is
met by the whole process, the ~0.5 GB that importing torch takes included. Then, `--repeats` times
and interleaved, two child processes run on it:

- stage2: `compute_stats` with the default settings (all statistics, gammas 0.1 and 0.3) on the local
  threaded scheduler, end to end: read and decompress the shards, compute, write `stats/`;
- numpy:  read the whole logits array into memory, then one pass over it in blocks of rows with plain
  NumPy (float32, the same statistics), keeping the results in memory. Its time is reported with and
  without the read.

Each child measures its own peak resident memory with resource.getrusage(RUSAGE_SELF).ru_maxrss
(the kernel's high-water mark of the whole process), its RSS after imports (/proc/self/statm), and its
CPU time (user + system, all threads; robust to other jobs on the machine, unlike wall time). The
numpy child also checks that its statistics equal stage 2's (max relative difference per array).

    .venv/bin/python benchmarks/bench_stage2.py [--samples 200000] [--views 10] [--repeats 1]
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: the work done, whatever else runs."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- the synthetic store ------------------------------------------------------------------------

def build_store(path: Path, samples: int, views: int, classes: int, seed: int = 0):
    """Teacher-like float16 logits: N(0, 2) noise, +6 on the label for ~80% of rows; shards are written
    by two threads (each shard is its own file), in the store's default layout."""
    from kdcache.store import CacheStore
    store = CacheStore.create(path, {"benchmark": "stage2", "samples": samples, "views": views, "classes": classes},
                              num_samples=samples, num_views=views, num_classes=classes, num_params=1)

    def write(shard):
        rng = np.random.default_rng([seed, shard])
        rows = store.shard_rows(shard)
        n = rows.stop - rows.start
        y = rng.integers(0, classes, n)
        z = rng.standard_normal((n, views, classes), dtype=np.float32) * 2
        z[np.arange(n), :, y] += 6 * (rng.random((n, views)) < 0.8)
        store.write_shard(shard, z.astype(np.float16), np.zeros((n, views, 1), np.int32), y.astype(np.int32))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, range(store.num_shards)))
    store.mark_complete_if_done()


# ---- the two sides (each in its own process) ------------------------------------------------------

def run_stage2(path: str) -> dict:
    from kdcache.config import DEFAULTS
    from kdcache.stages.compute_stats import compute_stats
    shutil.rmtree(Path(path) / "stats", ignore_errors=True)
    baseline, cpu = rss_mb(), cpu_seconds()
    start = time.perf_counter()
    done = compute_stats(path, DEFAULTS["stats"], progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "rss_after_imports_mb": baseline,
            "peak_rss_mb": peak_mb(), "arrays": len(done["computed"])}


def numpy_statistics(x: np.ndarray, y: np.ndarray, *, t_base: float, gammas, bins: int, block: int = 4096):
    """Every default statistic of the in-memory logits x (R, K) float16 with labels y (R,), in NumPy."""
    R, K = x.shape
    names = ["mean", "std_unbiased", "max", "min", "logsumexp", "entropy", "margin", "top1_correct",
             f"ls_temperature_t{t_base:g}_unbiased", "max_abs_zscore_unbiased", "mlt_temperature_unbiased",
             *[f"wttm_power_sum_gamma{g:g}" for g in gammas]]
    out = {n: np.empty(R, np.float32) for n in names}
    cells = np.zeros((K * bins, 3))
    probs = np.zeros((K, K))
    for s in range(0, R, block):
        z, yb = x[s:s + block].astype(np.float32), y[s:s + block]
        mean = z.mean(axis=1)
        d = z - mean[:, None]
        std = np.sqrt(np.einsum("ij,ij->i", d, d) / (K - 1))
        mx, mn, top = z.max(axis=1), z.min(axis=1), z.argmax(axis=1)
        e = np.exp(z - mx[:, None])
        se = e.sum(axis=1)
        lse = mx + np.log(se)
        log_p = z - lse[:, None]
        p = e / se[:, None]
        part = np.partition(z, K - 2, axis=1)
        maxz = np.maximum(mx - mean, mean - mn) / (std + 1e-7)
        correct = top == yb
        values = [mean, std, mx, mn, lse, -np.einsum("ij,ij->i", p, log_p), part[:, K - 1] - part[:, K - 2],
                  correct, t_base * std, maxz, (1 + np.sqrt(3)) / 2 * maxz,
                  *[np.exp(g * log_p).sum(axis=1) for g in gammas]]
        for n, v in zip(names, values):
            out[n][s:s + block] = v
        conf = 1 / se  # max softmax
        cell = yb * bins + np.clip(np.ceil(conf * bins) - 1, 0, bins - 1).astype(np.int64)
        for j, w in enumerate((None, conf, correct)):
            cells[:, j] += np.bincount(cell, weights=w, minlength=K * bins)
        order = np.argsort(yb, kind="stable")  # per-label sums of softmax rows: sort + reduceat
        ys = yb[order]
        starts = np.flatnonzero(np.r_[True, ys[1:] != ys[:-1]])
        probs[ys[starts]] += np.add.reduceat(p[order], starts, axis=0)
    count = cells[:, 0].reshape(K, bins).sum(axis=1)
    cells = cells.reshape(K, bins, 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["class_count"] = count
        out["class_accuracy"] = cells[..., 2].sum(axis=1) / count
        out["class_mean_softmax"] = probs / count[:, None]
        out[f"class_ece_bins{bins}"] = np.abs(cells[..., 2] - cells[..., 1]).sum(axis=1) / count
        out[f"ece_bins{bins}"] = np.abs(cells[..., 2].sum(0) - cells[..., 1].sum(0)).sum() / count.sum()
    return out


def run_numpy(path: str) -> dict:
    import zarr
    from kdcache.config import DEFAULTS
    s = DEFAULTS["stats"]
    group = zarr.open_group(path, mode="r")
    baseline, cpu = rss_mb(), cpu_seconds()
    start = time.perf_counter()
    x = group["logits"][...]
    y = np.repeat(group["labels"][...].astype(np.int64), x.shape[1])
    loaded = time.perf_counter()
    n, v, k = x.shape
    out = numpy_statistics(x.reshape(n * v, k), y, t_base=s["t_base"], gammas=s["gammas"], bins=s["ece_bins"])
    end = time.perf_counter()
    result = {"seconds": end - start, "load_seconds": loaded - start, "compute_seconds": end - loaded,
              "cpu_seconds": cpu_seconds() - cpu, "rss_after_imports_mb": baseline, "peak_rss_mb": peak_mb()}
    if "stats" in group:  # stage 2 ran first: same statistics?
        diffs = {}
        for name, want in out.items():
            got = group["stats"][name][...].reshape(want.shape).astype(np.float64)
            diffs[name] = float(np.nanmax(np.abs(got - want) / np.maximum(np.abs(want), 1)))
        result["max_rel_diff_vs_stage2"] = max(diffs.values())
        result["worst_array"] = max(diffs, key=diffs.get)
    return result


def run_kernels(path: str, repeats: int = 20) -> dict:
    """Per core, on one 2048-row block of the store, interleaved: the stage 2 kernel; the same kernel
    calling kdcache.losses for the max-logit temperature and the power sums (what the kernel replaces
    by formulas on shared intermediates); the NumPy baseline. Microseconds per row, medians."""
    import torch
    import zarr
    import kdcache.stats as ps
    from kdcache.config import DEFAULTS
    from kdcache.losses import MLT_CONSTANT, max_logit_temperature, teacher_power_sum
    torch.set_num_threads(1)
    group = zarr.open_group(path, mode="r")
    x = group["logits"][:2048 // group["logits"].shape[1]]
    y = group["labels"][:x.shape[0]].astype(np.int64)
    s = ps.check_settings(DEFAULTS["stats"])
    outputs = ps.plan_outputs(s)
    own = ps.row_statistics

    def via_losses(z, labels, outs, cache):
        values = []
        for o in outs:
            unbiased = o.params.get("std") == "unbiased"
            if o.statistic in ("mlt_temperature", "max_abs_zscore"):
                t = ps._once(cache, "mlt", lambda: max_logit_temperature(z, unbiased=unbiased))
                values.append(t if o.statistic == "mlt_temperature" else t / MLT_CONSTANT)
            elif o.statistic == "wttm_power_sum":
                values.append(teacher_power_sum(z, o.params["gamma"]))
            else:
                values.append(own(z, labels, [o], cache)[0])
        return values

    rows = x.shape[0] * x.shape[1]
    flat, y_rows = x.reshape(rows, -1), np.repeat(y, x.shape[1])

    def run(kind):
        start = time.perf_counter()
        if kind == "numpy":
            numpy_statistics(flat, y_rows, t_base=s["t_base"], gammas=s["gammas"], bins=s["ece_bins"])
        else:
            ps.row_statistics = own if kind == "kernel" else via_losses
            ps.block_statistics(x, y, outputs, s["ece_bins"])
        return (time.perf_counter() - start) / rows * 1e6

    times = {"kernel": [], "kernel_via_losses": [], "numpy": []}
    for _ in range(repeats):
        for kind in times:
            times[kind].append(run(kind))
    ps.row_statistics = own
    return {f"{kind}_us_per_row": statistics.median(t) for kind, t in times.items()}


# ---- driver ------------------------------------------------------------------------------------

def child(side: str, path: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", side, path], capture_output=True, text=True,
                         cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{side} child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", help="where to write the synthetic store (default: a temporary folder)")
    ap.add_argument("--out", default="benchmarks/results/stage2.json")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, path = args.child
        print(json.dumps({"stage2": run_stage2, "numpy": run_numpy, "kernels": run_kernels}[side](path)))
        return

    rows = args.samples * args.views
    array_mb = rows * args.classes * 2 / 2**20
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "bench.zarr"
        start = time.perf_counter()
        build_store(path, args.samples, args.views, args.classes)
        print(f"built {path}: {rows} rows x {args.classes} classes float16 ({array_mb:.0f} MiB) "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        load_before = os.getloadavg()[0]
        runs = {"stage2": [], "numpy": []}
        for i in range(args.repeats):
            for side in runs:
                runs[side].append(child(side, str(path)))
                print(f"repeat {i + 1} {side}: {runs[side][-1]}", flush=True)
        kernels = child("kernels", str(path))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for side, rs in runs.items()}
    s2, np_ = med["stage2"], med["numpy"]
    result = {
        "rows": rows, "classes": args.classes, "views": args.views, "dtype": "float16", "array_mib": array_mb,
        "cpus": os.cpu_count(), "repeats": args.repeats, "runs": runs,
        "stage2_rows_per_s": rows / s2["seconds"],
        "numpy_rows_per_s": rows / np_["seconds"],
        "numpy_compute_only_rows_per_s": rows / np_["compute_seconds"],
        "ratio_vs_numpy": np_["seconds"] / s2["seconds"],
        "ratio_vs_numpy_compute_only": np_["compute_seconds"] / s2["seconds"],
        "cpu_seconds_ratio_numpy_over_stage2": np_["cpu_seconds"] / s2["cpu_seconds"],
        "stage2_peak_rss_over_array": s2["peak_rss_mb"] / array_mb,
        "stage2_added_rss_over_array": (s2["peak_rss_mb"] - s2["rss_after_imports_mb"]) / array_mb,
        "max_rel_diff_numpy_vs_stage2": max(r.get("max_rel_diff_vs_stage2", 0) for r in runs["numpy"]),
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "per_core": kernels,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'':34s}{'stage 2 (Dask)':>16s}{'NumPy':>16s}")
    print(f"{'seconds (median)':34s}{s2['seconds']:16.1f}{np_['seconds']:16.1f}"
          f"   (NumPy: {np_['load_seconds']:.1f} s read + {np_['compute_seconds']:.1f} s compute)")
    print(f"{'rows / s':34s}{rows / s2['seconds']:16.0f}{rows / np_['seconds']:16.0f}")
    print(f"{'CPU seconds (all threads)':34s}{s2['cpu_seconds']:16.1f}{np_['cpu_seconds']:16.1f}")
    print(f"{'peak RSS MiB (after imports)':34s}{s2['peak_rss_mb']:9.0f} ({s2['rss_after_imports_mb']:4.0f})"
          f"{np_['peak_rss_mb']:9.0f} ({np_['rss_after_imports_mb']:4.0f})")
    print(f"throughput ratio stage 2 / NumPy: {result['ratio_vs_numpy']:.2f} "
          f"(vs NumPy compute only: {result['ratio_vs_numpy_compute_only']:.2f}); target >= 0.8")
    print(f"CPU time NumPy / stage 2: {result['cpu_seconds_ratio_numpy_over_stage2']:.2f} (the work per row, "
          "whatever else runs on the machine)")
    print(f"stage 2 peak RSS / array size: {result['stage2_peak_rss_over_array']:.2f} "
          f"(added by the computation: {result['stage2_added_rss_over_array']:.2f}); target <= 0.25")
    print(f"max relative difference NumPy vs stage 2: {result['max_rel_diff_numpy_vs_stage2']:.1e}")
    print("per core, us/row (1 thread, one 2048-row block): kernel {kernel_us_per_row:.1f}, kernel calling "
          "kdcache.losses {kernel_via_losses_us_per_row:.1f}, NumPy {numpy_us_per_row:.1f}".format(**kernels))
    print(f"1-minute load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs (other processes share them)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
