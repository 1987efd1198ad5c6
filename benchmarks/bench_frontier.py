"""Logit encodings: bytes on disk against fidelity, for every encoding and a range of settings, at K = 10, 100, 1000.

Rows:
- K = 10: the default store's real teacher logits (fmnist_resnet on Fashion-MNIST) in float32: its first 2000 samples
  x 8 cached views, cached again with `cache.dtype: float32` (`kdcache cache-teacher --config
  configs/frontier/fmnist.yaml`; the default store holds exactly their float16 cast).
- K = 100, 1000 (and 21843 for the storage table): `bench_topk.imagenet_like_logits` with K classes (groups of 25
  similar classes, a confident class, a Student-t bulk), divided by one temperature per K chosen so that the mean
  top-1 probability is 0.82, the K = 1000 model's as published (so the K = 1000 rows are bench_topk's unchanged):
  the same confidence at every K. Their entropy and mass outside the top 5 are printed and saved beside the real
  K = 10 teacher's.

Each setting is written as a real store (CacheStore + `encode_logits`, the default layout: 256-sample chunks, 16
per shard, zstd 5 + shuffle; at K = 21843 one whole 256-sample chunk) and its bytes per row are the sizes of its
logit arrays' chunk objects / rows. Fidelity is measured on the rows read back from disk:
- dense, quantized, top-k (`decode_logits`): KL(full || decoded) at T = 1 and 4, mean over rows;
- every encoding: the cosine between the gradient of the KD loss T^2 KL(p_T || s_T) with respect to a student's
  logits from the stored targets and from the full float32 ones, mean over rows, at T = 1 and 4 ("row"); and the
  cosine of those gradients summed into a linear head's weight gradient over a 128-row batch on random features
  ("head": where per-row errors partly cancel, as in one SGD step). The student's logits are the teacher's
  perturbed: z_s = z_t / 2 + std(z_t) / 2 * N(0, 1) per row (a partly trained student);
- sampled (distinct ids + counts of N draws; no dense decoding, its KL to the full row is infinite; a target only
  at T = T_s): the loss is an unbiased estimate of the full KD loss, so instead of a KL we report, over R
  independent draws of the same rows, the relative bias of the 128-row batch loss (zero up to its standard error)
  and its relative std, the row gradient cosine of the mean of the R draws' gradients (-> 1 when unbiased), and
  the mean number of distinct ids per row.
- quantized 4, 6, 12 bits, which kdcache does not offer (8 | 16), by the same formula, codes in uint8 / uint16.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_frontier.py [--classes 10 100 1000] [--samples 2000]
    .venv/bin/python benchmarks/bench_frontier.py --students results/frontier/students   # the students' table
"""
import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_topk  # noqa: E402
from bench_topk import divergences, imagenet_like_logits, summary  # noqa: E402
from kdcache import encodings  # noqa: E402
from kdcache.encodings import QUANT_BITS, batch_targets, decode_logits, encode_logits, storage_of  # noqa: E402
from kdcache.losses import kd_loss, sampled_kd_loss  # noqa: E402
from kdcache.store import CacheStore  # noqa: E402

# The default store's teacher on its first 2000 samples and their views, in float32 (the default store holds their
# float16 cast): kdcache cache-teacher --config configs/frontier/fmnist.yaml
K10_STORE = REPO / "stores" / "frontier" / "dense_float32.zarr"
TARGET_TOP1 = 0.8176  # mean top-1 probability of bench_topk's K = 1000 model (docs/BENCHMARKS.md "Top-k storage")
TEMPERATURES = (1, 4)
BATCH = 128  # the training batch: the sampled loss's std is that of a batch mean, head gradients sum over it
HEAD_FEATURES = 64  # d of the linear head whose weight gradient `head_cosine` compares
IMAGENET = {"imagenet-1k": (1_281_167, 1000), "imagenet-21k": (14_197_122, 21843)}
VIEWS = 10


# ---- rows ----------------------------------------------------------------------------------------

def store_rows(path: Path, samples: int):
    """(samples, V, K) float32 logits and labels of a real store."""
    store = CacheStore.open(path)
    parts = {n: a[:samples] for n, a in store.logit_arrays.items()}
    return decode_logits(parts, store.num_classes), store.labels[:samples]


