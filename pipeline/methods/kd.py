"""KD (Hinton et al. 2015), and KD+LS with `standardize: true` (Sun et al. 2024): docs/METHODS.md."""
import math

from kdcache.encodings import Sampled
from kdcache.losses import kd_loss, sampled_kd_loss, standardize
from kdcache.methods.base import FLAG, NON_NEGATIVE, POSITIVE, Method, refuse_sampled


class KD(Method):
    # The CRD / mdistiller CIFAR-100 setting; unbiased_std: the std of LS's Z() as the LS authors' code (K - 1).
    parameters = {"T": (4.0, POSITIVE), "standardize": (False, FLAG), "unbiased_std": (True, FLAG),
                  "w_ce": (0.1, NON_NEGATIVE), "w_kd": (0.9, NON_NEGATIVE)}
    ls_defaults = {"T": 2.0, "w_ce": 0.1, "w_kd": 9.0}  # the LS paper: T_base = 2, w_kd = 9

    def loss(self, z_s, z_t, labels, stats, epoch):
        p = self.params
        if isinstance(z_t, Sampled) and not p["standardize"]:  # sampled targets: an unbiased estimate at T = T_s
            if not math.isclose(p["T"], z_t.temperature, rel_tol=1e-6):
                raise refuse_sampled(self.name, z_t.temperature, f"with T: {p['T']:g} needs the teacher at that T")
            return sampled_kd_loss(z_s, z_t.ids, z_t.counts, z_t.entropy, p["T"])
        z_t = self.dense(z_t)
        if p["standardize"]:
            z_s, z_t = standardize(z_s, p["unbiased_std"]), standardize(z_t, p["unbiased_std"])
        return kd_loss(z_s, z_t, p["T"])
