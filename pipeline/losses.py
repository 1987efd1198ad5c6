"""Distillation losses as pure functions of logits (the formulas of docs docs/METHODS.md).

Every loss takes student logits ``z_s`` (B, K) and teacher logits ``z_t`` (B, K),
computes a per-sample divergence summed over classes, and returns its mean over
the batch. Conventions shared by all of them:

- The teacher is a fixed target: ``z_t`` is detached, so the same functions serve
  offline (cached) and online (live teacher) training without leaking gradients.
- Half-precision inputs (the cache stores float16) are computed in float32;
  float64 inputs stay float64.
- Cross-entropy is not here: the training loop computes it on the RAW student
  logits and forms ``w_ce * CE + w_kd * distill_loss(...)``.

``distill_loss`` is the one entry point the training loop uses, driven by a method
name and a parameter dict validated by ``check_params``.
"""

import math

import torch
import torch.nn.functional as F

from kdcache.errors import UserError, is_int, is_number

# (1 + sqrt(3)) / 2: from the radius of convergence of the second-order Taylor
# expansion of exp inside the softmax (Matsuyama et al. 2025).
MLT_CONSTANT = (1.0 + math.sqrt(3.0)) / 2.0


def _upcast(z):
    """Half precision -> float32; float32/float64 unchanged."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _pair(z_s, z_t):
    """Student and (detached) teacher logits in one common float dtype, at least float32."""
    dtype = torch.promote_types(_upcast(z_s).dtype, _upcast(z_t).dtype)
    return z_s.to(dtype), z_t.detach().to(dtype)


def _kl_rows(log_p, log_q):
    """KL(p || q) per row, from log-probabilities: sum_k p_k (log p_k - log q_k)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _per_row(temperature, z):
    """A float or a (B,) tensor of temperatures -> something that divides (B, K) rows; no gradient."""
    if isinstance(temperature, torch.Tensor):
        return temperature.detach().to(device=z.device, dtype=z.dtype).reshape(z.shape[0], 1)
    return float(temperature)


def standardize(z, unbiased=True, eps=1e-7):
    """Z(z) = (z - mean) / (std + eps) over the class axis (logit standardization, LS).

    ``unbiased=True`` divides the variance by K-1 as the LS authors' released code
    does (our default); ``False`` divides by K as the paper's algorithm writes.
    Gradients flow through mean and std (the released code does not detach them).
    """
    z = _upcast(z)
    std = z.std(dim=-1, keepdim=True, correction=1 if unbiased else 0)
    return (z - z.mean(dim=-1, keepdim=True)) / (std + eps)


def topk_compress(z, k):
    """The top-k form of teacher logits z (..., K): (values, indices, rest_logmass).

    values (..., k): the k largest logits, sorted descending, in z's dtype; indices (..., k) int64 their
    classes; rest_logmass (...): log of the softmax mass of the other K-k classes, computed in float64 as
    logsumexp(rest) - logsumexp(all), so it stays finite (and exact) however small the mass is; returned
    in float32 (float64 for float64 z). k = K has no rest: rest_logmass is -inf.
    """
    values, indices = z.topk(k, dim=-1)
    z64 = z.detach().double()
    lse_all = torch.logsumexp(z64, dim=-1)
    rest = z64.scatter(-1, indices, float("-inf"))
    rest_logmass = torch.logsumexp(rest, dim=-1) - lse_all
    return values, indices, rest_logmass.to(torch.promote_types(z.dtype, torch.float32))


def topk_logits(values, indices, rest_logmass, num_classes):
    """Logits (..., K) rebuilt from the top-k form (`topk_compress`): their softmax is the teacher's
    exact probabilities on the k stored classes and the rest mass spread uniformly over the other K-k.

    The stored values are kept as they are (so max, margin, logsumexp and the top-k order are the
    teacher's); every other class gets logit L + rest_logmass - log(K-k), where L = logsumexp(values) -
    log(1 - exp(rest_logmass)) is the teacher's logsumexp. That value is at most the k-th largest logit
    (up to rounding), so the argmax is kept too. Half precision comes out float32. Every loss and statistic then works
    unchanged on the result; what it cannot restore is the spread of the K-k rest logits (their mean,
    std and min, hence LS/MLT temperatures and entropies are approximations).
    """
    v = _upcast(values)
    k = v.shape[-1]
    if k == num_classes:  # nothing left out: the indices are a permutation of the classes
        return v.new_empty(*v.shape[:-1], num_classes).scatter_(-1, indices.long(), v)
    # The rest mass is < 1 except when the top-k mass underflowed to 0 (then log(1 - m) would be -inf).
    tiny = torch.finfo(v.dtype).tiny
    lm = rest_logmass.to(v.dtype).clamp(max=-tiny)
    log_top = torch.where(lm > -math.log(2), torch.log(-torch.expm1(lm)), torch.log1p(-torch.exp(lm)))
    rest = torch.logsumexp(v, dim=-1) - log_top + lm - math.log(num_classes - k)
    out = rest.unsqueeze(-1).expand(*v.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices.long(), v)


