"""Replaying views and running a model over them: the one path by which every stage gets its inputs.

`ViewBatches` is the one Dataset of replayed views: stage 1 and evaluation (`model_logits`), the trainer
(kdcache.targets) and users' loops (`kdcache.CacheDataset`) all read their images through it, so decoding (an
image folder's JPEG files) and view replay run in DataLoader workers when there are some (`replay_loader`).
"""
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdcache.views import apply_views


class ViewBatches(Dataset):
    """Keyed by a whole batch: `views[(ids, params)]` is the normalised input (B, C, S, S) of sample ids[i] in the
    view of params[i] (what `apply_views` replays). Each image the batch needs is read (an image folder's:
    decoded) once, however many of its views the batch holds. `mean`/`std` default to the data set's."""

    def __init__(self, data, space, mean=None, std=None):
        self.data, self.space = data, space
        self.mean, self.std = data.mean if mean is None else mean, data.std if std is None else std

    def __getitem__(self, key) -> torch.Tensor:
        ids, params = key
        samples, owner = np.unique(np.asarray(ids), return_inverse=True)
        images = self.data.batch(samples)
        batch = images[torch.from_numpy(owner)] if torch.is_tensor(images) else [images[k] for k in owner]
        return apply_views(batch, params, self.space, self.mean, self.std)


def replay_loader(views: ViewBatches, keys, workers: int, device) -> DataLoader:
    """The batches of `keys` (an iterable of (ids, params), consumed as they are needed) in order, replayed by
    `workers` DataLoader processes (0: this one); pinned on CUDA, for a `.to(device, non_blocking=True)`."""
    return DataLoader(views, batch_size=None, sampler=keys, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda")


@torch.inference_mode()
def model_logits(model, dataset, ids: np.ndarray, params: np.ndarray, space, *, batch_size: int = 512,
                 device=torch.device("cpu"), amp: bool = False, workers: int = 0) -> np.ndarray:
    """float32 logits (n, V, K) of `model` on every view in `params` (n, V, P) of the samples `ids`, in batches of
    `batch_size` (sample, view) rows; `workers` DataLoader processes read and replay the views (0: this process)."""
    n, v, _ = params.shape
    rows = np.arange(n * v)
    flat, owners = params.reshape(n * v, -1), np.asarray(ids)[rows // v]
    keys = [(owners[r:r + batch_size], flat[r:r + batch_size]) for r in range(0, n * v, batch_size)]
    out, start = None, 0
    for x in replay_loader(ViewBatches(dataset, space), keys, workers, device):  # in row order
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda" and amp):
            z = model(x.to(device, non_blocking=True)).float().cpu().numpy()
        if out is None:
            out = np.empty((n * v, z.shape[1]), dtype=np.float32)
        out[start:start + len(z)] = z
        start += len(z)
    return out.reshape(n, v, -1)


def accuracy(model, dataset, space, *, batch_size: int = 512, device=torch.device("cpu")) -> float:
    """Top-1 accuracy on one view per sample of `space` (use ViewSpace.identity for the test split)."""
    ids = np.arange(len(dataset))
    params = space.sample_params(ids, _sizes(dataset, ids))
    logits = model_logits(model, dataset, ids, params[:, :1], space, batch_size=batch_size, device=device)
    return float((logits[:, 0].argmax(1) == dataset.labels).mean())


def _sizes(dataset, ids):
    return dataset.image_size if dataset.image_size is not None else dataset.image_sizes(ids)
