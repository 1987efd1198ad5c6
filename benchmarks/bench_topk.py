"""Top-k storage for K = 1000: bytes on disk against a full float16 store, and what the reconstruction loses.

The logits are synthetic (no ImageNet teacher runs on this machine), drawn by `imagenet_like_logits`, a
model of a trained ImageNet classifier's outputs chosen for the two properties that decide what top-k
storage keeps and loses:
- a confident class: the label, or for 20% of the rows a wrong class of the label's group (a teacher's
  typical error), lifted by 7 + 3|N(0,1)| over the rest (so top-1 probabilities range from ~0.3 to ~1);
- a structured, heavy-tailed rest: 40 groups of 25 "similar" classes (ImageNet's dog breeds, vehicles...)
  where the label's group is lifted by U(1, 4), over a bulk of Student-t (3 degrees of freedom) x 1.2
  noise, whose occasional large values are the long tail that top-k storage cuts off.
The summary printed and saved (mean top-1 probability, entropy, mass outside the top 5 / 10) lets a
reader compare it with their teacher. A random-init network would not do: its logits are nearly flat.

The stores are written by the project's code (CacheStore + the stage-1 conversion `topk_parts`) in the
default layout (256-sample chunks, 16 per shard, zstd 5 + shuffle); bytes on disk are the sizes of the
logit arrays' files. "full" is the float16 logits array; "top-k" is the three top-k arrays (float16
values, uint16 indices, float32 rest_logmass). For each k the reconstruction (`decode_logits`, the
same function stages 2 and 3 use) is compared with the full store's logits read back:
KL(full || reconstructed) at T = 1 and T = 4 (mean and 99th percentile over rows), and the total
variation TV = 1/2 |p_T - q_T|_1 at T = 4: the KD gradient with respect to the student's logits is
T (softmax(z_s/T) - p_T), so the gradient error is 2 T TV in L1 whatever the student. Also the mean
relative error of the two per-row temperatures that depend on all K logits: LS's std and the
max-logit temperature (on the first 4096 rows); and the TV at T = 4 that a uniform rest would have if
its level matched the rest's exact mass at T = 4 instead of at T = 1.

    .venv/bin/python benchmarks/bench_topk.py [--samples 2000] [--views 10]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdcache.losses import max_logit_temperature  # noqa: E402
from kdcache.encodings import decode_logits, topk_parts  # noqa: E402
from kdcache.store import CacheStore  # noqa: E402

K, GROUP = 1000, 25
KS = (1, 5, 10, 20, 50, 100, 200)


def imagenet_like_logits(n: int, v: int, seed: int = 0, num_classes: int = K):
    """(n, v, num_classes) float32 teacher-like logits and (n,) labels; the model is described in the docstring
    (a label in a last, partial group of classes shares the last whole group)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    z = 1.2 * rng.standard_t(3, size=(n, v, num_classes)).astype(np.float32)
    start = np.minimum(y // GROUP * GROUP, num_classes - GROUP)
    groups = start[:, None] + np.arange(GROUP)  # (n, GROUP): the label's group
    z[np.arange(n)[:, None, None], np.arange(v)[None, :, None], groups[:, None, :]] += \
        rng.uniform(1, 4, (n, v, 1)).astype(np.float32)
    wrong = rng.random((n, v)) < 0.2
    top = np.where(wrong, groups[np.arange(n)[:, None], rng.integers(0, GROUP, (n, v))], y[:, None])
    z[np.arange(n)[:, None], np.arange(v)[None, :], top] += 7 + 3 * np.abs(rng.standard_normal((n, v)))
    return z, y.astype(np.int32)


def array_bytes(store_path: Path, names) -> int:
    return sum(f.stat().st_size for name in names for f in (store_path / name).rglob("*") if f.is_file())


def write_store(path: Path, z: np.ndarray, y: np.ndarray, topk: int | None) -> CacheStore:
    entry = {"dtype": "float16"} if topk is None else {"dtype": "float16", "storage": "topk", "k": topk}
    n, v, _ = z.shape
    store = CacheStore.create(path, {"benchmark": "topk", "logits": entry}, num_samples=n, num_views=v,
                              num_classes=K, num_params=1)
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        logits = z[rows].astype(np.float16) if topk is None else topk_parts(z[rows], topk, "float16")
        store.write_shard(shard, logits, np.zeros((rows.stop - rows.start, v, 1), np.int32), y[rows])
    store.mark_complete_if_done()
    return store


def divergences(full: np.ndarray, rebuilt: np.ndarray, T: float, block: int = 4096):
    """Per row: KL(softmax(full/T) || softmax(rebuilt/T)) and TV, in float64."""
    kl, tv = [], []
    for s in range(0, len(full), block):
        log_p = torch.log_softmax(torch.from_numpy(full[s:s + block]).double() / T, -1)
        log_q = torch.log_softmax(torch.from_numpy(rebuilt[s:s + block]).double() / T, -1)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1))
        tv.append(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1))
    return torch.cat(kl).numpy(), torch.cat(tv).numpy()


