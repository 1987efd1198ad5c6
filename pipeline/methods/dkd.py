"""DKD (Zhao et al. 2022) with its warm-up, and DKD+LS with `standardize: true` as the LS authors' code runs it
(docs/METHODS.md)."""
from kdcache.losses import dkd_loss, dkd_warmup, standardize
from kdcache.methods.base import EPOCHS, FLAG, NON_NEGATIVE, POSITIVE, Method


class DKD(Method):
    # beta = 8: resnet32x4 -> resnet8x4 (the authors' configs: 6 for vgg13 -> vgg8 and wrn_40_2 -> wrn_16_2,
    # 2 for resnet56 -> resnet20)
    parameters = {"alpha": (1.0, NON_NEGATIVE), "beta": (8.0, NON_NEGATIVE), "T": (4.0, POSITIVE),
                  "warmup": (20, EPOCHS), "standardize": (False, FLAG), "unbiased_std": (True, FLAG),
                  "w_ce": (1.0, NON_NEGATIVE), "w_kd": (1.0, NON_NEGATIVE)}
    ls_defaults = {"T": 2.0, "alpha": 9.0, "beta": 72.0}  # T = T_base, alpha and beta x the kd weight 9

    def teacher_moments(self):
        return ("unbiased" if self.params["unbiased_std"] else "population") if self.params["standardize"] else None

    def loss(self, z_s, z_t, labels, stats, epoch):
        p, z_t = self.params, self.dense(z_t)
        if p["standardize"]:  # with a lossy store's exact teacher moments when stage 3 read them
            z_s = standardize(z_s, p["unbiased_std"])
            z_t = standardize(z_t, p["unbiased_std"], mean=stats.get("mean"), std=stats.get("std"))
        return dkd_warmup(epoch, p["warmup"]) * dkd_loss(z_s, z_t, labels, p["alpha"], p["beta"], p["T"])
