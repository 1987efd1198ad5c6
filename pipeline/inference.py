"""Running a model over (sample, view) pairs: the one path by which every stage gets a model's logits
for cached views (stage 1 caching, evaluation, verify's spot checks)."""
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdcache.views import apply_views


class ViewRows(Dataset):
    """The (sample, view) rows of `ids` x V as normalised inputs, row r = sample ids[r // V], view r % V, with
    `params` (n, V, P). A DataLoader fetches a batch of rows through `__getitems__`: each image the batch needs
    is read (an image folder's: decoded) once and its views replayed by `apply_views`, in DataLoader workers
    when it has some, so that the process running the model never waits on decoding."""

    def __init__(self, dataset, ids: np.ndarray, params: np.ndarray, space):
        self.dataset, self.ids, self.space = dataset, np.asarray(ids), space
        self.num_views = params.shape[1]
        self.params = params.reshape(len(self.ids) * self.num_views, -1)

    def __len__(self):
        return len(self.params)

    def __getitems__(self, rows) -> torch.Tensor:
        rows = np.asarray(rows)
        samples, owner = np.unique(rows // self.num_views, return_inverse=True)
        images = self.dataset.batch(self.ids[samples])
        batch = images[torch.from_numpy(owner)] if torch.is_tensor(images) else [images[k] for k in owner]
        return apply_views(batch, self.params[rows], self.space, self.dataset.mean, self.dataset.std)


def whole_batch(x):
    """collate_fn of ViewRows: `__getitems__` already returns the batch (a module-level function: picklable)."""
    return x


@torch.inference_mode()
def model_logits(model, dataset, ids: np.ndarray, params: np.ndarray, space, *, batch_size: int = 512,
                 device=torch.device("cpu"), amp: bool = False, workers: int = 0) -> np.ndarray:
    """float32 logits (n, V, K) of `model` on every view in `params` (n, V, P) of the samples `ids`; `workers`
    DataLoader processes read and replay the views (0: this process)."""
    n, v, _ = params.shape
    cuda = device.type == "cuda"
    loader = DataLoader(ViewRows(dataset, ids, params, space), batch_size=batch_size, num_workers=workers,
                        collate_fn=whole_batch, pin_memory=cuda)
    out, start = None, 0
    for x in loader:  # in row order
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and amp):
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
