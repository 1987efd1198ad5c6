"""docs/FORMAT.md is enough to read a store: plain zarr, numpy, json and (for the teacher) torch.

Stores are built and the teacher is loaded with kdcache code; everything that READS the store below
(`read_*`, `teacher_input`, `crop_flip_views`, the byte-level shard reader) uses only what FORMAT.md
says, no pipeline.* or stages.* import.
"""
import hashlib
import json
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import pytest
import torch
import zarr

from tests.conftest import REPO, SMOKE


# ---- the reader: FORMAT.md only -------------------------------------------------------------------

def open_store(path) -> zarr.Group:
    g = zarr.open_group(str(path), mode="r")
    assert g.attrs["format"] == "kdcache-logit-cache" and g.attrs["format_version"] == 1
    assert g.attrs["status"] == "complete"
    return g


def crop_flip_views(manifest_views: dict, sample: int) -> np.ndarray:
    """The (V, 3) views of a sample of a crop_flip space: "all" in index order, or the first K of
    argsort(default_rng([seed, sample]).random(total_views))."""
    p, F = manifest_views["padding"], 2 if manifest_views["flip"] else 1
    total = (2 * p + 1) ** 2 * F
    if manifest_views["views"] == "all":
        index = np.arange(total)
    else:
        u = np.random.default_rng([manifest_views["seed"], sample]).random(total)
        index = np.argsort(u, kind="stable")[:manifest_views["views"]]
    return np.stack([index // F // (2 * p + 1), index // F % (2 * p + 1), index % F], axis=-1)


def teacher_input(img: np.ndarray, params: np.ndarray, manifest: dict) -> np.ndarray:
    """crop_flip: zero-pad by p, take the H x W window at (dy, dx), mirror when flip, normalise."""
    v = manifest["views"]
    assert v["kind"] == "crop_flip"
    p = v["padding"]
    C, H, W = img.shape
    dy, dx, flip = (int(x) for x in params)
    padded = np.pad(img, ((0, 0), (p, p), (p, p)), constant_values=0)
    x = padded[:, dy:dy + H, dx:dx + W]
    if flip:
        x = x[:, :, ::-1]
    mean = np.asarray(manifest["preprocessing"]["mean"], np.float32)[:, None, None]
    std = np.asarray(manifest["preprocessing"]["std"], np.float32)[:, None, None]
    return (x.astype(np.float32) / np.float32(255) - mean) / std


def read_shard_object(path: Path, n_inner: int) -> list[bytes | None]:
    """The inner chunks of one shard object (index at the end: n (offset, nbytes) <u8 pairs + crc32c)."""
    data = path.read_bytes()
    index = data[-(16 * n_inner + 4):]
    assert google_crc32c.value(index[:-4]).to_bytes(4, "little") == index[-4:]
    table = np.frombuffer(index[:-4], "<u8").reshape(n_inner, 2)
    chunks = []
    for offset, nbytes in table.tolist():
        if offset == nbytes == 2**64 - 1:
            chunks.append(None)
            continue
        chunk = data[offset:offset + nbytes]
        assert google_crc32c.value(chunk[:-4]).to_bytes(4, "little") == chunk[-4:]
        chunks.append(chunk[:-4])
    return chunks


# ---- stores built by kdcache ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory, teacher_ckpt):
    """configs/smoke/synthetic.yaml cut to 96 samples: 4 random views of 18 per sample, 3 shards of 32."""
    from kdcache.config import load_config
    from kdcache.stages.cache_teacher import cache_teacher
    path = tmp_path_factory.mktemp("format") / "store.zarr"
    cfg = load_config(SMOKE, {"teacher": {"checkpoint": str(teacher_ckpt)}, "dataset": {"subset": 96},
                              "cache": {"store": str(path), "samples_per_chunk": 16, "chunks_per_shard": 2}})
    cache_teacher(cfg, progress=False)
    return cfg


def images_and_teacher(cfg, teacher_ckpt):
    """The data set's uint8 images (the store holds none) and the teacher, by kdcache code."""
    from kdcache.data import load_dataset
    from kdcache.models import load_checkpoint
    d = cfg["dataset"]
    data = load_dataset(d["name"], "train", root=d["root"], subset=d["subset"], **d["options"])
    teacher, _ = load_checkpoint(teacher_ckpt, device="cpu")
    return data.images(np.arange(len(data))).numpy(), data.labels, teacher


@pytest.mark.parametrize("which", ["sampled", "all"])
def test_teacher_inputs_from_view_params_reproduce_the_logits(which, sampled_store, train_store_cfg, teacher_ckpt):
    cfg = sampled_store if which == "sampled" else train_store_cfg
    g = open_store(cfg["cache"]["store"])
    manifest = g.attrs["manifest"]
    N, V, K = g["logits"].shape
    images, labels, teacher = images_and_teacher(cfg, teacher_ckpt)
    np.testing.assert_array_equal(g["labels"][:], labels)
    rng = np.random.default_rng(0)
    pairs = [(0, 0), (N - 1, V - 1), *zip(rng.integers(0, N, 10).tolist(), rng.integers(0, V, 10).tolist())]
    for i in {i for i, _ in pairs}:  # the stored views are the documented ones
        np.testing.assert_array_equal(g["views"][i], crop_flip_views(manifest["views"], i))
    x = np.stack([teacher_input(images[i], g["views"][i, v], manifest) for i, v in pairs])
    with torch.no_grad():
        z = teacher(torch.from_numpy(x)).numpy()
    stored = np.stack([g["logits"][i, v] for i, v in pairs]).astype(np.float32)
    assert stored.dtype == np.float32 and g["logits"].dtype == np.dtype(manifest["logits"]["dtype"])
    tol = 2.0**-10 * np.maximum(1, np.abs(z).max(axis=1, keepdims=True))  # float16 rounding
    assert (np.abs(stored - z) <= tol).all(), np.abs(stored - z).max()


def test_metadata_is_as_documented(train_store_cfg):
    path = Path(train_store_cfg["cache"]["store"])
    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    attrs = root["attributes"]
    assert {"format", "format_version", "status", "manifest", "manifest_sha256"} <= set(attrs)
    m = attrs["manifest"]
    assert attrs["manifest_sha256"] == hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
    for key in ("arch", "num_classes", "in_channels", "checkpoint_sha256", "test_accuracy"):
        assert key in m["teacher"]
    for key in ("name", "split", "num_samples", "num_classes", "channels", "image_size", "mean", "std", "root",
                "subset", "options", "fingerprint"):
        assert key in m["dataset"]
    assert set(m["preprocessing"]) == {"mean", "std", "resolution"}
    for key in ("kind", "seed", "num_views", "num_params", "param_names", "param_meaning", "output_size", "rng",
                "views", "image_size", "padding", "flip", "fill", "total_views"):
        assert key in m["views"]
    assert m["logits"]["dtype"] in ("float16", "float32") and set(m["software"]) == {"kdcache", "torch", "zarr"}

    N, V, K, P = (m["dataset"]["num_samples"], m["views"]["num_views"], m["teacher"]["num_classes"],
                  m["views"]["num_params"])
    c = train_store_cfg["cache"]["samples_per_chunk"]
    S = c * train_store_cfg["cache"]["chunks_per_shard"]
    expected = {"logits": ([N, V, K], m["logits"]["dtype"], ["sample", "view", "class"]),
                "views": ([N, V, P], "int32", ["sample", "view", "param"]),
                "labels": ([N], "int32", ["sample"])}
    for name, (shape, dtype, dims) in expected.items():
        a = json.loads((path / name / "zarr.json").read_text())
        assert (a["shape"], a["data_type"], a["dimension_names"], a["fill_value"]) == (shape, dtype, dims, 0)
        assert a["chunk_grid"]["configuration"]["chunk_shape"] == [S] + shape[1:]
        (shard,) = a["codecs"]
        assert shard["name"] == "sharding_indexed"
        cfg = shard["configuration"]
        assert cfg["chunk_shape"] == [c] + shape[1:] and cfg["index_location"] == "end"
        assert [x["name"] for x in cfg["codecs"]] == ["bytes", "blosc", "crc32c"]
        assert cfg["codecs"][0]["configuration"]["endian"] == "little"
        blosc = cfg["codecs"][1]["configuration"]
        assert (blosc["cname"], blosc["clevel"], blosc["shuffle"]) == ("zstd", 5, "shuffle")
        assert [x["name"] for x in cfg["index_codecs"]] == ["bytes", "crc32c"]
    done = json.loads((path / "shard_done" / "zarr.json").read_text())
    assert (done["shape"], done["data_type"], done["dimension_names"]) == ([-(-N // S)], "uint8", ["shard"])
    assert done["chunk_grid"]["configuration"]["chunk_shape"] == [1]
    assert [x["name"] for x in done["codecs"]] == ["bytes", "crc32c"]


def test_shard_objects_decode_by_hand(train_store_cfg):
    """Below zarr: a shard object is its chunks + a crc32c'd index; a chunk is blosc bytes + crc32c."""
    path = Path(train_store_cfg["cache"]["store"])
    g = open_store(path)
    N, V, K = g["logits"].shape
    c = train_store_cfg["cache"]["samples_per_chunk"]
    chunks = read_shard_object(path / "logits" / "c" / "1" / "0" / "0", train_store_cfg["cache"]["chunks_per_shard"])
    assert all(chunk is not None for chunk in chunks)  # every chunk of a done shard is stored
    S = c * len(chunks)
    for j, chunk in enumerate(chunks):
        values = np.frombuffer(numcodecs.Blosc().decode(chunk), "<f2").reshape(c, V, K)
        np.testing.assert_array_equal(values, g["logits"][S + j * c:S + (j + 1) * c])


def test_statistics_are_named_and_attributed_as_documented(train_store_cfg):
    path = Path(train_store_cfg["cache"]["store"])
    g = open_store(path)
    m = g.attrs["manifest"]
    fingerprint = hashlib.sha256(json.dumps({k: v for k, v in m.items() if k != "software"},
                                            sort_keys=True).encode()).hexdigest()
    N, V = g["logits"].shape[:2]
    expected = {"mlt_temperature_unbiased": ("mlt_temperature", {"std": "unbiased"}),
                "wttm_power_sum_gamma0.1": ("wttm_power_sum", {"gamma": 0.1})}
    assert set(g["stats"].array_keys()) == set(expected)
    for name, (statistic, params) in expected.items():
        meta = json.loads((path / "stats" / name / "zarr.json").read_text())
        assert (meta["shape"], meta["data_type"], meta["dimension_names"]) == ([N, V], "float32", ["sample", "view"])
        attrs = meta["attributes"]
        assert (attrs["statistic"], attrs["params"], attrs["logits_fingerprint"]) == (statistic, params, fingerprint)
        assert attrs["logits_shape"] == [N, V, g["logits"].shape[2]] and attrs["computed_in"] == "float32"
        assert {"description", "logits_dtype", "kdcache_version"} <= set(attrs)
        assert np.isfinite(g["stats"][name][:]).all()


def test_format_document_names_every_array_and_attribute(train_store_cfg):
    """Whatever a store holds is in FORMAT.md (the test above pins values; this catches additions)."""
    doc = (REPO / "docs" / "FORMAT.md").read_text()
    g = open_store(train_store_cfg["cache"]["store"])
    names = list(g.attrs) + list(g.attrs["manifest"]) + [k for k, _ in g.arrays()]
    names += [f"{k}.{x}" for k in ("teacher", "dataset", "preprocessing", "logits") for x in g.attrs["manifest"][k]]
    names += list(g.attrs["manifest"]["views"])
    names += list(g["stats"]["mlt_temperature_unbiased"].attrs)
    missing = [n for n in names if f"`{n}`" not in doc and f"`{n.split('.')[-1]}`" not in doc
               and f"`{n.split('.')[0]}.{n.split('.')[-1]}`" not in doc]
    assert not missing, f"not documented in docs/FORMAT.md: {missing}"
