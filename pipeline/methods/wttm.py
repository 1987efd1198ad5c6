"""WTTM (Zheng & Yang 2024): TTM weighted per sample by the teacher's power sum U_gamma (docs/METHODS.md)."""
from kdcache.encodings import Sampled
from kdcache.errors import UserError
from kdcache.losses import sampled_ttm_loss, wttm_loss
from kdcache.methods.base import NON_NEGATIVE, POSITIVE, Method
from kdcache.methods.ttm import check_gamma


class WTTM(Method):
    # resnet32x4 -> resnet8x4 (vgg13 -> vgg8: w_kd = 2.25; resnet56 -> resnet20: gamma = 0.3, w_kd = 1.5)
    parameters = {"gamma": (0.1, POSITIVE), "w_ce": (1.0, NON_NEGATIVE), "w_kd": (3.0, NON_NEGATIVE)}

    def statistics(self):
        return {"power_sum": ("wttm_power_sum", {"gamma": self.params["gamma"]})}  # U_gamma at this gamma

    def check_sampled(self, temperature):
        check_gamma(self.name, self.params["gamma"], temperature)

    def loss(self, z_s, z_t, labels, stats, epoch):
        if isinstance(z_t, Sampled):  # U_gamma cannot come from draws: stage 1's exact statistic of the store
            self.check_sampled(z_t.temperature)
            if stats.get("power_sum") is None:
                raise UserError(f"method 'wttm' on a sampled store needs the teacher's power sum U_gamma "
                                f"(gamma {self.params['gamma']:g}) from the store's statistics, which it lacks")
            return sampled_ttm_loss(z_s, z_t.ids, z_t.counts, z_t.entropy, stats["power_sum"])
        return wttm_loss(z_s, z_t, self.params["gamma"], stats.get("power_sum"))
