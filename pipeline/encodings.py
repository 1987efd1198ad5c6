"""How a store holds its logits and how they are read back: all K of them ("full"), or for large class counts
the top k ("topk": the k largest logits, their classes and the log of the rest's softmax mass; docs/FORMAT.md).

Callers never branch on the encoding: `logits_entry` makes the manifest entry, `encode_logits` turns float32
logits into the arrays the store holds, `decode_logits` turns rows of those arrays back into logits.
"""
import math

import numpy as np
import torch

from kdcache.errors import UserError, is_int

TOPK_ARRAYS = ("topk_values", "topk_indices", "rest_logmass")


def logits_entry(dtype: str, topk: int | None, num_classes: int) -> dict:
    """The manifest's `logits` entry: the dtype, plus storage "topk" and k for a top-k store (a full store's entry
    has no `storage`, as before the option existed, so existing stores keep their fingerprint); UserError unless
    1 <= k < K."""
    if topk is None:
        return {"dtype": dtype}
    entry = {"dtype": dtype, "storage": "topk", "k": topk}
    logit_storage({"logits": entry}, num_classes)
    return entry


def logit_array_names(manifest: dict) -> tuple[str, ...]:
    """The arrays that hold a store's logits, by its manifest's `logits.storage` ("full" when absent)."""
    logits = manifest.get("logits")
    return TOPK_ARRAYS if isinstance(logits, dict) and logits.get("storage") == "topk" else ("logits",)


def logit_storage(manifest: dict, num_classes: int) -> int | None:
    """k of the manifest's top-k storage (None: full logits); UserError unless 1 <= k < K."""
    if logit_array_names(manifest) != TOPK_ARRAYS:
        return None
    k = manifest["logits"].get("k")
    if not (is_int(k, 1) and k < num_classes):
        raise UserError(f"cache.topk must be an integer in 1..{num_classes - 1} (the teacher has {num_classes} "
                        f"classes) or null for the full logits, got {k!r}")
    return k


def topk_index_dtype(num_classes: int) -> str:
    """Class indices of a top-k store: uint16 while they fit (K <= 65536), else uint32."""
    return "uint16" if num_classes <= 2**16 else "uint32"


def encode_logits(logits: np.ndarray, entry: dict) -> dict[str, np.ndarray]:
    """{array name: values} of float32 logits (n, V, K) as a store with manifest entry `entry` holds them (what
    `CacheStore.write_shard` takes)."""
    if logit_array_names({"logits": entry}) == TOPK_ARRAYS:
        return topk_parts(logits, entry["k"], entry["dtype"])
    return {"logits": logits.astype(entry["dtype"])}


def decode_logits(parts: dict[str, np.ndarray], num_classes: int, keep_dtype: bool = False) -> np.ndarray:
    """float32 logits (..., K) of some rows from what the store holds for them (the arrays' names as keys): the
    logits themselves, or their reconstruction from the top-k arrays (`topk_logits`). `keep_dtype` leaves full
    logits in their stored dtype, for a reader that upcasts small batches itself (stage 2)."""
    if "logits" in parts:
        return parts["logits"] if keep_dtype else parts["logits"].astype(np.float32)
    logits = topk_logits(torch.from_numpy(np.ascontiguousarray(parts["topk_values"])),
                         torch.from_numpy(parts["topk_indices"].astype(np.int64)),
                         torch.from_numpy(np.ascontiguousarray(parts["rest_logmass"])), num_classes)
    return logits.numpy()


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
