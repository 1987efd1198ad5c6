"""Top-k stores (cache.topk): the reconstruction against float64 references, and stages 1-3 on a top-k store
against a full store of the same teacher."""
import json
import shutil

import numpy as np
import pytest
import torch

from kdcache.config import load_config
from kdcache.errors import UserError
from kdcache.encodings import decode_logits, topk_compress, topk_index_dtype, topk_logits, topk_parts
from kdcache.methods import build, distill_loss
from kdcache.store import CacheStore
from kdcache.stages.cache_teacher import cache_teacher
from kdcache.stages.compute_stats import compute_stats
from kdcache.dataset import cached_stats
from kdcache.stages.train_student import train_student
from kdcache.targets import MemoryTargets, ZarrTargets
from tests.conftest import REPO

K = 4  # the smoke teacher's classes


def reference(z: np.ndarray, k: int):
    """float64 NumPy: the teacher's probabilities, the top-k classes, and the reconstructed distribution
    (exact on the top k, the rest mass spread uniformly) written directly from the definition."""
    z = z.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    in_top = np.zeros(z.shape, bool)
    np.put_along_axis(in_top, top, True, -1)
    rest = np.where(in_top, 0, p).sum(-1, keepdims=True)
    q = np.where(in_top, p, rest / (z.shape[-1] - k))
    return p, top, q


# ---- the reconstruction -------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 30, 49])  # 49 = K-1: the one rest class gets its exact mass
def test_reconstruction_matches_the_float64_definition(k):
    z = np.random.default_rng(k).standard_normal((64, 50)) * 3
    z[:, 7] += 5  # a confident class, as a trained teacher has
    p, top, q = reference(z, k)
    values, indices, rest = topk_compress(torch.from_numpy(z), k)
    assert np.array_equal(indices.numpy(), top) and np.array_equal(values.numpy(), np.take_along_axis(z, top, -1))
    assert np.all(np.diff(values.numpy(), axis=-1) <= 0)  # sorted descending
    rest_mass = np.array([np.delete(p[i], top[i]).sum() for i in range(len(p))])
    np.testing.assert_allclose(rest.exp().numpy(), rest_mass, rtol=1e-12)
    r = topk_logits(values, indices, rest, 50)
    got = torch.softmax(r, -1).numpy()
    np.testing.assert_allclose(np.take_along_axis(got, top, -1), np.take_along_axis(p, top, -1), rtol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1, rtol=1e-12)
    np.testing.assert_allclose(got, q, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(np.take_along_axis(r.numpy(), top, -1), np.take_along_axis(z, top, -1))
    np.testing.assert_allclose(torch.logsumexp(r, -1).numpy(), np.log(np.exp(z).sum(-1)), rtol=1e-12)
    assert np.array_equal(r.argmax(-1).numpy(), z.argmax(-1))
    # KL(full || reconstructed) from the pieces: only the rest classes contribute
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    log_p = torch.log_softmax(torch.from_numpy(z), -1)
    np.testing.assert_allclose((log_p.exp() * (log_p - torch.log_softmax(r, -1))).sum(-1).numpy(), kl,
                               rtol=1e-9, atol=1e-14)
    if k == 49:
        np.testing.assert_allclose(kl, 0, atol=1e-13)


def test_k_equal_to_K_round_trips_exactly():
    z = torch.randn(8, 10, dtype=torch.float64)
    values, indices, rest = topk_compress(z, 10)
    assert torch.isinf(rest).all() and (rest < 0).all()
    assert torch.equal(topk_logits(values, indices, rest, 10), z)


def test_extreme_masses_stay_finite():
    """A rest mass of exp(-1000) (far below float32's range) and a top-k mass that rounds away in float32."""
    z = torch.zeros(2, 1000)
    z[0, 3] = 1000.0  # rest mass ~ 999 * exp(-1000)
    values, indices, rest = topk_compress(z, 1)
    assert rest.dtype == torch.float32 and torch.isfinite(rest).all()
    assert abs(rest[0].item() - (-1000 + np.log(999))) < 1e-3
    np.testing.assert_allclose(rest[1].item(), np.log(999 / 1000), rtol=1e-6)
    r = topk_logits(values, indices, rest, 1000)
    assert torch.isfinite(r).all() and r[0].argmax() == 3
    np.testing.assert_allclose(torch.softmax(r.double(), -1)[1].numpy(), 1 / 1000, rtol=1e-5)
    flat = topk_logits(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1), 70000)
    assert torch.isfinite(flat).all()  # rest_logmass 0: the clamp keeps log(1 - m) finite


