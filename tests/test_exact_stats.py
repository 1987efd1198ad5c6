"""Exact statistics of lossy stores: stage 1 writes the per-row statistics from the teacher's float32 logits, stage 2
derives the temperatures from them, stage 3 reads them; a top-k, a quantized and a sampled store then give the
statistics of the dense store of the same teacher, which the decoded logits do not."""
import json
import shutil

import numpy as np
import pytest
import zarr

from kdcache.config import load_config
from kdcache.dataset import cached_stats
from kdcache.encodings import decode_logits
from kdcache.errors import StoreDamage, UserError
from kdcache.methods import build
from kdcache.stats import (STAGE1, Derived, block_statistics, check_settings, create_array, derivation, exact_outputs,
                           output, plan_outputs, read_stat, seal_exact)
from kdcache.stages.cache_teacher import cache_teacher
from kdcache.stages.compute_stats import compute_stats, plot_stats
from kdcache.stages.train_student import train_student
from kdcache.store import CacheStore
from kdcache.targets import MemoryTargets, ZarrTargets
from tests.conftest import REPO, kdcache, write_config
from tests.test_stats import reference, warnings_of_kdcache

STATS = {"statistics": "all", "gammas": [0.1, 0.3]}
ENCODINGS = {"dense": "dense", "top2": {"topk": 2}, "q8": {"quantized": 8},
             "sampled": {"sampled": 8, "temperature": 1.0}}
# what the methods read and what they are made of, by (statistic, params)
COMPARED = [("ls_temperature", {"t_base": 2.0, "std": "unbiased"}), ("mlt_temperature", {"std": "unbiased"}),
            ("wttm_power_sum", {"gamma": 0.1}), ("wttm_power_sum", {"gamma": 0.3}), ("std", {"std": "unbiased"}),
            ("std", {"std": "population"}), ("max_abs_zscore", {"std": "population"}), ("mean", {}), ("max", {}),
            ("min", {}), ("logsumexp", {}), ("entropy", {}), ("max_abs_zscore", {"std": "unbiased"}),
            ("ls_temperature", {"t_base": 2.0, "std": "population"}), ("mlt_temperature", {"std": "population"})]
POPULATION = ["std_population", "max_abs_zscore_population"]  # derived from the unbiased ones, not written


def config(teacher_ckpt, path, encoding, **stats):
    """The smoke train config (128 samples x 18 views, K = 4) in float32, stage-2 settings `STATS` + `stats`."""
    return load_config(REPO / "configs" / "smoke" / "train.yaml", {
        "teacher": {"checkpoint": str(teacher_ckpt)},
        "cache": {"store": str(path), "dtype": "float32", "encoding": encoding}, "stats": {**STATS, **stats}})


@pytest.fixture(scope="module")
def stores(tmp_path_factory, teacher_ckpt):
    """One teacher cached dense, top-2, quantized to 8 bits and sampled (8 draws), each with stages 1 and 2 run
    (both std conventions)."""
    tmp = tmp_path_factory.mktemp("exact")
    cfgs = {}
    for name, encoding in ENCODINGS.items():
        cfgs[name] = config(teacher_ckpt, tmp / f"{name}.zarr", encoding)
        cache_teacher(cfgs[name], progress=False)
        for std in ("unbiased", "population"):
            compute_stats(cfgs[name]["cache"]["store"], dict(cfgs[name]["stats"], std=std), progress=False)
    return cfgs


def open_(cfg):
    return CacheStore.open(cfg["cache"]["store"])


@pytest.mark.parametrize("name", ["top2", "q8", "sampled"])
def test_a_lossy_store_gives_the_dense_stores_temperatures_and_power_sums(stores, name):
    dense, lossy = open_(stores["dense"]), open_(stores[name])
    z = dense.logits[...].astype(np.float64)  # the teacher's float32 logits
    n, v, k = z.shape
    for std in ("unbiased", "population"):
        formulas, _ = reference(z.reshape(n * v, k), np.repeat(dense.labels[...], v), t_base=2.0, gammas=[0.1, 0.3],
                                std=std, bins=15)
        for stat, params in COMPARED:
            if params.get("std", std) != std:
                continue
            a = read_stat(lossy, stat, **params)
            assert a.attrs["exact"] is True, a.path
            np.testing.assert_allclose(a[...], read_stat(dense, stat, **params)[...], rtol=1e-6, err_msg=a.path)
            np.testing.assert_allclose(a[...].reshape(-1), formulas[a.basename], rtol=1e-4, atol=1e-5, err_msg=a.path)


