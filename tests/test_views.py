"""View spaces: enumeration, per-sample determinism, and exact equality with torchvision."""

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2 as T
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.errors import UserError
from kdcache.views import ViewSpace, apply_views

MEAN3, STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def reference(img, mean, std):
    """torchvision's ToTensor + Normalize on a uint8 (C, H, W) image."""
    return TF.normalize(TF.to_dtype(img, torch.float32, scale=True), list(mean), list(std))


def crop_flip(padding, flip=True, views="all", size=(8, 8), seed=0):
    return ViewSpace.from_config({"kind": "crop_flip", "padding": padding, "flip": flip,
                                  "views": views, "seed": seed}, size)


# ------------------------------------------------------------------ crop_flip space
def test_crop_flip_all_enumerates_every_view_once_in_documented_order():
    space = crop_flip(4, size=(32, 32))
    assert space.num_views == 162 and space.num_params == 3 and space.param_names == ("dy", "dx", "flip")
    params = space.sample_params(np.arange(3))
    assert params.shape == (3, 162, 3) and params.dtype == np.int32
    assert (params == params[0]).all()  # 'all' is the same list for every sample
    assert len({tuple(p) for p in params[0]}) == 162
    assert params[0].min() == 0 and params[0][:, :2].max() == 8 and params[0][:, 2].max() == 1
    dy, dx, f = params[0].T.astype(int)
    assert (((dy * 9 + dx) * 2 + f) == np.arange(162)).all()


def test_crop_flip_k_draws_distinct_views_and_prefixes_nest():
    ids = np.arange(40)
    p7 = crop_flip(2, views=7).sample_params(ids)
    assert p7.shape == (40, 7, 3)
    for row in p7:
        assert len({tuple(v) for v in row}) == 7
    assert len({tuple(map(tuple, row)) for row in p7}) > 30  # samples get different views
    assert (crop_flip(2, views=20).sample_params(ids)[:, :7] == p7).all()
    assert not (crop_flip(2, views=7, seed=1).sample_params(ids) == p7).all()


def test_k_larger_than_space_is_a_user_error():
    with pytest.raises(UserError, match="more than the 50"):
        crop_flip(2, views=51)
    crop_flip(2, views=50)  # exactly all is fine


@pytest.mark.parametrize("cfg, size", [
    ({"kind": "rotate"}, (8, 8)),
    ({"kind": "crop_flip"}, (8, 8)),                           # padding missing
    ({"kind": "crop_flip", "padding": -1}, (8, 8)),
    ({"kind": "crop_flip", "padding": 2, "flip": "yes"}, (8, 8)),
    ({"kind": "crop_flip", "padding": 2, "views": 0}, (8, 8)),
    ({"kind": "crop_flip", "padding": 2, "size": 8}, (8, 8)),   # key of another kind
    ({"kind": "crop_flip", "padding": 2}, None),               # variable-size data
    ({"kind": "resized_crop_flip", "size": 8}, None),          # views count missing
    ({"kind": "resized_crop_flip", "size": 8, "views": 2, "scale": [0.5, 0.1]}, None),
    ({"kind": "center_crop", "size": 8, "views": 3}, None),
    ({"kind": "center_crop", "size": 8, "crop_fraction": 1.5}, None),
    ("crop_flip", (8, 8)),
])
def test_bad_config_is_a_user_error(cfg, size):
    with pytest.raises(UserError):
        ViewSpace.from_config(cfg, size)


@pytest.mark.parametrize("space", [
    crop_flip(4, size=(32, 32)), crop_flip(2, flip=False, views=5, seed=3), ViewSpace.identity((28, 28)),
    ViewSpace.from_config({"kind": "resized_crop_flip", "size": 24, "views": 6, "scale": [0.2, 1.0], "seed": 9}),
    ViewSpace.from_config({"kind": "center_crop", "size": 24, "crop_fraction": 0.9}),
])
def test_manifest_round_trip_through_json(space):
    d = json.loads(json.dumps(space.to_manifest()))
    assert ViewSpace.from_manifest(d) == space
    assert d["param_names"] == list(space.param_names) and set(d["param_meaning"]) == set(space.param_names)
    assert d["num_views"] == space.num_views and d["num_params"] == space.num_params


def test_manifest_with_inconsistent_view_count_is_rejected():
    d = crop_flip(2).to_manifest()
    d["num_views"] = 3
    with pytest.raises(UserError):
        ViewSpace.from_manifest(d)


