"""TTM (Zheng & Yang 2024): a temperature 1/gamma on the teacher only (docs/METHODS.md)."""
from kdcache.losses import ttm_loss
from kdcache.methods.base import NON_NEGATIVE, POSITIVE, Method


class TTM(Method):
    # resnet32x4 -> resnet8x4 (vgg13 -> vgg8: w_kd = 45)
    parameters = {"gamma": (0.1, POSITIVE), "w_ce": (1.0, NON_NEGATIVE), "w_kd": (100.0, NON_NEGATIVE)}

    def loss(self, z_s, z_t, labels, stats, epoch):
        return ttm_loss(z_s, z_t, self.params["gamma"])
