"""Logit encodings (kdcache.encodings, docs/FORMAT.md "Logit encodings"): round trips within their stated
bounds, a plain-zarr reader that rebuilds each encoding from FORMAT.md alone, the unbiasedness of the sampled
KD/TTM losses and their gradients, and stages 1-3 and verify on sampled stores."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
import zarr

from kdcache.config import load_config
from kdcache.encodings import (Sampled, array_specs, batch_targets, decode_logits, decode_targets,
                               dense_logits_available, encode_logits, is_lossless, logits_entry, sampled_parts)
from kdcache.errors import StoreDamage, UserError
from kdcache.losses import kd_loss, sampled_kd_loss, sampled_ttm_loss, ttm_loss, wttm_loss
from kdcache.methods import build
from kdcache.store import FORMAT_MINOR_VERSION, CacheStore
from tests.conftest import REPO, SMOKE, kdcache, write_config

K = 10
ENCODINGS = {  # cache config -> manifest entry
    "float32": {"dtype": "float32"}, "float16": {"dtype": "float16"}, "bfloat16": {"dtype": "bfloat16"},
    "topk3": {"dtype": "float16", "encoding": {"topk": 3}},
    "quantized8": {"encoding": {"quantized": 8}}, "quantized16": {"encoding": {"quantized": 16}},
    "sampled": {"encoding": {"sampled": 40, "temperature": 2.0, "seed": 7}},
}


def teacher_like(n, V, K, seed=0) -> np.ndarray:
    """float32 (n, V, K) logits with one confident class per sample, as a trained teacher gives."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, V, K)) * 2
    z[np.arange(n), :, rng.integers(0, K, n)] += 6
    return z.astype(np.float32)


def softmax64(z, T=1.0):
    z = np.asarray(z, np.float64) / T
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


# ---- the entry: config checks ---------------------------------------------------------------------------

def test_entries_and_what_they_say():
    entries = {name: logits_entry(c, K) for name, c in ENCODINGS.items()}
    assert entries["float16"] == {"dtype": "float16"}  # no storage key: stores of before keep their fingerprint
    assert entries["topk3"] == {"dtype": "float16", "storage": "topk", "k": 3}
    assert logits_entry({"dtype": "float16", "topk": 3}, K) == entries["topk3"]  # the older shorthand
    assert entries["quantized8"] == {"storage": "quantized", "bits": 8}
    assert entries["sampled"] == {"storage": "sampled", "draws": 40, "temperature": 2.0, "seed": 7}
    assert [n for n, e in entries.items() if is_lossless(e)] == ["float32", "float16"]
    assert [n for n, e in entries.items() if not dense_logits_available(e)] == ["sampled"]


@pytest.mark.parametrize("cache, message", [
    ({"dtype": "float64"}, r"cache dtype must be one of float16, float32, got 'float64' \(bfloat16 too"),
    ({"encoding": "topk"}, "cache.encoding must be dense"),
    ({"encoding": {"quantized": 8, "k": 2}}, "cache.encoding must be dense"),
    ({"encoding": {"quantized": 4}}, "must be 8 or 16"),
    ({"encoding": {"quantized": True}}, "must be 8 or 16"),
    ({"encoding": {"topk": K}}, "cache.topk must be an integer in 1..9"),
    ({"encoding": {"sampled": 0}}, "sampled must be an integer in 1..65535"),
    ({"encoding": {"sampled": 8, "temperature": 0}}, "temperature must be a number > 0"),
    ({"encoding": {"sampled": 8, "seed": -1}}, "seed must be an integer >= 0"),
    ({"encoding": {"quantized": 8}, "topk": 2}, "set one of them, not both"),
])
def test_bad_encodings_are_one_line_errors(cache, message):
    with pytest.raises(UserError, match=message) as e:
        logits_entry(cache, K)
    assert "\n" not in str(e.value)


# ---- round trips within the stated bounds -------------------------------------------------------------

