"""Data sets: idx parsing, stable ids, fingerprints, image folders, synthetic data, errors."""

import gzip
import json

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from kdcache import data
from kdcache.data import load_dataset, read_idx
from kdcache.errors import UserError

# torchvision 0.29 deprecates its image codecs (in favour of torchcodec); they still work.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

FMNIST = data.FASHION_MNIST_ROOT
needs_fmnist = pytest.mark.skipif(not (FMNIST / "t10k-labels-idx1-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def write_idx(path, array):
    """Write a uint8 array as a gzipped idx file (the format read_idx parses)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def fake_fashion_mnist(folder, images, labels):
    folder.mkdir(exist_ok=True)
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


# ------------------------------------------------------------------ fashion-mnist
@needs_fmnist
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_files_parse(split, n):
    ds = load_dataset("fashion-mnist", split)
    assert len(ds) == n and ds.images(np.arange(n)).shape == (n, 1, 28, 28)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 10 and ds.channels == 1
    assert (np.bincount(ds.labels, minlength=10) == n // 10).all()
    assert ds.image_size == (28, 28) and ds.image_sizes([0, 5]) == [(28, 28), (28, 28)]
    if split == "train":  # the fixed normalisation constants are the train-set statistics
        hist = np.bincount(ds.images(np.arange(n)).numpy().ravel(), minlength=256) / (n * 28 * 28)
        v = np.arange(256) / 255
        mean = (hist * v).sum()
        std = np.sqrt((hist * v**2).sum() - mean**2)
        assert abs(mean - ds.mean[0]) < 5e-4 and abs(std - ds.std[0]) < 5e-4


@needs_fmnist
def test_subset_keeps_the_first_ids_and_fingerprint_is_stable():
    full = load_dataset("fashion-mnist", "test")
    sub = load_dataset("fashion-mnist", "test", subset=300)
    ids = np.array([0, 7, 299])
    assert len(sub) == 300 and sub.subset == 300
    assert torch.equal(sub.images(ids), full.images(ids)) and (sub.labels == full.labels[:300]).all()
    assert torch.equal(sub.image(7), full.image(7))
    assert sub.fingerprint() == load_dataset("fashion-mnist", "test", subset=300).fingerprint()
    assert sub.fingerprint() != load_dataset("fashion-mnist", "test", subset=299).fingerprint()
    assert sub.fingerprint() != load_dataset("fashion-mnist", "train", subset=300).fingerprint()
    d = json.loads(json.dumps(sub.describe()))
    assert d["num_samples"] == 300 and d["subset"] == 300 and d["fingerprint"] == sub.fingerprint()
    assert d["image_size"] == [28, 28] and d["mean"] == [0.2860] and d["root"] == str(FMNIST)


def test_fingerprint_changes_with_one_pixel_or_one_label(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20, dtype=np.uint8)
    base = load_dataset("fashion-mnist", "train", root=fake_fashion_mnist(tmp_path / "a", images, labels))
    same = load_dataset("fashion-mnist", "train", root=fake_fashion_mnist(tmp_path / "b", images, labels))
    assert base.fingerprint() == same.fingerprint() and len(base) == 20
    assert (base.labels == labels).all() and (base.images(np.arange(20))[:, 0].numpy() == images).all()
    pixel = images.copy()
    pixel[13, 5, 7] ^= 1
    label = labels.copy()
    label[4] = (label[4] + 1) % 10
    assert load_dataset("fashion-mnist", "train", root=fake_fashion_mnist(tmp_path / "c", pixel, labels)).fingerprint() != base.fingerprint()
    assert load_dataset("fashion-mnist", "train", root=fake_fashion_mnist(tmp_path / "d", images, label)).fingerprint() != base.fingerprint()


def test_bad_idx_files_are_user_errors(tmp_path):
    good = np.zeros((4, 3, 3), np.uint8)
    write_idx(tmp_path / "ok.gz", good)
    assert read_idx(tmp_path / "ok.gz").shape == (4, 3, 3)
    with gzip.open(tmp_path / "magic.gz", "wb") as f:
        f.write(bytes([0, 0, 0x0D, 3]) + np.array([4, 3, 3], ">i4").tobytes() + bytes(36 * 4))
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + np.array([4, 3, 3], ">i4").tobytes() + bytes(35))
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    for name, msg in [("magic.gz", "magic"), ("short.gz", "need 36 bytes"), ("plain.gz", "cannot read"),
                      ("missing.gz", "cannot read")]:
        with pytest.raises(UserError, match=msg):
            read_idx(tmp_path / name)


def test_missing_fashion_mnist_folders_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        load_dataset("fashion-mnist", "train", root=tmp_path / "nope")
    with pytest.raises(UserError, match="cannot read idx"):
        load_dataset("fashion-mnist", "train", root=tmp_path)  # folder exists, files do not
    monkeypatch.setattr(data, "FASHION_MNIST_ROOT", tmp_path / "nope")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


# ------------------------------------------------------------------ imagefolder
@pytest.fixture
def folder(tmp_path):
    """root/train/{cat,dog}/*.png of different sizes (one grayscale), root/val/{cat,dog}."""
    g = torch.Generator().manual_seed(0)
    written = {}
    for split, counts in [("train", {"dog": 2, "cat": 3}), ("val", {"dog": 1, "cat": 1})]:
        for cls, n in counts.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(n):
                channels = 1 if (cls, k) == ("cat", 1) else 3
                img = torch.randint(0, 256, (channels, 5 + k, 7 + 2 * k), dtype=torch.uint8, generator=g)
                write_png(img, str(tmp_path / split / cls / f"{k}.png"))
                written[(split, cls, k)] = img
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path, written


def test_imagefolder_reads_sorted_classes_and_decodes_rgb(folder):
    root, written = folder
    ds = load_dataset("imagefolder", "train", root=root)
    assert len(ds) == 5 and ds.num_classes == 2 and ds.channels == 3 and ds.image_size is None
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]  # cat (sorted first) then dog
    assert torch.equal(ds.image(0), written[("train", "cat", 0)])
    assert torch.equal(ds.image(1), written[("train", "cat", 1)].expand(3, -1, -1))  # grayscale -> RGB
    assert ds.image_sizes([0, 4]) == [(5, 7), (6, 9)]
    with pytest.raises(UserError, match="image"):
        ds.images(np.arange(2))
    d = json.loads(json.dumps(ds.describe()))
    assert d["image_size"] is None and d["mean"] == [0.485, 0.456, 0.406] and d["num_samples"] == 5


def test_imagefolder_test_split_maps_to_val_and_fingerprint_tracks_files(folder):
    root, _ = folder
    test = load_dataset("imagefolder", "test", root=root)
    assert len(test) == 2 and test.labels.tolist() == [0, 1]
    fp = test.fingerprint()
    assert fp == load_dataset("imagefolder", "test", root=root).fingerprint()
    assert fp != load_dataset("imagefolder", "train", root=root, subset=2).fingerprint()
    with open(root / "val" / "dog" / "0.png", "ab") as f:
        f.write(b"\0")  # a file of a different size
    assert load_dataset("imagefolder", "test", root=root).fingerprint() != fp
    assert load_dataset("imagefolder", "train", root=root, subset=3).labels.tolist() == [0, 0, 0]


def test_imagefolder_errors(folder, tmp_path_factory):
    root, _ = folder
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(UserError, match="train/"):
        load_dataset("imagefolder", "train", root=empty)
    with pytest.raises(UserError, match="needs root"):
        load_dataset("imagefolder", "train")
    (root / "val" / "bird").mkdir()
    with pytest.raises(UserError, match="no counterpart"):
        load_dataset("imagefolder", "test", root=root)
    (root / "train" / "dog" / "0.png").write_bytes(b"broken")
    with pytest.raises(UserError, match="cannot decode"):
        load_dataset("imagefolder", "train", root=root).image(3)


# ------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_and_splits_differ():
    a, b = load_dataset("synthetic", "train"), load_dataset("synthetic", "train")
    assert len(a) == 512 and len(load_dataset("synthetic", "test")) == 256
    assert a.fingerprint() == b.fingerprint() and torch.equal(a.images(np.arange(512)), b.images(np.arange(512)))
    assert a.fingerprint() != load_dataset("synthetic", "test", num_samples=512).fingerprint()
    assert a.fingerprint() != load_dataset("synthetic", "train", seed=1).fingerprint()
    c = load_dataset("synthetic", "test", num_samples=64, num_classes=6, channels=3, size=20)
    assert c.images(np.arange(64)).shape == (64, 3, 20, 20) and c.num_classes == 6 and len(c.mean) == 3
    assert set(c.labels.tolist()) == set(range(6))
    assert c.describe()["options"]["size"] == 20


def test_synthetic_class_means_differ():
    ds = load_dataset("synthetic", "train", num_samples=400)
    x = ds.images(np.arange(400)).float().numpy() / 255
    means = np.stack([x[ds.labels == c].mean(axis=0) for c in range(4)])
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(means[i] - means[j]).mean() > 0.05


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("args, kwargs, match", [
    (("mnist", "train"), {}, "fashion-mnist, cifar100, imagefolder, synthetic"),
    (("synthetic", "val"), {}, "split"),
    (("synthetic", "train"), {"subset": 0}, "subset"),
    (("synthetic", "train"), {"subset": 10**6}, "larger"),
    (("synthetic", "train"), {"colour": True}, "colour"),
    (("synthetic", "train"), {"num_classes": 40}, "at most"),
    (("fashion-mnist", "train"), {"size": 3}, "does not take"),
    (("cifar100", "train"), {}, "needs root"),
])
def test_bad_arguments_are_user_errors(args, kwargs, match):
    with pytest.raises(UserError, match=match):
        load_dataset(*args, **kwargs)


def test_missing_cifar100_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="never downloads"):
        load_dataset("cifar100", "train", root=tmp_path)
