"""Stage 2 statistics of cached teacher logits: settings, output names, and the per-block kernels.

The kernels are pure functions of numpy blocks; stages/compute_stats.py runs them with Dask over a
store and writes the results into the store's `stats/` group. Formulas: docs/METHODS.md. At the end,
what every reader of those arrays uses (stage 3, kdcache.dataset): `read_stat` finds a fresh array,
`load_stat` reads it checked.

The max-logit temperature and the WTTM power sum have their reference implementation in
kdcache.losses (`max_logit_temperature`, `teacher_power_sum`: what stage 3 trains with). The kernel
computes the same two values from intermediates it already has, because calling those functions per
row costs half of stage 2's time (docs/BENCHMARKS.md, "Stage 2"): max_k |Z(z)_k| is reached at the
largest or the smallest logit, so it is max(max - mean, mean - min) / (std + 1e-7) without a
standardized (R, K) copy; U_gamma = sum_k exp(gamma * log_softmax(z)_k) reuses the log-softmax.
tests/test_stats.py pins both to the kdcache.losses functions, so the two cannot drift apart.

Array names under `stats/` (one array per statistic and parameter setting, so new parameters add new
arrays and never overwrite old ones). Per (sample, view) row, shape (N, V), float32 unless said:

    mean                              mean of the K logits
    std_{unbiased|population}         std of the K logits; unbiased divides by K-1 (the LS authors'
                                      released code, our default), population by K (the LS paper)
    max, min, logsumexp               of the K logits
    entropy                           of softmax(z) at T=1, in nats
    margin                            top-1 minus top-2 logit (0 on ties)
    top1_correct (bool)               the teacher's top-1 class (the first one on ties) is the label
    ls_temperature_t{T}_{std}         logit-standardization effective temperature T_base * std(z)
    max_abs_zscore_{std}              max_k |Z(z)_k|, Z(z) = (z - mean) / (std + 1e-7)
    mlt_temperature_{std}             max-logit adaptive temperature (1 + sqrt 3)/2 * max_k |Z(z_t)_k|,
                                      the paper's teacher-only variant
    wttm_power_sum_gamma{g}           WTTM's U_gamma = sum_k softmax(z)_k ^ gamma

Per class k (rows grouped by their LABEL; NaN for a class without rows), float64:

    class_count        (K,)   number of (sample, view) rows with label k (int64)
    class_accuracy     (K,)   fraction of them whose top-1 is k
    class_mean_softmax (K, K) row k = mean teacher softmax over them (a class-similarity matrix)
    class_ece_bins{B}  (K,)   expected calibration error of them: confidence = max softmax,
                              B equal-width bins (lo, hi] on [0, 1],
                              ECE = sum_b |bin b| / n * |accuracy(b) - mean confidence(b)|
    ece_bins{B}        ()     the same over all rows

Numbers in names are written exactly (repr of the float, without a trailing ".0"): t2, gamma0.1, t1.5.
Every array's attributes record its statistic, parameters and the fingerprint of the logits it came
from (see stages/compute_stats.py). Everything is computed in float32 whatever the stored dtype
(exp overflows in float16); per-class sums accumulate in float64.

Exact statistics of lossy stores. A store that does not keep the teacher's logits as they are (top-k,
quantized, sampled: `kdcache.encodings.is_lossless`) cannot give back their std, min or power sums, so
stage 1, which has the float32 logits in hand, writes the per-row arrays of `exact_outputs` itself
(`exact: true` in their attributes) and seals them with the fingerprint once the store is complete
(`seal_exact`); std only in the unbiased convention and no max |Z|: the population std and max |Z| follow
from them (`derivation`) and are derived on read (`Derived`, `exact_array`). Stage 2 then derives the LS and
max-logit temperatures from them (`derivation` again), and computes from the decoded logits, marked
`exact: false`, only what they cannot give; `read_stat` takes an exact array of the store before an overlay's.
"""
import logging
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

import kdcache
from kdcache.encodings import dense_logits_available, describe, is_lossless
from kdcache.errors import StoreDamage, UserError, is_int, is_number
from kdcache.losses import MLT_CONSTANT
from kdcache.sharing import open_overlay
from kdcache.store import CacheStore, bad_values, reading, reading_metadata

log = logging.getLogger(__name__)