def test_round_trips_within_their_bounds():
    z = teacher_like(64, 3, K)
    scale = np.maximum(1, np.abs(z).max(-1, keepdims=True))
    bounds = {"float32": 0, "float16": 2.0**-11 * scale, "bfloat16": 2.0**-8 * scale}
    for name in ("float32", "float16", "bfloat16"):
        back = decode_logits(encode_logits(z, logits_entry(ENCODINGS[name], K)), K)
        assert back.dtype == np.float32 and (np.abs(back - z) <= bounds[name]).all(), name
    for bits in (8, 16):
        parts = encode_logits(z, logits_entry({"encoding": {"quantized": bits}}, K))
        step = parts["quant_step"][..., None]
        np.testing.assert_allclose(step[..., 0], (z.max(-1) - z.min(-1)) / (2**bits - 1), rtol=1e-6)
        back = decode_logits(parts, K)
        assert (np.abs(back - z) <= step / 2 + 2.0**-20 * scale).all()
        np.testing.assert_array_equal(back.max(-1), z.max(-1))  # the max is exact (code 0)
        np.testing.assert_allclose(back.min(-1), z.min(-1), atol=1e-5)
    constant = np.ones((2, 1, K), np.float32)  # step 0: no division by zero, exact
    np.testing.assert_array_equal(decode_logits(encode_logits(constant, {"storage": "quantized", "bits": 8}), K),
                                  constant)
    with pytest.raises(UserError, match="sampled targets .* not logits"):
        decode_logits(encode_logits(z, logits_entry(ENCODINGS["sampled"], K), ids=np.arange(64)), K)


def test_sampled_rows_are_distinct_classes_with_counts_and_the_entropy():
    z = teacher_like(200, 2, K)
    entry = logits_entry(ENCODINGS["sampled"], K)
    parts = encode_logits(z, entry, ids=np.arange(200))
    ids, counts = parts["sampled_ids"].astype(np.int64), parts["sampled_counts"].astype(np.int64)
    assert ids.shape == counts.shape == (200, 2, K)  # min(draws, K) columns
    assert (counts.sum(-1) == 40).all()
    used = counts > 0
    assert (np.diff(np.where(used, ids, K + 1), axis=-1)[used[..., 1:]] > 0).all()  # distinct, ascending
    assert (ids[~used] == 0).all() and (used[..., :-1] >= used[..., 1:]).all()  # padding at the end
    p = softmax64(z, 2.0)
    np.testing.assert_allclose(parts["sampled_entropy"], -(p * np.log(p)).sum(-1), rtol=1e-6)
    # frequencies over all rows of one teacher row are its softmax (chi-square over the classes)
    same = np.repeat(z[:1, :1], 2000, axis=0)
    c = encode_logits(same, entry, ids=np.arange(2000))
    freq = np.zeros(K)
    np.add.at(freq, c["sampled_ids"].ravel().astype(int), c["sampled_counts"].ravel())
    expected = 2000 * 40 * p[0, 0]
    keep = expected > 5
    chi2 = (((freq - expected) ** 2 / expected)[keep]).sum()
    assert chi2 < keep.sum() + 5 * math.sqrt(2 * keep.sum()), chi2


def test_sampled_draws_are_keyed_by_seed_sample_and_view():
    z = np.repeat(teacher_like(1, 1, K), 4, axis=0).repeat(3, axis=1)  # one row everywhere
    entry = logits_entry(ENCODINGS["sampled"], K)
    a = sampled_parts(z, entry, np.arange(4))
    again = sampled_parts(z, entry, np.arange(4))
    for name in a:
        np.testing.assert_array_equal(a[name], again[name])  # a redone shard is identical
    rows = a["sampled_counts"].reshape(12, K)
    assert len({r.tobytes() for r in rows}) > 8  # other samples and views: other draws
    alone = sampled_parts(z[2:3], entry, np.array([2]))  # a row's draws do not depend on its neighbours
    np.testing.assert_array_equal(alone["sampled_counts"][0], a["sampled_counts"][2])
    other = sampled_parts(z, dict(entry, seed=8), np.arange(4))
    assert not np.array_equal(other["sampled_counts"], a["sampled_counts"])


# ---- unbiased losses ------------------------------------------------------------------------------------

def replicated_draws(z_t, T, draws, reps):
    """`reps` independent draw sets of each teacher row (distinct sample ids), as Sampled (reps * B rows)."""
    B = len(z_t)
    entry = {"storage": "sampled", "draws": draws, "temperature": T, "seed": 3}
    parts = sampled_parts(np.tile(z_t, (reps, 1))[:, None, :], entry, np.arange(reps * B))
    return batch_targets({k: v[:, 0] for k, v in parts.items()}, entry)


