"""Data sets with stable sample ids and a content fingerprint.

The sample id of an image is its index in the data set; the cache stores teacher logits
by that id, and the fingerprint (in the store manifest) lets stage 3 check it is reading
targets for the same data. `subset=n` keeps the first n samples, so ids 0..n-1 mean the
same images with or without a subset.

Names: fashion-mnist, cifar100, imagefolder, synthetic. Splits: "train" and "test".
Nothing is ever downloaded: every data set is read from a local folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from kdcache.errors import UserError

DATASETS = ("fashion-mnist", "cifar100", "imagefolder", "synthetic")
SPLITS = ("train", "test")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SYNTHETIC_OPTIONS = ("num_samples", "num_classes", "channels", "size", "seed")

# Per-channel mean/std of the training images (x / 255): fixed constants so every stage
# normalises identically.
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ImageDataset:
    """Labelled uint8 images addressed by sample id (= index).

    Fixed-size sets hold all pixels in memory (`pixels`, (N, C, H, W) uint8); image
    folders hold file paths and decode on demand (`files`), so `image_size` is None.
    """

    def __init__(self, name, split, num_classes, mean, std, labels, *, pixels=None, files=None,
                 channels=None, root=None, subset=None, options=None):
        self.name, self.split, self.num_classes = name, split, int(num_classes)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.root = None if root is None else str(root)
        self.subset, self.options = subset, dict(options or {})
        self._pixels = None if pixels is None else np.ascontiguousarray(pixels, dtype=np.uint8)
        self._files = files  # list of (relative path str, absolute Path), for image folders
        if self._pixels is not None:
            self.channels = self._pixels.shape[1]
            self.image_size = tuple(self._pixels.shape[2:])
            assert len(self._pixels) == len(self.labels)
        else:
            self.channels, self.image_size = channels, None
            assert len(self._files) == len(self.labels)
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, {self.split!r}, N={len(self)}, image_size={self.image_size})"

    def images(self, idx) -> torch.Tensor:
        """uint8 (B, C, H, W) for the given sample ids (fixed-size sets only)."""
        if self._pixels is None:
            raise UserError(f"{self.name} images have different sizes: read them one at a time with image(i)")
        return torch.from_numpy(self._pixels[np.asarray(idx, dtype=np.int64)])

    def image(self, i: int) -> torch.Tensor:
        """uint8 (C, H, W) of sample i; image folders decode the file (always RGB)."""
        if self._pixels is not None:
            return torch.from_numpy(self._pixels[int(i)])
        from PIL import Image  # torchvision 0.29 deprecates its own decoders (for TorchCodec)

        path = self._files[int(i)][1]
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot decode image {path}: {e}") from None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()

    def batch(self, idx):
        """uint8 images of the sample ids `idx`: a (B, C, H, W) tensor for fixed-size sets, a list of (C, H, W)
        tensors for image folders (decoded here: in a DataLoader worker, off the training process)."""
        if self._pixels is not None:
            return self.images(idx)
        return [self.image(int(i)) for i in np.asarray(idx).reshape(-1)]

    def image_sizes(self, idx) -> list[tuple[int, int]]:
        """(H, W) per sample id; image folders read only the file headers."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if self.image_size is not None:
            return [self.image_size] * len(idx)
        from PIL import Image

        sizes = []
        for i in idx.tolist():
            path = self._files[i][1]
            try:
                with Image.open(path) as im:
                    sizes.append((im.height, im.width))
            except OSError as e:
                raise UserError(f"cannot read image header of {path}: {e}") from None
        return sizes

    def fingerprint(self) -> str:
        """sha256 hex of name, split, N, labels and content.

        Content is the pixel bytes for in-memory sets. For image folders it is the
        relative paths and file sizes (hashing every ImageNet file would take too long),
        so an edit that keeps a file's size is not detected.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({"name": self.name, "split": self.split, "N": len(self)}).encode())
            h.update(self.labels.astype("<i8").tobytes())
            if self._pixels is not None:
                h.update(json.dumps({"shape": list(self._pixels.shape)}).encode())
                h.update(memoryview(self._pixels).cast("B"))
            else:
                for rel, path in self._files:
                    h.update(f"{rel}\0{path.stat().st_size}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        """JSON-able description for the store manifest."""
        return {"name": self.name, "split": self.split, "num_samples": len(self),
                "num_classes": self.num_classes, "channels": self.channels,
                "image_size": None if self.image_size is None else list(self.image_size),
                "mean": list(self.mean), "std": list(self.std), "root": self.root,
                "subset": self.subset, "options": self.options, "fingerprint": self.fingerprint()}


def load_dataset(name: str, split: str, *, root=None, subset: int | None = None, **options) -> ImageDataset:
    """Open a data set split. subset=n keeps samples 0..n-1 (same ids as the full set).

    Image folders are ordered class by class, so their first n samples cover only the
    first classes; fashion-mnist and cifar100 files are already shuffled.
    """
    check_dataset(name, root=root, subset=subset, **options)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use 'train' or 'test'")

    if name == "fashion-mnist":
        ds = _fashion_mnist(split, root)
    elif name == "cifar100":
        ds = _cifar100(split, root)
    elif name == "imagefolder":
        ds = _imagefolder(split, root)
    else:
        ds = _synthetic(split, **options)

    if subset is not None:
        subset = int(subset)
        if subset > len(ds):
            raise UserError(f"subset {subset} is larger than {name} {split} ({len(ds)} samples)")
        ds = ImageDataset(ds.name, split, ds.num_classes, ds.mean, ds.std, ds.labels[:subset],
                          pixels=None if ds._pixels is None else ds._pixels[:subset],
                          files=None if ds._files is None else ds._files[:subset],
                          channels=ds.channels, root=ds.root, subset=subset, options=ds.options)
    return ds


def check_dataset(name: str, *, root=None, subset=None, **options) -> None:
    """The `dataset` section's values, checked without reading the data (at config load); UserError on a mistake.
    Whether `root` holds the data set and `subset` fits it is load_dataset's to find out."""
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    allowed = SYNTHETIC_OPTIONS if name == "synthetic" else ()
    if set(options) - set(allowed):
        raise UserError(f"data set {name!r} does not take options {sorted(set(options) - set(allowed))}"
                        f"{'; allowed: ' + ', '.join(allowed) if allowed else ''}")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise UserError(f"dataset.root must be a folder path, got {root!r}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1):
        raise UserError(f"subset must be a positive integer (keep the first n samples), got {subset!r}")


def holdout(full: ImageDataset, m: int, used: int) -> ImageDataset:
    """The last m samples of a training split, for validation: refused when the first `used` (the training
    subset) reach into them."""
    if m >= len(full) or used > len(full) - m:
        raise UserError(f"train.validation {m} holds out training images {len(full) - m}..{len(full) - 1}, but "
                        f"training uses images 0..{used - 1}: set dataset.subset to at most {len(full) - m}")
    keep = np.arange(len(full) - m, len(full))
    return ImageDataset(full.name, "validation", full.num_classes, full.mean, full.std, full.labels[keep],
                        pixels=None if full._pixels is None else full._pixels[keep],
                        files=None if full._files is None else [full._files[i] for i in keep],
                        channels=full.channels, root=full.root, options=full.options)


# -------------------------------------------------------------------- fashion-mnist
def _fashion_mnist(split: str, root) -> ImageDataset:
    folder = Path(root) if root is not None else FASHION_MNIST_ROOT
    if not folder.is_dir():
        hint = ("install it with `apt-get install dataset-fashion-mnist`" if root is None
                else "pass the folder holding the *-ubyte.gz files")
        raise UserError(f"Fashion-MNIST folder {folder} not found: {hint}")
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"Fashion-MNIST {split} files in {folder} do not match: images {images.shape}, labels {labels.shape}")
    if labels.size and labels.max() > 9:
        raise UserError(f"Fashion-MNIST {split} labels in {folder} exceed 9: is this the right file?")
    return ImageDataset("fashion-mnist", split, 10, *FASHION_MNIST_STATS, labels,
                        pixels=images[:, None], root=folder)


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped idx file (the MNIST format) of unsigned bytes into an array.

    Layout: two zero bytes, a type code (0x08 = uint8), the number of dims d, then d
    big-endian int32 sizes, then the data in C order.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path}: idx header is truncated or has no dimensions")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise UserError(f"{path}: idx dims {dims} need {int(np.prod(dims))} bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()  # writable


