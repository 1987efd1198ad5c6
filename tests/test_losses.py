"""Losses against independent float64 numpy computations of the docs/METHODS.md formulas."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kdcache.errors import UserError
from kdcache.losses import (
    adaptive_kd_loss,
    dkd_loss,
    kd_loss,
    max_logit_temperature,
    standardize,
    teacher_power_sum,
    ttm_loss,
    wttm_loss,
)
from kdcache.methods import METHODS, check_params, distill_loss

C = (1 + math.sqrt(3)) / 2

# --- numpy references (float64, written from the formulas) ---------------------


def np_log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_kl(p, q):
    """sum_k p_k (log p_k - log q_k) per row; terms with p_k = 0 count as 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=-1)


def np_kl_log(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def np_z(z, unbiased=True, eps=1e-7):
    K = z.shape[-1]
    mean = z.sum(axis=-1, keepdims=True) / K
    var = ((z - mean) ** 2).sum(axis=-1, keepdims=True) / (K - 1 if unbiased else K)
    return (z - mean) / (np.sqrt(var) + eps)


def np_kd(zs, zt, T):
    T = np.broadcast_to(np.asarray(T, dtype=np.float64), (zs.shape[0],))[:, None]
    per_row = T[:, 0] ** 2 * np_kl_log(np_log_softmax(zt / T), np_log_softmax(zs / T))
    return per_row.mean()


def np_ttm_rows(zs, zt, gamma):
    log_pg = gamma * np_log_softmax(zt)  # log p_t^gamma, then renormalised by U_gamma
    log_u = np.log(np.exp(log_pg).sum(axis=-1, keepdims=True))
    return np_kl_log(log_pg - log_u, np_log_softmax(zs)), np.exp(log_u[:, 0])


def np_dkd_parts(zs, zt, y, T):
    """Per-row (TCKD, NCKD) straight from the definitions, without T^2."""
    tckd, nckd = [], []
    for s, t, c in zip(zs, zt, y):
        ps, pt = np.exp(np_log_softmax(s / T)), np.exp(np_log_softmax(t / T))
        others = np.arange(len(s)) != c
        bs = np.array([ps[c], ps[others].sum()])  # [p_y, 1 - p_y]
        bt = np.array([pt[c], pt[others].sum()])
        tckd.append(np_kl(bt, bs))
        nckd.append(np_kl_log(np_log_softmax(t[others] / T), np_log_softmax(s[others] / T)))
    return np.array(tckd), np.array(nckd)


def logits(B, K, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, K, generator=g) * scale
    zt = torch.randn(B, K, generator=g) * scale * 1.5
    return zs, zt


CASES = [(100, 1.0), (100, 100.0), (2, 1.0), (2, 100.0)]  # (K, logit scale)

# --- standardize / KD / LS ---------------------------------------------------------


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("K", [2, 100])
def test_standardize_matches_formula(K, unbiased):
    z, _ = logits(8, K, scale=7.0)
    got = standardize(z, unbiased=unbiased)
    np.testing.assert_allclose(got.numpy(), np_z(z.double().numpy(), unbiased), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K,scale", CASES)
def test_kd_matches_formula(K, scale):
    zs, zt = logits(16, K, scale)
    ref = np_kd(zs.double().numpy(), zt.double().numpy(), 4.0)
    assert kd_loss(zs, zt, 4.0).item() == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_kd_per_sample_temperature():
    zs, zt = logits(16, 100)
    T = torch.linspace(0.5, 9.0, 16)
    ref = np_kd(zs.double().numpy(), zt.double().numpy(), T.double().numpy())
    assert kd_loss(zs, zt, T).item() == pytest.approx(ref, rel=1e-5)
    # a constant tensor temperature is the float case
    assert kd_loss(zs, zt, torch.full((16,), 3.0)).item() == pytest.approx(kd_loss(zs, zt, 3.0).item(), rel=1e-6)


@pytest.mark.parametrize("K,scale", CASES)
def test_float16_teacher_is_computed_in_float32(K, scale):
    zs, zt = logits(16, K, scale)
    zt16 = zt.half()
    got = kd_loss(zs, zt16, 4.0)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    ref = np_kd(zs.double().numpy(), zt16.double().numpy(), 4.0)  # the rounded teacher, exactly
    assert got.item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert ttm_loss(zs, zt16, 0.1).item() == pytest.approx(ttm_loss(zs, zt16.float(), 0.1).item(), rel=1e-6)


@pytest.mark.parametrize("K,scale", CASES)
def test_ls_kd_matches_formula(K, scale):
    zs, zt = logits(16, K, scale)
    got = distill_loss("kd", zs, zt, None, params={"standardize": True}, epoch=1)
    ref = np_kd(np_z(zs.double().numpy()), np_z(zt.double().numpy()), 2.0)  # T_base = 2 by default
    assert got.item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_ls_kd_invariant_to_per_row_shift_and_scale():
    zs, zt = logits(16, 100, scale=3.0)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(16, 1, generator=g) * 5 + 0.2
    c = torch.randn(16, 1, generator=g) * 50
    params = {"standardize": True, "T": 2.0}
    base = distill_loss("kd", zs, zt, None, params=params, epoch=1).item()
    moved_t = distill_loss("kd", zs, a * zt + c, None, params=params, epoch=1).item()
    moved_s = distill_loss("kd", a.flip(0) * zs - c, zt, None, params=params, epoch=1).item()
    assert moved_t == pytest.approx(base, rel=1e-4)
    assert moved_s == pytest.approx(base, rel=1e-4)
    # plain KD is not invariant: the test above can fail
    assert kd_loss(zs, a * zt, 2.0).item() != pytest.approx(kd_loss(zs, zt, 2.0).item(), rel=1e-2)


# --- TTM / WTTM --------------------------------------------------------------------


@pytest.mark.parametrize("K,scale", CASES)
@pytest.mark.parametrize("gamma", [0.1, 0.3])
def test_ttm_and_wttm_match_formula(K, scale, gamma):
    zs, zt = logits(16, K, scale)
    rows, u = np_ttm_rows(zs.double().numpy(), zt.double().numpy(), gamma)
    assert ttm_loss(zs, zt, gamma).item() == pytest.approx(rows.mean(), rel=1e-4, abs=1e-6)
    assert wttm_loss(zs, zt, gamma).item() == pytest.approx((u * rows).mean(), rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(teacher_power_sum(zt, gamma).numpy(), u, rtol=1e-5)


def test_teacher_power_transform_is_softmax_of_scaled_logits():
    """p_t^gamma = p_t^gamma / U_gamma (the power form) = softmax(gamma * z_t)."""
    zs, zt = logits(8, 100, scale=2.0)
    zs64, zt64, gamma = zs.double().numpy(), zt.double().numpy(), 0.25
    p = np.exp(np_log_softmax(zt64))
    power_form = p**gamma / (p**gamma).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(power_form, np.exp(np_log_softmax(gamma * zt64)), rtol=1e-10)
    np.testing.assert_allclose(teacher_power_sum(zt, gamma).numpy(), (p**gamma).sum(axis=-1), rtol=1e-5)
    ref = np_kl(power_form, np.exp(np_log_softmax(zs64))).mean()
    assert ttm_loss(zs, zt, gamma).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("K", [2, 10, 100])
@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0])
def test_power_sum_range(K, gamma):
    _, zt = logits(32, K, scale=1.0)
    rows = torch.cat([zt, zt * 1000, torch.zeros(1, K)])  # ordinary, near one-hot, uniform
    u = teacher_power_sum(rows, gamma)
    upper = K ** (1 - gamma)
    assert (u >= 1 - 1e-5).all() and (u <= upper * (1 + 1e-5)).all()
    assert u[-1].item() == pytest.approx(upper, rel=1e-5)  # uniform teacher reaches the upper bound
    assert u[32:-1].min().item() == pytest.approx(1.0, rel=1e-4)  # one-hot reaches the lower one


def test_wttm_cached_power_sum_equals_recomputed():
    zs, zt = logits(16, 100, scale=3.0)
    cached = teacher_power_sum(zt.half(), 0.1)  # stage 2 computes it from the float16 cache
    assert wttm_loss(zs, zt.half(), 0.1, power_sum=cached).item() == pytest.approx(
        wttm_loss(zs, zt.half(), 0.1).item(), rel=1e-6
    )
    via_registry = distill_loss("wttm", zs, zt, None, params={}, stats={"power_sum": cached.half()}, epoch=1)
    assert via_registry.item() == pytest.approx(wttm_loss(zs, zt, 0.1).item(), rel=1e-3)
    # the cache is really used: a different weight changes the loss
    other = distill_loss("wttm", zs, zt, None, params={}, stats={"power_sum": 2 * cached}, epoch=1)
    assert other.item() == pytest.approx(2 * via_registry.item(), rel=1e-3)


# --- DKD -----------------------------------------------------------------------------


@pytest.mark.parametrize("K,scale", CASES)
def test_dkd_matches_formula(K, scale):
    zs, zt = logits(16, K, scale)
    y = torch.randint(0, K, (16,), generator=torch.Generator().manual_seed(3))
    T, alpha, beta = 4.0, 1.5, 8.0
    tckd, nckd = np_dkd_parts(zs.double().numpy(), zt.double().numpy(), y.numpy(), T)
    ref = T**2 * (alpha * tckd + beta * nckd).mean()
    assert dkd_loss(zs, zt, y, alpha, beta, T).item() == pytest.approx(ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("K", [2, 100])
def test_kd_decomposes_into_tckd_and_nckd(K):
    """DKD paper: KD = TCKD + (1 - p_t,y) * NCKD, per sample, at the same T."""
    zs, zt = logits(8, K, scale=2.0)
    y = torch.randint(0, K, (8,), generator=torch.Generator().manual_seed(4))
    T = 3.0
    for i in range(8):
        s, t, c = zs[i : i + 1], zt[i : i + 1], y[i : i + 1]
        tckd = dkd_loss(s, t, c, 1.0, 0.0, T)
        nckd = dkd_loss(s, t, c, 0.0, 1.0, T)
        p_target = torch.softmax(t.double() / T, dim=-1)[0, c].item()
        assert kd_loss(s, t, T).item() == pytest.approx(tckd.item() + (1 - p_target) * nckd.item(), rel=1e-4, abs=1e-6)


def test_nckd_ignores_target_logits_even_when_large():
    """Exact masking: the 1000-subtraction trick would let a target logit of 5000 leak into NCKD."""
    zs, zt = logits(8, 10, scale=100.0)
    y = torch.arange(8)
    boost = torch.nn.functional.one_hot(y, 10) * 5000.0
    nckd = dkd_loss(zs, zt, y, 0.0, 1.0, 4.0).item()
    assert dkd_loss(zs + boost, zt + boost, y, 0.0, 1.0, 4.0).item() == pytest.approx(nckd, rel=1e-5)
    assert math.isfinite(dkd_loss(zs + boost, zt + boost, y, 1.0, 8.0, 4.0).item())


def test_dkd_warmup_and_ls_in_registry():
    zs, zt = logits(8, 100)
    y = torch.randint(0, 100, (8,), generator=torch.Generator().manual_seed(5))
    full = dkd_loss(zs, zt, y, 1.0, 8.0, 4.0).item()
    at = lambda epoch: distill_loss("dkd", zs, zt, y, params={}, epoch=epoch).item()  # noqa: E731
    assert at(5) == pytest.approx(full / 4, rel=1e-6)
    assert at(20) == pytest.approx(full, rel=1e-6) and at(200) == pytest.approx(full, rel=1e-6)
    assert distill_loss("dkd", zs, zt, y, params={"warmup": 0}, epoch=1).item() == pytest.approx(full, rel=1e-6)
    # DKD+LS as the LS code runs it (docs/METHODS.md): T = 2, alpha and beta x the kd weight 9
    ls = distill_loss("dkd", zs, zt, y, params=check_params("dkd", {"standardize": True}), epoch=30).item()
    assert ls == pytest.approx(dkd_loss(standardize(zs), standardize(zt), y, 9.0, 72.0, 2.0).item(), rel=1e-6)


# --- max-logit temperature -------------------------------------------------------------


@pytest.mark.parametrize("K,scale", CASES)
def test_max_logit_temperature_and_loss_match_formula(K, scale):
    zs, zt = logits(16, K, scale)
    zs64, zt64 = np_z(zs.double().numpy()), np_z(zt.double().numpy())
    T_ref = C * np.abs(zt64).max(axis=-1)
    T = max_logit_temperature(zt)
    np.testing.assert_allclose(T.numpy(), T_ref, rtol=1e-5)
    joint = max_logit_temperature(zt, zs)
    np.testing.assert_allclose(joint.numpy(), np.maximum(T_ref, C * np.abs(zs64).max(axis=-1)), rtol=1e-5)
    assert (joint >= T).all()
    ref = np_kd(zs64, zt64, T_ref)
    assert adaptive_kd_loss(zs, zt, T).item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert distill_loss("mlt", zs, zt, None, params={}, epoch=1).item() == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_mlt_uses_cached_temperature():
    zs, zt = logits(16, 100, scale=3.0)
    T = max_logit_temperature(zt.half())
    for variant in ("teacher", "joint"):
        p = {"variant": variant}
        cached = distill_loss("mlt", zs, zt.half(), None, params=p, stats={"temperature": T}, epoch=1)
        fresh = distill_loss("mlt", zs, zt.half(), None, params=p, epoch=1)
        assert cached.item() == pytest.approx(fresh.item(), rel=1e-6)
    # the cache is really used
    doubled = distill_loss("mlt", zs, zt, None, params={}, stats={"temperature": 2 * T}, epoch=1)
    assert doubled.item() == pytest.approx(adaptive_kd_loss(zs, zt, 2 * T).item(), rel=1e-6)


def test_max_logit_temperature_reaches_13_5_for_100_classes():
    one_hot = torch.nn.functional.one_hot(torch.tensor([7]), 100).float()
    assert max_logit_temperature(one_hot).item() == pytest.approx(C * 99 / 10, rel=1e-6)  # ~13.52


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(2, 60), elements=st.floats(-1e4, 1e4, allow_subnormal=False)))
def test_standardized_logits_are_bounded(z):
    """max|Z| <= (K-1)/sqrt(K) with the unbiased std, sqrt(K-1) with the biased one; one-hot attains both."""
    K = len(z)
    zt = torch.from_numpy(z)[None]
    assert standardize(zt, unbiased=True).abs().max().item() <= (K - 1) / math.sqrt(K) * (1 + 1e-9)
    assert standardize(zt, unbiased=False).abs().max().item() <= math.sqrt(K - 1) * (1 + 1e-9)