@pytest.mark.parametrize("loss", ["kd", "ttm", "wttm"])
def test_sampled_loss_and_gradient_are_unbiased(loss):
    """Mean over 2000 independent draw sets of the sampled batch loss (and of its gradient in z_s) equals the
    full loss (gradient) within 3 standard errors."""
    reps, B, T = 2000, 4, 4.0
    g = torch.Generator().manual_seed(0)
    z_t = torch.from_numpy(teacher_like(B, 1, K, seed=1)[:, 0]).double()
    z_s = torch.randn(B, K, generator=g, dtype=torch.float64) * 2
    u = torch.rand(B, generator=g, dtype=torch.float64) + 0.5  # WTTM's per-row U_gamma
    s = replicated_draws(z_t.numpy(), T, draws=8, reps=reps)
    full_fn = {"kd": lambda z: kd_loss(z, z_t, T), "ttm": lambda z: ttm_loss(z, z_t, 1 / T),
               "wttm": lambda z: wttm_loss(z, z_t, 1 / T, u)}[loss]
    losses, grads = [], []
    for r in range(reps):  # replicate r: rows r*B .. (r+1)*B - 1
        z = z_s.clone().requires_grad_(True)
        at = slice(r * B, (r + 1) * B)
        if loss == "kd":
            value = sampled_kd_loss(z, s.ids[at], s.counts[at], s.entropy[at], T)
        else:
            value = sampled_ttm_loss(z, s.ids[at], s.counts[at], s.entropy[at], u if loss == "wttm" else None)
        value.backward()
        losses.append(value.detach())
        grads.append(z.grad)
    z = z_s.clone().requires_grad_(True)
    full = full_fn(z)
    full.backward()
    for samples, target in ((torch.stack(losses), full.detach()), (torch.stack(grads), z.grad)):
        mean, se = samples.mean(0), samples.std(0) / math.sqrt(reps)
        assert (torch.abs(mean - target) <= 3 * se + 1e-12).all(), (mean, target, se)
        assert (se > 0).any()  # the draws do vary: the test can fail


def test_sampled_loss_matches_the_formula_on_one_row():
    """-H(p) - (1/draws) sum_j counts_j log q_ids_j, q = softmax(z_s / T), times T^2 for KD."""
    ids, counts = torch.tensor([[1, 3, 0]]), torch.tensor([[5.0, 3.0, 0.0]])
    entropy, z_s, T = torch.tensor([0.7]), torch.tensor([[0.5, -1.0, 2.0, 0.1]]), 2.0
    log_q = torch.log_softmax(z_s / T, -1)[0]
    want = T**2 * (-0.7 - (5 * log_q[1] + 3 * log_q[3]) / 8)
    torch.testing.assert_close(sampled_kd_loss(z_s, ids, counts, entropy, T), want)


# ---- methods on sampled targets -----------------------------------------------------------------------

def test_methods_take_sampled_targets_or_refuse_in_one_line():
    z_s = torch.randn(6, K)
    s = replicated_draws(teacher_like(6, 1, K)[:, 0], 4.0, draws=16, reps=1)
    assert isinstance(s, Sampled) and s.to("cpu").ids.dtype == torch.int64
    torch.testing.assert_close(build("kd", {"T": 4.0}).loss(z_s, s, None, {}, 1),
                               sampled_kd_loss(z_s, s.ids, s.counts, s.entropy, 4.0))
    torch.testing.assert_close(build("ttm", {"gamma": 0.25}).loss(z_s, s, None, {}, 1),
                               sampled_ttm_loss(z_s, s.ids, s.counts, s.entropy))
    u = torch.rand(6) + 1
    torch.testing.assert_close(build("wttm", {"gamma": 0.25}).loss(z_s, s, None, {"power_sum": u}, 1),
                               sampled_ttm_loss(z_s, s.ids, s.counts, s.entropy, u))
    refused = [("kd", {"T": 2.0}, "with T: 2"), ("kd", {"T": 4.0, "standardize": True}, "needs all K"),
               ("ttm", {"gamma": 0.1}, "with gamma: 0.1"), ("dkd", {}, "needs all K"), ("mlt", {}, "needs all K")]
    for method, params, message in refused:
        with pytest.raises(UserError, match=message) as e:
            build(method, params).loss(z_s, s, torch.zeros(6, dtype=torch.long), {}, 1)
        assert "\n" not in str(e.value) and "kd with T: 4" in str(e.value) and "gamma: 0.25" in str(e.value)
    with pytest.raises(UserError, match="power sum"):
        build("wttm", {"gamma": 0.25}).loss(z_s, s, None, {}, 1)