def teacher_like_rows(n: int, v: int, num_classes: int, seed: int = 0):
    """(n, v, K) float32 bench_topk-model logits at K classes, scaled to the mean top-1 probability TARGET_TOP1;
    (labels, the temperature used). K that is not a multiple of bench_topk.GROUP (21843) is drawn at whole groups,
    then cut to K (how the published rows were drawn)."""
    whole = -(-num_classes // bench_topk.GROUP) * bench_topk.GROUP
    z, y = imagenet_like_logits(n, v, seed, num_classes=whole)
    z = np.ascontiguousarray(z[..., :num_classes])
    tau = calibrate(z, TARGET_TOP1)
    return (z / tau).astype(np.float32), np.minimum(y, num_classes - 1), tau


def calibrate(z: np.ndarray, target: float) -> float:
    """The temperature tau at which softmax(z / tau) has mean top-1 probability `target` (bisection on log tau)."""
    flat = torch.from_numpy(z.reshape(-1, z.shape[-1])[:4096]).double()
    lo, hi = math.log(0.05), math.log(20.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        top1 = torch.softmax(flat / math.exp(mid), -1).max(-1).values.mean().item()
        lo, hi = (mid, hi) if top1 > target else (lo, mid)
    return math.exp((lo + hi) / 2)


def student_logits(z: np.ndarray, seed: int = 1) -> np.ndarray:
    """A partly trained student's logits: the teacher's halved plus Gaussian noise of half the row's std."""
    rng = np.random.default_rng(seed)
    std = z.std(-1, keepdims=True)
    return (0.5 * z + 0.5 * std * rng.standard_normal(z.shape)).astype(np.float32)


# ---- the settings ---------------------------------------------------------------------------------

def settings(num_classes: int, quick: bool = False) -> list[tuple[str, str, dict]]:
    """(family, label, manifest entry) of every setting measured at K classes (entries by `logits_entry`, from the
    `cache` config section a user would write)."""
    def entry(**cache):
        return encodings.logits_entry(cache, num_classes)
    out = [("dense", dtype, entry(dtype=dtype)) for dtype in ("float32", "float16", "bfloat16")]
    out += [("quantized", f"{b} bits", entry(encoding={"quantized": b}) if b in QUANT_BITS else
             {"storage": "quantized", "bits": b}) for b in ((4, 8) if quick else (4, 6, 8, 12, 16))]
    out += [("top-k", f"k={k}", entry(dtype="float16", topk=k))
            for k in ((1, 2) if quick else (1, 2, 5, 10, 20, 50, 100)) if k < num_classes]
    for t in TEMPERATURES:
        out += [(f"sampled T_s={t}", f"N={d}", entry(encoding={"sampled": d, "temperature": t, "seed": 0}))
                for d in ((1, 8) if quick else (1, 2, 4, 8, 16, 32, 64))]
    return out


def container_bits(bits: int) -> int:
    """The quantized encoding's code width (8 or 16) that holds `bits`-bit codes."""
    return next(b for b in QUANT_BITS if b >= bits)


def encode(z: np.ndarray, entry: dict, ids: np.ndarray) -> dict[str, np.ndarray]:
    """`encode_logits`, plus b-bit quantization for the b that kdcache does not offer (4, 6, 12): the quantized
    arrays with 2^b - 1 levels, codes in the next width kdcache has (what such an encoding would cost on disk
    before bit packing)."""
    if storage_of(entry) == "quantized" and entry["bits"] not in QUANT_BITS:
        return narrow_quantized(z, entry["bits"])
    return encode_logits(z, entry, ids)


def narrow_quantized(z: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """The quantized arrays (docs/FORMAT.md: per-row max m, step (m - min) / (2^b - 1), codes rint((m - z) / step))
    at a width kdcache does not offer; `decode_logits` reads them like its own."""
    z = np.asarray(z, dtype=np.float32)
    top = z.max(-1)
    step = ((top.astype(np.float64) - z.min(-1)) / (2**bits - 1)).astype(np.float32)
    codes = np.rint((top[..., None].astype(np.float64) - z) / np.where(step > 0, step, 1)[..., None])
    return {"quant_codes": codes.astype(f"uint{container_bits(bits)}"), "quant_max": top, "quant_step": step}


# ---- one store per setting ------------------------------------------------------------------------

def write_store(path: Path, z: np.ndarray, y: np.ndarray, entry: dict, samples_per_chunk: int = 256) -> CacheStore:
    """A real store of logits z (n, V, K) in the encoding `entry`, written shard by shard as stage 1 does."""
    n, v, num_classes = z.shape
    stored = {**entry, "bits": container_bits(entry["bits"])} if storage_of(entry) == "quantized" else entry
    store = CacheStore.create(path, {"benchmark": "frontier", "logits": stored}, num_samples=n, num_views=v,
                              num_classes=num_classes, num_params=1, samples_per_chunk=samples_per_chunk)
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        parts = encode(z[rows], entry, np.arange(rows.start, rows.stop))
        store.write_shard(shard, parts, np.zeros((rows.stop - rows.start, v, 1), np.int32), y[rows])
    store.mark_complete_if_done()
    return store


def data_bytes(path: Path, names) -> int:
    """Bytes of the arrays' chunk objects (`NAME/c/...`): what grows with the rows, without the zarr.json metadata
    (a few hundred bytes per array, which would dominate the small K = 21843 sample)."""
    return sum(f.stat().st_size for name in names for f in (path / name / "c").rglob("*") if f.is_file())


def read_parts(store: CacheStore) -> dict[str, np.ndarray]:
    return {n: a[...] for n, a in store.logit_arrays.items()}


# ---- fidelity -------------------------------------------------------------------------------------

def kd_gradients(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> torch.Tensor:
    """Per row: the gradient of T^2 KL(softmax(z_t/T) || softmax(z_s/T)) with respect to z_s (kd_loss's)."""
    z = z_s.detach().clone().requires_grad_(True)
    (kd_loss(z, z_t, T) * len(z)).backward()
    return z.grad


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of two gradients, without F.cosine_similarity's eps = 1e-8 on the norms (a confident
    teacher and student give gradients much smaller than that); two zero rows count as equal (1)."""
    dot, norms = (a * b).sum(-1), a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), (a == b).all(-1).to(dot.dtype))


def head_cosine(a: torch.Tensor, b: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per BATCH-row batch: the cosine of the gradients with respect to a linear head's weights (K x d) that the
    per-row logit gradients a, b (R, K) give on `features` (R, d): sum_i g_i h_i^T, where the rows' errors can
    average out (rows beyond the last whole batch are left out)."""
    nb = len(a) // BATCH
    shape = (nb, BATCH, -1)
    h = features[:nb * BATCH].reshape(shape)
    ga, gb = (torch.einsum("bik,bid->bkd", g[:nb * BATCH].reshape(shape), h).flatten(1) for g in (a, b))
    return cosine(ga, gb)


def dense_fidelity(full: np.ndarray, decoded: np.ndarray, student: np.ndarray, features: torch.Tensor,
                   block: int = 64 * BATCH) -> dict:
    """KL(full || decoded) (mean, p99), the mean per-row gradient cosine and the mean head-gradient cosine per
    batch (`head_cosine`) at each T, rows (R, K) in float64."""
    out = {}
    for T in TEMPERATURES:
        kl, _ = divergences(full, decoded, T)
        cos, head = [], []
        for s in range(0, len(full), block):
            z_s = torch.from_numpy(student[s:s + block]).double()
            g_full = kd_gradients(z_s, torch.from_numpy(full[s:s + block]).double(), T)
            g_dec = kd_gradients(z_s, torch.from_numpy(decoded[s:s + block]).double(), T)
            cos.append(cosine(g_dec, g_full))
            head.append(head_cosine(g_dec, g_full, features[s:s + block]))
        out[f"T{T}"] = {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                        "grad_cosine_mean": torch.cat(cos).mean().item(),
                        "head_grad_cosine_mean": torch.cat(head).mean().item()}
    return out


def flat_rows(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of (n, V, ...) rows as (n * V, ...)."""
    return {name: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]) for name, a in parts.items()}


def sampled_gradients(z_s: torch.Tensor, parts: dict[str, np.ndarray], entry: dict):
    """(per-row gradient of the sampled KD loss with respect to z_s, the loss) of rows `parts` (flat)."""
    z = z_s.detach().clone().requires_grad_(True)
    t = batch_targets(parts, entry)
    loss = sampled_kd_loss(z, t.ids, t.counts.to(z.dtype), t.entropy.to(z.dtype), t.temperature)
    (loss * len(z)).backward()
    return z.grad, loss.item()


def sampled_fidelity(z: np.ndarray, parts: dict[str, np.ndarray], student: np.ndarray, features: torch.Tensor,
                     entry: dict, repeats: int = 16, subset: int = 2048, block: int = 64 * BATCH) -> dict:
    """Sampled targets at T = their temperature: the mean per-row gradient cosine of the stored draw (all rows)
    and of the mean of `repeats` independent draws (seeds 0..R-1, the first `subset` rows), and over those draws
    the relative bias and std of the loss of a BATCH-row batch against the full KD loss; mean distinct ids."""
    T = entry["temperature"]
    n, v, num_classes = z.shape
    full = z.reshape(n * v, num_classes)
    parts = flat_rows(parts)
    cos, head = [], []
    for s in range(0, len(full), block):
        z_s = torch.from_numpy(student[s:s + block]).double()
        g_full = kd_gradients(z_s, torch.from_numpy(full[s:s + block]).double(), T)
        g_est, _ = sampled_gradients(z_s, {k: a[s:s + block] for k, a in parts.items()}, entry)
        cos.append(cosine(g_est, g_full))
        head.append(head_cosine(g_est, g_full, features[s:s + block]))
    m = max(1, min(n, subset // v))
    rows = m * v
    z_s = torch.from_numpy(student[:rows]).double()
    z_t = torch.from_numpy(full[:rows]).double()
    g_full = kd_gradients(z_s, z_t, T)
    batches = range(0, rows, BATCH)
    full_loss = np.array([kd_loss(z_s[s:s + BATCH], z_t[s:s + BATCH], T).item() for s in batches])
    g_sum, losses = torch.zeros_like(z_s), []
    for seed in range(repeats):
        draw = flat_rows(encode_logits(z[:m], {**entry, "seed": seed}, np.arange(m)))
        g, _ = sampled_gradients(z_s, draw, entry)
        g_sum += g
        losses.append([sampled_gradients(z_s[s:s + BATCH], {k: a[s:s + BATCH] for k, a in draw.items()}, entry)[1]
                       for s in batches])
    error = np.array(losses) - full_loss  # (repeats, batches)
    scale = full_loss.mean()
    return {f"T{T:g}": {"grad_cosine_mean": torch.cat(cos).mean().item(),
                        "head_grad_cosine_mean": torch.cat(head).mean().item(),
                        "grad_cosine_mean_of_draws": cosine(g_sum, g_full).mean().item(),
                        "loss_rel_bias": float(error.mean() / scale),
                        "loss_rel_bias_stderr": float(error.std(ddof=1) / np.sqrt(error.size) / scale),
                        "loss_rel_std": float(np.array(losses).std(0, ddof=1).mean() / scale)},
            "distinct_ids_mean": float((parts["sampled_counts"] > 0).sum(-1).mean()),
            "repeats": repeats, "repeat_rows": rows}


# ---- the benchmark --------------------------------------------------------------------------------

def measure(z: np.ndarray, y: np.ndarray, tmp: Path, quick: bool, samples_per_chunk: int = 256,
            fidelity: bool = True) -> list[dict]:
    """Every setting on rows z (n, V, K): bytes per row on disk and (unless not `fidelity`) its fidelity."""
    n, v, num_classes = z.shape
    rows = n * v
    full = z.reshape(rows, num_classes)
    student = student_logits(full)
    features = torch.from_numpy(np.random.default_rng(2).standard_normal((rows, HEAD_FEATURES)))
    out = []
    for family, label, entry in settings(num_classes, quick):
        started = time.perf_counter()
        path = tmp / f"K{num_classes}-{family}-{label}.zarr".replace(" ", "_").replace("=", "")
        store = write_store(path, z, y, entry, samples_per_chunk)
        on_disk = data_bytes(path, store.logit_arrays)
        row = {"family": family, "setting": label, "entry": entry, "bytes_per_row": on_disk / rows}
        if fidelity and encodings.dense_logits_available(entry):
            decoded = decode_logits(read_parts(store), num_classes).reshape(rows, num_classes)
            row.update(dense_fidelity(full, decoded, student, features))
        elif fidelity:
            row.update(sampled_fidelity(z, read_parts(store), student, features, entry))
        row["seconds"] = time.perf_counter() - started
        out.append(row)
        print(f"K={num_classes} {family} {label}: {row['bytes_per_row']:.1f} B/row"
              + "".join(f", T={T}: KL {fmt(row[f'T{T}'].get('kl_mean'))} cos {row[f'T{T}']['grad_cosine_mean']:.4f}"
                        for T in TEMPERATURES if f"T{T}" in row) + f" ({row['seconds']:.1f} s)", flush=True)
        shutil.rmtree(path)
    return out


# ---- reports ---------------------------------------------------------------------------------------

def fmt(x, spec=".2e") -> str:
    return "" if x is None else ("0" if x == 0 and "e" in spec else format(x, spec))


def markdown(results: dict) -> str:
    """The frontier table: one row per (K, setting)."""
    header = ("| K | encoding | setting | B/row on disk | KL T=1 | KL T=4 | row grad cos T=1 | row grad cos T=4 | "
              "head grad cos T=1 | head grad cos T=4 | sampled: distinct ids; batch-loss rel. std; rel. bias ± s.e.; "
              "row grad cos of 16-draw mean |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for num_classes, block in results["K"].items():
        for r in block["settings"]:
            t1, t4 = r.get("T1", {}), r.get("T4", {})
            if not (t1 or t4):
                continue
            t = t1 or t4
            extra = (f"{r['distinct_ids_mean']:.1f}; {t['loss_rel_std']:.3f}; {t['loss_rel_bias']:+.3f} ± "
                     f"{t['loss_rel_bias_stderr']:.3f}; {t['grad_cosine_mean_of_draws']:.4f}"
                     if "distinct_ids_mean" in r else "")
            lines.append(f"| {num_classes} | {r['family']} | {r['setting']} | {r['bytes_per_row']:.1f} | "
                         f"{fmt(t1.get('kl_mean'))} | {fmt(t4.get('kl_mean'))} | {fmt(t1.get('grad_cosine_mean'), '.4f')} | "
                         f"{fmt(t4.get('grad_cosine_mean'), '.4f')} | {fmt(t1.get('head_grad_cosine_mean'), '.4f')} | "
                         f"{fmt(t4.get('head_grad_cosine_mean'), '.4f')} | {extra} |")
    return "\n".join(lines)


def storage(results: dict) -> list[dict]:
    """Bytes each setting needs for ImageNet-1k and -21k at VIEWS views: measured bytes per row at K = 1000 and
    at K = 21843 (when measured) x images x views."""
    by_k = {int(k): {(r["family"], r["setting"]): r["bytes_per_row"] for r in b["settings"]}
            for k, b in results["K"].items()}
    out = []
    for key in by_k.get(1000, {}):
        row = {"family": key[0], "setting": key[1]}
        for name, (images, num_classes) in IMAGENET.items():
            per_row = by_k.get(num_classes, {}).get(key)
            row[name] = None if per_row is None else per_row * images * VIEWS
            row[f"{name}_bytes_per_row"] = per_row
        out.append(row)
    return out


def storage_markdown(table: list[dict]) -> str:
    def size(b):
        if b is None:
            return ""
        return f"{b / 1e12:.2f} TB" if b >= 1e12 else f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"
    lines = ["| encoding | setting | B/row, K=1000 | ImageNet-1k x 10 views | B/row, K=21843 | ImageNet-21k x 10 views |",
             "|---|---|---|---|---|---|"]
    for r in table:
        per21 = r["imagenet-21k_bytes_per_row"]
        lines.append(f"| {r['family']} | {r['setting']} | {r['imagenet-1k_bytes_per_row']:.1f} | {size(r['imagenet-1k'])} | "
                     f"{'' if per21 is None else f'{per21:.1f}'} | {size(r['imagenet-21k'])} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Bytes per row (log x) against KL(full || decoded), 1 - per-row gradient cosine and 1 - head-gradient cosine
    (rows of panels), one panel per K; T = 4 solid, T = 1 dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [k for k, b in results["K"].items() if any("T1" in r or "T4" in r for r in b["settings"])]
    fig, axes = plt.subplots(3, len(ks), figsize=(5 * len(ks), 12), squeeze=False)
    colors = {}
    for col, num_classes in enumerate(ks):
        rows = results["K"][num_classes]["settings"]
        for family in dict.fromkeys(r["family"] for r in rows):
            color = colors.setdefault(family, f"C{len(colors)}")
            mine = sorted((r for r in rows if r["family"] == family), key=lambda r: r["bytes_per_row"])
            for T, style in ((4, "-"), (1, "--")):
                at = [r for r in mine if f"T{T}" in r]
                if not at:
                    continue
                x, label = [r["bytes_per_row"] for r in at], f"{family}, T={T}"
                kl = [r[f"T{T}"].get("kl_mean") for r in at]
                if all(v is not None for v in kl):
                    axes[0][col].plot(x, [max(v, 1e-12) for v in kl], style, marker="o", ms=3, color=color, label=label)
                for row, key in ((1, "grad_cosine_mean"), (2, "head_grad_cosine_mean")):
                    axes[row][col].plot(x, [max(1 - r[f"T{T}"][key], 1e-12) for r in at], style,
                                        marker="o", ms=3, color=color, label=label)
        axes[0][col].set_title(f"K = {num_classes}")
        for row, ylabel in enumerate(("KL(full || decoded), row mean", "1 - row gradient cosine, mean",
                                      f"1 - head gradient cosine ({BATCH} rows), mean")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("bytes per row on disk")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[2][-1].legend(fontsize=7, loc="best")
    fig.suptitle("Logit encodings: bytes against fidelity (values < 1e-12 drawn at 1e-12; sampled has no KL)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def students(folder: Path) -> list[dict]:
    """Last test accuracy (mean, std over seeds) of each (store, method) in the frontier grid's run folders."""
    groups = {}
    for config in sorted(folder.glob("*/config.json")):
        result = config.parent / "result.json"
        if not result.exists():
            continue
        run = json.loads(config.read_text())
        key = (Path(run["cfg"]["cache"]["store"]).stem, run["label"])
        groups.setdefault(key, []).append((run["seed"], json.loads(result.read_text())["last_accuracy"]))
    return [{"store": store, "method": label, "seeds": [s for s, _ in sorted(v)],
             "last_accuracy": [a for _, a in sorted(v)], "mean": float(np.mean([a for _, a in v])),
             "std": float(np.std([a for _, a in v], ddof=1)) if len(v) > 1 else 0.0}
            for (store, label), v in sorted(groups.items())]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--samples", type=int, default=2000, help="samples (x 8 or 10 views) per K")
    ap.add_argument("--storage-samples", type=int, default=256,
                    help="samples (x 10 views) at K = 21843 for the storage table (0: skip); 256: one whole chunk")
    ap.add_argument("--quick", action="store_true", help="two settings per family (a smoke run)")
    ap.add_argument("--out", default=str(REPO / "results" / "frontier"))
    ap.add_argument("--students", metavar="GRID_FOLDER",
                    help="only summarise the students' runs of configs/frontier/grid.yaml in this folder")
    args = ap.parse_args()
    if args.students:
        table = students(Path(args.students))
        Path(args.out, "students.json").write_text(json.dumps(table, indent=1) + "\n")
        print("| store | method | last test accuracy, mean ± std | seeds |\n|---|---|---|---|")
        for r in table:
            print(f"| {r['store']} | {r['method']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | "
                  f"{len(r['seeds'])} |")
        return
    started = time.perf_counter()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"samples": args.samples, "target_top1": TARGET_TOP1, "K": {}}
    with tempfile.TemporaryDirectory(prefix="bench-frontier-") as tmp:
        for num_classes in args.classes:
            if num_classes == 10:
                if not K10_STORE.exists():
                    sys.exit(f"{K10_STORE} is missing: build it with `kdcache cache-teacher --config "
                             "configs/frontier/fmnist.yaml` (the default teacher's float32 logits)")
                z, y = store_rows(K10_STORE, args.samples)
                rows = {"rows": "the default teacher's float32 logits", "store": str(K10_STORE.relative_to(REPO))}
            else:
                z, y, tau = teacher_like_rows(args.samples, VIEWS, num_classes)
                rows = {"rows": "bench_topk.imagenet_like_logits at K classes / tau", "tau": tau}
            rows.update(summary(z))
            rows.update({"samples": z.shape[0], "views": z.shape[1]})
            print(f"K={num_classes}: {rows}", flush=True)
            results["K"][num_classes] = {"rows": rows, "settings": measure(z, y, Path(tmp), args.quick)}
        if args.storage_samples:
            z, y, tau = teacher_like_rows(args.storage_samples, VIEWS, 21843)
            rows = {"rows": "bench_topk.imagenet_like_logits at K classes / tau", "tau": tau, **summary(z)}
            results["K"][21843] = {"rows": rows, "settings": measure(z, y, Path(tmp), args.quick,
                                                                     min(256, args.storage_samples), fidelity=False)}
    results["storage"] = storage(results)
    results["seconds"] = time.perf_counter() - started
    (out / "frontier.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "frontier.png")
    print(markdown(results))
    print()
    print(storage_markdown(results["storage"]))
    print(f"wrote {out / 'frontier.json'}, {out / 'frontier.png'} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