# -------------------------------------------------------------------- cifar100
def _cifar100(split: str, root) -> ImageDataset:
    if root is None:
        raise UserError("cifar100 needs root: the folder holding cifar-100-python/ (torchvision layout; never downloaded)")
    from torchvision.datasets import CIFAR100

    try:
        ds = CIFAR100(str(root), train=split == "train", download=False)
    except (RuntimeError, OSError) as e:
        raise UserError(f"cannot read CIFAR-100 under {root} (expected {root}/cifar-100-python/, "
                        f"torchvision layout; this tool never downloads): {e}") from None
    pixels = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # NHWC -> NCHW
    return ImageDataset("cifar100", split, 100, *CIFAR100_STATS, np.asarray(ds.targets), pixels=pixels, root=root)


# -------------------------------------------------------------------- imagefolder
def _imagefolder(split: str, root) -> ImageDataset:
    """root/<split>/<class>/<image>; split "test" reads root/test, or root/val if there is no test folder.

    Classes are the sorted sub-folders of root/train when it exists (so train and test
    labels agree even if a test class folder is missing), else of the split folder.
    """
    if root is None:
        raise UserError("imagefolder needs root: a folder with train/ and val/ sub-folders of class folders")
    root = Path(root)
    folder = root / split
    if split == "test" and not folder.is_dir():
        folder = root / "val"
    if not folder.is_dir():
        tried = "train/" if split == "train" else "test/ or val/"
        raise UserError(f"image folder {root} has no {tried} sub-folder (expected root/<split>/<class>/<image>)")
    class_root = root / "train" if (root / "train").is_dir() else folder
    classes = sorted(e.name for e in os.scandir(class_root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"no class folders in {class_root}")
    index = {c: k for k, c in enumerate(classes)}
    files, labels = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name not in index:
            raise UserError(f"class folder {entry.path} has no counterpart in {class_root}")
        names = sorted(n for n in os.listdir(entry.path) if n.lower().endswith(IMAGE_EXTENSIONS))
        files += [(f"{entry.name}/{n}", Path(entry.path) / n) for n in names]
        labels += [index[entry.name]] * len(names)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return ImageDataset("imagefolder", split, len(classes), *IMAGENET_STATS, np.asarray(labels),
                        files=files, channels=3, root=root)


# -------------------------------------------------------------------- synthetic
def _synthetic(split: str, num_samples=None, num_classes=4, channels=1, size=16, seed=0) -> ImageDataset:
    """Tiny learnable images for tests and smoke runs.

    Class c is a stripe pattern: horizontal stripes (c even) or vertical stripes (c odd)
    with 1 + c // 2 cycles per image, a random phase within +-pi/4, plus pixel noise.
    The class survives crops and horizontal flips, and class means still differ. Train
    and test come from the same distribution with different random streams.
    """
    n = num_samples if num_samples is not None else (512 if split == "train" else 256)
    for key, v, low in (("num_samples", n, 1), ("num_classes", num_classes, 2), ("channels", channels, 1),
                        ("size", size, 4), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UserError(f"synthetic option {key} must be an integer >= {low}, got {v!r}")
    max_classes = 2 * (size // 2 - 1)
    if num_classes > max_classes:
        raise UserError(f"synthetic size {size} supports at most {max_classes} classes (stripe frequencies "
                        f"below Nyquist); raise size or lower num_classes")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    labels = rng.integers(0, num_classes, n)
    phase = rng.uniform(-np.pi / 4, np.pi / 4, n)
    coord = np.arange(size) / size
    cycles = 1 + labels // 2
    wave = np.cos(2 * np.pi * cycles[:, None] * coord[None, :] + phase[:, None])  # (n, size)
    horizontal = (labels % 2 == 0)[:, None, None]
    pattern = np.where(horizontal, wave[:, :, None], wave[:, None, :])          # (n, size, size)
    noise = rng.normal(0, 25, (n, channels, size, size))
    pixels = np.clip(np.rint(128 + 70 * pattern[:, None] + noise), 0, 255).astype(np.uint8)
    opts = {"num_samples": n, "num_classes": num_classes, "channels": channels, "size": size, "seed": seed}
    return ImageDataset("synthetic", split, num_classes, (0.5,) * channels, (0.22,) * channels, labels,
                        pixels=pixels, options=opts)
