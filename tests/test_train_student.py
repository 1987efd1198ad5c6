"""Stage 3: offline/online parity, exact resume, memory vs Zarr reading, every method, every refusal."""
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdcache.stages.cli import cli
from kdcache.config import load_config
from kdcache.data import load_dataset
from kdcache.errors import UserError
from kdcache.store import CacheStore
from kdcache.stages.cache_teacher import cache_teacher
from kdcache.dataset import block_shuffled, epoch_views
from kdcache.stages.train_student import learning_rate, train_student
from kdcache.targets import MemoryTargets, ZarrTargets, open_store, shuffled
from tests.conftest import REPO, image_folder, kdcache, write_config

SMOKE_TRAIN = REPO / "configs" / "smoke" / "train.yaml"


@pytest.fixture(scope="module")
def store_cfg(train_store_cfg):
    """The smoke train config with its store built (every view cached) and stage-2 statistics computed."""
    return train_store_cfg


@pytest.fixture
def cfg(store_cfg, tmp_path):
    """A fresh copy writing its run under tmp_path."""
    c = json.loads(json.dumps(store_cfg))
    c["train"]["out"] = str(tmp_path / "run")
    return c


def run(cfg, **train):
    """Train with `train` overrides; returns (result, per-step records)."""
    cfg["train"].update(train)
    steps = []
    result = train_student(cfg, progress=False, on_step=steps.append)
    return result, steps


def smoke_data(cfg):
    d = cfg["dataset"]
    return load_dataset(d["name"], "train", root=d["root"], subset=d["subset"], **d["options"])


# ---- parity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, params", [("kd", {}), ("wttm", {}), ("mlt", {"variant": "joint"}),
                                            ("dkd", {"standardize": True, "warmup": 1})])
def test_offline_and_online_see_the_same_views_and_losses(cfg, tmp_path, method, params):
    """Same seed: the same samples and views in every batch, and losses equal up to float16 targets."""
    epochs = 2 if method == "kd" else 1  # two epochs: differences do not grow with training
    offline, off_steps = run(cfg, method=method, params=params, epochs=epochs)
    cfg["train"]["out"] = str(tmp_path / "online")
    online, on_steps = run(cfg, method=method, params=params, online=True)
    assert (offline["mode"], offline["targets"], online["mode"], online["targets"]) == \
        ("offline", "memory", "online", "live")
    assert len(off_steps) == len(on_steps) == epochs * math.ceil(128 / cfg["train"]["batch_size"])
    for a, b in zip(off_steps, on_steps):
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_array_equal(a["views"], b["views"])
        # float16 keeps 11 significant bits: targets differ by <= 2^-11 relative, the losses by a few times that
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-3, abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)
    # the comparison can fail: a different seed gives other views
    other = epoch_views(128, 18, 1, 0)
    assert (other != epoch_views(128, 18, 0, 0)).any()


def test_float32_cache_gives_exactly_the_online_losses(cfg, tmp_path):
    """Without float16 rounding the cache is invisible: every per-batch loss is bit-identical."""
    cfg["cache"].update(store=str(tmp_path / "f32.zarr"), dtype="float32")
    cache_teacher(cfg, progress=False)
    _, offline = run(cfg, method="ttm", epochs=2)  # TTM: w_kd = 100 amplifies any difference
    cfg["train"]["out"] = str(tmp_path / "online")
    _, online = run(cfg, online=True)
    assert [s["loss"] for s in offline] == [s["loss"] for s in online]


def test_views_replayed_from_the_store_are_the_teachers_inputs(cfg):
    """The params a batch carries are the store's for (sample, view); the logits are the store's too."""
    store = CacheStore.open(cfg["cache"]["store"])
    source = MemoryTargets(store, {})
    views = epoch_views(128, 18, 0, 3)
    b = next(source.batches(source.blocks(128, 0, 3), views, 32))
    np.testing.assert_array_equal(b["params"], store.views[:][b["ids"], b["views"]])
    np.testing.assert_array_equal(b["logits"], store.logits[:][b["ids"], b["views"]].astype(np.float32))


