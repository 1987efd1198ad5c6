"""Stage 2: every statistic against a direct float64 NumPy computation of its formula (docs/METHODS.md),
on stores built from logits chosen here; skipping, new parameters, stale and refused stores; the
threaded scheduler against a real LocalCluster of 2 processes; the CLI and its plots; the temperatures
stage 2 derives on lossy stores (tests/test_exact_stats.py has those stores end to end)."""
import contextlib
import json
import logging

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from kdcache.stages.cli import cli
from kdcache.config import DEFAULTS
from kdcache.errors import UserError
from kdcache.losses import MLT_CONSTANT, max_logit_temperature, standardize, teacher_power_sum
from kdcache.encodings import encode_logits
from kdcache.stats import block_statistics, check_settings, derivation, number_name, output, plan_outputs
from kdcache.store import CacheStore, manifest_sha256
from kdcache.stages.compute_stats import compute_stats, read_stat

SETTINGS = dict(DEFAULTS["stats"], gammas=[0.1, 0.3, 1.0, 2.5])


def make_store(path, logits, labels, *, dtype="float16", complete=True, samples_per_chunk=8,
               chunks_per_shard=2) -> str:
    """A store holding exactly `logits` (N, V, K) and `labels` (N,), shards of 16 samples by default."""
    n, v, k = logits.shape
    store = CacheStore.create(path, {"test": "stats", "dtype": dtype}, num_samples=n, num_views=v,
                              num_classes=k, num_params=1, dtype=dtype, samples_per_chunk=samples_per_chunk,
                              chunks_per_shard=chunks_per_shard)
    for shard in range(store.num_shards - (0 if complete else 1)):
        rows = store.shard_rows(shard)
        store.write_shard(shard, logits[rows].astype(dtype), np.zeros((rows.stop - rows.start, v, 1), np.int32),
                          labels[rows].astype(np.int32))
    store.mark_complete_if_done()
    return str(path)


@contextlib.contextmanager
def warnings_of_kdcache():
    """The warning lines kdcache logs (its logger may not propagate once the CLI ran in this process)."""
    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("kdcache")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def reference(z, y, *, t_base, gammas, std, bins):
    """docs/METHODS.md formulas in float64, written directly: rows z (R, K), labels y (R,)."""
    K = z.shape[1]
    sd = z.std(axis=1, ddof=1 if std == "unbiased" else 0)
    mean = z.mean(axis=1)
    mx = z.max(axis=1)
    lse = mx + np.log(np.exp(z - mx[:, None]).sum(axis=1))
    log_p = z - lse[:, None]
    p = np.exp(log_p)
    zscore = (z - mean[:, None]) / (sd[:, None] + 1e-7)
    top2 = np.sort(z, axis=1)[:, -2:]
    correct = z.argmax(axis=1) == y
    rows = {"mean": mean, f"std_{std}": sd, "max": mx, "min": z.min(axis=1), "logsumexp": lse,
            "entropy": -(p * log_p).sum(axis=1), "margin": top2[:, 1] - top2[:, 0], "top1_correct": correct,
            f"ls_temperature_t{number_name(t_base)}_{std}": t_base * sd,
            f"max_abs_zscore_{std}": np.abs(zscore).max(axis=1),
            f"mlt_temperature_{std}": (1 + np.sqrt(3)) / 2 * np.abs(zscore).max(axis=1)}
    rows.update({f"wttm_power_sum_gamma{number_name(g)}": (p ** g).sum(axis=1) for g in gammas})

    conf = p.max(axis=1)
    edges = np.linspace(0, 1, bins + 1)

    def ece(sel):
        e = 0.0
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = sel & (conf > lo) & (conf <= hi)
            if m.any():
                e += m.sum() / sel.sum() * abs(correct[m].mean() - conf[m].mean())
        return e

    with np.errstate(invalid="ignore"):
        classes = {
            "class_count": np.bincount(y, minlength=K),
            "class_accuracy": np.array([correct[y == k].mean() if (y == k).any() else np.nan for k in range(K)]),
            "class_mean_softmax": np.stack([p[y == k].mean(axis=0) if (y == k).any() else np.full(K, np.nan)
                                            for k in range(K)]),
            f"class_ece_bins{bins}": np.array([ece(y == k) if (y == k).any() else np.nan for k in range(K)]),
            f"ece_bins{bins}": ece(np.ones_like(y, dtype=bool)),
        }
    return rows, classes


