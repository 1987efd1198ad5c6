"""Stage 1: replay, resume after SIGKILL, parallel writers, background writing, bad input."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdcache.stages.cli import cli
from kdcache.data import load_dataset
from kdcache.models import build_model, load_checkpoint, save_checkpoint
from kdcache.store import CacheStore
from kdcache.views import ViewSpace, apply_views
from kdcache.stages.cache_teacher import ShardWriter, cache_teacher
from kdcache.stats import check_settings, exact_arrays
from tests.conftest import REPO, image_folder, kdcache, write_config


def smoke_data(cfg):
    d = cfg["dataset"]
    return load_dataset(d["name"], "train", root=d["root"], subset=d["subset"], **d["options"])


def arrays(store: CacheStore) -> dict:
    return {name: store.group[name][:] for name in ("logits", "views", "labels", "shard_done")}


def assert_same_store(a: CacheStore, b: CacheStore):
    for name, value in arrays(a).items():
        np.testing.assert_array_equal(value, arrays(b)[name], err_msg=name)
    assert a.manifest == b.manifest and a.status == b.status == "complete"


def test_replay_reproduces_stored_logits(smoke_cfg):
    """Re-running the teacher on images re-created from stored view parameters gives the stored logits."""
    store = cache_teacher(smoke_cfg, progress=False)
    assert store.status == "complete" and store.done().all()
    data = smoke_data(smoke_cfg)
    space = ViewSpace.from_manifest(store.manifest["views"])
    teacher, _ = load_checkpoint(smoke_cfg["teacher"]["checkpoint"])
    logits, views = store.logits[:], store.views[:]
    np.testing.assert_array_equal(store.labels[:], data.labels)
    np.testing.assert_array_equal(views, space.sample_params(np.arange(len(data)), data.image_size))

    rng = np.random.default_rng(1)
    ids = rng.integers(0, len(data), 64)
    vs = rng.integers(0, space.num_views, 64)
    x = apply_views(data.images(ids), views[ids, vs], space, data.mean, data.std)
    with torch.inference_mode():
        fresh = teacher(x).numpy()
    np.testing.assert_allclose(logits[ids, vs].astype(np.float32), fresh, rtol=2e-3, atol=2e-3)
    # and the views differ: a wrong view gives other logits (the test can fail)
    other = apply_views(data.images(ids), views[ids, (vs + 1) % space.num_views], space, data.mean, data.std)
    with torch.inference_mode():
        assert not np.allclose(teacher(other).numpy(), fresh, atol=2e-3)


def test_rerun_of_complete_store_recomputes_nothing(smoke_cfg):
    store = cache_teacher(smoke_cfg, progress=False)
    shard_file = store.path + "/logits/c/0/0/0"
    before = os.stat(shard_file).st_mtime_ns
    again = cache_teacher(smoke_cfg, progress=False)
    assert os.stat(shard_file).st_mtime_ns == before
    assert_same_store(store, again)


def test_float32_store_and_manifest(smoke_cfg):
    smoke_cfg["cache"]["dtype"] = "float32"
    store = cache_teacher(smoke_cfg, progress=False)
    assert store.logits.dtype == np.float32
    m = store.manifest
    assert m["logits"]["dtype"] == "float32"
    assert m["teacher"]["arch"] == "tiny_teacher" and len(m["teacher"]["checkpoint_sha256"]) == 64
    assert 0.0 <= m["teacher"]["test_accuracy"] <= 1.0
    assert m["dataset"]["fingerprint"] == smoke_data(smoke_cfg).fingerprint()
    assert m["views"]["num_views"] == store.logits.shape[1] == 4


def test_writer_runs_in_background_and_reports_errors(smoke_cfg):
    """Writes happen on the writer thread; a failing write surfaces in the caller, nothing marked done."""
    store = cache_teacher(smoke_cfg, progress=False)
    seen = []

    class Recording(CacheStore):
        def write_shard(self, shard, *a):
            seen.append(threading.current_thread().name)
            super().write_shard(shard, *a)

    rec = Recording(store.group, store.path)
    rows = rec.shard_rows(0)
    with ShardWriter(rec) as w:
        w.put(0, store.logits[rows], store.views[rows], store.labels[rows])
    assert seen == ["shard-writer"]

    rec.shard_done[1] = 0
    with pytest.raises(ValueError):
        with ShardWriter(rec) as w:
            w.put(1, np.zeros((1, 2, 3), np.float16), store.views[rec.shard_rows(1)], store.labels[rec.shard_rows(1)])
    assert not rec.done()[1]


def test_writer_writes_a_lossy_stores_exact_rows_before_the_record(smoke_cfg):
    """The exact statistics of a shard (stage 1 of a top-k store) are written before its data and record, so a
    shard recorded done has them; a redone shard rewrites them."""
    smoke_cfg["cache"]["topk"] = 2
    store = cache_teacher(smoke_cfg, progress=False)
    exact = exact_arrays(store, check_settings(smoke_cfg["stats"]))
    assert [o.name for o, _ in exact][:3] == ["mean", "std_unbiased", "max"]
    seen = []

    class Recording(CacheStore):
        def write_shard(self, shard, *a):
            seen.append(np.stack([x[self.shard_rows(shard)] for _, x in exact], axis=-1))
            super().write_shard(shard, *a)

    rec = Recording(store.group, store.path)
    rows = rec.shard_rows(1)
    rec.shard_done[1] = 0
    before = np.stack([x[rows] for _, x in exact], axis=-1)
    constant = np.full((rows.stop - rows.start, store.views.shape[1], 4), 7.0, np.float32)  # other logits
    with ShardWriter(rec, exact) as w:
        w.put(1, {n: a[rows] for n, a in store.logit_arrays.items()}, store.views[rows], store.labels[rows], constant)
    assert np.isfinite(before).all() and rec.done()[1]
    want = {"mean": 7, "std_unbiased": 0, "max": 7, "min": 7, "logsumexp": 7 + np.log(4), "entropy": np.log(4)}
    for j, (o, _) in enumerate(exact):  # the writer's statistics of the logits put, written before the record
        if o.name in want:
            np.testing.assert_allclose(seen[0][..., j], want[o.name], rtol=1e-6, err_msg=o.name)


# ---- bad input: one-line error, non-zero exit, nothing marked complete --------------------------------

def run_cli(*args):
    """(exit code, the last line printed): for errors, the one `Error: ...` line (tqdm may precede it)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output.strip().splitlines()[-1] if result.output.strip() else ""


