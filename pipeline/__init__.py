"""kdcache: an offline logit cache for knowledge distillation (shared library of the stages).

The API for training loops of your own (docs/API.md): `open_cache`, `CacheDataset`, `ChunkSampler`, `Loss`.
"""

__version__ = "0.1.0"

_API = {"open_cache": "kdcache.dataset", "CacheDataset": "kdcache.dataset", "ChunkSampler": "kdcache.dataset",
        "Loss": "kdcache.methods"}
__all__ = list(_API)


def __getattr__(name):
    """The API names, imported on first use: `import kdcache` (the CLI's --help, config checks) stays free of
    torch and zarr."""
    if name not in _API:
        raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_API[name]), name)
