"""KD (Hinton et al. 2015), and KD+LS with `standardize: true` (Sun et al. 2024): docs/METHODS.md."""
from kdcache.losses import kd_loss, standardize
from kdcache.methods.base import FLAG, NON_NEGATIVE, POSITIVE, Method


class KD(Method):
    # The CRD / mdistiller CIFAR-100 setting; unbiased_std: the std of LS's Z() as the LS authors' code (K - 1).
    parameters = {"T": (4.0, POSITIVE), "standardize": (False, FLAG), "unbiased_std": (True, FLAG),
                  "w_ce": (0.1, NON_NEGATIVE), "w_kd": (0.9, NON_NEGATIVE)}
    ls_defaults = {"T": 2.0, "w_ce": 0.1, "w_kd": 9.0}  # the LS paper: T_base = 2, w_kd = 9

    def loss(self, z_s, z_t, labels, stats, epoch):
        p = self.params
        if p["standardize"]:
            z_s, z_t = standardize(z_s, p["unbiased_std"]), standardize(z_t, p["unbiased_std"])
        return kd_loss(z_s, z_t, p["T"])
