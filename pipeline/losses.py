"""Distillation losses as pure functions of logits (the formulas of docs/METHODS.md).

Every loss takes student logits ``z_s`` (B, K) and teacher logits ``z_t`` (B, K),
computes a per-sample divergence summed over classes, and returns its mean over
the batch. Conventions shared by all of them:

- The teacher is a fixed target: ``z_t`` is detached, so the same functions serve
  offline (cached) and online (live teacher) training without leaking gradients.
- Half-precision inputs (the cache stores float16) are computed in float32;
  float64 inputs stay float64.
- Cross-entropy is not here: the training loop computes it on the RAW student
  logits and forms ``w_ce * CE + w_kd * L_distill``.

The methods built on them (parameters, published defaults, statistics read) are
kdcache.methods, one file each.
"""

import math

import torch
import torch.nn.functional as F

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


def standardize(z, unbiased=True, eps=1e-7, *, mean=None, std=None):
    """Z(z) = (z - mean) / (std + eps) over the class axis (logit standardization, LS).

    ``unbiased=True`` divides the variance by K-1 as the LS authors' released code
    does (our default); ``False`` divides by K as the paper's algorithm writes.
    Gradients flow through mean and std (the released code does not detach them).
    ``mean``, ``std``: per-row (B,) values to use instead of z's own: a lossy store's exact
    moments of the teacher's logits (stage 1 wrote them before encoding), where z is a rebuild.
    """
    z = _upcast(z)
    if std is None:
        std = z.std(dim=-1, keepdim=True, correction=1 if unbiased else 0)
    else:
        std = std.to(z).reshape(-1, 1)
    mean = z.mean(dim=-1, keepdim=True) if mean is None else mean.to(z).reshape(-1, 1)
    return (z - mean) / (std + eps)


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


def adaptive_kd_loss(z_s, z_t, temperature, unbiased=True, *, teacher_mean=None, teacher_std=None):
    """KD on standardized logits with a per-sample temperature (B,):
    mean_i T_i^2 * KL(softmax(Z(z_t)/T_i) || softmax(Z(z_s)/T_i)).

    Standardization happens HERE, so this is the complete max-logit method of
    docs/METHODS.md; pass raw logits. ``temperature`` usually comes from
    ``max_logit_temperature`` (or its cached value) computed with the same ``unbiased``.
    ``teacher_mean``, ``teacher_std``: the teacher's exact moments (see ``standardize``).
    """
    z_t = standardize(z_t, unbiased, mean=teacher_mean, std=teacher_std)
    return kd_loss(standardize(z_s, unbiased), z_t, temperature)


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
    by the dkd method (``dkd_warmup``).
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


# ---- sampled targets (kdcache.encodings.Sampled): unbiased estimates of the full losses ----------------------
#
# A sampled store holds, per row, the distinct classes `ids` (B, D) of `draws` draws from the teacher's p =
# softmax(z_t / T_s), their `counts` (B, D) (0 pads) and the entropy H(p) (B,). Since E[count_k] = draws * p_k,
#     KL(p || q) = -H(p) - sum_k p_k log q_k,  estimated without bias by  -H(p) - sum_j counts_j / draws * log q_ids_j
# and so is its gradient in the student's logits (linear in the counts). No dense teacher row is rebuilt.

def _sampled_cross_entropy(log_q, ids, counts):
    """-(1/draws) sum_j counts_j log q_{ids_j} per row: the sampled estimate of -sum_k p_k log q_k (padding, count
    0, adds nothing even where log q is -inf)."""
    counts = counts.detach().to(log_q.dtype)
    picked = log_q.gather(-1, ids.long())
    return -torch.where(counts > 0, counts * picked, 0.0).sum(-1) / counts.sum(-1)


def sampled_kl_rows(z_s, ids, counts, entropy, T=1.0):
    """Per-row unbiased estimate of KL(p_t || softmax(z_s / T)) from sampled targets of p_t (ids, counts: (B, D);
    entropy (B,): H(p_t)). T must be the store's temperature for p_t to be what KD/TTM want (the methods check)."""
    log_q = F.log_softmax(_upcast(z_s) / T, dim=-1)
    return -entropy.detach().to(log_q.dtype) + _sampled_cross_entropy(log_q, ids, counts)


def sampled_kd_loss(z_s, ids, counts, entropy, T):
    """KD at T = the store's temperature T_s: mean_i T^2 * KL estimate (`sampled_kl_rows`); its mean over the
    draws is `kd_loss` of the teacher's logits, and so is its gradient's."""
    return T**2 * sampled_kl_rows(z_s, ids, counts, entropy, T).mean()


def sampled_ttm_loss(z_s, ids, counts, entropy, power_sum=None):
    """TTM (and WTTM with the teacher's U_gamma `power_sum` (B,)) of a store sampled at T_s = 1/gamma: p_t^gamma =
    softmax(gamma log softmax(z_t)) = softmax(z_t / T_s), the student at T = 1, no T^2 factor."""
    kl = sampled_kl_rows(z_s, ids, counts, entropy)
    if power_sum is None:
        return kl.mean()
    return (power_sum.detach().to(device=kl.device, dtype=kl.dtype).reshape(kl.shape) * kl).mean()