# ---- stores of every encoding, read back by plain zarr + numpy from FORMAT.md alone ----------------------

def write_store(path, name, z, ids=None):
    """A complete store of `z` (n, V, K) in encoding `name`, written as stage 1 writes (kdcache code)."""
    n, V, _ = z.shape
    entry = logits_entry(ENCODINGS[name], K)
    store = CacheStore.create(path, {"test": "encodings", "logits": entry}, num_samples=n, num_views=V,
                              num_classes=K, num_params=1, samples_per_chunk=8, chunks_per_shard=2)
    parts = encode_logits(z, entry, ids=np.arange(n) if ids is None else ids)
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        store.write_shard(shard, {k: v[rows] for k, v in parts.items()}, np.zeros((rows.stop - rows.start, V, 1),
                          np.int32), np.zeros(rows.stop - rows.start, np.int32))
    store.mark_complete_if_done()
    return store


def plain_mix(x):
    """splitmix64's finaliser, as FORMAT.md writes it (uint64, wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def plain_read(path):
    """What FORMAT.md says a store holds, read with zarr + numpy only: (entry, float32 logits or None,
    the raw arrays)."""
    g = zarr.open_group(str(path), mode="r")
    assert g.attrs["format_version"] == 1 and g.attrs["format_minor_version"] >= 2
    entry = g.attrs["manifest"]["logits"]
    storage = entry.get("storage", "dense")
    a = {name: g[name][...] for name in g.array_keys()}
    if storage == "dense":
        z = a["logits"]
        if entry["dtype"] == "bfloat16":
            assert z.dtype == np.uint16
            z = (z.astype(np.uint32) << 16).view(np.float32)
        return entry, z.astype(np.float32), a
    if storage == "quantized":
        return entry, a["quant_max"][..., None] - a["quant_codes"].astype(np.float32) * a["quant_step"][..., None], a
    if storage == "topk":
        K_ = g["topk_indices"].attrs["num_classes"]
        v, i = a["topk_values"].astype(np.float64), a["topk_indices"].astype(int)
        lm = a["rest_logmass"].astype(np.float64)
        lse_top = np.log(np.exp(v).sum(-1))
        L = lse_top - np.log1p(-np.exp(lm))
        z = np.repeat((L + lm - np.log(K_ - v.shape[-1]))[..., None], K_, axis=-1)
        np.put_along_axis(z, i, v, -1)
        return entry, z, a
    assert storage == "sampled"
    return entry, None, a


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_plain_zarr_reads_every_encoding_as_documented(name, tmp_path):
    z = teacher_like(40, 3, K)
    store = write_store(tmp_path / "s.zarr", name, z)
    assert store.minor_version == FORMAT_MINOR_VERSION == 3
    entry, got, a = plain_read(tmp_path / "s.zarr")
    specs = array_specs(entry, K)
    for array, (dtype, tail, _) in specs.items():  # the arrays, dtypes and shapes FORMAT.md lists
        assert a[array].dtype == np.dtype(dtype) and a[array].shape == (40, 3, *tail)
    assert set(json.loads((tmp_path / "s.zarr" / "chunk_crc32c" / "zarr.json").read_text())["attributes"]["arrays"]) \
        == {*specs, "views", "labels"}  # the digests cover the encoding's arrays
    if name == "topk3":
        p, q = softmax64(z.astype(np.float16)), softmax64(got)  # the stored values; the rest mass is float32's
        top = np.argsort(-z, -1)[..., :3]
        np.testing.assert_allclose(np.take_along_axis(q, top, -1), np.take_along_axis(p, top, -1), rtol=1e-3)
        np.testing.assert_allclose(got, decode_logits({k: a[k] for k in specs}, K), atol=1e-5)  # float32 there
    elif got is not None:
        np.testing.assert_allclose(got, decode_logits({k: a[k] for k in specs}, K), rtol=0, atol=0)
        tol = {"float32": 0, "float16": 2.0**-11, "bfloat16": 2.0**-8}.get(name)
        bound = (a["quant_step"][..., None] / 2 + 1e-5) if tol is None else tol * np.maximum(1, np.abs(z))
        assert (np.abs(got - z) <= bound).all()
    else:  # sampled: re-draw from the documented counter-based uniforms and compare the counts
        T, D = entry["temperature"], entry["draws"]
        p = softmax64(z, T)
        np.testing.assert_allclose(a["sampled_entropy"], -(p * np.log(p)).sum(-1), rtol=1e-6)
        G = np.uint64(0x9E3779B97F4A7C15)
        with np.errstate(over="ignore"):
            for i, v in [(0, 0), (17, 2), (39, 1)]:
                h = plain_mix(np.uint64(entry["seed"]) + G)
                h = plain_mix(plain_mix(h ^ np.uint64(i)) ^ np.uint64(v))
                u = (plain_mix(h + np.arange(1, D + 1, dtype=np.uint64) * G) >> np.uint64(11)) * 2.0**-53
                cdf = np.cumsum(p[i, v])
                classes = np.minimum(np.searchsorted(cdf / cdf[-1], u, side="right"), K - 1)
                want = np.bincount(classes, minlength=K)
                have = np.zeros(K, int)
                np.add.at(have, a["sampled_ids"][i, v].astype(int), a["sampled_counts"][i, v])  # pads: class 0
                np.testing.assert_array_equal(have, want)


def edit_manifest(path, **logits):
    """Change the manifest's logits entry and re-hash it, as a newer kdcache would have written it."""
    doc = json.loads((path / "zarr.json").read_text())
    m = doc["attributes"]["manifest"]
    m["logits"] = {**m["logits"], **logits}
    doc["attributes"]["manifest_sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
    (path / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("change, message", [({"storage": "delta"}, "logits.storage 'delta'"),
                                             ({"dtype": "float8"}, "logits.dtype 'float8'")])
def test_an_unknown_encoding_is_refused_as_newer(tmp_path, change, message):
    write_store(tmp_path / "s.zarr", "float16", teacher_like(16, 1, K))
    edit_manifest(tmp_path / "s.zarr", **change)
    with pytest.raises(UserError, match=f"{message}, an encoding written by a newer kdcache: upgrade") as e:
        CacheStore.open(tmp_path / "s.zarr")
    assert not isinstance(e.value, StoreDamage)
    result = kdcache("info", tmp_path / "s.zarr")
    _, err = result.communicate(timeout=120)
    assert result.returncode == 1 and "written by a newer kdcache: upgrade" in err
    assert len(err.strip().splitlines()) == 1


def test_edited_dtype_and_rows_of_new_arrays_are_damage(tmp_path):
    store = write_store(tmp_path / "s.zarr", "sampled", teacher_like(16, 2, K))
    edit_manifest(tmp_path / "s.zarr", draws="many")
    with pytest.raises(StoreDamage, match="invalid parameters"):
        CacheStore.open(tmp_path / "s.zarr")
    store = write_store(tmp_path / "t.zarr", "quantized8", teacher_like(16, 2, K))
    meta = tmp_path / "t.zarr" / "quant_codes" / "zarr.json"
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**doc, "data_type": "int8"}))
    with pytest.raises(StoreDamage, match="quant_codes/zarr.json says data type int8, but the format .* uint8"):
        CacheStore.open(tmp_path / "t.zarr")
    meta.write_text(json.dumps(doc))
    zarr.open_group(str(tmp_path / "t.zarr"), mode="r+")["quant_codes"][3, 1, 0] += 1  # bypassing the digests
    store = CacheStore.open(tmp_path / "t.zarr")
    with pytest.raises(StoreDamage, match="quant_codes samples 0..7 are not the rows written there"):
        store.read_rows("quant_codes", slice(0, 16), store.recorded_digests())


