"""Cross-entropy alone: the baseline without a teacher (stage 3 then reads no store)."""
import torch

from kdcache.methods.base import NON_NEGATIVE, Method


class CE(Method):
    parameters = {"w_ce": (1.0, NON_NEGATIVE)}

    def check_sampled(self, temperature):
        """CE reads no targets: any store will do."""

    def loss(self, z_s, z_t, labels, stats, epoch):
        return torch.zeros((), device=z_s.device)
