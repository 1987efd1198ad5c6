"""How a store holds its teacher logits (its encoding) and how they are read back: the one place that knows
the encodings (docs/FORMAT.md, "Logit encodings"). Callers never branch on the encoding:

- `logits_entry` makes the manifest's `logits` entry from the `cache` config (checked, one-line errors);
- `array_specs` names the arrays an encoding stores (the store creates them, verify checks them);
- `encode_logits` turns float32 logits into those arrays' values (stage 1);
- `decode_logits` rebuilds dense float32 logits from them (every encoding but sampled targets);
- `decode_targets` / `batch_targets` give stage 3 its z_t: dense logits, or `Sampled` draws that the
  losses take directly (kdcache.losses.sampled_kd_loss / sampled_ttm_loss);
- `describe`, `is_lossless`, `dense_logits_available`, `spot_check` answer what other modules ask.

The encodings (manifest `logits` entry):
  dense      {"dtype": float32|float16|bfloat16}       no `storage` key (so stores of before keep their
                                                        fingerprint); bfloat16 as uint16 bit patterns
  top-k      {"dtype", "storage": "topk", "k"}          the k largest logits, their classes, the rest's log mass
  quantized  {"storage": "quantized", "bits": 8|16}     uint codes of (row max - logit) / step, per-row max, step
  sampled    {"storage": "sampled", "draws", "temperature", "seed"}
                                                        distinct classes of `draws` draws from softmax(z / T) and
                                                        their counts, plus the entropy the unbiased loss needs
"""
import math
from typing import NamedTuple

import numpy as np
import torch

from kdcache.errors import UserError, is_int, is_number

DENSE_DTYPES = ("float16", "float32", "bfloat16")
STORAGES = ("dense", "topk", "quantized", "sampled")
QUANT_BITS = (8, 16)
MAX_DRAWS = 2**16 - 1  # counts are uint16


# ---- the manifest entry -----------------------------------------------------------------------------

def logits_entry(cache: dict, num_classes: int) -> dict:
    """The manifest's `logits` entry of the `cache` config section: `encoding` (dense by default; `topk: k` is
    the older shorthand for `encoding: {topk: k}`) and `dtype` (of dense logits and top-k values; quantized and
    sampled stores have their own dtypes); UserError (one line) for anything invalid."""
    dtype, encoding, topk = cache.get("dtype", "float16"), cache.get("encoding", "dense"), cache.get("topk")
    if dtype not in DENSE_DTYPES:
        raise UserError(f"cache dtype must be one of float16, float32, got {dtype!r} (bfloat16 too, for dense logits)")
    if topk is not None:
        if encoding not in ("dense", None):
            raise UserError("cache.topk is a shorthand for cache.encoding: {topk: k}: set one of them, not both")
        encoding = {"topk": topk}
    if encoding in ("dense", None):
        return {"dtype": dtype}
    keys = {"topk": {"topk"}, "quantized": {"quantized"}, "sampled": {"sampled", "temperature", "seed"}}
    kind = next((k for k in keys if isinstance(encoding, dict) and k in encoding), None)
    if kind is None or not set(encoding) <= keys[kind]:
        raise UserError("cache.encoding must be dense, {topk: k}, {quantized: 8|16} or {sampled: draws, "
                        f"temperature: T, seed: s}}, got {encoding!r}")
    if kind == "topk":
        k = encoding["topk"]
        if not (is_int(k, 1) and k < num_classes):
            raise UserError(f"cache.topk must be an integer in 1..{num_classes - 1} (the teacher has {num_classes} "
                            f"classes) or null for the full logits, got {k!r}")
        return {"dtype": dtype, "storage": "topk", "k": k}
    if kind == "quantized":
        bits = encoding["quantized"]
        if bits not in QUANT_BITS or isinstance(bits, bool):
            raise UserError(f"cache.encoding.quantized must be 8 or 16 (bits per logit), got {bits!r}")
        return {"storage": "quantized", "bits": bits}
    draws, T, seed = encoding["sampled"], encoding.get("temperature", 1.0), encoding.get("seed", 0)
    if not (is_int(draws, 1) and draws <= MAX_DRAWS):
        raise UserError(f"cache.encoding.sampled must be an integer in 1..{MAX_DRAWS} (draws per row), got {draws!r}")
    if not (is_number(T) and math.isfinite(T) and T > 0):
        raise UserError(f"cache.encoding.temperature must be a number > 0, got {T!r}")
    if not (is_int(seed, 0) and seed < 2**63):
        raise UserError(f"cache.encoding.seed must be an integer >= 0, got {seed!r}")
    return {"storage": "sampled", "draws": draws, "temperature": float(T), "seed": seed}