# ---- views, order, sources ---------------------------------------------------------------------

def test_epoch_views_cycle_through_every_view_before_repeating():
    V = 5
    seen = np.stack([epoch_views(40, V, 7, e) for e in range(V)])  # (epochs, samples)
    assert (np.sort(seen, axis=0) == np.arange(V)[:, None]).all()
    next_cycle = np.stack([epoch_views(40, V, 7, e) for e in range(V, 2 * V)])
    assert (np.sort(next_cycle, axis=0) == np.arange(V)[:, None]).all() and (next_cycle != seen).any()
    # a pure function of (seed, epoch, sample): a larger data set keeps the views of the first samples
    np.testing.assert_array_equal(epoch_views(100, V, 7, 3)[:40], seen[3])
    assert (epoch_views(1000, 1, 0, 4) == 0).all()


def test_block_shuffle_covers_every_row_once_in_whole_chunks():
    blocks = block_shuffled(103, 0, 2, chunk=10, chunks_per_block=3)
    rows = np.concatenate(blocks)
    np.testing.assert_array_equal(np.sort(rows), np.arange(103))
    for b in blocks:
        chunks = np.unique(b // 10)
        assert len(chunks) <= 3 and len(b) == sum(min(10, 103 - 10 * c) for c in chunks)
    assert not np.array_equal(rows, np.arange(103))
    assert not np.array_equal(rows, np.concatenate(block_shuffled(103, 0, 3, 10, 3)))
    np.testing.assert_array_equal(np.sort(np.concatenate(shuffled(103, 0, 1))), np.arange(103))


def test_memory_and_zarr_blocks_give_the_same_batches(cfg):
    """Given the same order, both sources yield identical ids, views, params, logits and statistics."""
    store = CacheStore.open(cfg["cache"]["store"])
    from kdcache.dataset import cached_stats
    from kdcache.methods import build
    stats = cached_stats(store, build("wttm", {"gamma": 0.1}))
    memory, zarr_ = MemoryTargets(store, stats), ZarrTargets(store, stats, chunks_per_block=3)
    views = epoch_views(128, 18, 0, 5)
    blocks = zarr_.blocks(128, 0, 5)
    assert max(len(b) for b in blocks) == 3 * store.logits.chunks[0]
    a = list(memory.batches(blocks, views, 20))
    b = list(zarr_.batches(blocks, views, 20))
    assert len(a) == len(b) == math.ceil(128 / 20) and [len(x["ids"]) for x in a][-1] == 128 % 20
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"ids", "views", "params", "logits", "power_sum"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    np.testing.assert_array_equal(np.sort(np.concatenate([x["ids"] for x in b])), np.arange(128))


def test_training_from_zarr_blocks(cfg):
    result, steps = run(cfg, memory_gb=0, epochs=1)
    assert result["targets"] == "zarr" and all(math.isfinite(s["loss"]) for s in steps)


def same_run(cfg, tmp_path, **train):
    """Per-step records and final weights of a run with train.workers 0 and of one with 2: asserted identical."""
    runs = []
    for workers in (0, 2):
        cfg["train"]["out"] = str(tmp_path / f"workers{workers}")
        result, steps = run(cfg, workers=workers, **train)
        weights = torch.load(tmp_path / f"workers{workers}" / "student.pt", weights_only=True)["state_dict"]
        runs.append((result, steps, weights))
    (r0, s0, w0), (r2, s2, w2) = runs
    assert len(s0) == len(s2) > 0
    for a, b in zip(s0, s2):
        assert (a["epoch"], a["step"], a["loss"], a["ce"], a["kd"]) == (b["epoch"], b["step"], b["loss"], b["ce"], b["kd"])
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_array_equal(a["views"], b["views"])
    assert w0.keys() == w2.keys() and all(torch.equal(w0[k], w2[k]) for k in w0)
    assert r0["last_accuracy"] == r2["last_accuracy"]
    return s0


@pytest.mark.parametrize("train", [
    {"method": "kd"},                                      # offline, targets in memory
    {"method": "mlt", "memory_gb": 0},                     # offline, Zarr blocks, cached statistics
    {"method": "kd", "online": True},                      # the teacher on the replayed views
    {"method": "ce", "augment": "fresh"}])                 # no teacher, a new view every step
def test_dataloader_workers_take_the_steps_of_one_process(cfg, tmp_path, train):
    """train.workers 2 replays the views in two DataLoader processes: over two epochs, every step's samples,
    views and losses and the final weights are bit-identical to replaying them in the training process."""
    steps = same_run(cfg, tmp_path, epochs=2, **train)
    assert len(steps) == 2 * math.ceil(128 / cfg["train"]["batch_size"])
    assert (max(s["kd"] for s in steps) > 0) == (train["method"] != "ce")


def test_dataloader_workers_decode_an_image_folder(cfg, tmp_path):
    """Variable-size PNG files with resized-crop views (CE, fresh views): decoded and replayed in the workers,
    the same steps as in the training process."""
    image_folder(tmp_path, {"cat": 6, "dog": 5})
    cfg["dataset"] = {"name": "imagefolder", "root": str(tmp_path / "images"), "subset": None, "options": {}}
    cfg["views"] = {"kind": "resized_crop_flip", "size": 16, "views": 3}
    same_run(cfg, tmp_path, method="ce", student="fmnist_mlp", batch_size=4, epochs=2)


def test_refuses_a_negative_number_of_workers(cfg):
    cfg["train"]["workers"] = -1
    with pytest.raises(UserError, match="train.workers must be an integer >= 0"):
        train_student(cfg, progress=False)


# ---- methods, schedules -------------------------------------------------------------------------

@pytest.mark.parametrize("method, params", [
    ("ce", {}), ("kd", {}), ("kd", {"standardize": True}), ("kd", {"standardize": True, "unbiased_std": False}),
    ("ttm", {}), ("wttm", {}), ("dkd", {}), ("dkd", {"standardize": True}),
    ("mlt", {}), ("mlt", {"variant": "joint"})])
def test_every_method_trains_without_nan(cfg, method, params):
    result, steps = run(cfg, method=method, params=params, epochs=1)
    losses = [s["loss"] for s in steps]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert (max(s["kd"] for s in steps) > 0) == (method != "ce")
    assert result["params"]["w_ce"] > 0 and 0 <= result["last_accuracy"] <= 1


def test_learning_rate_schedules():
    t = {"lr": 0.05, "epochs": 240, "schedule": "step", "milestones": [150, 180, 210], "lr_decay": 0.1}
    assert [learning_rate(t, e) for e in (0, 149.9, 150, 180, 239.5)] == pytest.approx([0.05, 0.05, 5e-3, 5e-4, 5e-5])
    t.update(schedule="cosine", epochs=10)
    assert [learning_rate(t, e) for e in (0, 5, 10)] == pytest.approx([0.05, 0.025, 0.0])
    assert learning_rate(dict(t, schedule="constant"), 7.3) == 0.05


# ---- run folder: results, resume ----------------------------------------------------------------

def test_result_and_metrics_files(cfg):
    result, _ = run(cfg, epochs=2)
    out = Path(cfg["train"]["out"])
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["last_accuracy"] == result["last_accuracy"] and on_disk["config"] == cfg
    assert on_disk["store_fingerprint"] == CacheStore.open(cfg["cache"]["store"]).fingerprint()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert on_disk["best_accuracy"] == max(m["test_accuracy"] for m in metrics)
    assert on_disk["last_accuracy"] == metrics[-1]["test_accuracy"] and on_disk["wall_seconds"] > 0
    assert (out / "student.pt").exists()


def test_interrupted_run_resumes_to_the_uninterrupted_result(cfg, tmp_path):
    full, _ = run(cfg, epochs=3)
    full_state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)

    cfg["train"]["out"] = str(tmp_path / "resumed")

    def crash(info):
        if info["epoch"] == 1 and info["step"] == 2:
            raise KeyboardInterrupt  # killed in the middle of the second epoch
    with pytest.raises(KeyboardInterrupt):
        train_student(cfg, progress=False, on_step=crash)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed, steps = run(cfg)
    assert steps[0]["epoch"] == 1 and steps[0]["step"] == 0  # restarted at the first unfinished epoch
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for k, v in full_state["model"].items():
        assert torch.equal(v, state["model"][k]), k
    timing = ("epoch_seconds", "eval_seconds", "samples_per_second")
    strip = [{k: v for k, v in m.items() if k not in timing} for m in state["metrics"]]
    assert strip == [{k: v for k, v in m.items() if k not in timing} for m in full_state["metrics"]]
    assert resumed["last_accuracy"] == full["last_accuracy"]
    # a finished run started again changes nothing
    again, steps = run(cfg)
    assert steps == [] and again["last_accuracy"] == full["last_accuracy"]


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_uninterrupted_result(cfg, tmp_path):
    """The real CLI in a subprocess, SIGKILLed after its first epoch checkpoint, then started again."""
    cfg["train"].update(epochs=5, batch_size=16)
    config = write_config(cfg, tmp_path / "train.yaml")
    full = kdcache("train", "--config", config, "--out", tmp_path / "full")
    assert full.wait(timeout=300) == 0, full.stderr.read()

    killed = kdcache("train", "--config", config, "--out", tmp_path / "killed")
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert torch.load(ckpt, weights_only=True)["epoch"] < 5
    again = kdcache("train", "--config", config, "--out", tmp_path / "killed")
    assert again.wait(timeout=300) == 0, again.stderr.read()

    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["epoch"] == b["epoch"] == 5
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [m["test_accuracy"] for m in a["metrics"]] == [m["test_accuracy"] for m in b["metrics"]]
    assert [m["train_loss"] for m in a["metrics"]] == [m["train_loss"] for m in b["metrics"]]


