"""The view-major layout (format 1.3): a chunk of the logit arrays holds one view of its samples, stage 3 chooses
views per chunk of samples, and a reader of one view reads and checks only that view's chunks."""
import json
import shutil

import google_crc32c
import numpy as np
import pytest
import zarr

from kdcache.config import load_config
from kdcache.data import load_dataset
from kdcache.dataset import CacheDataset, ChunkSampler, cached_stats, epoch_views, view_subset
from kdcache.encodings import encode_logits, logits_entry
from kdcache.errors import StoreDamage, UserError
from kdcache.methods import build
from kdcache.stages.cache_teacher import cache_teacher
from kdcache.stages.compute_stats import compute_stats
from kdcache.stages.train_student import train_student
from kdcache.store import CacheStore, _shard_index
from kdcache.targets import MemoryTargets, ZarrTargets, open_store
from kdcache.verify import CorruptStore, format_info, store_info, verify_store
from tests.conftest import REPO

N, V, K, P, C = 100, 3, 7, 2, 16  # 16-row chunks, 2 per shard: the last shard and its last chunk are partial
ENCODINGS = {"dense": "dense", "topk": {"topk": 2}, "quantized": {"quantized": 8}}


def make_store(path, layout, encoding="dense") -> CacheStore:
    """A complete store of the same random rows (seed 0) in `layout`, written as stage 1 writes."""
    rng = np.random.default_rng(0)
    z = (4 * rng.standard_normal((N, V, K))).astype(np.float32)
    params, labels = rng.integers(0, 9, (N, V, P)).astype(np.int32), rng.integers(0, K, N).astype(np.int32)
    entry = logits_entry({"encoding": encoding, "dtype": "float16"}, K)
    store = CacheStore.create(path, {"test": "layout", "logits": entry}, num_samples=N, num_views=V, num_classes=K,
                              num_params=P, samples_per_chunk=C, chunks_per_shard=2, layout=layout)
    parts = encode_logits(z, entry, ids=np.arange(N))
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        store.write_shard(shard, {k: v[rows] for k, v in parts.items()}, params[rows], labels[rows])
    store.mark_complete_if_done()
    return CacheStore.open(path)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_both_layouts_hold_the_same_rows_for_any_zarr_reader(tmp_path, encoding):
    a = make_store(tmp_path / "a.zarr", "sample-major", ENCODINGS[encoding])
    b = make_store(tmp_path / "b.zarr", "view-major", ENCODINGS[encoding])
    ga, gb = zarr.open_group(str(tmp_path / "a.zarr"), mode="r"), zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    assert (ga.attrs["layout"], gb.attrs["layout"], gb.attrs["format_minor_version"]) == ("sample-major", "view-major", 3)
    assert a.fingerprint() == b.fingerprint()  # the same logits: statistics and runs of one serve the other
    for name in a.logit_arrays:
        inner = json.loads((tmp_path / "b.zarr" / name / "zarr.json").read_text())["codecs"][0]["configuration"]
        assert inner["chunk_shape"][:2] == [C, 1] and gb[name].shards[:2] == (32, V)  # one view per chunk, V per shard
        np.testing.assert_array_equal(ga[name][...], gb[name][...])
    assert "view_crc32c" in gb and "view_crc32c" not in ga
    assert (a.view_group, b.view_group) == (1, C)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_read_view_gives_zarrs_values_of_that_view(tmp_path, encoding):
    store = make_store(tmp_path / "s.zarr", "view-major", ENCODINGS[encoding])
    assert all(shard_of is not None for shard_of, _ in store.layouts.values())  # read by kdcache itself
    digests, view_digests = store.recorded_digests(), store.recorded_view_digests()
    for name, a in store.logit_arrays.items():
        for rows in (slice(0, N), slice(16, 32), slice(16, 80), slice(96, N), slice(64, N)):
            np.testing.assert_array_equal(store.read_rows(name, rows, digests), a[rows])  # all views of whole rows
            for v in range(V):
                got = store.read_view(name, rows, v, view_digests)
                assert got.shape == a[rows, v].shape
                np.testing.assert_array_equal(got, a[rows, v])