def storage_of(entry: dict) -> str:
    """The encoding a manifest `logits` entry names: "dense" (no `storage` key), "topk", "quantized" or "sampled"."""
    return entry.get("storage", "dense") if isinstance(entry, dict) else "dense"


def check_entry(entry, where: str, num_classes: int | None = None) -> dict:
    """`entry` if this kdcache reads it; UserError "written by a newer kdcache: upgrade" for an encoding or dtype
    it does not know, ValueError (the caller names the damage) for a known one with invalid parameters (top-k:
    k < `num_classes` when given)."""
    if not isinstance(entry, dict):
        raise ValueError(f"the manifest's logits entry is {entry!r}, not a mapping")
    s = storage_of(entry)
    if s not in STORAGES or s == "dense" and entry.get("dtype") not in DENSE_DTYPES:
        what = f"logits.storage {s!r}" if s not in STORAGES else f"logits.dtype {entry.get('dtype')!r}"
        raise UserError(f"{where} holds its logits as {what}, an encoding written by a newer kdcache: upgrade "
                        f"kdcache to read it (this version knows {', '.join(STORAGES)}; dense dtypes "
                        f"{', '.join(DENSE_DTYPES)})")
    ok = {"dense": True,
          "topk": entry.get("dtype") in ("float16", "float32") and is_int(entry.get("k"), 1)
          and (num_classes is None or entry["k"] < num_classes),
          "quantized": entry.get("bits") in QUANT_BITS,
          "sampled": is_int(entry.get("draws"), 1) and entry["draws"] <= MAX_DRAWS and is_int(entry.get("seed"), 0)
          and is_number(entry.get("temperature")) and entry["temperature"] > 0}[s]
    if not ok:
        raise ValueError(f"the manifest's logits entry {entry!r} has invalid parameters for storage {s!r}")
    return entry


def is_lossless(entry: dict) -> bool:
    """True when the store holds the teacher's logits exactly as stage 1 cast them (dense float32/float16): every
    statistic stage 2 computes from them is then the one the stored values give. False for bfloat16, quantized,
    top-k and sampled stores, whose exact per-row statistics stage 1 must write itself."""
    return storage_of(entry) == "dense" and entry.get("dtype") in ("float32", "float16")


def dense_logits_available(entry: dict) -> bool:
    """True when `decode_logits` can give (possibly approximate) dense logits (K of them per row): every encoding
    but sampled targets, which hold only draws from the teacher's softmax."""
    return storage_of(entry) != "sampled"


def sampled_temperature(entry: dict) -> float | None:
    """T_s of a sampled store (the temperature its targets were drawn at), None for every other encoding."""
    return float(entry["temperature"]) if storage_of(entry) == "sampled" else None


def describe(entry: dict) -> str:
    """One phrase for messages and `kdcache info`: how the store holds the logits."""
    s = storage_of(entry)
    if s == "topk":
        return f"top-{entry['k']} of the logits ({entry['dtype']} values)"
    if s == "quantized":
        return f"logits quantized to {entry['bits']} bits per row (row max and step float32)"
    if s == "sampled":
        return f"sampled targets: {entry['draws']} draws per row at temperature {entry['temperature']:g}"
    return f"dense {entry.get('dtype')} logits"


def topk_index_dtype(num_classes: int) -> str:
    """Class indices of a top-k or sampled store: uint16 while they fit (K <= 65536), else uint32."""
    return "uint16" if num_classes <= 2**16 else "uint32"