def exact_level_tv(full: np.ndarray, k: int, T: float, block: int = 4096) -> float:
    """Mean TV at T when the K - k rest logits are set to the level that gives their exact mass AT T
    (information a top-k store does not have): how much of the error is the rest's level, not its spread."""
    tv = []
    for s in range(0, len(full), block):
        z = torch.from_numpy(full[s:s + block]).double()
        top = z.topk(k, -1).indices
        rest = z.scatter(-1, top, float("-inf"))
        level = T * (torch.logsumexp(rest / T, -1, keepdim=True) - np.log(z.shape[-1] - k))
        q = torch.softmax(level.expand_as(z).scatter(-1, top, z.gather(-1, top)) / T, -1)
        tv.append(0.5 * (torch.softmax(z / T, -1) - q).abs().sum(-1))
    return torch.cat(tv).mean().item()


def temperature_errors(full: np.ndarray, rebuilt: np.ndarray) -> dict:
    """Mean |relative error| of the per-row quantities LS and the max-logit method use: the std of the K
    logits (LS temperature T_base * std) and the max-logit temperature (1 + sqrt 3)/2 max |Z|."""
    def std_and_mlt(x):
        x = torch.from_numpy(x).double()
        return x.std(-1), max_logit_temperature(x)
    (s_f, t_f), (s_r, t_r) = std_and_mlt(full), std_and_mlt(rebuilt)
    return {"ls_std_rel_error": ((s_r - s_f).abs() / s_f).mean().item(),
            "mlt_temperature_rel_error": ((t_r - t_f).abs() / t_f).mean().item()}


def summary(z: np.ndarray) -> dict:
    """What the synthetic teacher looks like (T = 1), to compare with a real one."""
    p = torch.softmax(torch.from_numpy(z.reshape(-1, z.shape[-1])).double(), -1)
    srt = p.sort(-1, descending=True).values
    return {"mean_top1_probability": srt[:, 0].mean().item(),
            "mean_entropy_nats": -(p * p.clamp_min(1e-300).log()).sum(-1).mean().item(),
            "mean_mass_outside_top5": (1 - srt[:, :5].sum(-1)).mean().item(),
            "mean_mass_outside_top10": (1 - srt[:, :10].sum(-1)).mean().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "topk.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(2)
    z, y = imagenet_like_logits(args.samples, args.views)
    rows = args.samples * args.views
    results = {"rows": rows, "num_classes": K, "samples": args.samples, "views": args.views,
               "teacher_model": summary(z), "k": {}}
    with tempfile.TemporaryDirectory(prefix="bench-topk-") as tmp:
        full = write_store(Path(tmp) / "full.zarr", z, y, None)
        full_bytes = array_bytes(Path(full.path), ["logits"])
        reference = full.logits[...].reshape(rows, K).astype(np.float32)
        results["full"] = {"bytes_on_disk": full_bytes, "bytes_per_row": full_bytes / rows,
                           "raw_bytes_per_row": 2 * K}
        print(f"full float16: {full_bytes / rows:.1f} bytes per row on disk (raw {2 * K})", flush=True)
        for k in KS:
            store = write_store(Path(tmp) / f"top{k}.zarr", z, y, k)
            on_disk = array_bytes(Path(store.path), store.logit_arrays)
            rebuilt = decode_logits({n: a[...] for n, a in store.logit_arrays.items()}, K).reshape(rows, K)
            row = {"bytes_on_disk": on_disk, "bytes_per_row": on_disk / rows, "raw_bytes_per_row": k * 4 + 4,
                   "full_over_topk": full_bytes / on_disk}
            for T in (1, 4):
                kl, tv = divergences(reference, rebuilt, T)
                row[f"T{T}"] = {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                                "tv_mean": float(tv.mean()), "tv_p99": float(np.percentile(tv, 99))}
            row["T4"]["tv_mean_if_exact_rest_level"] = exact_level_tv(reference, k, 4)
            row.update(temperature_errors(reference[:4096], rebuilt[:4096]))
            results["k"][k] = row
            print(f"k={k}: {row['bytes_per_row']:.1f} B/row, ratio {row['full_over_topk']:.1f}x, "
                  f"KL T=1 {row['T1']['kl_mean']:.2e} (p99 {row['T1']['kl_p99']:.2e}), "
                  f"T=4 {row['T4']['kl_mean']:.2e} (p99 {row['T4']['kl_p99']:.2e}), "
                  f"TV T=4 {row['T4']['tv_mean']:.3f}, std error {row['ls_std_rel_error']:.2f}, "
                  f"max-logit T error {row['mlt_temperature_rel_error']:.2f}", flush=True)
    results["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
