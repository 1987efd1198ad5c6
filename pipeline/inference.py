"""Running a model over (sample, view) pairs: the one path by which every stage gets a model's logits
for cached views (stage 1 caching, evaluation, online KD's live teacher, verify's spot checks)."""
import numpy as np
import torch

from kdcache.views import apply_views


def view_batches(dataset, ids: np.ndarray, params: np.ndarray, space, batch_size: int):
    """Yield (row slice, normalised input batch) over the flattened (sample, view) rows of `ids` x V.

    `params` is (n, V, P); row r is sample ids[r // V], view r % V. Images are read once per call.
    """
    n, v, _ = params.shape
    flat = params.reshape(n * v, -1)
    fixed = dataset.image_size is not None
    images = dataset.images(ids) if fixed else [dataset.image(int(i)) for i in ids]
    for start in range(0, n * v, batch_size):
        rows = np.arange(start, min(start + batch_size, n * v))
        owner = rows // v
        batch = images[torch.from_numpy(owner)] if fixed else [images[i] for i in owner]
        yield slice(rows[0], rows[-1] + 1), apply_views(batch, flat[rows], space, dataset.mean, dataset.std)


@torch.inference_mode()
def model_logits(model, dataset, ids: np.ndarray, params: np.ndarray, space, *, batch_size: int = 512,
                 device=torch.device("cpu"), amp: bool = False) -> np.ndarray:
    """float32 logits (n, V, K) of `model` on every view in `params` (n, V, P) of the samples `ids`."""
    n, v, _ = params.shape
    out = None
    cuda = device.type == "cuda"
    for rows, x in view_batches(dataset, ids, params, space, batch_size):
        if cuda:
            x = x.pin_memory().to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=cuda and amp):
            z = model(x).float().cpu().numpy()
        if out is None:
            out = np.empty((n * v, z.shape[1]), dtype=np.float32)
        out[rows] = z
    return out.reshape(n, v, -1)


def accuracy(model, dataset, space, *, batch_size: int = 512, device=torch.device("cpu")) -> float:
    """Top-1 accuracy on one view per sample of `space` (use ViewSpace.identity for the test split)."""
    ids = np.arange(len(dataset))
    params = space.sample_params(ids, _sizes(dataset, ids))
    logits = model_logits(model, dataset, ids, params[:, :1], space, batch_size=batch_size, device=device)
    return float((logits[:, 0].argmax(1) == dataset.labels).mean())


def _sizes(dataset, ids):
    return dataset.image_size if dataset.image_size is not None else dataset.image_sizes(ids)
