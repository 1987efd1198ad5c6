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

    def teacher_moments(self):
        return ("unbiased" if self.params["unbiased_std"] else "population") if self.params["standardize"] else None

    def check_sampled(self, temperature):
        if self.params["standardize"]:
            raise refuse_sampled(self.name, temperature, "with standardize: true needs all K teacher logits")
        if not math.isclose(self.params["T"], temperature, rel_tol=1e-6):
            raise refuse_sampled(self.name, temperature, f"with T: {self.params['T']:g} needs the teacher at that T")

    def loss(self, z_s, z_t, labels, stats, epoch):
        p = self.params
        if isinstance(z_t, Sampled):  # sampled targets: an unbiased estimate at T = T_s
            self.check_sampled(z_t.temperature)
            return sampled_kd_loss(z_s, z_t.ids, z_t.counts, z_t.entropy, p["T"])
        if p["standardize"]:  # with a lossy store's exact teacher moments when stage 3 read them
            z_s = standardize(z_s, p["unbiased_std"])
            z_t = standardize(z_t, p["unbiased_std"], mean=stats.get("mean"), std=stats.get("std"))
        return kd_loss(z_s, z_t, p["T"])
