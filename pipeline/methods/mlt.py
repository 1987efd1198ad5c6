"""The max-logit temperature (Matsuyama et al. 2025): KD on standardized logits at a per-sample temperature
from the teacher's largest |Z| (docs/METHODS.md)."""
import torch

from kdcache.losses import adaptive_kd_loss, max_logit_temperature
from kdcache.methods.base import FLAG, NON_NEGATIVE, Method

VARIANT = (lambda v: v in ("teacher", "joint"), "'teacher' or 'joint'", str)


class MLT(Method):
    # teacher: the paper's T_i (cacheable); joint: a public implementation's max over student and teacher
    parameters = {"variant": ("teacher", VARIANT), "unbiased_std": (True, FLAG),
                  "w_ce": (0.1, NON_NEGATIVE), "w_kd": (9.0, NON_NEGATIVE)}  # as LS

    def statistics(self):
        return {"temperature": ("mlt_temperature", {"std": self.teacher_moments()})}  # the teacher's T_i

    def teacher_moments(self):
        return "unbiased" if self.params["unbiased_std"] else "population"

    def loss(self, z_s, z_t, labels, stats, epoch):
        unbiased, z_t = self.params["unbiased_std"], self.dense(z_t)
        t = stats.get("temperature")
        if t is None:
            t = max_logit_temperature(z_t, unbiased=unbiased)
        if self.params["variant"] == "joint":  # max of |Z| over both sides = max(teacher's T, student's T)
            t_s = max_logit_temperature(z_s, unbiased=unbiased)
            t = torch.maximum(t.to(t_s), t_s)
        return adaptive_kd_loss(z_s, z_t, t, unbiased=unbiased, teacher_mean=stats.get("mean"),
                                teacher_std=stats.get("std"))