# ---- refusals -----------------------------------------------------------------------------------

def test_refuses_a_store_of_another_data_set(cfg):
    cfg["dataset"]["options"] = dict(cfg["dataset"]["options"], seed=1)  # same shapes, other images
    with pytest.raises(UserError, match="another data set.*fingerprint"):
        train_student(cfg, progress=False)


def test_refuses_a_store_whose_class_count_differs_from_the_student(cfg, tmp_path):
    """E.g. a 1000-class teacher cached on a 4-class subset of its data: same images, other label set."""
    real = CacheStore.open(cfg["cache"]["store"])
    fake = CacheStore.create(tmp_path / "k7.zarr", dict(real.manifest, teacher=dict(real.manifest["teacher"],
                             num_classes=7)), num_samples=128, num_views=18, num_classes=7, num_params=3,
                             samples_per_chunk=64, chunks_per_shard=2)
    for shard in range(fake.num_shards):
        n = fake.shard_rows(shard).stop - fake.shard_rows(shard).start
        fake.write_shard(shard, np.zeros((n, 18, 7), np.float16), np.zeros((n, 18, 3), np.int32),
                         np.zeros(n, np.int32))
    fake.mark_complete_if_done()
    with pytest.raises(UserError, match="7-class teacher logits.*4 classes"):
        open_store(fake.path, smoke_data(cfg), cfg["views"])