def check_against_reference(path, logits, labels, settings, scale):
    s = check_settings(settings)
    n, v, k = logits.shape
    z = logits.reshape(n * v, k).astype(np.float64)  # the stored values, exactly
    rows, classes = reference(z, np.repeat(labels, v), t_base=s["t_base"], gammas=s["gammas"], std=s["std"],
                              bins=s["ece_bins"])
    stats = zarr.open_group(path, mode="r")["stats"]   # plain zarr: names as documented
    planned = {o.name for o in plan_outputs(s)}
    rows = {name: value for name, value in rows.items() if name in planned}
    classes = {name: value for name, value in classes.items() if name in planned}
    atol = 1e-5 + 1e-6 * scale   # float32 arithmetic on logits of magnitude `scale`
    for name, want in rows.items():
        got = stats[name][...]
        assert got.shape == (n, v) and got.dtype == (bool if name == "top1_correct" else np.float32), name
        np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-4, atol=atol, err_msg=name)
    for name, want in classes.items():
        np.testing.assert_allclose(stats[name][...], want, rtol=1e-4, atol=1e-6, err_msg=name)


def ties(n, v, k, rng):
    """Rows with every logit equal, and rows whose maximum appears twice (top-1 = first, margin 0)."""
    z = rng.integers(-4, 4, size=(n, v, k)).astype(np.float32)
    z[::3] = 1.5
    z[1::3, :, 0] = z[1::3, :, -1] = 10.0
    return z


def large(n, v, k, rng, scale):
    z = rng.uniform(-scale, scale, size=(n, v, k)).astype(np.float32)
    z[::4, :, :] = -scale
    z[::4, :, 1] = scale  # one-hot-like rows: softmax is exactly 0 / 1 in float32
    return z


CASES = {  # name: (logits(rng), dtype, scale)
    "random-float32": (lambda r: r.normal(0, 3, (37, 3, 10)), "float32", 10),
    "random-float16": (lambda r: r.normal(0, 3, (37, 3, 10)), "float16", 10),
    "large-float16": (lambda r: large(37, 2, 10, r, 6e4), "float16", 6e4),
    "large-float32": (lambda r: large(37, 2, 10, r, 1e6), "float32", 1e6),
    "ties": (lambda r: ties(37, 2, 10, r), "float16", 10),
    "K=2": (lambda r: r.normal(0, 2, (40, 3, 2)), "float16", 10),
    "K=1000": (lambda r: r.normal(0, 5, (20, 2, 1000)), "float16", 20),
}


@pytest.mark.parametrize("case", CASES)
def test_statistics_match_formulas(tmp_path, case):
    make, dtype, scale = CASES[case]
    rng = np.random.default_rng(len(case))
    logits = make(rng).astype(dtype)
    assert np.isfinite(logits).all()
    labels = rng.integers(0, logits.shape[-1], logits.shape[0])
    if case == "ties":
        labels[::3] = 0  # all-equal rows: the top-1 is class 0, so these are correct
    path = make_store(tmp_path / "s.zarr", logits, labels, dtype=dtype)
    done = compute_stats(path, SETTINGS, progress=False)
    assert done["up_to_date"] == [] and len(done["computed"]) == 16 + len(SETTINGS["gammas"])
    check_against_reference(path, logits, labels, SETTINGS, scale)


@pytest.mark.parametrize("case", CASES)
def test_kernel_temperatures_and_power_sums_equal_the_training_losses(case):
    """The kernel computes mlt and U_gamma from shared intermediates: pin them to kdcache.losses."""
    make, dtype, _ = CASES[case]
    rng = np.random.default_rng(len(case))
    logits = make(rng).astype(dtype)
    n, v, k = logits.shape
    z = torch.from_numpy(logits.reshape(n * v, k)).float()
    outs = [output("mlt_temperature", std=std) for std in ("unbiased", "population")]
    outs += [output("max_abs_zscore", std="unbiased")] + [output("wttm_power_sum", gamma=g) for g in (0.1, 1.0, 2.5)]
    rows, _ = block_statistics(logits, np.zeros(n, int), outs, ece_bins=15)
    want = [max_logit_temperature(z, unbiased=True), max_logit_temperature(z, unbiased=False),
            standardize(z, unbiased=True).abs().amax(dim=-1)] + [teacher_power_sum(z, g) for g in (0.1, 1.0, 2.5)]
    for j, (o, w) in enumerate(zip(outs, want)):
        np.testing.assert_allclose(rows[..., j].reshape(-1), w.numpy(), rtol=2e-6, atol=1e-6, err_msg=o.name)