def kd_loss(z_s, z_t, T):
    """Hinton KD: mean_i T_i^2 * KL(softmax(z_t/T_i) || softmax(z_s/T_i)).

    ``T`` is a float (one temperature) or a (B,) tensor (one per sample, no
    gradient through it); the T^2 factor keeps gradient magnitudes comparable
    across temperatures.
    """
    z_s, z_t = _pair(z_s, z_t)
    T = _per_row(T, z_s)
    kl = _kl_rows(F.log_softmax(z_t / T, dim=-1), F.log_softmax(z_s / T, dim=-1))
    weight = T.squeeze(1) ** 2 if isinstance(T, torch.Tensor) else T**2
    return (weight * kl).mean()


def adaptive_kd_loss(z_s, z_t, temperature, unbiased=True):
    """KD on standardized logits with a per-sample temperature (B,):
    mean_i T_i^2 * KL(softmax(Z(z_t)/T_i) || softmax(Z(z_s)/T_i)).

    Standardization happens HERE, so this is the complete max-logit method of
    docs/METHODS.md; pass raw logits. ``temperature`` usually comes from
    ``max_logit_temperature`` (or its cached value) computed with the same ``unbiased``.
    """
    return kd_loss(standardize(z_s, unbiased), standardize(z_t, unbiased), temperature)


def max_logit_temperature(z_t, z_s=None, unbiased=True):
    """Per-sample temperature T_i = (1 + sqrt 3)/2 * max_k |Z(z_t)_k|, shape (B,), no gradient.

    With ``z_s`` given, the "joint" variant of a public implementation: the max of
    |Z| over both student and teacher. Without it (the paper's variant) T_i depends
    on the teacher only and can be cached by stage 2. A constant row has Z = 0 and
    T = 0, which makes the loss NaN; trained teachers do not produce such rows.
    """
    with torch.no_grad():
        m = standardize(z_t, unbiased).abs().amax(dim=-1)
        if z_s is not None:
            m = torch.maximum(m, standardize(z_s, unbiased).abs().amax(dim=-1).to(m.dtype))
    return MLT_CONSTANT * m


def teacher_power_sum(z_t, gamma):
    """U_gamma = sum_k softmax(z_t)_k ^ gamma per sample, shape (B,), no gradient.

    Computed as exp(logsumexp(gamma * log_softmax(z_t))), which neither overflows
    nor underflows for large logits. Lies in [1, K^(1-gamma)] for 0 < gamma <= 1.
    Depends on the teacher only, so stage 2 can cache it per row.
    """
    with torch.no_grad():
        return torch.logsumexp(gamma * F.log_softmax(_upcast(z_t), dim=-1), dim=-1).exp()


def _ttm_rows(z_s, z_t, gamma):
    """Per-sample KL(p_t^gamma || softmax(z_s)), with p_t^gamma = softmax(gamma * log_softmax(z_t))."""
    z_s, z_t = _pair(z_s, z_t)
    log_pt_gamma = F.log_softmax(gamma * F.log_softmax(z_t, dim=-1), dim=-1)
    return _kl_rows(log_pt_gamma, F.log_softmax(z_s, dim=-1))


def ttm_loss(z_s, z_t, gamma):
    """TTM: KL(p_t^gamma || softmax(z_s)); temperature 1/gamma on the teacher only, no T^2 factor."""
    return _ttm_rows(z_s, z_t, gamma).mean()


def wttm_loss(z_s, z_t, gamma, power_sum=None):
    """WTTM: mean_i U_gamma,i * KL(p_t^gamma || softmax(z_s)), U_gamma without gradient.

    ``power_sum``: a cached (B,) U_gamma for these rows (stage 2, same gamma);
    recomputed from ``z_t`` when None.
    """
    kl = _ttm_rows(z_s, z_t, gamma)
    u = teacher_power_sum(z_t, gamma) if power_sum is None else power_sum
    return (u.detach().to(device=kl.device, dtype=kl.dtype).reshape(kl.shape) * kl).mean()