def test_decoded_topk_logits_give_other_temperatures(stores):
    """What the exact arrays correct: stage 2 on the top-2 store's decoded logits is far off (hence the test above
    could fail), while what the decoded logits keep (max, logsumexp) is the same."""
    top = open_(stores["top2"])
    logits = decode_logits({n: a[...] for n, a in top.logit_arrays.items()}, top.num_classes)
    outs = [output("ls_temperature", t_base=2.0, std="unbiased"), output("mlt_temperature", std="unbiased"),
            output("max"), output("logsumexp")]
    decoded = block_statistics(logits, top.labels[...], outs, 15)[0]
    error = {o.statistic: np.abs(decoded[..., j] / read_stat(top, o.statistic, **o.params)[...] - 1).max()
             for j, o in enumerate(outs)}
    assert error["ls_temperature"] > 0.05 and error["mlt_temperature"] > 0.05, error
    assert error["max"] < 1e-6 and error["logsumexp"] < 1e-6, error


def test_what_each_stage_writes_and_records(stores):
    dense, top = open_(stores["dense"]), open_(stores["top2"])
    assert all("exact" not in a.attrs for _, a in dense.group["stats"].arrays())  # lossless: as before
    s = top.group["stats"]
    for o in exact_outputs(check_settings(stores["top2"]["stats"])):  # stage 1: a chunk per shard, sealed
        a = s[o.name]
        assert a.attrs["exact"] is True and a.attrs["source"] == STAGE1, o.name
        assert a.attrs["logits_fingerprint"] == top.fingerprint() and a.chunks == (top.samples_per_shard, 18)
    assert s["ls_temperature_t2_unbiased"].attrs["source"] == "stage 2, 2.0 x stats/std_unbiased (exact)"
    assert s["mlt_temperature_unbiased"].attrs["source"] == (
        "stage 2, 1.3660254037844386 x (max(stats/max - stats/mean, stats/mean - stats/min) / "
        "(stats/std_unbiased + 1e-07)) (exact)")
    # stage 1 writes std and max |Z| unbiased only; stage 2 (run with std: population too) derives the population
    # temperatures through the population std and max |Z|, which stay unwritten: readers derive them
    assert [o.name for o in exact_outputs(check_settings(stores["top2"]["stats"]))] == [
        "mean", "std_unbiased", "max", "min", "logsumexp", "entropy", "wttm_power_sum_gamma0.1",
        "wttm_power_sum_gamma0.3"]
    assert not set(POPULATION) & set(s.array_keys())
    assert s["ls_temperature_t2_population"].attrs["source"] == \
        "stage 2, 2.0 x (sqrt(3/4) x stats/std_unbiased) (exact)"
    assert s["mlt_temperature_population"].attrs["source"] == (
        "stage 2, 1.3660254037844386 x (max(stats/max - stats/mean, stats/mean - stats/min) / "
        "((sqrt(3/4) x stats/std_unbiased) + 1e-07)) (exact)")
    a = read_stat(top, "std", std="population")
    assert isinstance(a, Derived) and a.attrs["source"] == "derived on read, sqrt(3/4) x stats/std_unbiased"
    assert a.shape == (128, 18) and a.path == "stats/std_population"
    for name in ("margin", "top1_correct", "class_accuracy", "class_mean_softmax"):  # from the decoded logits
        assert s[name].attrs["exact"] is False and "logits_fingerprint" in s[name].attrs, name
    # stage 1 alone: the exact arrays, no stats/ in a lossless store
    for name in ("dense", "top2"):
        cfg = json.loads(json.dumps(stores[name]))
        cfg["cache"]["store"] = cfg["cache"]["store"].replace(".zarr", "-stage1.zarr")
        group = cache_teacher(cfg, progress=False).group
        assert sorted(group["stats"].array_keys() if "stats" in group else []) == (
            [] if name == "dense" else sorted(o.name for o in exact_outputs(check_settings(cfg["stats"]))))