def test_standardized_bound_is_attained_by_one_hot():
    K = 100
    e = torch.nn.functional.one_hot(torch.tensor([0]), K).double()
    assert standardize(e, unbiased=True).abs().max().item() == pytest.approx((K - 1) / math.sqrt(K), rel=1e-6)
    assert standardize(e, unbiased=False).abs().max().item() == pytest.approx(math.sqrt(K - 1), rel=1e-5)


# --- gradients --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,params",
    [("kd", {}), ("kd", {"standardize": True}), ("ttm", {}), ("wttm", {}), ("dkd", {}),
     ("dkd", {"standardize": True}), ("mlt", {}), ("mlt", {"variant": "joint"})],
)
def test_no_gradient_into_teacher(method, params):
    zs, zt = logits(8, 10)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    y = torch.arange(8)
    loss = distill_loss(method, zs, zt, y, params=params, epoch=30)
    g_s, g_t = torch.autograd.grad(loss, [zs, zt], allow_unused=True)
    assert g_t is None
    assert g_s is not None and g_s.abs().sum() > 0


def test_no_gradient_through_weights_and_temperatures():
    zs, zt = logits(8, 10)
    zs.requires_grad_(True)
    u = teacher_power_sum(zt, 0.1).requires_grad_(True)
    T = torch.full((8,), 3.0, requires_grad=True)
    loss = wttm_loss(zs, zt, 0.1, power_sum=u) + kd_loss(zs, zt, T)
    assert torch.autograd.grad(loss, [u, T], allow_unused=True) == (None, None)
    # WTTM's gradient is U_i times TTM's, row by row: U acts as a constant weight
    (g_w,) = torch.autograd.grad(wttm_loss(zs, zt, 0.1), zs)
    (g_t,) = torch.autograd.grad(ttm_loss(zs, zt, 0.1), zs)
    np.testing.assert_allclose(g_w.numpy(), (teacher_power_sum(zt, 0.1)[:, None] * g_t).numpy(), rtol=1e-5, atol=1e-8)