@pytest.mark.parametrize("case", ["random-float32", "large-float32", "K=1000"])
def test_derived_temperatures_are_the_kernels_bit_for_bit(tmp_path, case):
    """Stage 2 derives the LS and max-logit temperatures of a lossy store as float32(factor) x stage 1's exact
    std / max |Z| (`derivation`): the very numbers the kernel gives a dense store, so the two stores agree."""
    make, dtype, _ = CASES[case]
    rng = np.random.default_rng(len(case))
    logits = make(rng).astype(dtype)
    path = make_store(tmp_path / "s.zarr", logits, rng.integers(0, logits.shape[-1], logits.shape[0]), dtype=dtype)
    for std in ("unbiased", "population"):
        settings = dict(SETTINGS, std=std, t_base=1.7, statistics=["std", "max_abs_zscore", "ls_temperature",
                                                                    "mlt_temperature"])
        compute_stats(path, settings, progress=False)
        stats = zarr.open_group(path, mode="r")["stats"]
        derived = [o for o in plan_outputs(check_settings(settings)) if o.statistic.endswith("temperature")]
        assert [o.statistic for o in derived] == ["ls_temperature", "mlt_temperature"]
        for o in derived:
            d = derivation(o, logits.shape[-1])
            np.testing.assert_array_equal(stats[o.name][...], d.f(stats[d.sources[0].name][...]), o.name)
            factor = o.params.get("t_base", MLT_CONSTANT)  # as float32: what `f` multiplies by
            np.testing.assert_array_equal(stats[o.name][...], np.float32(factor) * stats[d.sources[0].name][...])


def test_a_topk_store_without_exact_arrays_gets_approximate_ones_with_a_warning(tmp_path):
    """A top-k store without stage 1's exact arrays (written before they existed): stage 2 computes everything from
    the decoded logits, marks it `exact: false`, and says so once for what a method reads."""
    rng = np.random.default_rng(7)
    logits, labels = rng.normal(0, 3, (20, 2, 6)).astype(np.float32), rng.integers(0, 6, 20)
    entry = {"dtype": "float32", "storage": "topk", "k": 2}
    store = CacheStore.create(tmp_path / "s.zarr", {"test": "stats", "logits": entry}, num_samples=20, num_views=2,
                              num_classes=6, num_params=1, dtype="float32", samples_per_chunk=8, chunks_per_shard=2)
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        store.write_shard(shard, encode_logits(logits[rows], entry), np.zeros((rows.stop - rows.start, 2, 1), np.int32),
                          labels[rows].astype(np.int32))
    store.mark_complete_if_done()
    settings = dict(SETTINGS, statistics=["entropy", "mlt_temperature", "wttm_power_sum"], gammas=[0.1])
    with warnings_of_kdcache() as lines:
        done = compute_stats(store.path, settings, progress=False)
    assert done["computed"] == ["entropy", "mlt_temperature_unbiased", "wttm_power_sum_gamma0.1"]
    assert lines == [f"store {store.path} holds top-2 of the logits (float32 values) and no exact "
                     "stats/mlt_temperature_unbiased, "
                     "stats/wttm_power_sum_gamma0.1 from stage 1: computed from the decoded logits, approximate "
                     "(stage 1 writes exact ones, power sums at stats.gammas, when it builds the store: "
                     "kdcache cache-teacher --overwrite)"]
    for name in done["computed"]:
        assert store.group["stats"][name].attrs["exact"] is False
    assert read_stat(store, "entropy").attrs["source"] == "stage 2, from the decoded logits"