@pytest.mark.parametrize("K", [2, 10, 1000])
def test_population_values_derived_from_unbiased_ones_are_the_kernels(K):
    """std_population = sqrt((K-1)/K) x std_unbiased and max |Z| by the kernel's formula on mean, max, min and that std
    give the kernel's direct population values within float32 rounding, near-constant rows included; the plain
    factor sqrt(K/(K-1)) x the unbiased max |Z| does not there, because of the 1e-7 in Z = (z - mean) / (std + 1e-7)."""
    rng = np.random.default_rng(K)
    z = np.concatenate([rng.normal(0, 3, (200, K)), rng.normal(0, 0.05, (50, K)),  # ordinary and small std
                        0.01 + rng.normal(0, 1e-7, (50, K)), np.full((5, K), 0.1)]).astype(np.float32)  # near-constant
    outs = [output("mean"), output("max"), output("min")] + [
        output(stat, std=c) for c in ("unbiased", "population") for stat in ("std", "max_abs_zscore")]
    rows = block_statistics(z[:, None], np.zeros(len(z), np.int64), outs, 1)[0][:, 0]  # the kernel's, directly
    v = {o.name: rows[:, j] for j, o in enumerate(outs)}
    std = derivation(output("std", std="population"), K)
    got_std = std.f(v["std_unbiased"])
    np.testing.assert_allclose(got_std, v["std_population"], rtol=3e-7, atol=0)
    # and the float64 formula's where float32 does not cancel (the kernel's own value is off on near-constant rows)
    np.testing.assert_allclose(got_std[:250], z[:250].astype(np.float64).std(axis=1), rtol=4e-7)
    mz = derivation(output("max_abs_zscore", std="population"), K)
    assert [o.name for o in mz.sources] == ["mean", "max", "min", "std_population"]
    got_mz = mz.f(v["mean"], v["max"], v["min"], got_std)
    np.testing.assert_allclose(got_mz, v["max_abs_zscore_population"], rtol=5e-7, atol=0)
    plain = v["max_abs_zscore_unbiased"] * np.float32(np.sqrt(K / (K - 1)))
    near_constant = slice(250, 300)
    assert (v["std_population"][near_constant] > 0).all() and (v["std_population"][near_constant] < 1e-6).all()
    assert np.abs(plain[near_constant] / v["max_abs_zscore_population"][near_constant] - 1).max() > (
        1e-3 if K < 1000 else 1e-5)


def exact_values(store):
    return {name: a[...] for name, a in store.group["stats"].arrays() if a.attrs.get("source") == STAGE1}