def test_index_dtype_and_a_70000_class_round_trip():
    assert topk_index_dtype(65536) == "uint16" and topk_index_dtype(65537) == "uint32"
    z = np.random.default_rng(0).standard_normal((3, 2, 70000)).astype(np.float32)
    z[..., 69999] += 20  # the top class needs more than 16 bits
    parts = topk_parts(z, 5, "float16", rows_per_step=4)
    assert parts["topk_indices"].dtype == np.uint32 and parts["topk_values"].dtype == np.float16
    assert (parts["topk_indices"][..., 0] == 69999).all()
    got = decode_logits(parts, 70000)
    assert got.shape == (3, 2, 70000) and got.dtype == np.float32
    p, top, q = reference(z.reshape(6, -1), 5)
    np.testing.assert_array_equal(np.take_along_axis(got.reshape(6, -1), top, -1),
                                  np.take_along_axis(z.reshape(6, -1), top, -1).astype(np.float16))
    got_p = torch.softmax(torch.from_numpy(got.reshape(6, -1)).double(), -1).numpy()
    np.testing.assert_allclose(got_p, q, rtol=1e-2)  # values stored in float16


# ---- stores: stage 1 writes them, stages 2 and 3 read them --------------------------------------

@pytest.fixture(scope="module")
def stores(tmp_path_factory, teacher_ckpt):
    """From the smoke train config, in float32: the full store, top-k stores with k = 2 and k = 3 (= K-1),
    and a copy of the full store whose logits were replaced by their k = 2 reconstruction."""
    tmp = tmp_path_factory.mktemp("topk")

    def build(name, topk):
        cfg = load_config(REPO / "configs" / "smoke" / "train.yaml", {
            "teacher": {"checkpoint": str(teacher_ckpt)},
            "cache": {"store": str(tmp / f"{name}.zarr"), "dtype": "float32", "topk": topk},
            "stats": {"statistics": ["mlt_temperature", "wttm_power_sum", "entropy", "class_mean_softmax"]}})
        cache_teacher(cfg, progress=False)
        return cfg

    cfgs = {"full": build("full", None), "top2": build("top2", 2), "top3": build("top3", 3)}
    shutil.copytree(tmp / "full.zarr", tmp / "rebuilt.zarr")
    rebuilt = CacheStore.open(tmp / "rebuilt.zarr", mode="r+")
    for shard in range(rebuilt.num_shards):  # rewritten as stage 1 writes: the rows, their digests, the record
        rows = rebuilt.shard_rows(shard)
        rebuilt.write_shard(shard, decode_logits(topk_parts(rebuilt.logits[rows], 2, "float32"), K),
                            rebuilt.views[rows], rebuilt.labels[rows])
    cfgs["rebuilt"] = json.loads(json.dumps(cfgs["full"]))
    cfgs["rebuilt"]["cache"]["store"] = str(tmp / "rebuilt.zarr")
    for cfg in cfgs.values():
        compute_stats(cfg["cache"]["store"], cfg["stats"], progress=False)
    return cfgs


def open_(cfg):
    return CacheStore.open(cfg["cache"]["store"])


def test_stage1_writes_the_topk_arrays_of_the_teachers_logits(stores):
    full, top = open_(stores["full"]), open_(stores["top2"])
    assert top.logits is None and set(top.logit_arrays) == {"topk_values", "topk_indices", "rest_logmass"}
    assert top.num_classes == full.num_classes == K
    assert top.logits_shape == full.logits_shape == full.logits.shape
    assert top.manifest["logits"] == {"dtype": "float32", "storage": "topk", "k": 2}
    assert full.manifest["logits"] == {"dtype": "float32"}  # full stores keep their old manifest entry
    assert top.fingerprint() != full.fingerprint()
    a = top.logit_arrays
    assert (a["topk_values"].dtype, a["topk_indices"].dtype, a["rest_logmass"].dtype) == ("float32", "uint16",
                                                                                      "float32")
    assert a["topk_values"].chunks[0] == full.logits.chunks[0] and a["rest_logmass"].shards == full.logits.shards[:2]
    z = full.logits[...]
    p, top_classes, _ = reference(z, 2)
    assert np.array_equal(a["topk_indices"][...], top_classes)
    np.testing.assert_array_equal(a["topk_values"][...], np.take_along_axis(z, top_classes, -1))
    got = torch.softmax(torch.from_numpy(decode_logits({n: x[...] for n, x in a.items()}, K)).double(), -1).numpy()
    np.testing.assert_allclose(np.take_along_axis(got, top_classes, -1), np.take_along_axis(p, top_classes, -1),
                               rtol=1e-5)