def test_joint_temperature_is_not_differentiated():
    zs, zt = logits(8, 10, scale=2.0)
    zs.requires_grad_(True)
    (g_joint,) = torch.autograd.grad(distill_loss("mlt", zs, zt, None, params={"variant": "joint"}, epoch=1), zs)
    fixed = max_logit_temperature(zt, zs.detach())
    (g_fixed,) = torch.autograd.grad(adaptive_kd_loss(zs, zt, fixed), zs)
    np.testing.assert_allclose(g_joint.numpy(), g_fixed.numpy(), rtol=1e-5, atol=1e-8)


# --- registry ---------------------------------------------------------------------------


def test_check_params_fills_published_defaults():
    assert check_params("kd", {}) == {"T": 4.0, "standardize": False, "unbiased_std": True, "w_ce": 0.1, "w_kd": 0.9}
    ls = check_params("kd", {"standardize": True})
    assert (ls["T"], ls["w_ce"], ls["w_kd"]) == (2.0, 0.1, 9.0)
    assert check_params("kd", {"standardize": True, "T": 3})["T"] == 3.0
    dkd = check_params("dkd", {})
    assert (dkd["alpha"], dkd["beta"], dkd["T"], dkd["warmup"], dkd["w_ce"]) == (1.0, 8.0, 4.0, 20, 1.0)
    assert check_params("ttm", {})["gamma"] == 0.1 and check_params("wttm", {})["gamma"] == 0.1
    assert check_params("mlt", {})["variant"] == "teacher"
    for method in METHODS:
        once = check_params(method, {})
        assert check_params(method, once) == once  # idempotent