def test_a_resumed_run_and_a_redone_shard_give_the_same_exact_arrays(stores, teacher_ckpt, tmp_path):
    cfg = config(teacher_ckpt, tmp_path / "resumed.zarr", ENCODINGS["top2"])
    store = cache_teacher(cfg, num_shards=2, shard_index=1, progress=False)  # the odd shards only
    assert store.status == "incomplete"
    half = exact_values(store)
    S = store.samples_per_shard
    odd = (np.arange(store.labels.shape[0]) // S) % 2 == 1
    for name, values in half.items():  # rows of done shards written, the others not; nothing sealed
        assert np.isfinite(values[odd]).all() and np.isnan(values[~odd]).all(), name
        assert "logits_fingerprint" not in store.group["stats"][name].attrs
    with pytest.raises(UserError, match="incomplete"):
        compute_stats(cfg["cache"]["store"], cfg["stats"], progress=False)
    # shard 1 to be redone: its record cleared, its exact rows overwritten with garbage
    store.shard_done[1] = 0
    for name in half:
        store.group["stats"][name][S:2 * S] = -1.0
    store = cache_teacher(cfg, progress=False)
    assert store.status == "complete"
    want = exact_values(open_(stores["top2"]))
    assert sorted(exact_values(store)) == sorted(want)
    for name, values in exact_values(store).items():
        np.testing.assert_array_equal(values, want[name], err_msg=name)
        assert store.group["stats"][name].attrs["logits_fingerprint"] == store.fingerprint()
    # a complete store is left alone; --overwrite builds it again, exact arrays included
    stamp = (tmp_path / "resumed.zarr" / "stats" / "mean" / "zarr.json").stat().st_mtime_ns
    cache_teacher(cfg, progress=False)
    assert (tmp_path / "resumed.zarr" / "stats" / "mean" / "zarr.json").stat().st_mtime_ns == stamp
    store = cache_teacher(cfg, overwrite=True, progress=False)
    for name, values in exact_values(store).items():
        np.testing.assert_array_equal(values, want[name], err_msg=name)
        assert store.group["stats"][name].attrs["logits_fingerprint"] == store.fingerprint()


def test_a_gamma_configured_part_way_is_left_to_stage_2_with_a_warning(stores, teacher_ckpt, tmp_path):
    first = config(teacher_ckpt, tmp_path / "g.zarr", ENCODINGS["top2"], gammas=[0.1])
    second = config(teacher_ckpt, tmp_path / "g.zarr", ENCODINGS["top2"], gammas=[0.1, 0.3])
    cache_teacher(first, num_shards=2, shard_index=0, progress=False)
    with warnings_of_kdcache() as lines:
        store = cache_teacher(second, progress=False)
    assert lines == [f"store {store.path}: stats/wttm_power_sum_gamma0.3 lacks the rows of shards written by a run "
                     "configured without it; stage 2 computes it from the decoded logits (approximate) unless the "
                     "store is rebuilt"]
    s = store.group["stats"]
    assert "logits_fingerprint" in s["wttm_power_sum_gamma0.1"].attrs
    assert "logits_fingerprint" not in s["wttm_power_sum_gamma0.3"].attrs
    with warnings_of_kdcache() as lines:
        done = compute_stats(store.path, dict(second["stats"], statistics=["wttm_power_sum"]), progress=False)
    assert done["computed"] == ["wttm_power_sum_gamma0.3"] and done["up_to_date"] == ["wttm_power_sum_gamma0.1"]
    assert len(lines) == 1 and "stats/wttm_power_sum_gamma0.3 from stage 1: computed from the decoded logits, " \
                               "approximate" in lines[0]
    assert s["wttm_power_sum_gamma0.3"].attrs["exact"] is False
    dense = open_(stores["dense"])
    np.testing.assert_array_equal(read_stat(store, "wttm_power_sum", gamma=0.1)[...],
                                  read_stat(dense, "wttm_power_sum", gamma=0.1)[...])


def test_an_overlay_takes_the_stores_exact_arrays(stores, tmp_path):
    """Stage 2 into an overlay derives new temperatures from the store's exact arrays and copies nothing; readers
    given the overlay find the store's exact arrays."""
    path, overlay = stores["top2"]["cache"]["store"], str(tmp_path / "overlay.zarr")
    settings = dict(stores["top2"]["stats"], statistics=["std", "ls_temperature", "mlt_temperature", "wttm_power_sum"],
                    t_base=3.0)
    done = compute_stats(path, settings, out=overlay, progress=False)
    assert done["computed"] == ["ls_temperature_t3_unbiased"]
    assert set(done["up_to_date"]) == {"std_unbiased", "mlt_temperature_unbiased", "wttm_power_sum_gamma0.1",
                                       "wttm_power_sum_gamma0.3"}
    assert sorted(zarr.open_group(overlay, mode="r")["stats"].array_keys()) == ["ls_temperature_t3_unbiased"]
    top, dense = open_(stores["top2"]), open_(stores["dense"])
    np.testing.assert_allclose(read_stat(top, "ls_temperature", t_base=3.0, std="unbiased", overlay=overlay)[...],
                               3 * read_stat(dense, "std", std="unbiased")[...], rtol=1e-6)
    for method, params in (("mlt", {}), ("wttm", {"gamma": 0.3})):
        got = cached_stats(top, build(method, params), overlay)
        want = cached_stats(dense, build(method, params))
        # mlt standardizes the teacher: on a lossy store it also reads the exact moments
        assert set(got) == set(want) | ({"mean", "std"} if method == "mlt" else set())
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # the population std: derived on read from the store's std_unbiased, neither written nor copied
    done = compute_stats(path, dict(settings, std="population"), out=overlay, progress=False)
    assert done["computed"] == ["ls_temperature_t3_population"] and "std_population" in done["up_to_date"]
    assert "std_population" not in zarr.open_group(overlay, mode="r")["stats"]
    np.testing.assert_allclose(read_stat(top, "ls_temperature", t_base=3.0, std="population", overlay=overlay)[...],
                               3 * read_stat(dense, "std", std="population")[...], rtol=1e-6)


def test_a_store_with_stage_1s_population_arrays_reads_them(stores, tmp_path):
    """A lossy store written before stage 1 derived the population values, with its std_population and
    max_abs_zscore_population: readers and stage 2 take those arrays as they are."""
    shutil.copytree(stores["top2"]["cache"]["store"], tmp_path / "old.zarr")
    store, dense = CacheStore.open(tmp_path / "old.zarr", mode="r+"), open_(stores["dense"])
    outs = [output("std", std="population"), output("max_abs_zscore", std="population")]
    rows = block_statistics(dense.logits[...], dense.labels[...], outs, 1)[0]  # the teacher's float32 logits
    for j, o in enumerate(outs):  # as stage 1 wrote them then
        a = create_array(store.group["stats"], o, store, store.samples_per_shard, {"exact": True, "source": STAGE1})
        a[...] = rows[..., j]
    assert seal_exact(store) == sorted(POPULATION)
    for o in outs:
        a = read_stat(store, o.statistic, **o.params)
        assert isinstance(a, zarr.Array) and a.attrs["source"] == STAGE1, o.name
        np.testing.assert_array_equal(a[...], read_stat(dense, o.statistic, **o.params)[...], err_msg=o.name)
    settings = dict(stores["top2"]["stats"], std="population", t_base=3.0,
                    statistics=["std", "max_abs_zscore", "ls_temperature", "mlt_temperature"])
    done = compute_stats(store.path, settings, progress=False)
    assert done["computed"] == ["ls_temperature_t3_population"]
    assert set(done["up_to_date"]) == {*POPULATION, "mlt_temperature_population"}
    a = read_stat(store, "ls_temperature", t_base=3.0, std="population")
    assert a.attrs["source"] == "stage 2, 3.0 x stats/std_population (exact)"
    np.testing.assert_array_equal(a[...], np.float32(3.0) * read_stat(dense, "std", std="population")[...])


@pytest.mark.parametrize("method, params", [("mlt", {"unbiased_std": False}),
                                            ("kd", {"standardize": True, "unbiased_std": False})])
def test_stage3_in_the_population_convention_reads_derived_moments(stores, method, params):
    """LS and the max-logit method with the population std on a top-2 store: the teacher's temperature and moments
    stage 3 reads (the population std derived on read) are the dense store's, within float32 rounding."""
    top, dense = open_(stores["top2"]), open_(stores["dense"])
    m = build(method, params)
    got, want = cached_stats(top, m), cached_stats(dense, m)
    assert set(got) == set(want) | {"mean", "std"}
    want.update(mean=read_stat(dense, "mean")[...], std=read_stat(dense, "std", std="population")[...])
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=key)


