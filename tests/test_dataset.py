"""The public API (kdcache.dataset, kdcache.Loss, examples/own_loop.py) on the smoke store (every view cached,
statistics computed): against the store's own arrays, across processes, and against stage 3's steps."""
import json
import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

import kdcache
from kdcache.config import load_config
from kdcache.data import load_dataset
from kdcache.dataset import CacheDataset, ChunkSampler, block_shuffled, epoch_views, open_cache, view_subset
from kdcache.errors import UserError
from kdcache.methods import distill_loss
from kdcache.stages.cache_teacher import cache_teacher
from kdcache.stages.train_student import train_student
from kdcache.encodings import decode_logits
from kdcache.store import CacheStore
from kdcache.views import apply_views
from tests.conftest import REPO, image_folder

N, V, CHUNK = 128, 18, 16  # the smoke store: 128 samples x 18 crop/flip views, chunks of 16 samples


@pytest.fixture(scope="module")
def store(train_store_cfg):
    return train_store_cfg["cache"]["store"]


def run_trainer(cfg, tmp_path, **train):
    """Stage 3 with `train` overrides; its per-step records."""
    cfg = json.loads(json.dumps(cfg))
    cfg["train"].update(out=str(tmp_path / "run"), **train)
    steps = []
    train_student(cfg, progress=False, on_step=steps.append)
    return steps


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


# ---- what the API reads is the store ------------------------------------------------------------

def test_cache_reads_the_stores_arrays_and_statistics(store):
    s = CacheStore.open(store)
    cache = open_cache(store)
    assert (cache.num_samples, cache.num_views, cache.num_classes) == (N, V, 4)
    assert cache.manifest == s.manifest and cache.fingerprint == s.fingerprint() and cache.space.num_views == V
    np.testing.assert_array_equal(cache.labels, s.labels[...])
    ids = np.array([5, 0, 127, 5])
    logits = cache.logits(ids)
    assert logits.dtype == np.float32 and logits.shape == (4, V, 4)  # stored float16, given float32
    np.testing.assert_array_equal(logits, s.logits[...][ids].astype(np.float32))
    np.testing.assert_array_equal(cache.logits(ids, [3, 0, 17, 4]), s.logits[...][ids, [3, 0, 17, 4]])
    np.testing.assert_array_equal(cache.view_params(ids, 2), s.views[...][ids, 2])
    np.testing.assert_array_equal(cache.stat("wttm_power_sum", gamma=0.1), s.group["stats/wttm_power_sum_gamma0.1"][...])
    with pytest.raises(UserError, match="kdcache stats .* --stat entropy"):
        cache.stat("entropy")
    with pytest.raises(UserError, match="sample ids must lie in 0..127"):
        cache.logits([128])


@pytest.mark.parametrize("memory_gb", [4.0, 0])  # targets loaded whole, or read chunk by chunk from Zarr
def test_items_are_the_stores_rows_replayed(store, memory_gb):
    s = CacheStore.open(store)
    logits, params, labels = s.logits[...].astype(np.float32), s.views[...], s.labels[...]
    power_sum = s.group["stats/wttm_power_sum_gamma0.1"][...]
    ds = CacheDataset(store, method="wttm", memory_gb=memory_gb, cache_chunks=2)
    assert ds.in_memory == bool(memory_gb) and len(ds) == N
    data, space = ds.data, ds.cache.space
    ds.set_epoch(3)
    views = epoch_views(N, V, 0, 3)
    for i in range(N):
        item, v = ds[i], views[i]
        assert item.keys() == {"image", "label", "logits", "sample", "view", "power_sum"}
        assert (item["sample"], item["view"], item["label"].item()) == (i, v, labels[i])
        np.testing.assert_array_equal(item["logits"].numpy(), logits[i, v])
        assert item["power_sum"].item() == power_sum[i, v] and item["power_sum"].dtype == torch.float32
        replayed = apply_views(data.images([i]), params[i, v][None], space, data.mean, data.std)[0]
        torch.testing.assert_close(item["image"], replayed, rtol=0, atol=0)
    ids = [100, 3, 64, 3, 17]  # a batch (what a DataLoader fetches) holds the same items
    for item, one in zip(ds.__getitems__(ids), [ds[i] for i in ids]):
        for k in one:
            torch.testing.assert_close(item[k], one[k], rtol=0, atol=0, msg=k)