def test_population_std_and_new_parameters_add_arrays_rerun_does_nothing(tmp_path):
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 3, (40, 2, 7)).astype(np.float16), rng.integers(0, 7, 40)
    path = make_store(tmp_path / "s.zarr", logits, labels)
    first = compute_stats(path, DEFAULTS["stats"], progress=False)
    group = zarr.open_group(path, mode="r")["stats"]
    before = {n: group[n][...] for n in group.array_keys()}
    mtime = (tmp_path / "s.zarr" / "stats" / "mean" / "zarr.json").stat().st_mtime_ns

    again = compute_stats(path, DEFAULTS["stats"], progress=False)
    assert again["computed"] == [] and sorted(again["up_to_date"]) == sorted(first["computed"])
    assert (tmp_path / "s.zarr" / "stats" / "mean" / "zarr.json").stat().st_mtime_ns == mtime

    other = dict(DEFAULTS["stats"], std="population", t_base=3, gammas=[0.5])
    added = compute_stats(path, other, progress=False)
    assert set(added["computed"]) == {"std_population", "ls_temperature_t3_population",
                                      "max_abs_zscore_population", "mlt_temperature_population",
                                      "wttm_power_sum_gamma0.5"}
    group = zarr.open_group(path, mode="r")["stats"]
    for name, value in before.items():  # the old arrays are untouched
        np.testing.assert_array_equal(group[name][...], value)
    check_against_reference(path, logits, labels, other, scale=10)
    attrs = group["mlt_temperature_population"].attrs.asdict()
    assert attrs["params"] == {"std": "population"} and attrs["statistic"] == "mlt_temperature"
    assert attrs["logits_fingerprint"] == CacheStore.open(path).fingerprint()


def test_stale_and_interrupted_statistics_are_refused_then_recomputed(tmp_path):
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(0, 3, (30, 2, 5)).astype(np.float16), rng.integers(0, 5, 30)
    path = make_store(tmp_path / "s.zarr", logits, labels)
    settings = dict(DEFAULTS["stats"], statistics=["mlt_temperature", "wttm_power_sum", "class_accuracy"])
    compute_stats(path, settings, progress=False)
    store = CacheStore.open(path, mode="r+")
    assert read_stat(store, "mlt_temperature", std="unbiased").shape == (30, 2)

    # stage 1 re-run with another teacher: new logits, new manifest (fingerprint)
    new = rng.normal(0, 1, logits.shape).astype(np.float16)
    for shard in range(store.num_shards):  # as stage 1 writes: the rows, their digests, the record
        rows = store.shard_rows(shard)
        store.write_shard(shard, new[rows], store.views[rows], store.labels[rows])
    manifest = dict(store.manifest, test="another teacher")
    store.group.attrs.update({"manifest": manifest, "manifest_sha256": manifest_sha256(manifest)})
    with pytest.raises(UserError, match=r"stale .*stats/mlt_temperature_unbiased; compute it with: "
                                        r"kdcache stats .*s.zarr --stat mlt_temperature --std unbiased"):
        read_stat(store, "mlt_temperature", std="unbiased")
    done = compute_stats(path, settings, progress=False)
    assert sorted(done["stale"]) == sorted(done["computed"]) and len(done["computed"]) == 4
    check_against_reference(path, new, labels, settings, scale=10)

    # an interrupted run leaves an array without its fingerprint: refused, then recomputed
    attrs = store.group["stats/wttm_power_sum_gamma0.1"].attrs
    attrs.put({k: v for k, v in attrs.asdict().items() if k != "logits_fingerprint"})
    with pytest.raises(UserError, match="incomplete"):
        read_stat(store, "wttm_power_sum", gamma=0.1)
    assert compute_stats(path, settings, progress=False)["computed"] == ["wttm_power_sum_gamma0.1"]
    assert read_stat(store, "wttm_power_sum", gamma=0.1).shape == (30, 2)


def test_missing_statistic_names_the_command_that_adds_it(tmp_path):
    rng = np.random.default_rng(2)
    path = make_store(tmp_path / "s.zarr", rng.normal(0, 3, (20, 2, 4)), rng.integers(0, 4, 20))
    store = CacheStore.open(path)
    with pytest.raises(UserError, match="has no stats/wttm_power_sum_gamma0.7") as e:
        read_stat(store, "wttm_power_sum", gamma=0.7)
    command = str(e.value).split("compute it with: ")[1]
    assert command == f"kdcache stats {path} --stat wttm_power_sum --gamma 0.7"
    result = CliRunner().invoke(cli, command.split()[1:])  # run exactly that command
    assert result.exit_code == 0, result.output
    assert read_stat(store, "wttm_power_sum", gamma=0.7).shape == (20, 2)
    assert list(zarr.open_group(path, mode="r")["stats"].array_keys()) == ["wttm_power_sum_gamma0.7"]