def test_deriving_from_a_damaged_exact_array_is_refused(stores, tmp_path):
    shutil.copytree(stores["top2"]["cache"]["store"], tmp_path / "damaged.zarr")
    store = CacheStore.open(tmp_path / "damaged.zarr", mode="r+")
    store.group["stats"]["std_unbiased"][3, 5] = np.inf
    damage = r"stats/std_unbiased at sample 3, view 5 holds NaN/Inf: inf"
    with pytest.raises(StoreDamage, match=damage):
        compute_stats(store.path, dict(stores["top2"]["stats"], statistics=["ls_temperature"], t_base=5.0),
                      progress=False)
    with pytest.raises(StoreDamage, match=damage):  # through the population std, derived on read
        compute_stats(store.path, dict(stores["top2"]["stats"], statistics=["ls_temperature"], t_base=5.0,
                                       std="population"), progress=False)
    with pytest.raises(StoreDamage, match=damage):  # stage 3's teacher moments
        cached_stats(store, build("mlt", {"unbiased_std": False}))


@pytest.mark.parametrize("method, params", [("mlt", {}), ("wttm", {"gamma": 0.1}), ("wttm", {"gamma": 0.3})])
def test_stage3_reads_the_exact_temperature_and_power_sum(stores, method, params):
    """The per-row values stage 3 feeds a method's loss, from a top-k store, are the dense store's."""
    top, dense = open_(stores["top2"]), open_(stores["dense"])
    m = build(method, params)
    rows = np.arange(0, 128, 5)
    views = np.random.default_rng(0).integers(0, 18, rows.size)
    want = cached_stats(dense, m)
    for source in (MemoryTargets(top, cached_stats(top, m)), ZarrTargets(top, cached_stats(top, m), 2)):
        batch = source.read(rows, views)
        for key in want:
            np.testing.assert_array_equal(batch[key], want[key][rows, views], err_msg=key)