def test_topk_store_items_are_its_reconstructed_logits(tmp_path, teacher_ckpt):
    cfg = load_config(REPO / "configs" / "smoke" / "train.yaml", {
        "teacher": {"checkpoint": str(teacher_ckpt)}, "cache": {"store": str(tmp_path / "top2.zarr"), "topk": 2}})
    cache_teacher(cfg, progress=False)
    s = CacheStore.open(cfg["cache"]["store"])
    full = decode_logits({n: a[...] for n, a in s.logit_arrays.items()}, 4)  # (N, V, 4)
    np.testing.assert_array_equal(open_cache(s.path).logits(np.arange(N)), full)
    for memory_gb in (4.0, 0):
        ds = CacheDataset(s.path, memory_gb=memory_gb)
        for i in (0, 17, 127):
            np.testing.assert_array_equal(ds[i]["logits"].numpy(), full[i, ds.views[i]])


# ---- processes, DDP, chunk order ----------------------------------------------------------------

@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_give_the_batches_of_one_process(store, context):
    """Each worker opens the store itself (Zarr reads here, memory_gb=0); the batches are those of one process."""
    ds = CacheDataset(store, method="mlt", memory_gb=0, cache_chunks=2)
    assert pickle.loads(pickle.dumps(ds)).cache._store is None  # no Zarr handle crosses processes
    ds.set_epoch(1)
    sampler = ChunkSampler(ds, seed=3)
    sampler.set_epoch(1)
    one = list(DataLoader(ds, batch_size=20, sampler=sampler))
    two = list(DataLoader(ds, batch_size=20, sampler=sampler, num_workers=2, multiprocessing_context=context))
    same_batches(one, two)
    assert sorted(torch.cat([b["sample"] for b in two]).tolist()) == list(range(N))


def test_distributed_sampler_covers_the_data_set_once(store):
    ds = CacheDataset(store)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(1)
        seen += [b["sample"] for b in DataLoader(ds, batch_size=16, sampler=sampler, num_workers=1)]
    assert sorted(torch.cat(seen).tolist()) == list(range(N))