def array_specs(entry: dict, num_classes: int) -> dict[str, tuple[str, tuple, tuple]]:
    """{array name: (dtype, shape after (N, V), dimension names after (sample, view))} of the arrays that hold
    the logits in a store with manifest entry `entry` (docs/FORMAT.md)."""
    s, K = storage_of(entry), num_classes
    if s == "topk":
        k = entry["k"]
        return {"topk_values": (entry["dtype"], (k,), ("rank",)),
                "topk_indices": (topk_index_dtype(K), (k,), ("rank",)),
                "rest_logmass": ("float32", (), ())}
    if s == "quantized":
        return {"quant_codes": (f"uint{entry['bits']}", (K,), ("class",)),
                "quant_max": ("float32", (), ()), "quant_step": ("float32", (), ())}
    if s == "sampled":
        d = sampled_width(entry, K)
        return {"sampled_ids": (topk_index_dtype(K), (d,), ("draw",)),
                "sampled_counts": ("uint16", (d,), ("draw",)),
                "sampled_entropy": ("float32", (), ())}
    return {"logits": ("uint16" if entry.get("dtype") == "bfloat16" else entry.get("dtype"), (K,), ("class",))}


def sampled_width(entry: dict, num_classes: int) -> int:
    """Columns of a sampled store's ids and counts: at most min(draws, K) distinct classes are drawn."""
    return min(entry["draws"], num_classes)


def class_id_arrays(entry: dict) -> tuple[str, ...]:
    """The arrays whose values are classes 0..K-1 (they record K as their attribute `num_classes`)."""
    return {"topk": ("topk_indices",), "sampled": ("sampled_ids",)}.get(storage_of(entry), ())


def logit_array_names(manifest: dict) -> tuple[str, ...]:
    """The arrays that hold a store's logits, by its manifest's `logits` entry (dense when absent)."""
    return tuple(array_specs(manifest.get("logits") or {"dtype": "float16"}, 2))  # K changes shapes, not names


def decoded_itemsize(entry: dict) -> int:
    """Bytes per logit of rows as `decode_logits(..., keep_dtype=True)` gives them: the stored size of dense
    float16/float32, else 4 (rebuilt in float32)."""
    return 2 if is_lossless(entry) and entry["dtype"] == "float16" else 4


# ---- encoding (stage 1) -----------------------------------------------------------------------------

