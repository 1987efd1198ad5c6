"""The method registry: one unit per method, published defaults, one check per run, and a method added in one
place trains end to end."""
import json
import math

import pytest
import torch

import kdcache.losses
from kdcache.errors import UserError
from kdcache.losses import kd_loss, max_logit_temperature, teacher_power_sum
from kdcache.methods import METHODS, Loss, build, distill_loss
from kdcache.methods.base import NON_NEGATIVE, POSITIVE, Method
from kdcache.stages.train_student import train_student

# docs/METHODS.md's published settings, written out.
PUBLISHED = {
    "ce": {"w_ce": 1.0},
    "kd": {"T": 4.0, "standardize": False, "unbiased_std": True, "w_ce": 0.1, "w_kd": 0.9},
    "ttm": {"gamma": 0.1, "w_ce": 1.0, "w_kd": 100.0},
    "wttm": {"gamma": 0.1, "w_ce": 1.0, "w_kd": 3.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20, "standardize": False, "unbiased_std": True,
            "w_ce": 1.0, "w_kd": 1.0},
    "mlt": {"variant": "teacher", "unbiased_std": True, "w_ce": 0.1, "w_kd": 9.0},
}
PUBLISHED_LS = {  # KD+LS: the LS paper; DKD+LS: the LS authors' code on resnet32x4 -> resnet8x4
    "kd": {**PUBLISHED["kd"], "standardize": True, "T": 2.0, "w_ce": 0.1, "w_kd": 9.0},
    "dkd": {**PUBLISHED["dkd"], "standardize": True, "T": 2.0, "alpha": 9.0, "beta": 72.0},
}


def test_the_registry_holds_the_six_methods():
    assert list(METHODS) == ["ce", "kd", "ttm", "wttm", "dkd", "mlt"]
    assert all(issubclass(m, Method) for m in METHODS.values())
    assert not hasattr(kdcache.losses, "check_params")  # the pure formulas only: methods live in kdcache.methods


@pytest.mark.parametrize("method", PUBLISHED)
def test_defaults_are_the_published_settings(method):
    assert build(method).params == PUBLISHED[method]
    assert list(build(method).params) == list(METHODS[method].parameters)


@pytest.mark.parametrize("method", PUBLISHED_LS)
def test_ls_defaults_are_the_published_settings(method):
    assert build(method, {"standardize": True}).params == PUBLISHED_LS[method]
    assert build(method, {"standardize": True, "T": 3}).params["T"] == 3.0  # a given value wins


@pytest.mark.parametrize("method, params, message", [
    ("kd", {"temp": 4}, "unknown parameter(s) temp for method 'kd'; allowed: T, standardize, unbiased_std, "
                        "w_ce, w_kd"),
    ("ce", {"w_kd": 1}, "unknown parameter(s) w_kd for method 'ce'; allowed: w_ce"),
    ("fitnet", {}, "unknown distillation method 'fitnet'; choose one of: ce, kd, ttm, wttm, dkd, mlt"),
    *[(m, {p: "x"}, f"method {m!r}: parameter {p}='x' must be ") for m in PUBLISHED for p in PUBLISHED[m]],
])
def test_a_mistake_is_one_user_error(method, params, message):
    with pytest.raises(UserError) as e:
        build(method, params)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("method, params", [
    ("ce", {}), ("kd", {}), ("kd", {"standardize": True, "unbiased_std": False}), ("ttm", {"gamma": 0.2}),
    ("wttm", {}), ("dkd", {}), ("dkd", {"standardize": True}), ("mlt", {}), ("mlt", {"variant": "joint"})])
@pytest.mark.parametrize("cached", [False, True])
def test_a_method_built_once_gives_distill_loss(method, params, cached):
    torch.manual_seed(0)
    z_s, z_t, y = 3 * torch.randn(16, 10), 3 * torch.randn(16, 10), torch.randint(0, 10, (16,))
    stats = {"temperature": max_logit_temperature(z_t), "power_sum": teacher_power_sum(z_t, 0.1)} if cached else {}
    m = build(method, params)
    for epoch in (1, 5, 30):  # DKD's warm-up
        got = m.loss(z_s, z_t, y, stats, epoch)
        assert torch.equal(got, distill_loss(method, z_s, z_t, y, params=params, stats=stats, epoch=epoch))
    assert Loss(method, **params)(z_s, z_t, y, stats=stats, epoch=1).item() == pytest.approx(
        m.params["w_ce"] * torch.nn.functional.cross_entropy(z_s, y).item()
        + m.params.get("w_kd", 0.0) * m.loss(z_s, z_t, y, stats, 1).item(), rel=1e-6)


