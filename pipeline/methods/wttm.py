"""WTTM (Zheng & Yang 2024): TTM weighted per sample by the teacher's power sum U_gamma (docs/METHODS.md)."""
from kdcache.losses import wttm_loss
from kdcache.methods.base import NON_NEGATIVE, POSITIVE, Method


class WTTM(Method):
    # resnet32x4 -> resnet8x4 (vgg13 -> vgg8: w_kd = 2.25; resnet56 -> resnet20: gamma = 0.3, w_kd = 1.5)
    parameters = {"gamma": (0.1, POSITIVE), "w_ce": (1.0, NON_NEGATIVE), "w_kd": (3.0, NON_NEGATIVE)}

    def statistics(self):
        return {"power_sum": ("wttm_power_sum", {"gamma": self.params["gamma"]})}  # U_gamma at this gamma

    def loss(self, z_s, z_t, labels, stats, epoch):
        return wttm_loss(z_s, z_t, self.params["gamma"], stats.get("power_sum"))
