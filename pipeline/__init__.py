"""kdcache: an offline logit cache for knowledge distillation (shared library of the stages)."""

__version__ = "0.1.0"