# ------------------------------------------------------------------ determinism
SPACES = [
    (crop_flip(4, views=10, size=(32, 32)), None),
    (ViewSpace.from_config({"kind": "resized_crop_flip", "size": 16, "views": 5}), (40, 60)),
]


@pytest.mark.parametrize("space, sizes", SPACES)
def test_params_do_not_depend_on_partition(space, sizes):
    ids = np.arange(100)
    whole = space.sample_params(ids, sizes)
    assert (np.concatenate([space.sample_params(ids[:50], sizes), space.sample_params(ids[50:], sizes)]) == whole).all()
    shuffled = np.random.default_rng(0).permutation(100)
    assert (space.sample_params(shuffled, sizes) == whole[shuffled]).all()
    r = space.random_params(ids, 5, sizes)
    assert (np.concatenate([space.random_params(ids[:30], 5, sizes), space.random_params(ids[30:], 5, sizes)]) == r).all()
    assert not (space.random_params(ids, 6, sizes) == r).all()  # a new epoch draws new views


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(0, 10**6), min_size=1, max_size=20), cut=st.integers(0, 20))
def test_sample_params_are_a_pure_function_of_sample_id(ids, cut):
    space = SPACES[0][0]
    ids = np.array(ids)
    whole = space.sample_params(ids)
    parts = [space.sample_params(ids[:cut]), space.sample_params(ids[cut:])]
    assert (np.concatenate(parts) == whole).all()


def test_random_crop_flip_params_cover_the_whole_space_uniformly():
    space = crop_flip(1, views=2)
    p = space.random_params(np.arange(4000), 0)
    index = (p[:, 0] * 3 + p[:, 1]) * 2 + p[:, 2]
    counts = np.bincount(index, minlength=18)
    assert counts.min() > 4000 / 18 * 0.7 and counts.max() < 4000 / 18 * 1.3


# ------------------------------------------------------------------ crop_flip replay == torchvision
def crop_flip_reference(img, params, padding, mean, std):
    H, W = img.shape[-2:]
    out = []
    for dy, dx, f in params.tolist():
        v = TF.crop(TF.pad(img, [padding], fill=0), dy, dx, H, W)
        out.append(reference(TF.horizontal_flip(v) if f else v, mean, std))
    return torch.stack(out)


def test_every_crop_flip_view_matches_torchvision():
    img = torch.randint(0, 256, (3, 7, 9), dtype=torch.uint8)
    space = crop_flip(3, size=(7, 9))
    params = space.enumerate_views()
    got = apply_views(img.expand(len(params), -1, -1, -1), params, space, MEAN3, STD3)
    assert got.shape == (98, 3, 7, 9) and got.dtype == torch.float32
    torch.testing.assert_close(got, crop_flip_reference(img, params, 3, MEAN3, STD3))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 6), C=st.sampled_from([1, 3]), H=st.integers(1, 10), W=st.integers(1, 10),
       padding=st.integers(0, 4), seed=st.integers(0, 2**31))
def test_batched_crop_flip_matches_per_image_torchvision(B, C, H, W, padding, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, generator=g)
    space = crop_flip(padding, size=(H, W))
    params = space.random_params(np.arange(B), seed)
    mean, std = MEAN3[:C], STD3[:C]
    got = apply_views(images, params, space, mean, std)
    want = torch.cat([crop_flip_reference(images[b], params[b:b + 1], padding, mean, std) for b in range(B)])
    torch.testing.assert_close(got, want)


def test_identity_view_returns_the_normalised_image():
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    space = ViewSpace.identity((28, 28))
    params = space.sample_params(np.arange(5))
    assert space.num_views == 1 and params.shape == (5, 1, 3) and (params == 0).all()
    got = apply_views(images, params[:, 0], space, (0.2860,), (0.3530,))
    torch.testing.assert_close(got, (images.float() / 255 - 0.2860) / 0.3530)


def test_apply_views_rejects_params_from_another_space():
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(UserError, match="out of range"):
        apply_views(images, np.array([[5, 0, 0], [0, 0, 0]]), crop_flip(2), (0.5,), (0.5,))
    with pytest.raises(UserError, match="built for"):
        apply_views(torch.zeros(2, 1, 9, 9, dtype=torch.uint8), np.zeros((2, 3)), crop_flip(2), (0.5,), (0.5,))
    with pytest.raises(UserError):
        apply_views(images, np.zeros((2, 5)), crop_flip(2), (0.5,), (0.5,))