STD_EPS = 1e-7  # the epsilon of Z(z) = (z - mean) / (std + eps), as in kdcache.losses.standardize

STD_CONVENTIONS = ("unbiased", "population")

# statistic -> (what it is, the settings its value depends on)
ROW_STATISTICS = {
    "mean": ("mean of the K logits", ()),
    "std": ("standard deviation of the K logits", ("std",)),
    "max": ("largest logit", ()),
    "min": ("smallest logit", ()),
    "logsumexp": ("log sum_k exp(z_k)", ()),
    "entropy": ("entropy of softmax(z) at T=1, nats", ()),
    "margin": ("top-1 minus top-2 logit", ()),
    "top1_correct": ("the teacher's top-1 class (first on ties) is the label", ()),
    "ls_temperature": ("logit-standardization effective temperature T_base * std(z)", ("t_base", "std")),
    "max_abs_zscore": ("max_k |Z(z)_k|, Z(z) = (z - mean) / (std + 1e-7)", ("std",)),
    "mlt_temperature": ("max-logit adaptive temperature (1 + sqrt 3)/2 * max_k |Z(z_t)_k| (teacher-only)",
                        ("std",)),
    "wttm_power_sum": ("WTTM power sum U_gamma = sum_k softmax(z)_k ^ gamma", ("gamma",)),
}
CLASS_STATISTICS = {
    "class_count": ("number of (sample, view) rows per label", ()),
    "class_accuracy": ("teacher top-1 accuracy per label", ()),
    "class_mean_softmax": ("mean teacher softmax per label: a K x K class-similarity matrix", ()),
    "class_ece": ("expected calibration error per label (max-softmax confidence, equal-width bins)",
                  ("ece_bins",)),
    "ece": ("expected calibration error over all rows (max-softmax confidence, equal-width bins)",
            ("ece_bins",)),
}
STATISTICS = {**ROW_STATISTICS, **CLASS_STATISTICS}



def check_settings(settings: dict) -> dict:
    """Validate what the `stats` config section asks to compute (statistics, t_base, gammas, std,
    ece_bins; other keys are ignored); UserError on mistakes. kdcache.config.check_config calls it when a config
    is loaded; stage 1 and 2 call it again for the normalised copy (and for settings passed from Python).

    Returns a normalised copy: statistics as a list of names, floats for t_base and gammas (duplicates
    dropped, order kept), an int for ece_bins.
    """
    stats = settings.get("statistics", "all")
    if isinstance(stats, str):
        stats = [stats]
    if isinstance(stats, (list, tuple)) and "all" in stats:
        stats = list(STATISTICS)
    if not isinstance(stats, (list, tuple)) or not stats:
        raise UserError(f"stats.statistics must be 'all' or a list of names, got {stats!r}")
    unknown = [s for s in stats if s not in STATISTICS]
    if unknown:
        raise UserError(f"unknown statistic(s) {', '.join(map(repr, unknown))}; "
                        f"known: {', '.join(STATISTICS)} (or 'all')")
    t_base = _positive("stats.t_base (T_base)", settings.get("t_base"))
    gammas = settings.get("gammas")
    gammas = [gammas] if is_number(gammas) else gammas
    if not isinstance(gammas, (list, tuple)):
        raise UserError(f"stats.gammas must be a list of numbers > 0, got {gammas!r}")
    gammas = list(dict.fromkeys(_positive("stats.gammas (gamma)", g) for g in gammas))
    if "wttm_power_sum" in stats and not gammas:
        raise UserError("the statistic wttm_power_sum needs at least one gamma (stats.gammas or --gamma)")
    std = settings.get("std")
    if std not in STD_CONVENTIONS:
        raise UserError(f"stats.std must be one of {', '.join(STD_CONVENTIONS)}, got {std!r}")
    bins = settings.get("ece_bins")
    if not is_int(bins, 1):
        raise UserError(f"stats.ece_bins must be an integer >= 1, got {bins!r}")
    return {"statistics": list(dict.fromkeys(stats)), "t_base": t_base, "gammas": gammas,
            "std": std, "ece_bins": bins}


def _positive(what, v):
    if not (is_number(v) and v > 0):
        raise UserError(f"{what} must be a finite number > 0, got {v!r}")
    return float(v)


# ---- output arrays: names and parameters ----------------------------------------------------------