# ---- stages 1-3 and verify on encoded stores ----------------------------------------------------------

@pytest.fixture(scope="module")
def sampled_cfg(tmp_path_factory, teacher_ckpt):
    """The smoke train config (128 samples x 18 views, K = 4) with a store of 64 draws per row at T_s = 10 (so
    KD at T 10 and TTM/WTTM at gamma 0.1, the smoke config's stage-1 gamma, train on it)."""
    from kdcache.stages.cache_teacher import cache_teacher
    tmp = tmp_path_factory.mktemp("sampled")
    cfg = load_config(REPO / "configs" / "smoke" / "train.yaml", {
        "teacher": {"checkpoint": str(teacher_ckpt)},
        "cache": {"store": str(tmp / "sampled.zarr"), "encoding": {"sampled": 64, "temperature": 10.0}},
        "train": {"out": str(tmp / "run"), "params": {"T": 10.0}}})
    cache_teacher(cfg, progress=False)
    return cfg


@pytest.mark.slow
def test_sampled_store_trains_end_to_end_with_kdcache_train(sampled_cfg, tmp_path):
    store = CacheStore.open(sampled_cfg["cache"]["store"])
    assert store.manifest["logits"] == {"storage": "sampled", "draws": 64, "temperature": 10.0, "seed": 0}
    assert store.num_classes == 4 and set(store.logit_arrays) == {"sampled_ids", "sampled_counts", "sampled_entropy"}
    config = write_config(sampled_cfg, tmp_path / "kd.yaml")
    for extra in ([], ["--set", "train.memory_gb=0"]):  # targets in memory, and Zarr blocks
        out = tmp_path / f"run{len(extra)}"
        p = kdcache("train", "--config", config, "--set", f"train.out={out}", *extra)
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        result = json.loads((out / "result.json").read_text())
        assert 0 <= result["last_accuracy"] <= 1 and result["store"] == sampled_cfg["cache"]["store"]
    p = kdcache("train", "--config", config, "--set", f"train.out={tmp_path / 'dkd'}", "--set", "train.method=dkd",
                "--set", "train.params={}")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "method 'dkd' needs all K teacher logits" in err and "kd with T: 10" in err and "gamma: 0.1" in err