def test_refusals_are_one_line_errors(tmp_path):
    rng = np.random.default_rng(3)
    logits, labels = rng.normal(0, 3, (40, 2, 4)), rng.integers(0, 4, 40)
    good = make_store(tmp_path / "good.zarr", logits, labels)
    partial = make_store(tmp_path / "partial.zarr", logits, labels, complete=False)
    runner = CliRunner()
    cases = [
        ([partial], "is incomplete (2/3 shards done)"),
        ([str(tmp_path / "nothing.zarr")], "no cache store at"),
        ([good, "--stat", "temperature"], "unknown statistic(s) 'temperature'"),
        ([good, "--gamma", "0"], "gamma) must be a finite number > 0, got 0.0"),
        ([good, "--gamma", "0.1", "--gamma", "-1"], "must be a finite number > 0, got -1.0"),
        ([good, "--t-base", "-2"], "T_base) must be a finite number > 0, got -2.0"),
        ([good, "--ece-bins", "0"], "ece_bins must be an integer >= 1"),
        ([good, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "either --scheduler ADDRESS or --workers"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, ["stats", *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
    # a store whose logits array is gone
    import shutil
    shutil.rmtree(tmp_path / "good.zarr" / "logits")
    result = runner.invoke(cli, ["stats", good])
    assert result.exit_code == 1 and "has no 'logits' array" in result.output
    assert not (tmp_path / "partial.zarr" / "stats").exists()
    with pytest.raises(UserError, match="unknown statistic 'temp'"):
        output("temp")


def test_cli_computes_from_config_and_plots(tmp_path):
    rng = np.random.default_rng(4)
    logits, labels = rng.normal(0, 3, (30, 2, 6)), rng.integers(0, 6, 30)
    path = make_store(tmp_path / "s.zarr", logits, labels)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"cache": {"store": path}, "stats": {"gammas": [0.2], "t_base": 4}}))
    result = CliRunner().invoke(cli, ["stats", "--config", str(config), "--plot", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert "computed 17 statistics arrays, 0 already up to date" in result.output
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["class_accuracy.png", "class_mean_softmax.png", "entropy.png", "ls_temperature_t4_unbiased.png",
                    "margin.png", "mlt_temperature_unbiased.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    again = CliRunner().invoke(cli, ["stats", "--config", str(config)])
    assert "computed 0 statistics arrays, 17 already up to date" in again.output


def test_blocks_smaller_than_shards_give_the_same_statistics(tmp_path, monkeypatch):
    """Large shards are split into blocks of whole chunks; outputs are then sharded like the logits."""
    import kdcache.stages.compute_stats as stage
    rng = np.random.default_rng(6)
    logits, labels = rng.normal(0, 3, (70, 3, 20)).astype(np.float16), rng.integers(0, 20, 70)
    whole = make_store(tmp_path / "whole.zarr", logits, labels, samples_per_chunk=4, chunks_per_shard=8)
    split = make_store(tmp_path / "split.zarr", logits, labels, samples_per_chunk=4, chunks_per_shard=8)
    compute_stats(whole, SETTINGS, progress=False)
    monkeypatch.setattr(stage, "BLOCK_BYTES", 2 * 4 * 3 * 20 * 2)  # two chunks per block, 4 blocks per shard
    assert stage.block_samples(CacheStore.open(split)) == 8
    compute_stats(split, SETTINGS, progress=False)
    a, b = (zarr.open_group(p, mode="r")["stats"] for p in (whole, split))
    assert a["mean"].shards is None and a["mean"].chunks == (32, 3)
    assert b["mean"].shards == (32, 3) and b["mean"].chunks == (8, 3)
    for name in a.array_keys():
        np.testing.assert_allclose(a[name][...], b[name][...], rtol=1e-12, err_msg=name)
    check_against_reference(split, logits, labels, SETTINGS, scale=10)


@pytest.mark.slow  # ~10-14 s on 2 cores: starting 2 worker processes that import torch, and closing them
def test_threaded_and_local_cluster_give_identical_arrays(tmp_path):
    """The same statistics on the threaded scheduler and on a real LocalCluster of 2 worker processes."""
    rng = np.random.default_rng(5)
    logits, labels = rng.normal(0, 4, (100, 3, 50)).astype(np.float16), rng.integers(0, 50, 100)
    a = make_store(tmp_path / "a.zarr", logits, labels)
    b = make_store(tmp_path / "b.zarr", logits, labels)
    compute_stats(a, SETTINGS, progress=False)
    compute_stats(b, SETTINGS, workers=2, progress=False)
    ga, gb = (zarr.open_group(p, mode="r")["stats"] for p in (a, b))
    names = sorted(ga.array_keys())
    assert names == sorted(gb.array_keys()) and len(names) == 20
    for name in names:
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)
        assert ga[name].attrs.asdict() == gb[name].attrs.asdict()