def steps_of(cfg, tmp_path, name, **cache):
    c = json.loads(json.dumps(cfg))
    c["cache"].update(cache)
    c["train"].update(method="mlt", out=str(tmp_path / name))
    steps = []
    train_student(c, progress=False, on_step=steps.append)
    return np.array([s["kd"] for s in steps])


def test_training_on_a_topk_store_uses_the_exact_temperature_and_moments(stores, tmp_path):
    """mlt from the top-2 store trains neither as from a dense store of its decoded logits with their own statistics,
    nor as from one with only the teacher's exact temperature: it standardizes with the exact mean and std too."""
    top = open_(stores["top2"])
    shutil.copytree(stores["dense"]["cache"]["store"], tmp_path / "rebuilt.zarr")  # with the dense store's stats/
    rebuilt = CacheStore.open(tmp_path / "rebuilt.zarr", mode="r+")
    for shard in range(rebuilt.num_shards):  # rewritten as stage 1 writes: the rows, their digests, the record
        rows = rebuilt.shard_rows(shard)
        rebuilt.write_shard(shard, decode_logits({n: a[rows] for n, a in top.logit_arrays.items()}, 4),
                            rebuilt.views[rows], rebuilt.labels[rows])
    compute_stats(rebuilt.path, stores["top2"]["stats"], out=tmp_path / "decoded.zarr", progress=False)
    got = steps_of(stores["top2"], tmp_path, "top2")
    exact_temperature = steps_of(stores["top2"], tmp_path, "exact", store=rebuilt.path)
    decoded = steps_of(stores["top2"], tmp_path, "decoded", store=rebuilt.path, stats=str(tmp_path / "decoded.zarr"))
    assert np.abs(decoded / exact_temperature - 1).max() > 1e-3
    assert np.abs(got / exact_temperature - 1).max() > 1e-3
    m = build("mlt", {})
    batch = MemoryTargets(top, cached_stats(top, m)).read(np.arange(6), np.zeros(6, dtype=np.int64))
    dense = open_(stores["dense"])
    for key in ("mean", "std"):  # what stage 3 fed the loss: the dense store's values
        np.testing.assert_array_equal(batch[key], read_stat(dense, key, **({"std": "unbiased"} if key == "std" else {}))[:6, 0])