def test_ttm_and_wttm_train_on_a_sampled_store(sampled_cfg, tmp_path):
    from kdcache.stages.train_student import train_student
    for method in ("ttm", "wttm"):
        cfg = json.loads(json.dumps(sampled_cfg))
        cfg["train"].update(method=method, params={"gamma": 0.1}, out=str(tmp_path / method))
        steps = []
        train_student(cfg, progress=False, on_step=steps.append)
        assert steps and all(math.isfinite(s["kd"]) for s in steps)


def test_targets_of_a_sampled_store_are_its_rows(sampled_cfg):
    from kdcache.targets import MemoryTargets, ZarrTargets
    store = CacheStore.open(sampled_cfg["cache"]["store"])
    rows, views = np.arange(0, 128, 5), np.arange(0, 128, 5) % 18
    want = {n: a[...][rows, views] for n, a in store.logit_arrays.items()}
    for source in (MemoryTargets(store, {}), ZarrTargets(store, {}, 2)):
        b = source.read(rows, views)
        for n in want:
            np.testing.assert_array_equal(b[n], want[n])
        s = batch_targets(b, store.entry)
        assert isinstance(s, Sampled) and s.temperature == 10.0 and (s.counts.sum(1) == 64).all()
    assert decode_targets({"logits": np.zeros((2, 4), np.float16)}, 4)["logits"].dtype == np.float32


@pytest.mark.parametrize("encoding", [{"sampled": 16, "temperature": 2.0}, {"quantized": 8}, "dense"])
def test_verify_and_info_on_encoded_stores(teacher_ckpt, tmp_path, encoding):
    from kdcache.stages.cache_teacher import cache_teacher
    from kdcache.verify import CorruptStore, format_info, store_info, verify_store
    path = tmp_path / "s.zarr"
    cfg = load_config(SMOKE, {"teacher": {"checkpoint": str(teacher_ckpt)}, "dataset": {"subset": 32},
                              "cache": {"store": str(path), "encoding": encoding, "samples_per_chunk": 16,
                                        "dtype": "bfloat16" if encoding == "dense" else "float16"}})
    cache_teacher(cfg, progress=False)
    summary = verify_store(path, spot_check=6, checkpoint=teacher_ckpt, progress=False)
    assert summary.startswith("OK") and "spot check: " in summary
    info = format_info(store_info(path))
    assert {"dense": "dense bfloat16 logits", "sampled": "sampled targets: 16 draws per row at temperature 2",
            "quantized": "logits quantized to 8 bits"}[next(iter(encoding)) if isinstance(encoding, dict)
                                                         else encoding] in info
    if isinstance(encoding, dict) and "sampled" in encoding:  # an encoding's own rule: counts add up to the draws
        counts = zarr.open_group(str(path), mode="r+")["sampled_counts"]
        row = counts[5, 1]
        row[0] += 1
        counts[5, 1] = row
        with pytest.raises(CorruptStore, match="sampled_counts at sample 5, view 1 holds counts that do not add up"):
            verify_store(path, progress=False)