def test_view_digests_are_as_format_md_says(tmp_path):
    make_store(tmp_path / "s.zarr", "view-major")
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    table, logits = g["view_crc32c"][...], g["logits"][...]
    assert table.shape == (-(-N // C), V, 1) and g["view_crc32c"].attrs["arrays"] == ["logits"]
    for j in range(table.shape[0]):
        lo, hi = j * C, min((j + 1) * C, N)
        for v in range(V):
            header = np.array([lo, hi, v], "<i8").tobytes()
            crc = google_crc32c.extend(google_crc32c.value(header), logits[lo:hi, v].astype("<f2").tobytes())
            assert table[j, v, 0] == crc
    assert (g["chunk_crc32c"].attrs["arrays"] == ["logits", "views", "labels"])  # whole-row digests kept


def test_a_view_holding_another_views_rows_is_refused_by_readers_and_verify(tmp_path):
    store = make_store(tmp_path / "s.zarr", "view-major")
    raw = zarr.open_array(str(tmp_path / "s.zarr" / "logits"), mode="r+")
    raw[0:C, 1] = raw[0:C, 0]  # valid numbers, valid checksums: only the digests can tell
    store, vd = CacheStore.open(tmp_path / "s.zarr"), store.recorded_view_digests()
    store.read_view("logits", slice(0, C), 0, vd)
    with pytest.raises(StoreDamage, match=r"logits samples 0\.\.15 view 1 are not the rows written there.*view_crc32c"):
        store.read_view("logits", slice(0, C), 1, vd)


def test_a_damaged_chunk_of_one_view_is_read_only_by_that_views_reader(tmp_path):
    store = make_store(tmp_path / "s.zarr", "view-major")
    shard = tmp_path / "s.zarr" / "logits" / "c" / "0" / "0" / "0"
    with open(shard, "rb") as f:
        offset, nbytes = _shard_index(f.fileno(), 2 * V)[0 * V + 2]  # chunk 0 of rows, view 2
    data = bytearray(shard.read_bytes())
    data[offset + nbytes // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    vd = store.recorded_view_digests()
    for v in (0, 1):
        store.read_view("logits", slice(0, 32), v, vd)  # never reads view 2's bytes
    with pytest.raises(StoreDamage, match="crc32c"):
        store.read_view("logits", slice(0, C), 2, vd)


def test_views_are_chosen_per_group_and_cycle_through_every_view():
    n, views, group = 100, 5, 16
    cycle = np.stack([epoch_views(n, views, 3, e, group) for e in range(views)])  # (epochs, samples)
    for g in range(0, n, group):
        assert (cycle[:, g:g + group] == cycle[:, g:g + 1]).all()  # one view per group and epoch
        assert sorted(cycle[:, g]) == list(range(views))          # every view once per cycle
    assert len({tuple(cycle[:, g]) for g in range(0, n, group)}) > 1  # groups draw their own order
    np.testing.assert_array_equal(epoch_views(n, views, 3, 2, 1), epoch_views(n, views, 3, 2))
    subset = view_subset(n, views, 2, 0, group)
    assert (subset[:group] == subset[0]).all() and (subset[:, :1] == view_subset(n, views, 1, 0, group)).all()


@pytest.fixture(scope="module")
def view_major_cfg(tmp_path_factory, teacher_ckpt):
    """The smoke train config with a view-major store of the smoke teacher and its statistics."""
    tmp = tmp_path_factory.mktemp("view_major")
    cfg = load_config(REPO / "configs" / "smoke" / "train.yaml",
                      {"teacher": {"checkpoint": str(teacher_ckpt)},
                       "cache": {"store": str(tmp / "cache.zarr"), "layout": "view-major"}})
    cache_teacher(cfg, progress=False)
    compute_stats(cfg["cache"]["store"], cfg["stats"], progress=False)
    return cfg


def train(cfg, out, **overrides):
    cfg = json.loads(json.dumps(cfg))
    cfg["train"].update(out=str(out), **overrides)
    steps = []
    return train_student(cfg, progress=False, on_step=steps.append), steps


def test_zarr_blocks_of_a_view_major_store_give_the_rows_memory_gives(view_major_cfg, train_store_cfg):
    """ZarrTargets reads one view per chunk: the same targets and statistics as MemoryTargets and as the
    sample-major store of the same teacher."""
    data = load_dataset("synthetic", "train", subset=128, **view_major_cfg["dataset"]["options"])
    method = build("mlt", {})
    sources = []
    for cfg in (view_major_cfg, train_store_cfg):
        store = open_store(cfg["cache"]["store"], data, cfg["views"])
        stats = cached_stats(store, method, None)
        sources += [ZarrTargets(store, stats, 2), MemoryTargets(store, stats)]
    store = sources[0].store
    for epoch in (0, 1):
        views = epoch_views(128, 18, 0, epoch, store.view_group)
        for rows in sources[0].blocks(128, 0, epoch):
            got = [s.read(rows, views[rows]) for s in sources]
            assert set(got[0]) == {"params", "logits", "temperature"}
            for other in got[1:]:
                for k in got[0]:
                    np.testing.assert_array_equal(got[0][k], other[k])


@pytest.mark.parametrize("memory_gb", [4, 0])
def test_training_on_a_view_major_store_takes_one_view_per_chunk_and_epoch(view_major_cfg, tmp_path, memory_gb):
    result, steps = train(view_major_cfg, tmp_path / "run", method="kd", epochs=2, memory_gb=memory_gb)
    assert result["targets"] == ("memory" if memory_gb else "zarr") and all(np.isfinite(s["loss"]) for s in steps)
    assert (result["store_layout"], result["store_samples_per_chunk"], result["view_group"]) == ("view-major", 16, 16)
    c, per_epoch = view_major_cfg["cache"]["samples_per_chunk"], len(steps) // 2
    for epoch in range(2):
        seen = {}
        for s in steps[epoch * per_epoch:(epoch + 1) * per_epoch]:
            for i, v in zip(s["ids"].tolist(), s["views"].tolist()):
                seen.setdefault(i // c, set()).add(v)
        assert len(seen) == 128 // c and all(len(v) == 1 for v in seen.values())


def test_views_used_on_a_view_major_store_is_a_subset_per_chunk(view_major_cfg, tmp_path):
    _, steps = train(view_major_cfg, tmp_path / "run", method="kd", epochs=4, views_used=2, memory_gb=0)
    c, seen = view_major_cfg["cache"]["samples_per_chunk"], {}
    for s in steps:
        for i, v in zip(s["ids"].tolist(), s["views"].tolist()):
            seen.setdefault(i // c, set()).add(v)
    allowed = view_subset(128, 18, 2, 0, c)
    assert all(seen[j] == set(allowed[j * c].tolist()) for j in range(128 // c))


def test_cache_dataset_reads_one_view_per_chunk_as_it_would_from_memory(view_major_cfg):
    path = view_major_cfg["cache"]["store"]
    loaded, chunked = CacheDataset(path, seed=1), CacheDataset(path, seed=1, memory_gb=0, cache_chunks=2)
    assert loaded.in_memory and not chunked.in_memory
    for epoch in (0, 1):
        loaded.set_epoch(epoch), chunked.set_epoch(epoch)
        order = list(ChunkSampler(chunked, chunks_per_block=2, seed=1))
        got, want = chunked.__getitems__(order[:40]), loaded.__getitems__(order[:40])
        for x, y in zip(got, want):
            assert x["view"] == y["view"] and x["sample"] == y["sample"]
            assert x["logits"].equal(y["logits"]) and x["image"].equal(y["image"])
        c = chunked.cache.samples_per_chunk
        assert all((chunked.views[j:j + c] == chunked.views[j]).all() for j in range(0, len(chunked), c))


def test_info_names_the_layout_and_a_store_of_another_layout_is_not_resumed(view_major_cfg):
    info = store_info(view_major_cfg["cache"]["store"])
    assert info["layout"] == "view-major" and info["format"].endswith("v1.3")
    assert "layout     view-major: a chunk holds 16 samples x 1 view" in format_info(info)
    assert "view_crc32c" in verify_store(view_major_cfg["cache"]["store"], progress=False)
    cfg = json.loads(json.dumps(view_major_cfg))
    cfg["cache"]["layout"] = "sample-major"
    with pytest.raises(UserError, match="has cache.layout view-major, not the sample-major asked for"):
        cache_teacher(cfg, progress=False)
    cfg["cache"].update(layout="view-major", samples_per_chunk=8)  # the chunk: the samples sharing a view
    with pytest.raises(UserError, match="has cache.samples_per_chunk 16, not the 8 asked for; use --overwrite"):
        cache_teacher(cfg, progress=False)


@pytest.mark.parametrize("damage, message", [
    ("digest", r"logits samples 48\.\.63 view 5 .*view_crc32c"),  # found by verify, not first by a training run
    ("rows", r"logits samples 0\.\.15 view 1 are not the rows written there"),
    ("byte", r"crc32c")])
def test_verify_finds_damage_to_one_view(view_major_cfg, tmp_path, damage, message):
    path = tmp_path / "copy.zarr"
    shutil.copytree(view_major_cfg["cache"]["store"], path)
    if damage == "digest":
        digests = zarr.open_array(str(path / "view_crc32c"), mode="r+")
        digests[3, 5, 0] ^= 1
    elif damage == "rows":
        raw = zarr.open_array(str(path / "logits"), mode="r+")
        raw[0:16, 1] = raw[0:16, 0]
    else:
        shard = path / "logits" / "c" / "0" / "0" / "0"
        with open(shard, "rb") as f:
            offset, nbytes = _shard_index(f.fileno(), 2 * 18)[2]  # chunk 0 of rows, view 2
        data = bytearray(shard.read_bytes())
        data[offset + nbytes // 2] ^= 0x5A
        shard.write_bytes(bytes(data))
    with pytest.raises(CorruptStore, match=message):
        verify_store(path, progress=False)


def test_view_major_with_every_crop_cached_warns_about_large_chunks(view_major_cfg, tmp_path, caplog):
    cfg = json.loads(json.dumps(view_major_cfg))  # views: all of crop_flip: view v is the same crop of every sample
    cfg["cache"].update(store=str(tmp_path / "c64.zarr"), samples_per_chunk=64)
    cache_teacher(cfg, progress=False)
    assert "the 64 samples of a chunk will share one crop per epoch" in caplog.text
    caplog.clear()
    cfg["cache"].update(store=str(tmp_path / "c32.zarr"), samples_per_chunk=32)
    cache_teacher(cfg, progress=False)
    assert "share one crop" not in caplog.text


def test_an_unknown_layout_is_refused(tmp_path):
    with pytest.raises(UserError, match="cache.layout must be sample-major or view-major, got 'diagonal'"):
        load_config(REPO / "configs" / "smoke" / "train.yaml", {"cache": {"layout": "diagonal"}})
    make_store(tmp_path / "s.zarr", "view-major")
    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+").attrs["layout"] = "diagonal"
    with pytest.raises(UserError, match="layout 'diagonal'.*newer kdcache; upgrade"):
        CacheStore.open(tmp_path / "s.zarr")