def test_the_per_step_call_checks_nothing(monkeypatch):
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    loss_fn, want = Loss("kd"), Loss("kd")(z_s, z_t, y, epoch=1)
    monkeypatch.setattr(METHODS["kd"], "parameters", {})  # building kd now gives no parameters at all
    assert torch.equal(loss_fn(z_s, z_t, y, epoch=1), want)


class ScaledKD(Method):
    """docs/METHODS.md's example ("Adding a method"): a toy method that reads a stage-2 statistic."""
    parameters = {"scale": (1.0, POSITIVE), "w_ce": (0.1, NON_NEGATIVE), "w_kd": (0.9, NON_NEGATIVE)}

    def statistics(self):
        return {"temperature": ("mlt_temperature", {"std": "unbiased"})}

    def loss(self, z_s, z_t, labels, stats, epoch):
        return kd_loss(z_s, z_t, self.params["scale"] * stats["temperature"])  # KeyError if stage 3 lacks it


def test_a_method_added_to_the_dict_trains_end_to_end(train_store_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "scaled_kd", ScaledKD)
    cfg = json.loads(json.dumps(train_store_cfg))
    cfg["train"].update(method="scaled_kd", params={"scale": 2}, epochs=1, out=str(tmp_path / "run"))
    steps = []
    result = train_student(cfg, progress=False, on_step=steps.append)
    assert result["method"] == "scaled_kd" and result["params"] == {"scale": 2.0, "w_ce": 0.1, "w_kd": 0.9}
    assert steps and all(math.isfinite(s["loss"]) and s["kd"] > 0 for s in steps)
    assert all(s["loss"] == pytest.approx(0.1 * s["ce"] + 0.9 * s["kd"], rel=1e-5) for s in steps)
    cfg["train"].update(params={"scale": 0}, out=str(tmp_path / "bad"))
    with pytest.raises(UserError, match="method 'scaled_kd': parameter scale=0 must be a number > 0"):
        train_student(cfg, progress=False)


@pytest.mark.parametrize("method, params", [("kd", {"standardize": True}), ("dkd", {"standardize": True}),
                                            ("mlt", {}), ("mlt", {"unbiased_std": False})])
def test_given_teacher_moments_standardize_the_teacher(method, params):
    """On a lossy store stage 3 hands the loss stage 1's exact per-row mean and std: the teacher is standardized with
    them, Z = (z_t - mean) / (std + 1e-7) (the rebuilt logits' own moments are not the teacher's), the student with
    its own; docs/METHODS.md's formulas, written out."""
    g = torch.Generator().manual_seed(0)
    z_s, z_t, y = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g), torch.arange(6) % 5
    full = z_t + torch.randn(6, 5, generator=g)  # the teacher's logits, of which z_t is a lossy rebuild
    m = build(method, params)
    convention = m.teacher_moments()
    assert convention == ("unbiased" if m.params["unbiased_std"] else "population")
    correction = int(convention == "unbiased")
    mean, std = full.mean(1), full.std(1, correction=correction)
    Z_t = (z_t - mean[:, None]) / (std[:, None] + 1e-7)
    Z_s = (z_s - z_s.mean(1, keepdim=True)) / (z_s.std(1, keepdim=True, correction=correction) + 1e-7)
    p = m.params
    if method == "mlt":
        T = max_logit_temperature(full, unbiased=bool(correction))
        stats, want = {"temperature": T}, kd_loss(Z_s, Z_t, T)
    elif method == "kd":
        stats, want = {}, kd_loss(Z_s, Z_t, p["T"])
    else:
        stats, want = {}, kdcache.losses.dkd_loss(Z_s, Z_t, y, p["alpha"], p["beta"], p["T"]) * min(30 / p["warmup"], 1)
    got = m.loss(z_s, z_t, y, {**stats, "mean": mean, "std": std}, 30)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, m.loss(z_s, z_t, y, stats, 30))  # without them: the rebuild's own moments
    plain = build(method, {k: v for k, v in params.items() if k != "standardize"})
    assert plain.teacher_moments() == (convention if method == "mlt" else None)  # KD, DKD without LS read none