def bad_case(cfg, tmp_path, **change):
    for dotted, value in change.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return write_config(cfg, tmp_path / "bad.yaml")


@pytest.mark.parametrize("change, message", [
    ({"teacher__checkpoint": "/nonexistent/t.pt"}, "/nonexistent/t.pt"),
    ({"dataset__name": "mnist-of-doom"}, "mnist-of-doom"),
    ({"teacher__arch": "resnet_of_doom"}, "resnet_of_doom"),
    ({"dataset__name": "fashion-mnist", "dataset__root": "/nonexistent/data", "dataset__options": {}},
     "/nonexistent/data"),
    ({"cache__topk": 2, "stats__gammas": [0.1, -1]}, "stats.gammas (gamma) must be a finite number > 0, got -1"),
])
def test_bad_input_is_one_line_error(smoke_cfg, tmp_path, change, message):
    code, out = run_cli("cache-teacher", "--config", bad_case(smoke_cfg, tmp_path, **change))
    assert code != 0 and out.startswith("Error:") and message in out
    assert not (tmp_path / "cache.zarr").exists() or CacheStore.open(tmp_path / "cache.zarr").status != "complete"


def test_mismatched_checkpoints_are_refused(smoke_cfg, tmp_path):
    other_arch = tmp_path / "other_arch.pt"
    save_checkpoint(other_arch, build_model("fmnist_cnn", 4, 1), arch="fmnist_cnn", num_classes=4,
                    in_channels=1, meta={})
    other_classes = tmp_path / "other_classes.pt"
    save_checkpoint(other_classes, build_model("tiny_teacher", 7, 1), arch="tiny_teacher", num_classes=7,
                    in_channels=1, meta={})
    for ckpt in (other_arch, other_classes):
        code, out = run_cli("cache-teacher", "--config", write_config(smoke_cfg, tmp_path / "c.yaml"),
                            "--checkpoint", ckpt)
        assert code != 0 and out.startswith("Error:"), out


def test_unwritable_output(smoke_cfg, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    code, out = run_cli("cache-teacher", "--config", write_config(smoke_cfg, tmp_path / "c.yaml"),
                        "--out", tmp_path / "a_file" / "cache.zarr")
    assert code != 0 and out.startswith("Error:") and "cannot write" in out


def test_store_from_other_manifest_refused_unless_overwrite(smoke_cfg, tmp_path):
    cache_teacher(smoke_cfg, progress=False)
    smoke_cfg["views"]["views"] = 2
    code, out = run_cli("cache-teacher", "--config", write_config(smoke_cfg, tmp_path / "c.yaml"))
    assert code != 0 and "different manifest" in out and "views" in out
    assert CacheStore.open(smoke_cfg["cache"]["store"]).logits.shape[1] == 4  # untouched
    code, out = run_cli("cache-teacher", "--config", tmp_path / "c.yaml", "--overwrite")
    assert code == 0, out
    assert CacheStore.open(smoke_cfg["cache"]["store"]).logits.shape[1] == 2


def test_nan_teacher_outputs_refused(smoke_cfg, tmp_path):
    model, info = load_checkpoint(smoke_cfg["teacher"]["checkpoint"])
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, model, arch=info["arch"], num_classes=info["num_classes"],
                    in_channels=info["in_channels"], meta={"test_accuracy": 0.0})
    code, out = run_cli("cache-teacher", "--config", write_config(smoke_cfg, tmp_path / "c.yaml"), "--checkpoint", bad)
    assert code != 0 and "NaN/Inf" in out
    store = CacheStore.open(smoke_cfg["cache"]["store"])
    assert store.status == "incomplete" and not store.done().any()


# ---- processes: SIGKILL + resume, parallel writers ---------------------------------------------------