# ------------------------------------------------------------------ box kinds
def test_resized_crop_flip_matches_torchvision_resized_crop():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in [(40, 60), (33, 21), (50, 50)]]
    space = ViewSpace.from_config({"kind": "resized_crop_flip", "size": 24, "views": 4})
    params = space.sample_params(np.arange(3), [tuple(i.shape[-2:]) for i in images])
    assert params.shape == (3, 4, 5)
    for v in range(4):
        got = apply_views(images, params[:, v], space, MEAN3, STD3)
        for b, img in enumerate(images):
            top, left, h, w, f = params[b, v].tolist()
            want = TF.resized_crop(img, top, left, h, w, [24, 24], antialias=True)
            want = reference(TF.horizontal_flip(want) if f else want, MEAN3, STD3)
            torch.testing.assert_close(got[b], want)


@settings(max_examples=30, deadline=None)
@given(H=st.integers(1, 400), W=st.integers(1, 400), seed=st.integers(0, 1000))
def test_resized_crop_boxes_follow_the_torchvision_constraints(H, W, seed):
    space = ViewSpace.from_config({"kind": "resized_crop_flip", "size": 8, "views": 20, "seed": seed})
    top, left, h, w, f = space.sample_params(np.arange(3), (H, W)).reshape(-1, 5).T.astype(float)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all() and set(f) <= {0, 1}
    # accepted boxes: scale and ratio within range (up to rounding of h and w)
    area = h * w / (H * W)
    tol = (h + w + 1) / (H * W)
    fallback = (area > 1 - 1e-9) | (h == H) | (w == W)
    assert (fallback | ((area >= 0.08 - tol - 0.01) & (area <= 1 + tol))).all()


def test_resized_crop_boxes_are_distributed_like_torchvisions_sampler():
    """Same distribution as torchvision's RandomResizedCrop on a 300x400 image (2000 boxes each)."""
    space = ViewSpace.from_config({"kind": "resized_crop_flip", "size": 8, "views": 50})
    top, left, h, w, f = space.sample_params(np.arange(40), (300, 400)).reshape(-1, 5).T.astype(float)
    torch.manual_seed(0)
    rrc, img = T.RandomResizedCrop(8), torch.zeros(3, 300, 400, dtype=torch.uint8)
    tv = np.array([[p["top"], p["left"], p["height"], p["width"]] for p in (rrc.make_params([img]) for _ in range(2000))], float)

    def ks(a, b):  # two-sample Kolmogorov-Smirnov statistic
        grid = np.sort(np.concatenate([a, b]))
        return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                      - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()

    assert ks(h * w, tv[:, 2] * tv[:, 3]) < 0.07      # area (5% critical value ~0.043)
    assert ks(w / h, tv[:, 3] / tv[:, 2]) < 0.07      # aspect ratio
    assert ks(top / (301 - h), tv[:, 0] / (301 - tv[:, 2])) < 0.07  # relative position
    assert 0.45 < f.mean() < 0.55


def test_resized_crop_falls_back_to_central_crop_for_extreme_shapes():
    space = ViewSpace.from_config({"kind": "resized_crop_flip", "size": 8, "views": 30, "scale": [0.99, 1.0]})
    p = space.sample_params(np.arange(2), (10, 100))  # no box with ratio <= 4/3 covers 99% of a 1:10 image
    assert (p[..., :4] == [0, 43, 10, 13]).all()      # w = round(10 * 4/3), left = (100 - 13) // 2


def test_center_crop_equals_torchvision_center_crop_when_the_resize_is_a_no_op():
    img = torch.randint(0, 256, (3, 32, 45), dtype=torch.uint8)  # shorter side 32 = 28 / 0.875
    space = ViewSpace.from_config({"kind": "center_crop", "size": 28})
    params = space.sample_params(np.arange(1), [(32, 45)])
    assert params.shape == (1, 1, 5) and params[0, 0, 4] == 0
    assert (space.random_params(np.arange(1), 7, [(32, 45)]) == params[:, 0]).all()
    got = apply_views([img], params[:, 0], space, MEAN3, STD3)
    torch.testing.assert_close(got[0], reference(TF.center_crop(img, [28, 28]), MEAN3, STD3))


def test_box_outside_the_image_is_a_user_error():
    space = ViewSpace.from_config({"kind": "center_crop", "size": 8})
    with pytest.raises(UserError, match="outside"):
        apply_views([torch.zeros(3, 10, 10, dtype=torch.uint8)], np.array([[5, 5, 8, 8, 0]]), space, MEAN3, STD3)
    with pytest.raises(UserError, match="image_sizes"):
        space.sample_params(np.arange(2))