def test_chunk_sampler_reads_every_chunk_once_per_epoch(store, monkeypatch):
    reads = []
    read_rows = CacheStore.read_rows
    monkeypatch.setattr(CacheStore, "read_rows",
                        lambda self, name, rows, digests: reads.append((name, rows.start)) or read_rows(self, name, rows, digests))
    ds = CacheDataset(store, memory_gb=0, cache_chunks=2)
    sampler = ChunkSampler(ds, chunks_per_block=2, seed=0)
    for epoch in range(3):
        reads.clear()
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)
        # stage 3's order when it reads Zarr blocks: every sample once, two chunks per block
        assert order == np.concatenate(block_shuffled(N, 0, epoch, CHUNK, 2)).tolist()
        assert sorted(order) == list(range(N)) and len(sampler) == N
        for _ in DataLoader(ds, batch_size=20, sampler=sampler):
            pass
        assert max(Counter(reads).values()) == 1  # no chunk read twice (one may still be cached from last epoch)
        if epoch == 0:
            assert sorted(reads) == [("logits", c * CHUNK) for c in range(N // CHUNK)]  # view params: loaded whole
    with pytest.raises(UserError, match="more than the 2 chunks the dataset caches"):
        ChunkSampler(ds, chunks_per_block=3)


def test_chunk_sampler_splits_whole_blocks_between_ranks(store):
    ds = CacheDataset(store, memory_gb=0, cache_chunks=2)
    parts = [list(ChunkSampler(ds, chunks_per_block=2, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    # 8 chunks in 4 blocks: ranks get 2, 1, 1 blocks, padded with their own last block to 64 ids each
    assert [len(p) for p in parts] == [64, 64, 64]
    assert set().union(*parts) == set(range(N))
    chunks = [{i // CHUNK for i in p} for p in parts]
    assert sum(map(len, chunks)) == N // CHUNK  # no chunk is read by two ranks
    with pytest.raises(UserError, match="fewer than the 5 ranks"):
        ChunkSampler(ds, chunks_per_block=2, num_replicas=5, rank=0)


# ---- views and steps of stage 3 -----------------------------------------------------------------

def test_epoch_views_are_the_trainers(train_store_cfg, tmp_path):
    """Stage 3 with train.views_used 3: per step, the dataset's views of those samples are the trainer's."""
    steps = run_trainer(train_store_cfg, tmp_path, epochs=2, views_used=3)
    ds = CacheDataset(train_store_cfg["cache"]["store"], views_used=3)
    assert (ds.views[:, None] == view_subset(N, V, 3, ds.cache.space.seed)).any(1).all()  # views of the subset
    for epoch in range(2):
        ds.set_epoch(epoch)
        for s in (s for s in steps if s["epoch"] == epoch):
            np.testing.assert_array_equal(ds.views[s["ids"]], s["views"])
    with pytest.raises(UserError, match="views_used must be an integer in 1..18"):
        CacheDataset(train_store_cfg["cache"]["store"], views_used=19)


@pytest.mark.parametrize("method", ["kd", "mlt"])  # mlt: the cached temperatures come through the batches
def test_own_loop_example_takes_the_trainers_steps(train_store_cfg, tmp_path, method):
    """examples/own_loop.py with 2 workers: its first losses (over an epoch boundary) are stage 3's, with the
    trainer reading Zarr blocks of the same size at a constant lr."""
    steps = run_trainer(train_store_cfg, tmp_path, method=method, epochs=2, memory_gb=0, schedule="constant")
    done = subprocess.run([sys.executable, "examples/own_loop.py", "--cache", train_store_cfg["cache"]["store"],
                           "--method", method, "--steps", "6", "--workers", "2", "--chunks-per-block", "2"],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines()]
    assert losses == [s["loss"] for s in steps[:6]]


# ---- losses and mistakes ------------------------------------------------------------------------

def test_loss_is_the_trainers_formula_with_published_settings():
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    u = torch.rand(8) + 1
    got = kdcache.Loss("wttm")(z_s, z_t, y, stats={"power_sum": u}, epoch=1)
    want = 1.0 * F.cross_entropy(z_s, y) + 3.0 * distill_loss("wttm", z_s, z_t, y, params={}, stats={"power_sum": u},
                                                               epoch=1)
    assert got.item() == want.item()
    assert kdcache.Loss("kd", standardize=True).params["T"] == 2.0  # the LS paper's settings
    with pytest.raises(UserError, match="unknown distillation method"):
        kdcache.Loss("fitnet")


def test_mistakes_are_one_line_user_errors(store, tmp_path):
    with pytest.raises(UserError, match="no cache store at"):
        CacheDataset(tmp_path / "nothing.zarr")
    other = load_dataset("synthetic", "train", subset=64, num_samples=256, num_classes=4, channels=1, size=16)
    with pytest.raises(UserError, match="built on another data set"):
        CacheDataset(store, other)
    with pytest.raises(UserError, match="has no stats/mlt_temperature_population"):
        CacheDataset(store, method="mlt", params={"unbiased_std": False})


def test_image_folder_of_any_sizes_with_box_views(tmp_path):
    """Variable-size images (imagefolder) and resized-crop views: items are the store's views replayed."""
    image_folder(tmp_path, {"cat": 3, "dog": 2})
    cfg = load_config(REPO / "configs" / "smoke" / "synthetic.yaml", {
        "teacher": {"checkpoint": str(tmp_path / "teacher.pt")}, "cache": {"store": str(tmp_path / "folder.zarr")}})
    cfg["dataset"] = {"name": "imagefolder", "root": str(tmp_path / "images"), "subset": None, "options": {}}
    cfg["views"] = {"kind": "resized_crop_flip", "size": 16, "views": 3}  # replaced whole, not merged
    cache_teacher(cfg, progress=False)
    s = CacheStore.open(cfg["cache"]["store"])
    ds = CacheDataset(s.path)
    assert ds.data.image_size is None and len(ds) == 5
    batch = next(iter(DataLoader(ds, batch_size=5, num_workers=1)))
    assert batch["image"].shape == (5, 3, 16, 16)
    for j, i in enumerate(batch["sample"].tolist()):
        v = batch["view"][j].item()
        np.testing.assert_array_equal(batch["logits"][j].numpy(), s.logits[i, v].astype(np.float32))
        replayed = apply_views([ds.data.image(i)], s.views[i, v][None], ds.cache.space, ds.mean, ds.std)[0]
        torch.testing.assert_close(batch["image"][j], replayed, rtol=0, atol=0)