def dkd_loss(z_s, z_t, labels, alpha, beta, T):
    """Decoupled KD: alpha * TCKD + beta * NCKD at temperature T (no warm-up factor here).

    TCKD = T^2 KL(b_t || b_s) with b = [p_y, 1 - p_y] of softmax(z/T), computed in
    log space as log_softmax([z_y/T, logsumexp_{k != y} z_k/T]).
    NCKD = T^2 KL over the K-1 non-target classes. The target class is removed
    exactly (by selecting the other columns), not by subtracting 1000 from its logit
    as the DKD authors' code does: that trick leaks mass back to the target when
    |z|/T is in the hundreds. The warm-up factor min(epoch/warmup, 1) is applied
    by ``distill_loss`` (see ``dkd_warmup``).
    """
    z_s, z_t = _pair(z_s, z_t)
    B, K = z_s.shape
    is_target = F.one_hot(labels.long().reshape(B), K).bool()

    def split(z):
        """(target logit / T, non-target logits / T) as (B, 1) and (B, K-1)."""
        z = z / T
        return z[is_target].reshape(B, 1), z[~is_target].reshape(B, K - 1)

    (y_s, rest_s), (y_t, rest_t) = split(z_s), split(z_t)

    def binary_log_probs(y, rest):
        return F.log_softmax(torch.cat([y, torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1), dim=-1)

    tckd = _kl_rows(binary_log_probs(y_t, rest_t), binary_log_probs(y_s, rest_s))
    nckd = _kl_rows(F.log_softmax(rest_t, dim=-1), F.log_softmax(rest_s, dim=-1))
    return T**2 * (alpha * tckd + beta * nckd).mean()


def dkd_warmup(epoch, warmup):
    """DKD's linear warm-up min(epoch / warmup, 1); epochs count from 1 as in the DKD code
    (epoch 1 of a 20-epoch warm-up scales by 1/20); warmup = 0 disables it."""
    return min(epoch / warmup, 1.0) if warmup else 1.0


# --- registry ---------------------------------------------------------------

# Method -> allowed parameters with their defaults: the published CIFAR-100
# settings of docs/METHODS.md (TTM/WTTM weights are those of resnet32x4 -> resnet8x4).
# Every method has w_ce; all but "ce" have w_kd (the training loss is
# w_ce * CE + w_kd * distill_loss). "standardize" is LS: Z() on both logit vectors
# first; "unbiased_std" is the std choice of Z (also for mlt, which always standardizes).
METHOD_PARAMS = {
    "ce": {"w_ce": 1.0},
    "kd": {"T": 4.0, "standardize": False, "unbiased_std": True, "w_ce": 0.1, "w_kd": 0.9},
    "ttm": {"gamma": 0.1, "w_ce": 1.0, "w_kd": 100.0},
    "wttm": {"gamma": 0.1, "w_ce": 1.0, "w_kd": 3.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20, "standardize": False, "unbiased_std": True,
            "w_ce": 1.0, "w_kd": 1.0},
    "mlt": {"variant": "teacher", "unbiased_std": True, "w_ce": 0.1, "w_kd": 9.0},
}

# Defaults that change when LS is switched on (LS paper: T_base = 2, w_kd = 9, w_ce = 0.1).
# DKD+LS as the LS authors' released code runs it (docs/METHODS.md, LS section): T = T_base = 2 and both alpha
# and beta multiplied by the kd weight 9 (alpha 1 x 9, beta 8 x 9 on resnet32x4 -> resnet8x4).
LS_DEFAULTS = {"kd": {"T": 2.0, "w_ce": 0.1, "w_kd": 9.0}, "dkd": {"T": 2.0, "alpha": 9.0, "beta": 72.0}}


# parameter -> (is it valid, what it must be, normalise)
_RULES = {
    "T": (lambda v: is_number(v) and v > 0, "a number > 0", float),
    "gamma": (lambda v: is_number(v) and v > 0, "a number > 0", float),
    "alpha": (lambda v: is_number(v) and v >= 0, "a number >= 0", float),
    "beta": (lambda v: is_number(v) and v >= 0, "a number >= 0", float),
    "w_ce": (lambda v: is_number(v) and v >= 0, "a number >= 0", float),
    "w_kd": (lambda v: is_number(v) and v >= 0, "a number >= 0", float),
    "warmup": (lambda v: is_int(v, 0), "an integer >= 0 (epochs)", int),
    "standardize": (lambda v: isinstance(v, bool), "true or false", bool),
    "unbiased_std": (lambda v: isinstance(v, bool), "true or false", bool),
    "variant": (lambda v: v in ("teacher", "joint"), "'teacher' or 'joint'", str),
}


def check_params(method, params):
    """Validate a method's hyper-parameters and fill in defaults; raise UserError on mistakes.

    Idempotent: checking an already checked dict returns an equal dict.
    """
    if method not in METHOD_PARAMS:
        raise UserError(f"unknown distillation method {method!r}; choose one of: {', '.join(METHOD_PARAMS)}")
    params = dict(params or {})
    allowed = METHOD_PARAMS[method]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UserError(
            f"unknown parameter(s) {', '.join(unknown)} for method {method!r}; allowed: {', '.join(allowed)}"
        )
    defaults = dict(allowed)
    if params.get("standardize") is True:
        defaults.update(LS_DEFAULTS.get(method, {}))
    checked = {}
    for name, value in {**defaults, **params}.items():
        valid, must_be, normalise = _RULES[name]
        if not valid(value):
            raise UserError(f"method {method!r}: parameter {name}={value!r} must be {must_be}")
        checked[name] = normalise(value)
    return checked


def distill_loss(method, z_s, z_t, labels, *, params, stats=None, epoch):
    """The distillation term L_distill of ``method`` (without CE and without w_kd).

    z_s, z_t: raw student / teacher logits (B, K); labels: (B,) class indices (DKD).
    params: the method's hyper-parameters (checked here with ``check_params``).
    stats: optional cached per-row tensors from stage 2, used instead of recomputation:
      "temperature" (B,): teacher-variant max-logit T_i (for "joint" the student's
      side is still computed per step and the larger one wins);
      "power_sum" (B,): WTTM's U_gamma. They must have been computed with the same
      gamma / std choice as ``params``.
    epoch: current epoch counted from 1 (DKD warm-up).
    """
    p = check_params(method, params)
    stats = stats or {}
    if method == "ce":
        return torch.zeros((), device=z_s.device)
    if method == "ttm":
        return ttm_loss(z_s, z_t, p["gamma"])
    if method == "wttm":
        return wttm_loss(z_s, z_t, p["gamma"], stats.get("power_sum"))
    if method == "mlt":
        t = stats.get("temperature")
        if t is None:
            t = max_logit_temperature(z_t, unbiased=p["unbiased_std"])
        if p["variant"] == "joint":  # max of |Z| over both sides = max(teacher's T, student's T)
            t_s = max_logit_temperature(z_s, unbiased=p["unbiased_std"])
            t = torch.maximum(t.to(t_s), t_s)
        return adaptive_kd_loss(z_s, z_t, t, unbiased=p["unbiased_std"])
    if p["standardize"]:
        z_s, z_t = standardize(z_s, p["unbiased_std"]), standardize(z_t, p["unbiased_std"])
    if method == "kd":
        return kd_loss(z_s, z_t, p["T"])
    # dkd
    return dkd_warmup(epoch, p["warmup"]) * dkd_loss(z_s, z_t, labels, p["alpha"], p["beta"], p["T"])


class Loss:
    """A method's whole training loss, as stage 3 computes it: w_ce * CE(z_s, labels) + w_kd * distill_loss.

    Settings default to the published ones (METHOD_PARAMS, LS_DEFAULTS) and are checked by ``check_params``:

        loss_fn = Loss("dkd", standardize=True)
        loss = loss_fn(student(x), z_t, y, stats=batch, epoch=epoch + 1)

    stats: a mapping holding the cached per-row statistics the method reads ("temperature" for mlt,
    "power_sum" for wttm: a kdcache.dataset.CacheDataset batch has them); without them they are computed
    from z_t. epoch: counted from 1 (DKD's warm-up).
    """

    def __init__(self, method, **params):
        self.method, self.params = method, check_params(method, params)

    def __call__(self, z_s, z_t, labels, *, stats=None, epoch):
        ce = F.cross_entropy(z_s, labels)
        kd = distill_loss(self.method, z_s, z_t, labels, params=self.params, stats=stats, epoch=epoch)
        return self.params["w_ce"] * ce + self.params.get("w_kd", 0.0) * kd

    def __repr__(self):
        return f"Loss({self.method!r}, {', '.join(f'{k}={v!r}' for k, v in self.params.items())})"
