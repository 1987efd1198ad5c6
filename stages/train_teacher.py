"""Stage 0 (bootstrap): train the default teacher for users who have no checkpoint yet.

Plain cross-entropy with the same augmentation view space that stage 1 will cache, SGD + cosine
schedule; saves the checkpoint with its test accuracy, which stage 1 records in the store manifest.
"""
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kdcache.config import check_teacher
from kdcache.data import load_dataset
from kdcache.errors import UserError
from kdcache.inference import accuracy
from kdcache.models import build_model, save_checkpoint, select_device
from kdcache.views import ViewSpace, apply_views


def train_teacher(cfg: dict, *, progress: bool = True) -> float:
    """Train cfg['teacher']['arch'] on the training split; save it to cfg['teacher']['checkpoint']."""
    tcfg, dcfg = writable_checkpoint(cfg["teacher"]), cfg["dataset"]
    torch.manual_seed(cfg["seed"])
    device = select_device(cfg["device"])
    data = load_dataset(dcfg["name"], "train", root=dcfg["root"], subset=dcfg["subset"], **dcfg["options"])
    test = load_dataset(dcfg["name"], "test", root=dcfg["root"], **dcfg["options"])
    if data.image_size is None:
        raise UserError("stage 0 trains on fixed-size data sets only; bring your own teacher checkpoint")
    space = ViewSpace.from_config(cfg["views"], data.image_size)
    model = build_model(tcfg["arch"], data.num_classes, data.channels, image_size=data.image_size[0]).to(device)
    steps = -(-len(data) // tcfg["batch_size"])
    opt = torch.optim.SGD(model.parameters(), lr=tcfg["lr"], momentum=0.9, weight_decay=tcfg["weight_decay"],
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tcfg["lr"], total_steps=tcfg["epochs"] * steps)
    images, labels = data.images(np.arange(len(data))), torch.from_numpy(data.labels)
    rng = np.random.default_rng(cfg["seed"])
    start = time.time()
    for epoch in range(tcfg["epochs"]):
        model.train()
        order = rng.permutation(len(data))
        bar = tqdm(range(steps), desc=f"stage 0 epoch {epoch + 1}/{tcfg['epochs']}", disable=not progress)
        for step in bar:
            ids = order[step * tcfg["batch_size"]:(step + 1) * tcfg["batch_size"]]
            params = space.random_params(ids, epoch_seed=cfg["seed"] * 100_003 + epoch, image_sizes=data.image_size)
            x = apply_views(images[torch.from_numpy(ids)], params, space, data.mean, data.std).to(device)
            loss = F.cross_entropy(model(x), labels[ids].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    acc = accuracy(model, test, ViewSpace.identity(test.image_size), device=device)
    save_checkpoint(tcfg["checkpoint"], model.cpu(), arch=tcfg["arch"], num_classes=data.num_classes,
                    in_channels=data.channels, image_size=data.image_size[0],
                    meta={"test_accuracy": acc, "dataset": data.describe(), "epochs": tcfg["epochs"],
                          "train_seconds": round(time.time() - start, 1)})
    return acc


def writable_checkpoint(t: dict) -> dict:
    """The `teacher` section (checked: kdcache.config.check_teacher, for a dict from Python too), its checkpoint's
    folder created now, so an unwritable path fails before training, not after."""
    path = Path(check_teacher(t)["checkpoint"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the teacher checkpoint {path}: {e.strerror} ({e.filename})") from None
    if path.is_dir():
        raise UserError(f"cannot write the teacher checkpoint {path}: it is a folder; give a file path")
    return t
