"""The block reader: `CacheStore.read_rows` reads whole chunks from the shard files itself (`whole_chunks`); what it
gives must be zarr's read, bit for bit, in every codec a store may hold, and damaged bytes must still be StoreDamage."""
import numpy as np
import pytest
import zarr

import kdcache.store
from kdcache.errors import StoreDamage
from kdcache.store import CacheStore, bad_values, nonfinite_bits, whole_chunks
from kdcache.targets import chunk_runs

N, V, K, P = 100, 3, 7, 2  # 16-row chunks, 2 per shard: the last shard and its last chunk are partial


def make_store(path, dtype="float16") -> CacheStore:
    rng = np.random.default_rng(0)
    store = CacheStore.create(path, {"test": "reader", "logits": {"dtype": dtype}}, num_samples=N, num_views=V,
                              num_classes=K, num_params=P, dtype=dtype, samples_per_chunk=16, chunks_per_shard=2)
    for shard in range(store.num_shards):
        rows = store.shard_rows(shard)
        n = rows.stop - rows.start
        store.write_shard(shard, (4 * rng.standard_normal((n, V, K))).astype(dtype),
                          rng.integers(0, 9, (n, V, P)).astype(np.int32), rng.integers(0, K, n).astype(np.int32))
    store.mark_complete_if_done()
    return CacheStore.open(path)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_read_rows_gives_zarrs_values_for_any_span(tmp_path, monkeypatch, codec, dtype):
    if codec == "lz4":  # the codec a store may hold besides the default
        monkeypatch.setattr(kdcache.store, "CODEC", {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"})
    store = make_store(tmp_path / "s.zarr", dtype)
    blosc = store.logits.metadata.to_dict()["codecs"][0]["configuration"]["codecs"][1]["configuration"]
    assert blosc["cname"] == codec
    assert all(shard_of is not None for shard_of, _ in store.layouts.values())  # read by kdcache, not zarr
    digests = store.recorded_digests()
    for name, a in store.per_sample.items():
        for rows in (slice(0, N), slice(16, 32), slice(16, 80), slice(32, 64), slice(96, N), slice(64, N)):
            got, want = store.read_rows(name, rows, digests), a[rows]
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_a_layout_it_does_not_read_itself_is_read_by_zarr():
    a = zarr.create_array(zarr.storage.MemoryStore(), shape=(40, 3), chunks=(8, 3), shards=(16, 3), dtype="int32")
    a[:] = np.arange(120).reshape(40, 3)
    layout = kdcache.store._direct_layout(a)
    assert layout == (None, None)
    np.testing.assert_array_equal(whole_chunks(a, slice(8, 40), layout), np.arange(24, 120).reshape(32, 3))


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["chunk", "index", "truncated"])
def test_damaged_bytes_of_a_shard_are_store_damage_naming_the_object(tmp_path, where):
    store = make_store(tmp_path / "s.zarr")
    shard = tmp_path / "s.zarr" / "logits" / "c" / "1" / "0" / "0"  # samples 32..63
    if where == "chunk":
        flip(shard, 40)
    elif where == "index":
        flip(shard, shard.stat().st_size - 10)
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    digests = store.recorded_digests()
    store.read_rows("logits", slice(0, 32), digests)  # the other shards read
    with pytest.raises(StoreDamage, match=r"logits samples 32\.\.63 \(key logits/c/1/0/0\): a chunk of the cache "
                                          r"store fails its crc32c checksum"):
        store.read_rows("logits", slice(16, 48), digests)


def test_the_exponent_bit_test_is_isfinite_on_every_float16():
    bits = np.arange(2**16, dtype=np.uint16)
    np.testing.assert_array_equal(nonfinite_bits(bits, 0x7C00), ~np.isfinite(bits.view(np.float16)))
    values = np.zeros((4, 2, 3), np.float16)
    values[2, 1, 0] = -np.inf
    line = bad_values("logits", values, 3, np.arange(10, 14))
    assert line == "logits at sample 12, view 1 holds NaN/Inf: [-inf, 0.0, 0.0]"
    assert bad_values("logits", values.astype(">f2"), 3, np.arange(4)).startswith("logits at sample 2, view 1")


def test_chunk_runs_are_consecutive_chunks_within_a_shard():
    runs = chunk_runs(np.array([0, 1, 2, 5, 15, 16, 17, 20]), 16, 256)  # 16 chunks per shard
    assert [r.tolist() for r in runs] == [[0, 1, 2], [5], [15], [16, 17], [20]]