@pytest.mark.parametrize("topk, message", [(4, "1..3"), (0, "1..3"), ("2", "1..3"), (True, "1..3")])
def test_refuses_a_k_out_of_range(smoke_cfg, topk, message):
    smoke_cfg["cache"]["topk"] = topk
    with pytest.raises(UserError, match=message):
        cache_teacher(smoke_cfg, progress=False)


def test_a_topk_store_never_matches_a_full_config(stores):
    cfg = json.loads(json.dumps(stores["top2"]))
    cfg["cache"]["topk"] = None
    with pytest.raises(UserError, match="different manifest .*logits.k"):
        cache_teacher(cfg, progress=False)


def test_stage2_on_a_topk_store_gives_the_exact_statistics(stores):
    """A top-k store is lossy, so stage 1 wrote exact per-row statistics from the float32 logits: a statistic
    marked exact (the temperatures and power sums the methods read, at least) equals the full store's; the others
    (class_mean_softmax) are the reconstruction's."""
    top, full, rebuilt = open_(stores["top2"]), open_(stores["full"]), open_(stores["rebuilt"])
    names = sorted(full.group["stats"].array_keys())
    assert len(names) == 4 and set(names) <= set(top.group["stats"].array_keys())
    exact = {name for name in names if top.group["stats"][name].attrs.get("exact")}
    assert {"mlt_temperature_unbiased", "wttm_power_sum_gamma0.1"} <= exact
    for name in names:
        want = (full if name in exact else rebuilt).group["stats"][name][...]
        np.testing.assert_allclose(top.group["stats"][name][...], want, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("method, params", [("kd", {}), ("kd", {"standardize": True}), ("ttm", {}), ("wttm", {}),
                                            ("mlt", {}), ("dkd", {"warmup": 0})])
def test_stage3_targets_and_losses_equal_those_of_the_reconstruction(stores, method, params):
    """Memory and Zarr-block targets of the top-k store are the reconstruction of the full store's logits,
    and every method's loss (with the store's statistics) is the loss on that reconstruction."""
    top, rebuilt = open_(stores["top2"]), open_(stores["rebuilt"])
    rows = np.arange(0, 128, 3)
    views = np.random.default_rng(0).integers(0, 18, rows.size)
    want = rebuilt.logits[...][rows, views]
    z_s = torch.randn(rows.size, K, generator=torch.Generator().manual_seed(1))
    y = torch.from_numpy(top.labels[...][rows]).long()
    for store in (top, rebuilt):  # the same loss from the top-k sources as from the rebuilt full store
        stats = cached_stats(store, build(method, params))
        for source in (MemoryTargets(store, stats), ZarrTargets(store, stats, 2)):
            b = source.read(rows, views)
            np.testing.assert_allclose(b["logits"], want, rtol=1e-6)
            row_stats = {k: torch.from_numpy(b[k]) for k in source.stat_names}  # top-k: stage 1's exact ones
            loss = distill_loss(method, z_s, torch.from_numpy(b["logits"]), y, params=params, epoch=1, stats=row_stats)
            expected = distill_loss(method, z_s, torch.from_numpy(want), y, params=params, epoch=1, stats=row_stats)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def steps_of(cfg, tmp_path, name, **train):
    c = json.loads(json.dumps(cfg))
    c["train"].update(out=str(tmp_path / name), **train)
    steps = []
    train_student(c, progress=False, on_step=steps.append)
    return np.array([s["kd"] for s in steps])


def test_training_on_a_topk_store_equals_training_on_the_reconstruction(stores, tmp_path):
    top = steps_of(stores["top2"], tmp_path, "top", memory_gb=0)  # Zarr blocks
    np.testing.assert_allclose(top, steps_of(stores["rebuilt"], tmp_path, "rebuilt", memory_gb=0), rtol=1e-5)


def test_k_of_K_minus_1_trains_like_the_full_store(stores, tmp_path):
    """One rest class gets exactly its own mass, so k = K-1 loses nothing but float rounding."""
    np.testing.assert_allclose(steps_of(stores["top3"], tmp_path, "top3"), steps_of(stores["full"], tmp_path, "full"),
                               rtol=1e-4)


def test_cli_reports_a_topk_store(stores, tmp_path):
    from click.testing import CliRunner

    from kdcache.stages.cli import cli
    from tests.conftest import write_config
    config = write_config(stores["top2"], tmp_path / "top2.yaml")
    result = CliRunner().invoke(cli, ["cache-teacher", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "logits (128, 18, 4) as top-2 of the logits (float32 values)" in result.output