def test_refuses_a_store_of_other_views_than_the_config(cfg):
    """Online and CE-only runs draw from the config's views: the store must cache exactly those."""
    cfg["views"]["views"] = 8  # 8 random views per sample; the store caches all 18
    with pytest.raises(UserError, match=r"caches other views \(crop_flip, 18 per sample.*crop_flip, 8"):
        train_student(cfg, progress=False)


def test_refuses_an_incomplete_or_missing_store(cfg, tmp_path):
    real = CacheStore.open(cfg["cache"]["store"])
    partial = CacheStore.create(tmp_path / "part.zarr", real.manifest, num_samples=128, num_views=18,
                                num_classes=4, num_params=3, samples_per_chunk=64, chunks_per_shard=1)
    with pytest.raises(UserError, match="incomplete.*cache-teacher"):
        open_store(partial.path, smoke_data(cfg), cfg["views"])
    cfg["cache"]["store"] = str(tmp_path / "nothing.zarr")
    with pytest.raises(UserError, match="no cache store.*cache-teacher"):
        train_student(cfg, progress=False)


@pytest.mark.parametrize("method, params, call", [
    ("mlt", {"unbiased_std": False}, "kdcache stats .* --stat mlt_temperature --std population"),
    ("wttm", {"gamma": 0.3}, "kdcache stats .* --stat wttm_power_sum --gamma 0.3")])