def encode_logits(logits: np.ndarray, entry: dict, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{array name: values} of float32 logits (n, V, K) as a store with manifest entry `entry` holds them (what
    `CacheStore.write_shard` takes). `ids` (n,): the rows' keys for a sampled store's draws (so a redone shard is
    identical: stage 1 passes the sample ids);
    required for sampled targets only."""
    s = storage_of(entry)
    if s == "topk":
        return topk_parts(logits, entry["k"], entry["dtype"])
    if s == "quantized":
        return quantized_parts(logits, entry["bits"])
    if s == "sampled":
        if ids is None:
            raise ValueError("encode_logits: sampled targets are keyed by the rows' sample ids: pass ids")
        return sampled_parts(logits, entry, ids)
    if entry.get("dtype") == "bfloat16":
        return {"logits": bfloat16_bits(logits)}
    return {"logits": logits.astype(entry["dtype"])}


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """uint16 bit patterns of float32 `x` rounded to bfloat16 (round to nearest even; torch's cast)."""
    b = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return b.view(torch.int16).numpy().view(np.uint16)


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (uint16): the pattern is the float32's upper half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantized_parts(logits: np.ndarray, bits: int, rows_per_step: int = 4096) -> dict[str, np.ndarray]:
    """The quantized arrays of float32 logits (..., K): per row max m, step s = (m - min) / (2^bits - 1) (float32,
    0 for a constant row), codes rint((m - z) / s) in uint{bits}, computed in float64 a few thousand rows at a
    time. Decoding m - code * s is exact at the max (code 0) and within s/2 (plus float32 rounding) elsewhere."""
    z = np.asarray(logits, dtype=np.float32)
    flat = z.reshape(-1, z.shape[-1])
    levels = 2**bits - 1
    top, step = flat.max(-1), ((flat.max(-1).astype(np.float64) - flat.min(-1)) / levels).astype(np.float32)
    codes = np.empty(flat.shape, f"uint{bits}")
    for s in range(0, len(flat), rows_per_step):
        rows = slice(s, s + rows_per_step)
        safe = np.where(step[rows] > 0, step[rows], 1).astype(np.float64)[:, None]
        codes[rows] = np.clip(np.rint((top[rows, None].astype(np.float64) - flat[rows]) / safe), 0, levels)
    return {"quant_codes": codes.reshape(z.shape), "quant_max": top.reshape(z.shape[:-1]),
            "quant_step": step.reshape(z.shape[:-1])}


def sampled_parts(logits: np.ndarray, entry: dict, ids: np.ndarray,
                  rows_per_step: int = 4096) -> dict[str, np.ndarray]:
    """The sampled-target arrays of float32 logits (n, V, K), row keys `ids` (n,): per row, `draws` classes
    drawn from softmax(z / temperature) by `draw_uniforms` keyed by (seed, row key, view), kept as the distinct
    classes in ascending order with their counts (min(draws, K) columns, padded with class 0, count 0), and the
    entropy (nats) of that softmax, computed in float64 (what makes the loss estimate unbiased: kdcache.losses.sampled_kd_loss)."""
    n, V, K = logits.shape
    D, T, width = entry["draws"], entry["temperature"], sampled_width(entry, K)
    flat = np.ascontiguousarray(logits, dtype=np.float32).reshape(n * V, K)
    sample = np.repeat(np.asarray(ids, dtype=np.uint64), V)
    view = np.tile(np.arange(V, dtype=np.uint64), n)
    out_ids = np.zeros((n * V, width), topk_index_dtype(K))
    counts = np.zeros((n * V, width), np.uint16)
    entropy = np.empty(n * V, np.float32)
    for s in range(0, n * V, rows_per_step):
        z = flat[s:s + rows_per_step].astype(np.float64) / T
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        p = np.exp(logp)
        entropy[s:s + len(z)] = -(p * np.where(p > 0, logp, 0)).sum(-1)
        u = draw_uniforms(entry["seed"], sample[s:s + len(z)], view[s:s + len(z)], D)
        i, c = distinct_counts(inverse_cdf(p, u), width)
        out_ids[s:s + len(z)], counts[s:s + len(z)] = i, c
    return {"sampled_ids": out_ids.reshape(n, V, width), "sampled_counts": counts.reshape(n, V, width),
            "sampled_entropy": entropy.reshape(n, V)}


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a bijection that scrambles every bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def draw_uniforms(seed: int, sample: np.ndarray, view: np.ndarray, draws: int) -> np.ndarray:
    """(R, draws) float64 uniforms in [0, 1) of rows (sample[r], view[r]): counter-based, so any row's draws
    are re-created alone: h = mix(mix(mix(seed + G) ^ sample) ^ view), u_j = (mix(h + (j + 1) G) >> 11) / 2^53
    (mix: splitmix64's finaliser, G = 0x9E3779B97F4A7C15, uint64 arithmetic modulo 2^64)."""
    with np.errstate(over="ignore"):
        h = _splitmix(np.full(len(sample), seed, np.uint64) + GOLDEN)
        h = _splitmix(_splitmix(h ^ sample.astype(np.uint64)) ^ view.astype(np.uint64))
        j = (np.arange(1, draws + 1, dtype=np.uint64) * GOLDEN)[None, :]
        x = _splitmix(h[:, None] + j)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def inverse_cdf(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """(R, D) classes: for each uniform u[r, j] the first class whose cumulative probability of row r exceeds it
    (a class of probability 0 is never drawn). One searchsorted for all rows: row r's cdf is shifted by r."""
    R, K = p.shape
    cdf = np.cumsum(p, -1)
    cdf /= cdf[:, -1:]
    offset = np.arange(R, dtype=np.float64)[:, None]
    at = np.searchsorted((cdf + offset).ravel(), (u + offset).ravel(), side="right").reshape(u.shape)
    return np.minimum(at - (offset.astype(np.int64) * K), K - 1)


def distinct_counts(classes: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, width) distinct classes of each row of `classes` (R, D), ascending, and how often each was drawn; the
    rest padded with class 0 and count 0."""
    R, D = classes.shape
    s = np.sort(classes, axis=1)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = np.cumsum(first, axis=1) - 1
    rows = np.broadcast_to(np.arange(R)[:, None], s.shape)
    ids = np.zeros((R, width), np.int64)
    ids[rows[first], slot[first]] = s[first]
    counts = np.bincount((rows * width + slot).ravel(), minlength=R * width).reshape(R, width)
    return ids, counts


def topk_parts(logits: np.ndarray, k: int, dtype: str, rows_per_step: int = 4096) -> dict[str, np.ndarray]:
    """The top-k arrays of float32 logits (n, V, K): values cast to the cache `dtype`, indices in
    `topk_index_dtype`, rest_logmass float32 (`topk_compress`, a few thousand rows at a time to bound its float64
    temporaries)."""
    n, V, K = logits.shape
    flat = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32).reshape(n * V, K))
    values = np.empty((n * V, k), dtype)
    indices = np.empty((n * V, k), topk_index_dtype(K))
    rest = np.empty(n * V, np.float32)
    for s in range(0, n * V, rows_per_step):
        v, i, r = topk_compress(flat[s:s + rows_per_step], k)
        values[s:s + len(v)], indices[s:s + len(v)], rest[s:s + len(v)] = v.numpy(), i.numpy(), r.numpy()
    return {"topk_values": values.reshape(n, V, k), "topk_indices": indices.reshape(n, V, k),
            "rest_logmass": rest.reshape(n, V)}


# ---- decoding (stages 2 and 3, verify) ------------------------------------------------------------------

def decode_logits(parts: dict[str, np.ndarray], num_classes: int, keep_dtype: bool = False) -> np.ndarray:
    """float32 logits (..., K) of some rows from what the store holds for them (the arrays' names as keys): the
    logits themselves (bfloat16 bit patterns widened), the quantized codes decoded, or the top-k reconstruction
    (`topk_logits`). `keep_dtype` leaves dense float16 logits as stored, for a reader that upcasts small batches
    itself (stage 2). A sampled store holds no logits: UserError."""
    if "logits" in parts:
        z = parts["logits"]
        if z.dtype == np.uint16:
            return bfloat16_values(z)
        return z if keep_dtype else z.astype(np.float32)
    if "quant_codes" in parts:
        step = parts["quant_step"].astype(np.float32)[..., None]
        return parts["quant_max"].astype(np.float32)[..., None] - parts["quant_codes"].astype(np.float32) * step
    if "sampled_ids" in parts:
        raise UserError("this store holds sampled targets (draws from the teacher's softmax), not logits: dense "
                        "logits cannot be rebuilt from it; use its exact stage-1 statistics, or a method that "
                        "trains on sampled targets (kd with T = the store's temperature, ttm/wttm with gamma = 1/T)")
    logits = topk_logits(torch.from_numpy(np.ascontiguousarray(parts["topk_values"])),
                         torch.from_numpy(parts["topk_indices"].astype(np.int64)),
                         torch.from_numpy(np.ascontiguousarray(parts["rest_logmass"])), num_classes)
    return logits.numpy()


class Sampled(NamedTuple):
    """A batch's sampled targets, what stage 3 passes as z_t for a sampled store: for each row the distinct
    classes drawn `ids` (B, W) int64 and their `counts` (B, W) float32 (0: padding; each row sums to the draws),
    and the teacher's `entropy` (B,) at `temperature`, the store's T_s, which the methods check their T (or 1 /
    gamma) against. The losses take the tensors directly (kdcache.losses.sampled_kd_loss, sampled_ttm_loss)."""
    ids: torch.Tensor
    counts: torch.Tensor
    entropy: torch.Tensor
    temperature: float

    def to(self, device) -> "Sampled":
        return self._replace(ids=self.ids.to(device), counts=self.counts.to(device), entropy=self.entropy.to(device))


def decode_targets(parts: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Stage 3's per-row target arrays of some rows (numpy, first axis the rows, so a reader can concatenate and
    slice them): {"logits": float32 (n, K)} (`decode_logits`), or a sampled store's arrays as stored."""
    if "sampled_ids" in parts:
        return dict(parts)
    return {"logits": decode_logits(parts, num_classes)}


def batch_targets(batch: dict, entry: dict):
    """z_t of a batch holding `decode_targets`' arrays: a float32 tensor (B, K), or `Sampled` for a sampled store
    (manifest entry `entry`); both have `.to(device)`."""
    if "sampled_ids" not in batch:
        return torch.from_numpy(batch["logits"])
    return Sampled(torch.from_numpy(batch["sampled_ids"].astype(np.int64)),
                   torch.from_numpy(batch["sampled_counts"].astype(np.float32)),
                   torch.from_numpy(np.asarray(batch["sampled_entropy"], np.float32)),
                   float(entry["temperature"]))


def spot_check(parts: dict[str, np.ndarray], logits: np.ndarray, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(error, tolerance) per row: how far the stored rows `parts` are from the teacher's float32 `logits` (n, K)
    recomputed now, and how far the encoding (and the teacher's run-to-run rounding) lets them be. Dense,
    quantized: the decoded logits; top-k: the stored values against the teacher's at their classes; sampled:
    the stored entropy against the teacher's."""
    s, scale = storage_of(entry), np.maximum(1.0, np.abs(logits).max(axis=1))
    if s == "sampled":
        z = logits.astype(np.float64) / entry["temperature"]
        logp = z - z.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        h = -(np.exp(logp) * logp).sum(1)
        return np.abs(parts["sampled_entropy"] - h), 2.0**-10 * np.maximum(1.0, h) + 2.0**-10 * scale
    if s == "topk":
        got = np.take_along_axis(logits, parts["topk_indices"].astype(np.int64), 1)
        return np.abs(parts["topk_values"].astype(np.float32) - got).max(1), 2.0**-10 * scale
    err = np.abs(decode_logits(parts, logits.shape[1]) - logits).max(1)
    if s == "quantized":
        return err, parts["quant_step"] / 2 + 2.0**-10 * scale
    return err, (2.0**-7 if entry.get("dtype") == "bfloat16" else 2.0**-10) * scale


def bad_encoded_rows(name: str, values: np.ndarray, entry: dict, start: int) -> str | None:
    """What an encoding's own rule finds wrong in rows start.. of array `name` (`kdcache verify`), else None: a
    sampled row whose counts do not add up to the draws, a negative quantization step or entropy."""
    if name == "sampled_counts":
        bad = values.astype(np.int64).sum(-1) != entry["draws"]
        what = f"counts that do not add up to the {entry['draws']} draws"
    elif name in ("quant_step", "sampled_entropy"):
        bad, what = values < 0, "a negative value"
    else:
        return None
    if not bad.any():
        return None
    i, v = np.argwhere(bad)[0]
    return f"{name} at sample {start + i}, view {v} holds {what}"


def topk_compress(z, k):
    """The top-k form of teacher logits z (..., K): (values, indices, rest_logmass).

    values (..., k): the k largest logits, sorted descending, in z's dtype; indices (..., k) int64 their
    classes; rest_logmass (...): log of the softmax mass of the other K-k classes, computed in float64 as
    logsumexp(rest) - logsumexp(all), so it stays finite (and exact) however small the mass is; returned
    in float32 (float64 for float64 z). k = K has no rest: rest_logmass is -inf.
    """
    values, indices = z.topk(k, dim=-1)
    z64 = z.detach().double()
    lse_all = torch.logsumexp(z64, dim=-1)
    rest = z64.scatter(-1, indices, float("-inf"))
    rest_logmass = torch.logsumexp(rest, dim=-1) - lse_all
    return values, indices, rest_logmass.to(torch.promote_types(z.dtype, torch.float32))


def topk_logits(values, indices, rest_logmass, num_classes):
    """Logits (..., K) rebuilt from the top-k form (`topk_compress`): their softmax is the teacher's
    exact probabilities on the k stored classes and the rest mass spread uniformly over the other K-k.

    The stored values are kept as they are (so max, margin, logsumexp and the top-k order are the
    teacher's); every other class gets logit L + rest_logmass - log(K-k), where L = logsumexp(values) -
    log(1 - exp(rest_logmass)) is the teacher's logsumexp. That value is at most the k-th largest logit
    (up to rounding), so the argmax is kept too. Half precision comes out float32. Every loss and statistic then works
    unchanged on the result; what it cannot restore is the spread of the K-k rest logits (their mean,
    std and min, hence LS/MLT temperatures and entropies are approximations).
    """
    v = values if values.dtype in (torch.float32, torch.float64) else values.float()
    k = v.shape[-1]
    if k == num_classes:  # nothing left out: the indices are a permutation of the classes
        return v.new_empty(*v.shape[:-1], num_classes).scatter_(-1, indices.long(), v)
    # The rest mass is < 1 except when the top-k mass underflowed to 0 (then log(1 - m) would be -inf).
    tiny = torch.finfo(v.dtype).tiny
    lm = rest_logmass.to(v.dtype).clamp(max=-tiny)
    log_top = torch.where(lm > -math.log(2), torch.log(-torch.expm1(lm)), torch.log1p(-torch.exp(lm)))
    rest = torch.logsumexp(v, dim=-1) - log_top + lm - math.log(num_classes - k)
    out = rest.unsqueeze(-1).expand(*v.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices.long(), v)
