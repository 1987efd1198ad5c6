"""Augmentation as an explicit view space: every augmented input is (image, view params).

A teacher's logits depend on the augmented input, so the cache stores, per sample, the
parameters of each view it ran the teacher on, and stage 3 replays exactly those views
with `apply_views` (the one replay function every stage uses).

Kinds (params per view, all ints):
- crop_flip: CIFAR-style RandomCrop(size, padding=p, fill=0) + RandomHorizontalFlip.
  Params (dy, dx, flip): crop origin in the zero-padded image (0..2p each), flip 0/1
  applied after the crop. A finite space of (2p+1)^2 * (2 if flip else 1) views, enumerated
  with flip fastest, then dx, then dy: index = (dy * (2p+1) + dx) * F + flip (F = 2 or 1).
  `views: all` caches every view in that order; `views: K` draws K distinct views per
  sample (a prefix of a random permutation, so a cache with fewer views is a prefix of
  one with more views under the same seed). The identity view (test split) is crop_flip
  with padding 0 and flip false: one view, params (0, 0, 0).
- resized_crop_flip: ImageNet RandomResizedCrop(size, scale, ratio) + flip.
  Params (top, left, height, width, flip): the box in original image pixels, resized
  (bilinear, antialias) to size x size, then flipped. K views per image are sampled with
  torchvision's algorithm (10 attempts, then the central-crop fallback) on our own RNG.
- center_crop: ImageNet evaluation. The centred square box of side
  round(crop_fraction * shorter side) resized to size x size; this equals
  Resize(size / crop_fraction) + CenterCrop(size) up to a pixel of rounding.
  One view, same param layout as resized_crop_flip (flip always 0).

Randomness is a pure function of (seed, sample_id): sample `i` always gets the views of
`np.random.default_rng([seed, i])`, however the data set is split into shards or workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from kdcache.errors import UserError

KINDS = ("crop_flip", "resized_crop_flip", "center_crop")

_CROP_FLIP_PARAMS = {
    "dy": "row of the crop origin in the zero-padded image (0..2*padding)",
    "dx": "column of the crop origin in the zero-padded image (0..2*padding)",
    "flip": "1 = horizontal flip after the crop, 0 = none",
}
_BOX_PARAMS = {
    "top": "first row of the crop box in original image pixels",
    "left": "first column of the crop box in original image pixels",
    "height": "box height in original image pixels",
    "width": "box width in original image pixels",
    "flip": "1 = horizontal flip after the resize, 0 = none",
}
_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 random boxes before falling back

# Allowed config keys per kind (besides `kind`).
_KEYS = {
    "crop_flip": {"padding", "flip", "views", "seed"},
    "resized_crop_flip": {"size", "views", "scale", "ratio", "flip", "seed"},
    "center_crop": {"size", "crop_fraction", "views", "seed"},
}


@dataclass(frozen=True)
class ViewSpace:
    """A data set's augmentation: which views exist, how many are cached, how to draw them.

    Fields a kind does not use keep their defaults and are left out of the manifest.
    """

    kind: str
    num_views: int                          # V: views cached per sample
    output_size: tuple[int, int]            # (S, S) for box kinds; the image size for crop_flip
    seed: int = 0
    all_views: bool = False                 # crop_flip `views: all` (enumeration order)
    image_size: tuple[int, int] | None = None  # crop_flip only: the fixed input size
    padding: int = 0
    flip: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_fraction: float = 0.875

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: dict, image_size=None) -> "ViewSpace":
        """Build from a config dict; image_size is the data set's (H, W), or None if variable."""
        if not isinstance(cfg, dict) or "kind" not in cfg:
            raise UserError(f"view config must be a mapping with a 'kind' (one of {', '.join(KINDS)}), got {cfg!r}")
        kind = cfg["kind"]
        if kind not in KINDS:
            raise UserError(f"unknown view kind {kind!r}: choose one of {', '.join(KINDS)}")
        unknown = set(cfg) - _KEYS[kind] - {"kind"}
        if unknown:
            raise UserError(f"view kind {kind!r} does not take {sorted(unknown)}; allowed keys: {sorted(_KEYS[kind])}")
        seed = _int(cfg.get("seed", 0), "views.seed", low=0)
        flip = cfg.get("flip", True)
        if not isinstance(flip, bool):
            raise UserError(f"views.flip must be true or false, got {flip!r}")
        views = cfg.get("views", "all" if kind != "resized_crop_flip" else None)

        if kind == "crop_flip":
            if image_size is None:
                raise UserError("crop_flip needs a fixed-size data set; use resized_crop_flip for variable-size images")
            size = _size2(image_size, "image_size")
            padding = _int(cfg.get("padding"), "views.padding (crop_flip)", low=0)
            total = (2 * padding + 1) ** 2 * (2 if flip else 1)
            if views == "all":
                num, all_views = total, True
            else:
                num, all_views = _int(views, "views.views ('all' or a count)", low=1), False
                if num > total:
                    raise UserError(f"views: {num} is more than the {total} distinct crop_flip views "
                                    f"(padding {padding}, flip {flip}); use 'all' or at most {total}")
            return cls(kind, num, size, seed, all_views, size, padding=padding, flip=flip)

        size = _int(cfg.get("size"), f"views.size ({kind} output side)", low=1)
        if kind == "center_crop":
            if views not in ("all", 1):
                raise UserError(f"center_crop has exactly one view; drop 'views' or set it to 1 (got {views!r})")
            frac = cfg.get("crop_fraction", 0.875)
            if not isinstance(frac, (int, float)) or not 0 < frac <= 1:
                raise UserError(f"views.crop_fraction must be in (0, 1], got {frac!r}")
            return cls(kind, 1, (size, size), seed, crop_fraction=float(frac), flip=False)

        num = _int(views, "views.views (resized_crop_flip: views sampled per image)", low=1)
        scale = _pair(cfg.get("scale", (0.08, 1.0)), "views.scale", low=0.0)
        ratio = _pair(cfg.get("ratio", (3 / 4, 4 / 3)), "views.ratio", low=0.0)
        if scale[0] <= 0 or scale[1] > 1 or ratio[0] <= 0:
            raise UserError(f"views.scale must lie in (0, 1] and views.ratio be positive, got scale {scale}, ratio {ratio}")
        return cls(kind, num, (size, size), seed, scale=scale, ratio=ratio, flip=flip)

    @classmethod
    def identity(cls, image_size) -> "ViewSpace":
        """No augmentation (e.g. the test split of a fixed-size data set): one view (0, 0, 0)."""
        return cls.from_config({"kind": "crop_flip", "padding": 0, "flip": False}, image_size)

    def to_manifest(self) -> dict:
        """JSON-able, complete description: enough to rebuild the space and to read `views` arrays."""
        meaning = _CROP_FLIP_PARAMS if self.kind == "crop_flip" else _BOX_PARAMS
        d = {"kind": self.kind, "seed": self.seed, "num_views": self.num_views,
             "num_params": self.num_params, "param_names": list(self.param_names),
             "param_meaning": dict(meaning), "output_size": list(self.output_size),
             "rng": "numpy.random.default_rng([seed, sample_id]) per sample"}
        if self.kind == "crop_flip":
            d.update(views="all" if self.all_views else self.num_views, image_size=list(self.image_size),
                     padding=self.padding, flip=self.flip, fill=0,
                     enumeration="index = (dy * (2*padding+1) + dx) * (2 if flip else 1) + flip; "
                                 "'all' stores views in index order, a count K stores the first K "
                                 "of a random permutation of the indices",
                     total_views=self.total_views)
        elif self.kind == "resized_crop_flip":
            d.update(views=self.num_views, size=self.output_size[0], scale=list(self.scale),
                     ratio=list(self.ratio), flip=self.flip, interpolation="bilinear, antialias",
                     sampling="torchvision RandomResizedCrop: 10 attempts, then central-crop fallback")
        else:
            d.update(views=1, size=self.output_size[0], crop_fraction=self.crop_fraction,
                     interpolation="bilinear, antialias",
                     box="centred square of side round(crop_fraction * shorter side)")
        return d

    @classmethod
    def from_manifest(cls, d: dict) -> "ViewSpace":
        """Inverse of to_manifest."""
        try:
            kind = d["kind"]
            cfg = {k: d[k] for k in _KEYS.get(kind, ()) if k in d}
            space = cls.from_config({"kind": kind, **cfg}, d.get("image_size"))
        except (KeyError, TypeError) as e:
            raise UserError(f"view-space manifest is incomplete or malformed ({e!r}); was it written by this tool?")
        if space.num_views != d.get("num_views"):
            raise UserError(f"view-space manifest says {d.get('num_views')} views but its settings give {space.num_views}")
        return space

    # ---------------------------------------------------------------- shape
    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(_CROP_FLIP_PARAMS if self.kind == "crop_flip" else _BOX_PARAMS)

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    @property
    def total_views(self) -> int | None:
        """Size of a finite space (crop_flip, center_crop); None for resized_crop_flip."""
        if self.kind == "crop_flip":
            return (2 * self.padding + 1) ** 2 * (2 if self.flip else 1)
        return 1 if self.kind == "center_crop" else None

    def enumerate_views(self) -> np.ndarray:
        """All crop_flip views in index order, (total_views, 3) int32."""
        if self.kind != "crop_flip":
            raise UserError(f"only crop_flip spaces can be enumerated, this one is {self.kind}")
        return _crop_flip_params(np.arange(self.total_views), self.padding, self.flip)

    # ---------------------------------------------------------------- sampling
    def sample_params(self, sample_ids, image_sizes=None) -> np.ndarray:
        """The V cached views of each sample, (n, V, P) int32; a pure function of (seed, sample_id).

        image_sizes: one (H, W) for all samples or a list of (H, W) per sample
        (unused by crop_flip, required by the box kinds).
        """
        ids = _ids(sample_ids)
        V = self.num_views
        if self.kind == "crop_flip":
            if self.all_views:
                return np.ascontiguousarray(np.broadcast_to(self.enumerate_views(), (len(ids), V, 3)))
            u = _uniforms(ids, [self.seed], (self.total_views,))
            index = np.argsort(u, axis=1, kind="stable")[:, :V]  # first V of a random permutation
            return _crop_flip_params(index, self.padding, self.flip)
        sizes = _sizes(image_sizes, len(ids))
        if self.kind == "center_crop":
            return self._center_boxes(sizes)[:, None, :]
        return self._random_boxes(_uniforms(ids, [self.seed], (V, 2 * _ATTEMPTS + 3)), sizes)

    def random_params(self, sample_ids, epoch_seed: int, image_sizes=None) -> np.ndarray:
        """One fresh view per sample from the augmentation distribution, (n, P) int32.

        For live augmentation (stage 0, online KD). crop_flip draws uniformly from all
        total_views views, not only the cached ones. Deterministic given (seed, epoch_seed, id).
        """
        ids = _ids(sample_ids)
        epoch_seed = _int(epoch_seed, "epoch_seed", low=0)
        # The trailing 1 keeps these streams apart from sample_params' [seed, id]
        # (SeedSequence pads short keys with zeros).
        key = [self.seed, epoch_seed]
        if self.kind == "crop_flip":
            u = _uniforms(ids, key, (1,), tag=1)[:, 0]
            return _crop_flip_params(np.floor(u * self.total_views).astype(np.int64), self.padding, self.flip)
        sizes = _sizes(image_sizes, len(ids))
        if self.kind == "center_crop":
            return self._center_boxes(sizes)
        return self._random_boxes(_uniforms(ids, key, (1, 2 * _ATTEMPTS + 3), tag=1), sizes)[:, 0]

    def _random_boxes(self, u: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """torchvision's RandomResizedCrop sampling, vectorised: u (n, K, 23) uniforms -> (n, K, 5)."""
        H = sizes[:, 0, None].astype(np.float64)  # (n, 1)
        W = sizes[:, 1, None].astype(np.float64)
        lo, hi = np.log(self.ratio[0]), np.log(self.ratio[1])
        area = (H * W)[..., None]                                              # (n, 1, 1)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., :_ATTEMPTS])
        aspect = np.exp(lo + (hi - lo) * u[..., _ATTEMPTS:2 * _ATTEMPTS])
        w = np.rint(np.sqrt(target * aspect))                                  # (n, K, 10)
        h = np.rint(np.sqrt(target / aspect))
        ok = (w > 0) & (w <= W[..., None]) & (h > 0) & (h <= H[..., None])
        first = np.argmax(ok, axis=-1)[..., None]                              # first accepted attempt
        found = ok.any(axis=-1)
        h = np.take_along_axis(h, first, -1)[..., 0]
        w = np.take_along_axis(w, first, -1)[..., 0]
        top = np.floor(u[..., 2 * _ATTEMPTS] * (H - h + 1))
        left = np.floor(u[..., 2 * _ATTEMPTS + 1] * (W - w + 1))
        # Fallback: the whole image clamped to the ratio range, centred.
        Hb, Wb = np.broadcast_to(H, h.shape), np.broadcast_to(W, w.shape)
        in_ratio = Wb / Hb
        fb_w = np.where(in_ratio > max(self.ratio), np.rint(Hb * max(self.ratio)), Wb)
        fb_h = np.where(in_ratio < min(self.ratio), np.rint(Wb / min(self.ratio)), Hb)
        h, w = np.where(found, h, fb_h), np.where(found, w, fb_w)
        top = np.where(found, top, (Hb - h) // 2)
        left = np.where(found, left, (Wb - w) // 2)
        flip = (u[..., 2 * _ATTEMPTS + 2] < 0.5) & self.flip
        return np.stack([top, left, h, w, flip], axis=-1).astype(np.int32)

    def _center_boxes(self, sizes: np.ndarray) -> np.ndarray:
        """The centred square box per image, (n, 5) int32 (same rounding as torchvision center_crop)."""
        H, W = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
        side = np.maximum(np.rint(np.minimum(H, W) * self.crop_fraction), 1)
        top, left = np.rint((H - side) / 2), np.rint((W - side) / 2)
        return np.stack([top, left, side, side, np.zeros_like(side)], axis=-1).astype(np.int32)


# -------------------------------------------------------------------- replay
def apply_views(images, params, space: ViewSpace, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Render views: uint8 images + (B, P) int params -> normalised float (B, C, S, S).

    images: a uint8 tensor (B, C, H, W), or (box kinds) a list of uint8 (C, H, W) tensors
    of any size. Output is (x / 255 - mean) / std per channel, as ToTensor + Normalize.
    """
    params = torch.as_tensor(params)
    n = images.shape[0] if torch.is_tensor(images) else len(images)
    if params.ndim != 2 or params.shape != (n, space.num_params):
        raise UserError(f"view params must be ({n}, {space.num_params}) for {space.kind}, got {tuple(params.shape)}")
    if space.kind == "crop_flip":
        if not torch.is_tensor(images):
            images = torch.stack(list(images))
        out = _crop_flip(images, params.to(images.device, torch.long), space)
    else:
        out = torch.stack([_box_view(img, [int(v) for v in p], space.output_size) for img, p in zip(images, params.tolist())])
    return normalise(out, mean, std)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (x / 255 - mean) / std, the same ops as ToTensor + Normalize."""
    if images.dtype != torch.uint8:
        raise UserError(f"images must be uint8 (0..255), got {images.dtype}")
    C = images.shape[1]
    if len(mean) != C or len(std) != C:
        raise UserError(f"mean/std have {len(mean)}/{len(std)} entries but the images have {C} channels")
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, C, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, C, 1, 1)
    return images.float().div(255).sub(m).div(s)


def _crop_flip(images: torch.Tensor, params: torch.Tensor, space: ViewSpace) -> torch.Tensor:
    """Batched zero-pad + crop + flip by index arithmetic: one gather, no per-image loop."""
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise UserError(f"crop_flip needs a uint8 (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    B, C, H, W = images.shape
    if (H, W) != tuple(space.image_size):
        raise UserError(f"images are {H}x{W} but the view space was built for {space.image_size[0]}x{space.image_size[1]}")
    p = space.padding
    if B and (params[:, :2].min() < 0 or params[:, :2].max() > 2 * p or params[:, 2].min() < 0 or params[:, 2].max() > 1):
        raise UserError(f"crop_flip params out of range for padding {p} (dy, dx in 0..{2 * p}, flip 0/1); "
                        "do the params come from a different view space?")
    padded = torch.nn.functional.pad(images, (p, p, p, p)) if p else images
    Wp = W + 2 * p
    dy, dx, flip = params[:, 0, None], params[:, 1, None], params[:, 2, None].bool()
    rows = dy + torch.arange(H, device=images.device)                            # (B, H)
    c = torch.arange(W, device=images.device)
    cols = dx + torch.where(flip, W - 1 - c, c)                                  # (B, W)
    flat = (rows[:, :, None] * Wp + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    return padded.reshape(B, C, -1).gather(2, flat).view(B, C, H, W)


def _box_view(img: torch.Tensor, p: list[int], size: tuple[int, int]) -> torch.Tensor:
    top, left, h, w, flip = p
    if img.ndim != 3 or img.dtype != torch.uint8:
        raise UserError(f"box views need uint8 (C, H, W) images, got {img.dtype} {tuple(img.shape)}")
    H, W = img.shape[-2:]
    if h <= 0 or w <= 0 or top < 0 or left < 0 or top + h > H or left + w > W:
        raise UserError(f"crop box (top {top}, left {left}, {h}x{w}) lies outside a {H}x{W} image; "
                        "do the params belong to this data set?")
    out = TF.resized_crop(img, top, left, h, w, list(size), antialias=True)
    return TF.horizontal_flip(out) if flip else out


# -------------------------------------------------------------------- helpers
def _crop_flip_params(index: np.ndarray, padding: int, flip: bool) -> np.ndarray:
    """View index -> (dy, dx, flip), per the documented enumeration order."""
    F = 2 if flip else 1
    side = 2 * padding + 1
    f = index % F
    rest = index // F
    return np.stack([rest // side, rest % side, f], axis=-1).astype(np.int32)


def _uniforms(ids: np.ndarray, key: list[int], shape: tuple, tag: int | None = None) -> np.ndarray:
    """(n, *shape) uniforms; row i comes from default_rng([*key[:1], id, *key[1:], tag])."""
    out = np.empty((len(ids), *shape))
    for k, i in enumerate(ids.tolist()):
        words = [key[0], i, *key[1:]] + ([tag] if tag is not None else [])
        out[k] = np.random.default_rng(words).random(shape)
    return out


def _ids(sample_ids) -> np.ndarray:
    ids = np.asarray(sample_ids).reshape(-1)
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0):
        raise UserError("sample ids must be non-negative integers")
    return ids.astype(np.int64)


def _sizes(image_sizes, n: int) -> np.ndarray:
    """One (H, W) or n of them -> (n, 2) int64."""
    if image_sizes is None:
        raise UserError("this view kind needs image_sizes: one (H, W) or a list of (H, W) per sample")
    s = np.asarray(image_sizes, dtype=np.int64)
    if s.ndim == 1 and s.shape == (2,):
        s = np.broadcast_to(s, (n, 2))
    if s.shape != (n, 2) or (s <= 0).any():
        raise UserError(f"image_sizes must be one (H, W) or {n} positive (H, W) pairs, got shape {s.shape}")
    return s


def _int(v, what: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise UserError(f"{what} must be an integer >= {low}, got {v!r}")
    return int(v)


def _size2(v, what: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (v, v)
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise UserError(f"{what} must be an int or (H, W), got {v!r}")
    return (_int(v[0], what, 1), _int(v[1], what, 1))


def _pair(v, what: str, low: float) -> tuple[float, float]:
    if (not isinstance(v, (tuple, list)) or len(v) != 2 or not all(isinstance(x, (int, float)) for x in v)
            or not low <= v[0] <= v[1]):
        raise UserError(f"{what} must be [low, high] with {low} <= low <= high, got {v!r}")
    return (float(v[0]), float(v[1]))