def bigger(cfg, tmp_path, name):
    """A store with many shards, so that a kill lands part-way."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    cfg["dataset"] = dict(cfg["dataset"], options=dict(cfg["dataset"]["options"], num_samples=1024))
    cfg["views"] = dict(cfg["views"], views="all")
    cfg["cache"] = dict(cfg["cache"], store=str(tmp_path / f"{name}.zarr"), batch_size=64,
                        samples_per_chunk=32, chunks_per_shard=1)
    return cfg, write_config(cfg, tmp_path / f"{name}.yaml")


def kill_after_shards(yaml_path, store_path, shards: int = 3) -> None:
    """Run stage 1 on the config at `yaml_path` in a subprocess and SIGKILL it once `shards` shards are recorded done."""
    done_dir = Path(store_path) / "shard_done" / "c"
    proc = kdcache("cache-teacher", "--config", yaml_path)
    while not (done_dir.exists() and len(list(done_dir.iterdir())) >= shards):
        assert proc.poll() is None, "stage 1 finished before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(smoke_cfg, tmp_path):
    ref_cfg, ref_yaml = bigger(smoke_cfg, tmp_path, "ref")
    assert kdcache("cache-teacher", "--config", ref_yaml).wait() == 0
    cfg, yaml_path = bigger(smoke_cfg, tmp_path, "killed")
    kill_after_shards(yaml_path, cfg["cache"]["store"])
    store = CacheStore.open(cfg["cache"]["store"])
    finished = np.flatnonzero(store.done())
    assert store.status == "incomplete" and 0 < len(finished) < store.num_shards
    stamps = {s: (tmp_path / "killed.zarr" / "logits" / "c" / str(s) / "0" / "0").stat().st_mtime_ns
              for s in finished}
    resumed = kdcache("cache-teacher", "--config", yaml_path)
    assert resumed.wait() == 0, resumed.stderr.read()
    for s, stamp in stamps.items():  # finished shards were not recomputed
        assert (tmp_path / "killed.zarr" / "logits" / "c" / str(s) / "0" / "0").stat().st_mtime_ns == stamp
    assert_same_store(CacheStore.open(cfg["cache"]["store"]), CacheStore.open(ref_cfg["cache"]["store"]))


@pytest.mark.slow
def test_two_processes_give_the_same_store_as_one(smoke_cfg, tmp_path):
    one_cfg, one_yaml = bigger(smoke_cfg, tmp_path, "one")
    two_cfg, two_yaml = bigger(smoke_cfg, tmp_path, "two")
    assert kdcache("cache-teacher", "--config", one_yaml).wait() == 0
    procs = [kdcache("cache-teacher", "--config", two_yaml, "--num-shards", 2, "--shard-index", i) for i in (0, 1)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    assert_same_store(CacheStore.open(two_cfg["cache"]["store"]), CacheStore.open(one_cfg["cache"]["store"]))
    # the same under torchrun: ranks take their shards from WORLD_SIZE/RANK
    run_cfg, run_yaml = bigger(smoke_cfg, tmp_path, "torchrun")
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "--no-python", sys.executable, "-m", "kdcache.stages.cli",
                           "cache-teacher", "--config", run_yaml], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_store(CacheStore.open(run_cfg["cache"]["store"]), CacheStore.open(one_cfg["cache"]["store"]))


def test_one_of_two_processes_leaves_store_incomplete(smoke_cfg, tmp_path):
    code, out = run_cli("cache-teacher", "--config", write_config(smoke_cfg, tmp_path / "c.yaml"),
                        "--num-shards", 2, "--shard-index", 1)
    assert code == 0, out
    store = CacheStore.open(smoke_cfg["cache"]["store"])
    assert store.status == "incomplete"
    assert list(store.done()) == [s % 2 == 1 for s in range(store.num_shards)]
    code, out = run_cli("cache-teacher", "--config", tmp_path / "c.yaml", "--num-shards", 2, "--shard-index", 0)
    assert code == 0 and CacheStore.open(smoke_cfg["cache"]["store"]).status == "complete"


def test_dataloader_workers_give_the_same_store(smoke_cfg, tmp_path):
    """Stage 1 reading and replaying views in 2 DataLoader worker processes writes what it writes in process,
    for in-memory images and for an image folder decoded in the workers."""
    teacher = image_folder(tmp_path, {"cat": 5, "dog": 4})
    folder = json.loads(json.dumps(smoke_cfg))
    folder["dataset"] = {"name": "imagefolder", "root": str(tmp_path / "images"), "subset": None, "options": {}}
    folder["views"] = {"kind": "resized_crop_flip", "size": 16, "views": 3}
    folder["teacher"] = dict(folder["teacher"], checkpoint=str(teacher))
    for name, cfg in (("pixels", smoke_cfg), ("folder", folder)):
        stores = []
        for workers in (0, 2):
            c = json.loads(json.dumps(cfg))
            c["cache"].update(store=str(tmp_path / f"{name}{workers}.zarr"), workers=workers, batch_size=7)
            stores.append(cache_teacher(c, progress=False))
        assert_same_store(*stores)