def test_a_sampled_store_skips_what_it_cannot_give(stores, tmp_path):
    store = open_(stores["sampled"])
    with warnings_of_kdcache() as lines:
        done = compute_stats(store.path, dict(stores["sampled"]["stats"], t_base=1.5), progress=False)
    assert done["computed"] == ["ls_temperature_t1.5_unbiased"]
    assert done["skipped"] == [o.name for o in plan_outputs(check_settings(stores["sampled"]["stats"]))
                               if o.statistic in ("margin", "top1_correct", "class_count", "class_accuracy",
                                                  "class_mean_softmax", "class_ece", "ece")]
    assert len(lines) == 1 and lines[0].startswith("skipped stats/margin, stats/top1_correct") and \
        "holds sampled targets" in lines[0]
    with pytest.raises(UserError, match=r"no stats/top1_correct: the store holds sampled targets: 8 draws per row at "
                                        r"temperature 1, which give no logits .* only stage 1's mean, std, max, min, "
                                        r"logsumexp, entropy"):
        read_stat(store, "top1_correct")
    with pytest.raises(UserError, match=r"gamma0\.5: .* rebuild the store \(kdcache cache-teacher --overwrite\) "
                                        r"with 0\.5 among them"):
        read_stat(store, "wttm_power_sum", gamma=0.5)
    with pytest.raises(UserError, match=r"'wttm' with gamma: 0\.5 needs the teacher at temperature 2"):
        cached_stats(store, build("wttm", {"gamma": 0.5}))  # refused before training: draws at T 1 need gamma 1
    with pytest.raises(UserError, match="compute it with: kdcache stats .* --stat ls_temperature --t-base 4"):
        read_stat(store, "ls_temperature", t_base=4.0, std="unbiased")  # derivable: stage 2 computes it
    plots = plot_stats(store.path, stores["sampled"]["stats"], tmp_path)  # of what there is
    assert sorted(p.name for p in plots) == ["entropy.png", "ls_temperature_t2_unbiased.png",
                                             "mlt_temperature_unbiased.png"]


@pytest.mark.slow  # ~10 s: two subprocesses importing torch
def test_two_processes_write_the_exact_arrays_of_one(stores, teacher_ckpt, tmp_path):
    """Two processes of one job (--num-shards 2) create the arrays together and write their own shards' rows."""
    cfg = config(teacher_ckpt, tmp_path / "two.zarr", ENCODINGS["top2"])
    path = write_config(cfg, tmp_path / "two.yaml")
    procs = [kdcache("cache-teacher", "--config", path, "--num-shards", 2, "--shard-index", i) for i in (0, 1)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    store, want = open_(cfg), exact_values(open_(stores["top2"]))
    assert store.status == "complete" and sorted(exact_values(store)) == sorted(want)
    for name, values in exact_values(store).items():
        np.testing.assert_array_equal(values, want[name], err_msg=name)
        assert store.group["stats"][name].attrs["logits_fingerprint"] == store.fingerprint()


@pytest.mark.slow  # ~25 s: three stage-1 runs of 1024 samples x 18 views in subprocesses
def test_sigkill_then_resume_gives_the_exact_arrays_of_an_uninterrupted_run(smoke_cfg, tmp_path):
    from tests.test_cache_teacher import bigger, kill_after_shards
    smoke_cfg["cache"]["encoding"] = ENCODINGS["top2"]
    smoke_cfg["stats"].update(STATS)
    ref_cfg, ref_yaml = bigger(smoke_cfg, tmp_path, "ref")
    assert kdcache("cache-teacher", "--config", ref_yaml).wait() == 0
    cfg, yaml_path = bigger(smoke_cfg, tmp_path, "killed")
    kill_after_shards(yaml_path, cfg["cache"]["store"])
    assert CacheStore.open(cfg["cache"]["store"]).status == "incomplete"
    resumed = kdcache("cache-teacher", "--config", yaml_path)
    assert resumed.wait() == 0, resumed.stderr.read()
    got, want = CacheStore.open(cfg["cache"]["store"]), CacheStore.open(ref_cfg["cache"]["store"])
    assert got.status == "complete" and sorted(exact_values(got)) == sorted(exact_values(want))
    for name, values in exact_values(got).items():
        np.testing.assert_array_equal(values, exact_values(want)[name], err_msg=name)
        assert got.group["stats"][name].attrs["logits_fingerprint"] == got.fingerprint()


def test_the_dataset_refuses_a_sampled_store_in_one_line(stores):
    from kdcache.dataset import CacheDataset
    with pytest.raises(UserError, match=r"holds sampled targets: 8 draws per row at temperature 1, not logits") as e:
        CacheDataset(stores["sampled"]["cache"]["store"])
    assert "\n" not in str(e.value)
