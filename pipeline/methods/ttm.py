"""TTM (Zheng & Yang 2024): a temperature 1/gamma on the teacher only (docs/METHODS.md)."""
import math

from kdcache.encodings import Sampled
from kdcache.losses import sampled_ttm_loss, ttm_loss
from kdcache.methods.base import NON_NEGATIVE, POSITIVE, Method, refuse_sampled


def check_gamma(method, gamma, temperature) -> None:
    """Sampled targets are the teacher at temperature T_s = 1/gamma or nothing: UserError otherwise."""
    if not math.isclose(gamma * temperature, 1.0, rel_tol=1e-6):
        raise refuse_sampled(method, temperature, f"with gamma: {gamma:g} needs the teacher at temperature "
                             f"{1 / gamma:g}")


class TTM(Method):
    # resnet32x4 -> resnet8x4 (vgg13 -> vgg8: w_kd = 45)
    parameters = {"gamma": (0.1, POSITIVE), "w_ce": (1.0, NON_NEGATIVE), "w_kd": (100.0, NON_NEGATIVE)}

    def check_sampled(self, temperature):
        check_gamma(self.name, self.params["gamma"], temperature)

    def loss(self, z_s, z_t, labels, stats, epoch):
        if isinstance(z_t, Sampled):
            self.check_sampled(z_t.temperature)
            return sampled_ttm_loss(z_s, z_t.ids, z_t.counts, z_t.entropy)
        return ttm_loss(z_s, z_t, self.params["gamma"])
