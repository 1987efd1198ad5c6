"""The distillation methods, one file each, found through `METHODS` (docs/METHODS.md, "Adding a method").

A run builds its method once (`build`: parameters checked, published defaults filled in) and calls its `loss`
every step. `check_params` and `distill_loss` do the same from a method name and a parameter dict.
"""
import torch.nn.functional as F

from kdcache.errors import UserError
from kdcache.methods.ce import CE
from kdcache.methods.dkd import DKD
from kdcache.methods.kd import KD
from kdcache.methods.mlt import MLT
from kdcache.methods.ttm import TTM
from kdcache.methods.wttm import WTTM

METHODS = {"ce": CE, "kd": KD, "ttm": TTM, "wttm": WTTM, "dkd": DKD, "mlt": MLT}


def build(method, params=None):
    """The method called `method` with `params` checked and the defaults filled in; UserError on a mistake."""
    if method not in METHODS:
        raise UserError(f"unknown distillation method {method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[method](method, params)


def check_params(method, params):
    """`params` checked, with the defaults filled in; idempotent. UserError on a mistake."""
    return build(method, params).params


def distill_loss(method, z_s, z_t, labels, *, params, stats=None, epoch):
    """The distillation term L_distill of `method` (without CE and w_kd), checking `params` at every call: a
    training loop builds its method once instead.

    z_s, z_t: raw student / teacher logits (B, K), or for z_t a sampled store's targets (kdcache.encodings.Sampled:
    kd, ttm and wttm take them at the store's temperature, the others refuse them); labels: (B,) class indices
    (DKD). stats: optional cached per-row tensors from stage 2, used instead of recomputation ("temperature" for
    mlt: the teacher's T_i, for "joint" the student's side is still computed per step; "power_sum" for wttm:
    U_gamma), computed with the same gamma / std choice as `params`. epoch: the current epoch counted from 1 (DKD's warm-up).
    """
    return build(method, params).loss(z_s, z_t, labels, stats or {}, epoch)


class Loss:
    """A method's whole training loss, as stage 3 computes it: w_ce * CE(z_s, labels) + w_kd * L_distill.

    Settings default to the published ones and are checked once, here:

        loss_fn = Loss("dkd", standardize=True)
        loss = loss_fn(student(x), z_t, y, stats=batch, epoch=epoch + 1)

    stats: a mapping holding the cached per-row statistics the method reads ("temperature" for mlt,
    "power_sum" for wttm: a kdcache.dataset.CacheDataset batch has them); without them they are computed
    from z_t. epoch: counted from 1 (DKD's warm-up).
    """

    def __init__(self, method, **params):
        self.method = build(method, params)
        self.params = self.method.params

    def __call__(self, z_s, z_t, labels, *, stats=None, epoch):
        ce = F.cross_entropy(z_s, labels)
        kd = self.method.loss(z_s, z_t, labels, stats or {}, epoch)
        return self.params["w_ce"] * ce + self.params.get("w_kd", 0.0) * kd

    def __repr__(self):
        return f"Loss({self.method.name!r}, {', '.join(f'{k}={v!r}' for k, v in self.params.items())})"