@dataclass
class Output:
    """One array of `stats/`: its name, the statistic it holds and the parameters it depends on."""
    name: str
    statistic: str
    params: dict = field(default_factory=dict)

    @property
    def per_row(self) -> bool:
        return self.statistic in ROW_STATISTICS


def number_name(x: float) -> str:
    """Exact and short: 2.0 -> '2', 0.1 -> '0.1', 1e-05 -> '1e-05' (two different floats never collide)."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


def output(statistic: str, **params) -> Output:
    """The array of `statistic` for the given parameters (t_base, std, gamma, ece_bins: as relevant)."""
    if statistic not in STATISTICS:
        raise UserError(f"unknown statistic {statistic!r}; known: {', '.join(STATISTICS)}")
    needs = STATISTICS[statistic][1]
    missing = [n for n in needs if n not in params]
    if missing:
        raise UserError(f"statistic {statistic} needs the parameter(s) {', '.join(missing)}")
    p = {n: params[n] for n in needs}
    if "t_base" in p:
        p["t_base"] = _positive("T_base", p["t_base"])
    if "gamma" in p:
        p["gamma"] = _positive("gamma", p["gamma"])
    if "std" in p and p["std"] not in STD_CONVENTIONS:
        raise UserError(f"std must be one of {', '.join(STD_CONVENTIONS)}, got {p['std']!r}")
    name = statistic
    if statistic == "std":
        name = f"std_{p['std']}"
    elif statistic == "ls_temperature":
        name = f"ls_temperature_t{number_name(p['t_base'])}_{p['std']}"
    elif statistic in ("max_abs_zscore", "mlt_temperature"):
        name = f"{statistic}_{p['std']}"
    elif statistic == "wttm_power_sum":
        name = f"wttm_power_sum_gamma{number_name(p['gamma'])}"
    elif statistic in ("class_ece", "ece"):
        name = f"{statistic}_bins{p['ece_bins']}"
    return Output(name, statistic, p)


def plan_outputs(settings: dict) -> list[Output]:
    """Every array that checked settings ask for, row statistics first (in STATISTICS order)."""
    s = settings
    outs = []
    for stat in STATISTICS:
        if stat not in s["statistics"]:
            continue
        if stat == "wttm_power_sum":
            outs += [output(stat, gamma=g) for g in s["gammas"]]
        else:
            outs.append(output(stat, t_base=s["t_base"], std=s["std"], ece_bins=s["ece_bins"]))
    return outs


class Derivation(NamedTuple):
    """An output = f(*values of the per-row outputs `sources`, in order); `formula` says how ({0}, {1}, ...: them)."""
    sources: list
    f: Callable
    formula: str


def derivation(o: Output, num_classes: int) -> Derivation | None:
    """How per-row output `o` follows from others, for K = num_classes; None when it does not.

    The temperatures are multiples, float32(factor) x the value, as the kernel computes them: ls_temperature =
    t_base * std and mlt_temperature = (1 + sqrt 3)/2 * max_abs_zscore; stage 2 derives them so from a lossy store's
    exact arrays, bit for bit the dense store's. Stage 1 writes std unbiased only (EXACT_STD) and no max |Z|: the
    population std is sqrt((K-1)/K) x the unbiased one (in float64: within an ulp or two of float32 of the direct
    value), and max |Z| is the kernel's own formula on mean, max, min and that std. Not sqrt(K/(K-1)) x the unbiased
    max |Z|: the 1e-7 of (std + 1e-7) makes that (std + 1e-7) / (std + sqrt((K-1)/K) * 1e-7) times too large (std:
    the population one), up to 41 % at K = 2 on near-constant rows, and more than float32 rounding there for any
    std below 0.5 (tests/test_exact_stats.py)."""
    p = o.params
    if o.statistic in ("ls_temperature", "mlt_temperature"):
        factor, source = ((p["t_base"], "std") if o.statistic == "ls_temperature"
                          else (MLT_CONSTANT, "max_abs_zscore"))
        return Derivation([output(source, std=p["std"])], lambda v: factor * v, f"{factor!r} x {{0}}")
    if o.statistic == "std" and p["std"] == "population":
        K = num_classes
        c = math.sqrt((K - 1) / K)
        return Derivation([output("std", std="unbiased")], lambda s: (s.astype(np.float64) * c).astype(np.float32),
                          f"sqrt({K - 1}/{K}) x {{0}}")
    if o.statistic == "max_abs_zscore":
        return Derivation([output("mean"), output("max"), output("min"), output("std", std=p["std"])],
                          lambda *v: max_abs_zscore(*map(torch.from_numpy, v)).numpy(),
                          f"max({{1}} - {{0}}, {{0}} - {{2}}) / ({{3}} + {STD_EPS!r})")
    return None


# What stage 1 writes exactly for a lossy store: the per-row statistics the temperatures and losses are made of,
# and the entropy (4 bytes per row each, next to a top-k store's 4k + 2k + 4: not the margin, which top-k keeps).
EXACT_STATISTICS = ("mean", "std", "max", "min", "logsumexp", "entropy", "max_abs_zscore", "wttm_power_sum")
EXACT_STD = "unbiased"  # stage 1's std convention: the population values follow from these (`derivation`)


def exact_outputs(settings: dict) -> list[Output]:
    """The arrays stage 1 writes from the float32 logits of a lossy store, for checked `settings` (the config's
    stats section): EXACT_STATISTICS, std in the EXACT_STD convention, power sums at its gammas; not max |Z|, which
    `derivation` gives from mean, max, min and std bit for bit as the kernel computes it."""
    outs = []
    for stat in EXACT_STATISTICS:
        if stat == "max_abs_zscore":
            continue
        if stat == "wttm_power_sum":
            outs += [output(stat, gamma=g) for g in settings["gammas"]]
        else:
            outs.append(output(stat, std=EXACT_STD))
    return outs


# ---- kernels ------------------------------------------------------------------------------------

def _once(cache: dict, key, compute):
    """An intermediate value shared by several statistics of one batch, computed on first use."""
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _common(z: torch.Tensor, cache: dict, key: str) -> torch.Tensor:
    """Intermediates several statistics share: mean, max, min, logsumexp, log-softmax, softmax, top-1
    index (the first on ties)."""
    if key in ("mean", "max", "min"):
        reduce = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}[key]
        return _once(cache, key, lambda: reduce(z, dim=-1))
    if key == "lse":
        return _once(cache, key, lambda: torch.logsumexp(z, dim=-1))
    if key == "log_softmax":
        return _once(cache, key, lambda: z - _common(z, cache, "lse")[:, None])
    if key == "softmax":
        return _once(cache, key, lambda: _common(z, cache, "log_softmax").exp())
    if key == "argmax":
        return _once(cache, key, lambda: z.argmax(dim=-1))
    raise KeyError(key)


def row_statistics(z: torch.Tensor, labels: torch.Tensor, outputs: list[Output],
                   cache: dict | None = None) -> list[torch.Tensor]:
    """Per-row values (R,) of each per-row output, for float32 logits z (R, K) and labels (R,)."""
    cache = {} if cache is None else cache

    def std(convention):  # two passes: sqrt(sum (z - mean)^2 / (K - 1 or K)); 4x faster than torch.std
        def compute():
            d = z - _common(z, cache, "mean")[:, None]
            return (torch.linalg.vecdot(d, d) / (z.shape[-1] - (convention == "unbiased"))).sqrt()
        return _once(cache, ("std", convention), compute)

    def max_abs_z(convention):
        return _once(cache, ("max_abs_z", convention), lambda: max_abs_zscore(
            *(_common(z, cache, k) for k in ("mean", "max", "min")), std(convention)))

    values = []
    for o in outputs:
        s, p = o.statistic, o.params
        if s in ("mean", "max", "min"):
            v = _common(z, cache, s)
        elif s == "std":
            v = std(p["std"])
        elif s == "logsumexp":
            v = _common(z, cache, "lse")
        elif s == "entropy":  # -sum_k p_k log p_k (not lse - sum_k p_k z_k: that cancels for large z)
            v = -torch.linalg.vecdot(_common(z, cache, "softmax"), _common(z, cache, "log_softmax"))
        elif s == "margin":  # the largest logit minus the largest other one (0 on a tie); 3x faster than topk
            others = z.scatter(-1, _common(z, cache, "argmax")[:, None], float("-inf"))
            v = _common(z, cache, "max") - others.amax(dim=-1)
        elif s == "top1_correct":
            v = (_common(z, cache, "argmax") == labels).float()
        elif s == "max_abs_zscore":
            v = max_abs_z(p["std"])
        elif s in ("ls_temperature", "mlt_temperature"):  # t_base * std, (1 + sqrt 3)/2 * max |Z|: `derivation`
            # mlt = kdcache.losses.max_logit_temperature(z) (teacher variant)
            d = derivation(o, z.shape[-1])
            v = d.f(std(p["std"]) if d.sources[0].statistic == "std" else max_abs_z(p["std"]))
        elif s == "wttm_power_sum":  # = kdcache.losses.teacher_power_sum(z, gamma); each term <= 1
            v = (p["gamma"] * _common(z, cache, "log_softmax")).exp().sum(dim=-1)
        else:
            raise ValueError(f"{s} is not a per-row statistic")
        values.append(v)
    return values


def max_abs_zscore(mean: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """max_k |Z(z)_k| of rows from their mean, max, min and std: it is reached at the largest or the smallest logit,
    so no standardized (R, K) copy is made. The kernel and `derivation` (population max |Z| of a lossy store)."""
    return torch.maximum(top - mean, mean - bottom) / (std + STD_EPS)


def add_class_sums(z: torch.Tensor, labels: torch.Tensor, bins: torch.Tensor, probs: torch.Tensor | None,
                   cache: dict | None = None) -> None:
    """Add one batch of rows to the per-class sums (in place).

    bins (K, B, 3) float64: per label and confidence bin, [rows, sum of confidences, correct rows];
    bin b holds confidences in (b/B, (b+1)/B], confidence = max softmax >= 1/K > 0.
    probs (K, K) float64: per label, the sum of softmax(z) (skipped when None).
    """
    cache = {} if cache is None else cache
    K, B = bins.shape[0], bins.shape[1]
    conf = (_common(z, cache, "max") - _common(z, cache, "lse")).exp().double()
    correct = (_common(z, cache, "argmax") == labels).double()
    b = (torch.ceil(conf * B) - 1).clamp(0, B - 1).long()
    bins.view(K * B, 3).index_add_(0, labels * B + b, torch.stack([torch.ones_like(conf), conf, correct], -1))
    if probs is not None:
        probs.index_add_(0, labels, _common(z, cache, "softmax").double())


def block_statistics(logits: np.ndarray, labels: np.ndarray, outputs: list[Output], ece_bins: int,
                     batch_rows: int = 512):
    """The Dask task of stage 2: all statistics of one block of the store's samples.

    logits (n, V, K) in the stored dtype, labels (n,). Rows are processed `batch_rows` at a time in
    float32, which bounds the memory of the temporaries whatever the shard size.
    Returns rows (n, V, M) float32 with the M per-row outputs in order (top1_correct as 0/1), and the
    block's class sums (see `add_class_sums`) as a pair: bins (K, B, 3) and probs (K, K), float64,
    None for what no output asks for.
    """
    n, V, K = logits.shape
    flat = np.ascontiguousarray(logits).reshape(n * V, K)
    y = torch.from_numpy(np.repeat(np.asarray(labels, dtype=np.int64), V))
    row_outs = [o for o in outputs if o.per_row]
    class_stats = {o.statistic for o in outputs if not o.per_row}
    rows = np.empty((n * V, len(row_outs)), dtype=np.float32)
    bins = torch.zeros(K, ece_bins, 3, dtype=torch.float64) if class_stats else None
    probs = torch.zeros(K, K, dtype=torch.float64) if "class_mean_softmax" in class_stats else None
    buffer = torch.empty(min(batch_rows, n * V), K) if flat.dtype != np.float32 else None
    for start in range(0, n * V, batch_rows):
        stop = min(start + batch_rows, n * V)
        z = torch.from_numpy(flat[start:stop])
        if buffer is not None:  # float16 -> float32 into one reused buffer (fresh memory is slow to touch)
            z = buffer[:stop - start].copy_(z)
        yb, cache = y[start:stop], {}
        if row_outs:
            rows[start:stop] = torch.stack(row_statistics(z, yb, row_outs, cache), dim=-1).numpy()
        if bins is not None:
            add_class_sums(z, yb, bins, probs, cache)
    return rows.reshape(n, V, len(row_outs)), (None if bins is None else bins.numpy(),
                                                None if probs is None else probs.numpy())


def class_statistics(bins: np.ndarray, probs, outputs: list[Output]) -> dict[str, np.ndarray]:
    """The per-class outputs from the class sums of the whole store (see `add_class_sums`)."""
    count = bins[..., 0].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {
            "class_count": count.astype(np.int64),
            "class_accuracy": bins[..., 2].sum(axis=1) / count,
            "class_ece": np.abs(bins[..., 2] - bins[..., 1]).sum(axis=1) / count,
            "ece": np.float64(np.abs(bins[..., 2].sum(0) - bins[..., 1].sum(0)).sum() / count.sum()),
        }
        if probs is not None:
            values["class_mean_softmax"] = probs / count[:, None]
    return {o.name: values[o.statistic] for o in outputs if not o.per_row}


# ---- arrays: creating them, recording what they came from -------------------------------------------

COMPRESSORS = [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=4), Crc32cCodec()]
STAGE1 = "stage 1, from the teacher's float32 logits before encoding"  # the `source` of the exact arrays


def create_array(group, o: Output, store: CacheStore, rows_per_chunk: int, attributes: dict, overwrite: bool = True):
    """An empty array of output `o` in `group` with its statistic, parameters and `attributes`: per-row ones laid out
    like the logits (a shard per logits shard, chunks of `rows_per_chunk` samples, which divides a shard), per-class
    ones in one chunk. Replaces an array of that name (`overwrite`: zarr's ContainsArrayError otherwise)."""
    N, V, K = store.logits_shape
    shards = None
    if o.per_row:
        shape, chunks, dims = (N, V), (rows_per_chunk, V), ("sample", "view")
        if chunks[0] != store.samples_per_shard:
            shards = (store.samples_per_shard, V)
    else:
        shape = {"class_mean_softmax": (K, K), "ece": ()}.get(o.statistic, (K,))
        chunks, dims = shape, {0: (), 1: ("class",), 2: ("class", "class")}[len(shape)]
    dtype = stat_dtype(o)
    fill = {"bool": False, "int64": 0}.get(dtype, float("nan"))
    return group.create_array(
        o.name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=fill,
        compressors=COMPRESSORS if o.per_row else [Crc32cCodec()], dimension_names=dims, overwrite=overwrite,
        attributes={"statistic": o.statistic, "description": STATISTICS[o.statistic][0], "params": o.params,
                    **attributes})


def computed_record(store: CacheStore) -> dict:
    """The attributes an array gets once all its values are written, among them the fingerprint of the logits they
    came from (written last: an array without it is an interrupted computation)."""
    return {"logits_fingerprint": store.fingerprint(), "logits_shape": list(store.logits_shape),
            "logits_dtype": str(store.logits_dtype), "computed_in": "float32", "kdcache_version": kdcache.__version__}


def exact_arrays(store: CacheStore, settings: dict) -> list[tuple[Output, zarr.Array]]:
    """Stage 1 on a lossy store: the outputs of `exact_outputs(settings)` (checked settings) and their arrays in the
    store's stats/ group, created where missing (a resumed run keeps the rows written before it; the processes of
    one job create the same documents), a chunk per shard."""
    group, outs = store.group.require_group("stats"), exact_outputs(settings)
    for o in outs:
        if o.name not in group:
            try:
                create_array(group, o, store, store.samples_per_shard, {"exact": True, "source": STAGE1},
                             overwrite=False)
            except zarr.errors.ContainsArrayError:
                pass  # created meanwhile by another process of the job
    return [(o, group[o.name]) for o in outs]


def seal_exact(store: CacheStore) -> list[str]:
    """Stage 1's last step on a lossy store, once every shard is done: record the fingerprint on each exact array
    that holds every row, so that stages 2 and 3 find it fresh. A shard written by an earlier run configured
    without an array (another stats.gammas) leaves its rows NaN, the fill value: that array stays unsealed, and
    stage 2 computes it from the decoded logits. Returns the names sealed."""
    if "stats" not in store.group:
        return []
    group, sealed = store.group["stats"], []
    for name in sorted(group.array_keys()):
        a = group[name]
        attrs = a.attrs.asdict()
        if attrs.get("source") != STAGE1 or "logits_fingerprint" in attrs:
            continue
        if np.isnan(a[...]).any():
            log.warning(f"store {store.path}: stats/{name} lacks the rows of shards written by a run configured "
                        "without it; stage 2 computes it from the decoded logits (approximate) unless the store is "
                        "rebuilt")
            continue
        a.update_attributes(computed_record(store))
        sealed.append(name)
    return sealed


@dataclass
class Derived:
    """Exact values of output `output` for which a lossy store holds no array, computed on read from its exact
    arrays by `derivation` (e.g. std_population, stage 1 writing std_unbiased only). Read like the array it stands
    for: [rows] (a slice of samples, or ...), shape, dtype, attrs, path, basename, store."""
    output: Output
    derivation: Derivation
    sources: list  # one per derivation.sources: the store's exact zarr arrays, or Derived
    where: str  # the store's path, for messages

    def __getitem__(self, rows: slice) -> np.ndarray:
        rows = slice(None) if rows is Ellipsis else rows
        return self.derivation.f(*(read_rows(a, self.where, rows) for a in self.sources))

    @property
    def formula(self) -> str:
        return self.derivation.formula.format(*(a.path if isinstance(a, zarr.Array) else f"({a.formula})"
                                                for a in self.sources))

    @property
    def attrs(self) -> dict:
        o = self.output
        return {"statistic": o.statistic, "description": STATISTICS[o.statistic][0], "params": o.params,
                "exact": True, "source": f"derived on read, {self.formula}"}

    shape = property(lambda self: self.sources[0].shape)
    dtype = property(lambda self: np.dtype(stat_dtype(self.output)))
    path = property(lambda self: f"stats/{self.output.name}")
    basename = property(lambda self: self.output.name)
    store = property(lambda self: self.sources[0].store)


def exact_array(store: CacheStore, o: Output):
    """Output `o`'s exact values in a lossy store: its own fresh array when exact (`exact: true`: stage 1's, or one
    stage 2 derived from them), else a `Derived` of such arrays (`derivation`, in a chain: ls_temperature population
    <- std population <- std unbiased), else None (and always None for a lossless store)."""
    if is_lossless(store.entry):
        return None
    with reading_metadata(store.path, "stats"):
        group = store.group["stats"] if "stats" in store.group else None
    if group is None:
        return None
    if stat_state(group, o, store.fingerprint(), store.path) == "fresh" and group[o.name].attrs.get("exact") is True:
        return group[o.name]
    d = derivation(o, store.num_classes)
    sources = [] if d is None else [exact_array(store, s) for s in d.sources]
    return None if d is None or any(a is None for a in sources) else Derived(o, d, sources, store.path)


def given_exact(store: CacheStore, o: Output):
    """What a reader takes as output `o` of a lossy store without stage 2: its own exact array, or stage 1's statistic
    in the other std convention, derived on read (a `Derived`); None for the rest (stage 2 derives temperatures)."""
    a = exact_array(store, o)
    return a if isinstance(a, zarr.Array) or a is not None and o.statistic in EXACT_STATISTICS else None


def uncomputable(store: CacheStore, o: Output) -> str | None:
    """Why stage 2 cannot compute output `o` of this store, else None: a store without dense logits (sampled
    targets) gives only stage 1's exact arrays and what `derivation` makes of them."""
    if dense_logits_available(store.entry) or exact_array(store, o) is not None:
        return None
    rebuild = "rebuild the store (kdcache cache-teacher --overwrite)"
    if o.statistic == "wttm_power_sum":
        what = (f"stage 1 writes the power sums at stats.gammas: {rebuild} with {number_name(o.params['gamma'])} "
                "among them")
    elif o.statistic in EXACT_STATISTICS or derivation(o, store.num_classes) is not None:
        what = f"{rebuild}: stage 1 writes it"  # a store written before stage 1 wrote them
    else:
        what = f"only stage 1's {', '.join(EXACT_STATISTICS)} and the temperatures derived from them are available"
    return f"the store holds {describe(store.entry)}, which give no logits to compute it from; {what}"


# ---- reading a store's statistics (stage 3, kdcache.dataset, tests) -----------------------------------

def read_stat(store: CacheStore, statistic: str, *, overlay=None, **params):
    """The zarr array of `statistic` for `params` (t_base, std, gamma, ece_bins: those it depends on),
    checked to come from this store's current logits; from the statistics overlay at `overlay` (a path
    or URL, see compute_stats' `out`) when given, else from the store's own stats/ group; an exact array of
    a lossy store (`exact_array`) wins over an overlay's.

    E.g. read_stat(store, "mlt_temperature", std="unbiased"), read_stat(store, "wttm_power_sum",
    gamma=0.1). Raises UserError naming the `kdcache stats` call that computes a missing or stale one.
    """
    o = output(statistic, **params)
    root = store.group if overlay is None else open_overlay(overlay, store.fingerprint(), store.path)
    exact = given_exact(store, o)
    if exact is not None:  # a lossy store's exact array (or a population std / max |Z| derived on read) wins
        return exact
    with reading_metadata(overlay or store.path, "stats"):
        group = root["stats"] if "stats" in root else None
    state = "missing" if group is None else stat_state(group, o, store.fingerprint(), overlay or store.path)
    if state == "fresh":
        return group[o.name]
    why = {"missing": "has no", "incomplete": "has an incomplete (interrupted)",
           "stale": "has a stale (computed from other logits)"}[state]
    where = f"store {store.path}" if overlay is None else f"statistics overlay {overlay}"
    if state == "missing" and uncomputable(store, o):
        raise UserError(f"{where} has no stats/{o.name}: {uncomputable(store, o)}")
    raise UserError(f"{where} {why} stats/{o.name}; compute it with: {stats_command(store.path, o, overlay)}")


def load_stat(a, path) -> np.ndarray:
    """A per-row statistics array (or `Derived`) of the store (or overlay) at `path` read whole, as stage 3 does,
    checked as read (`read_rows`)."""
    return read_rows(a, path, slice(0, a.shape[0]))


def read_rows(a, path, rows: slice) -> np.ndarray:
    """Rows of a per-row statistics array (or `Derived`) of the store (or overlay) at `path`, checked as read:
    StoreDamage for undecodable bytes or a NaN/Inf (statistics of finite logits are finite)."""
    if isinstance(a, Derived):
        return a[rows]
    rows = slice(*rows.indices(a.shape[0]))
    with reading(path, a, rows):
        values = a[rows]
    problem = bad_values(a.path, values, 0, np.arange(rows.start, rows.stop, rows.step))
    if problem is not None:
        raise StoreDamage(f"store {path}: {problem}: the statistics are damaged; run `kdcache verify {path}`, then "
                          "recompute them (delete the array, then kdcache stats)")
    return values


def stats_command(path, o: Output, out=None) -> str:
    """The exact `kdcache stats` call that computes output `o` (into the overlay `out`, if given)."""
    flags = {"t_base": "--t-base", "std": "--std", "gamma": "--gamma", "ece_bins": "--ece-bins"}
    args = [f"{flags[k]} {number_name(v) if isinstance(v, float) else v}" for k, v in o.params.items()]
    into = ["--out", shlex.quote(str(out))] if out is not None else []
    return " ".join(["kdcache stats", shlex.quote(str(path)), *into, "--stat", o.statistic, *args])


def stat_state(group, o: Output, fingerprint: str, path) -> str:
    """'fresh' | 'missing' | 'incomplete' | 'stale' for output `o` in the stats group of the store at `path`;
    StoreDamage for damaged metadata, or a finished array of another data type than its statistic's."""
    with reading_metadata(path, f"stats/{o.name}"):
        if o.name not in group:
            return "missing"
        a = group[o.name]
    attrs = a.attrs.asdict()
    if "logits_fingerprint" not in attrs:
        return "incomplete"
    same = (attrs["logits_fingerprint"] == fingerprint and attrs.get("statistic") == o.statistic
            and attrs.get("params") == o.params)
    if same and str(a.dtype) != stat_dtype(o):
        raise StoreDamage(f"store {path}: stats/{o.name}/zarr.json says data type {a.dtype}, but {o.statistic} is "
                          f"{stat_dtype(o)}: its metadata was edited, every chunk would be misread; recompute it "
                          f"(delete stats/{o.name}, then kdcache stats) or run `kdcache verify {path}`")
    return "fresh" if same else "stale"


def stat_dtype(o: Output) -> str:
    """The data type of output `o`'s array."""
    return {"top1_correct": "bool", "class_count": "int64"}.get(o.statistic, "float32" if o.per_row else "float64")