def test_refuses_a_method_whose_statistics_the_store_lacks(cfg, method, params, call):
    cfg["train"].update(method=method, params=params, epochs=1)
    with pytest.raises(UserError, match=call):
        train_student(cfg, progress=False)
    cfg["train"]["online"] = True  # online computes them from the live teacher: no statistics needed
    assert math.isfinite(train_student(cfg, progress=False)["last_accuracy"])


@pytest.mark.parametrize("train, message", [
    ({"method": "fitnet"}, "unknown distillation method 'fitnet'"),
    ({"method": "kd", "params": {"gamma": 0.1}}, "unknown parameter.*gamma.*'kd'"),
    ({"method": "dkd", "params": {"beta": -1}}, "beta=-1 must be a number >= 0"),
    ({"schedule": "linear"}, "train.schedule must be"),
    ({"schedule": "step"}, "needs train.milestones"),
    ({"epochs": 0}, "train.epochs must be an integer >= 1"),
    ({"student": "resnet1000"}, "unknown model 'resnet1000'")])
def test_refuses_bad_training_settings(cfg, train, message):
    cfg["train"].update(train)
    with pytest.raises(UserError, match=message):
        train_student(cfg, progress=False)


def test_refuses_unknown_config_keys_and_resuming_another_config(cfg):
    with pytest.raises(UserError, match="unknown config key 'train.learning_rate'"):
        load_config(SMOKE_TRAIN, {"train": {"learning_rate": 0.1}})
    run(cfg, epochs=1)
    cfg["train"]["lr"] = 0.1
    with pytest.raises(UserError, match=r"another config \(train.lr: 0.05 there, 0.1 now\)"):
        train_student(cfg, progress=False)


def test_cli_trains_and_reports_errors_on_one_line(cfg, tmp_path):
    config = write_config(cfg, tmp_path / "train.yaml")
    runner = CliRunner()
    ok = runner.invoke(cli, ["train", "--config", str(config), "--epochs", "1", "--out", str(tmp_path / "cli"),
                             "--workers", "1"])
    assert ok.exit_code == 0, ok.output
    assert "kd (offline, fmnist_cnn): last test accuracy" in ok.output
    train = json.loads((tmp_path / "cli" / "result.json").read_text())["config"]["train"]
    assert (train["epochs"], train["workers"]) == (1, 1)
    bad = runner.invoke(cli, ["train", "--config", str(config), "--cache", str(tmp_path / "none.zarr")])
    assert bad.exit_code == 1 and "Error: no cache store at" in bad.output and "Traceback" not in bad.output


def test_shipped_training_configs_are_valid():
    """Every config under configs/train loads, passes the checks, and writes to a folder named after it."""
    from kdcache.methods import check_params
    from kdcache.stages.train_student import check_train
    paths = sorted((REPO / "configs" / "train").rglob("*.yaml"))
    # 9 methods x (Fashion-MNIST + 4 CIFAR-100 pairs), + TTM with a weight matched to WTTM's (docs/RESULTS.md),
    # + online KD with fresh views on Fashion-MNIST (the baseline of offline KD)
    assert len(paths) == 9 * 5 + 2
    for path in paths:
        t = check_train(load_config(path)["train"])
        assert t["out"].endswith(str(path.relative_to(REPO / "configs" / "train").with_suffix(""))), path
        assert check_params(t["method"], t["params"])