@pytest.mark.parametrize(
    "method,params,fragment",
    [
        ("kdd", {}, "unknown distillation method"),
        ("ls", {}, "unknown distillation method"),
        ("kd", {"gamma": 0.1}, "unknown parameter"),
        ("ce", {"w_kd": 1.0}, "unknown parameter"),
        ("mlt", {"standardize": False}, "unknown parameter"),
        ("kd", {"T": 0}, "T=0"),
        ("kd", {"T": -2.0}, "must be a number > 0"),
        ("kd", {"T": "4"}, "must be a number > 0"),
        ("kd", {"T": True}, "must be a number > 0"),
        ("kd", {"T": float("nan")}, "must be a number > 0"),
        ("ttm", {"gamma": 0.0}, "gamma"),
        ("wttm", {"gamma": -0.1}, "gamma"),
        ("dkd", {"beta": -1}, "beta"),
        ("dkd", {"warmup": -1}, "warmup"),
        ("dkd", {"warmup": 2.5}, "warmup"),
        ("kd", {"standardize": "yes"}, "true or false"),
        ("mlt", {"variant": "both"}, "'teacher' or 'joint'"),
        ("kd", {"w_kd": -1}, "w_kd"),
    ],
)
def test_check_params_rejects_mistakes(method, params, fragment):
    with pytest.raises(UserError, match=fragment):
        check_params(method, params)


def test_registry_dispatch():
    zs, zt = logits(8, 100)
    assert distill_loss("ce", zs, zt, None, params={}, epoch=1).item() == 0.0
    assert distill_loss("kd", zs, zt, None, params={"T": 3}, epoch=1).item() == pytest.approx(
        kd_loss(zs, zt, 3.0).item(), rel=1e-6
    )
    assert distill_loss("ttm", zs, zt, None, params={"gamma": 0.2}, epoch=1).item() == pytest.approx(
        ttm_loss(zs, zt, 0.2).item(), rel=1e-6
    )
    with pytest.raises(UserError):
        distill_loss("kd", zs, zt, None, params={"temp": 4}, epoch=1)
