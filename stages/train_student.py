"""Stage 3: train a student against the cached teacher targets (or, with `online`, a live teacher).

One loop serves every mode; where the targets come from (the store, a live teacher, none for CE) is
kdcache.targets, the run folder (checkpoint, resume, metrics, result) kdcache.rundir.

Augmentation (`train.augment`):
- cached: each epoch every sample draws one of its V cached views: a random permutation of the V
  views per sample and cycle of V epochs, so no view repeats before all were seen. Online and
  CE-only runs draw from the config's view space the same V views per sample that the store holds
  (a pure function of the views seed and sample id): online KD on cached views is the parity
  reference of offline KD. `train.views_used: K` restricts a run to a fixed subset of K of the V
  views per sample (the same for every training seed, nested: K=2 holds K=1's view), so one
  exhaustive store answers how many cached views a schedule needs.
- fresh: a new view drawn from the whole view space at every step, as ordinary training does
  (CE-only and online KD only: a cache has no targets for views it never saw).
Views, batch order and stochastic layers are pure functions of (seed, epoch, sample): a killed run
resumes from its last epoch checkpoint and ends exactly where an uninterrupted run ends, without
saving RNG states.

`train.validation: M` evaluates on the last M training images instead of the test split, for
choosing settings without looking at test accuracy (the training subset must stop before them).

`train.workers: N` decodes images and replays views in N DataLoader processes, a few batches ahead of the
loop (kdcache.targets); the steps are the same as with 0.

Several processes (`torchrun --nproc-per-node N kdcache train ...`): DistributedDataParallel, gloo on CPUs,
nccl on GPUs. Every rank walks the same epoch order and takes rows rank, rank + N, ... of each read, in
batches of batch_size / N, so the ranks' batches together are one process's batches and the averaged
gradients its gradients (tests/test_ddp.py: the same student as one process). Rank 0 writes the run folder.
"""
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import kdcache
from kdcache.config import check_train
from kdcache.data import holdout, load_dataset
from kdcache.dataset import epoch_views, mix, view_subset
from kdcache.errors import UserError
from kdcache.files import disk_full
from kdcache.inference import accuracy
from kdcache.methods import build
from kdcache.models import build_model, save_checkpoint, select_device
from kdcache.rundir import make_run_folder, resume, save_result, save_run
from kdcache.targets import targets
from kdcache.views import ViewSpace


def train_student(cfg: dict, *, progress: bool = True, on_step=None) -> dict:
    """Train cfg['train']['student'] with cfg['train']['method']; returns the result (also in result.json).

    on_step(info): called after every optimiser step with {epoch, step, ids, views, loss, ce, kd}
    (numpy ids and view indices, float losses): what the parity test compares.
    """
    started = time.perf_counter()
    t = check_train(cfg["train"])  # load_config checked it; again for a dict handed over from Python
    method = build(t["method"], t["params"])  # parameters checked and defaults filled in
    params = method.params
    device, rank, world, own_group = processes(select_device(cfg["device"]), t["batch_size"])
    d = cfg["dataset"]
    data = load_dataset(d["name"], "train", root=d["root"], subset=d["subset"], **d["options"])
    if t["validation"] is None:
        test, eval_split = load_dataset(d["name"], "test", root=d["root"], **d["options"]), "test"
    else:
        full = load_dataset(d["name"], "train", root=d["root"], **d["options"])
        test = holdout(full, t["validation"], len(data))
        eval_split = f"validation: training images {len(full) - len(test)}..{len(full) - 1}"
    fresh = t["augment"] == "fresh"
    source = targets(cfg, data, method, device)
    space, fingerprint = source.space, source.fingerprint

    torch.manual_seed(cfg["seed"])
    student = build_model(t["student"], data.num_classes, data.channels, image_size=space.output_size[0]).to(device)
    opt = make_optimizer(student, t)
    model = DDP(student) if world > 1 else student  # averages the ranks' gradients: those of the whole batch
    out = make_run_folder(t["out"])  # now, not after the first epoch
    metrics, wall, first_epoch = resume(out, student, opt, cfg, fingerprint)

    N, V, seed, bs = len(data), space.num_views, cfg["seed"], t["batch_size"]
    K = t["views_used"] or V
    if K > V:
        raise UserError(f"train.views_used {K} is more than the {V} views per sample {source.views_of}")
    view_group = source.view_group  # 1, or a view-major store's chunk: an epoch then reads one view of each chunk
    subset = view_subset(N, V, K, space.seed, view_group) if K < V else None
    steps = math.ceil(N / bs)
    eval_space = evaluation_space(space)
    w_ce, w_kd = params["w_ce"], params.get("w_kd", 0.0)
    tick = started
    for epoch in range(first_epoch, t["epochs"]):
        torch.manual_seed(mix(seed, epoch, 1) >> 1)  # stochastic layers (dropout), if the student has any
        student.train()
        if fresh:
            views = np.full(N, -1)  # no cached view: LiveViews draws a new one per sample and epoch
        else:
            views = epoch_views(N, K, seed, epoch, view_group)
            if subset is not None:
                views = subset[np.arange(N), views]
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, ce, kd, correct (summed over samples)
        epoch_start = time.perf_counter()
        batches = source.batches(data, views, bs, seed, epoch, device, rank, world, workers=t["workers"])
        bar = tqdm(batches, total=steps, leave=False, desc=f"stage 3 epoch {epoch + 1}/{t['epochs']}",
                   disable=None if progress else True)  # None: no bar when stderr is not a terminal (logs)
        for step, b in enumerate(bar):
            lr = learning_rate(t, epoch + step / steps)
            for group in opt.param_groups:
                group["lr"] = lr
            y = b["y"]
            z_s = model(b["x"])
            ce = F.cross_entropy(z_s, y)
            kd = method.loss(z_s, b["z_t"], y, b["stats"], epoch + 1)  # CE: zero
            loss = w_ce * ce + w_kd * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                n = len(y)
                sums += torch.stack([loss.detach() * n, ce.detach() * n, kd.detach() * n,
                                     (z_s.argmax(1) == y).sum().to(loss.dtype)]).double()
            if on_step is not None:
                on_step({"epoch": epoch, "step": step, "ids": b["ids"], "views": b["views"],
                         "loss": loss.item(), "ce": ce.item(), "kd": kd.item()})
        train_seconds = time.perf_counter() - epoch_start
        if world > 1:
            dist.all_reduce(sums)  # every rank's samples
        loss_sum, ce_sum, kd_sum, correct = (sums / N).tolist()
        if not math.isfinite(loss_sum):
            raise UserError(f"the training loss is not finite in epoch {epoch + 1} ({method.name}, lr {t['lr']}); "
                            "lower train.lr or check the method's parameters")
        student.eval()
        eval_start = time.perf_counter()
        test_acc = accuracy(student, test, eval_space, batch_size=t["eval_batch_size"], device=device)
        now = time.perf_counter()
        wall += now - tick
        tick = now
        metrics.append({"epoch": epoch + 1, "lr": learning_rate(t, epoch), "train_loss": loss_sum,
                        "train_ce": ce_sum, "train_kd": kd_sum, "train_accuracy": correct,
                        "test_accuracy": test_acc, "epoch_seconds": train_seconds,
                        "eval_seconds": now - eval_start, "samples_per_second": N / train_seconds})
        if rank == 0:
            save_run(out, epoch=epoch + 1, cfg=cfg, fingerprint=fingerprint, student=student, opt=opt,
                     metrics=metrics, wall=wall)
        if progress and rank == 0:
            print(f"epoch {epoch + 1}/{t['epochs']}: loss {loss_sum:.4f}, train acc {correct:.4f}, "
                  f"test acc {test_acc:.4f} ({train_seconds:.1f} s)", flush=True)
    if own_group:
        dist.destroy_process_group()  # the one processes() started; the last collective was the epoch's all_reduce

    best = max(metrics, key=lambda m: m["test_accuracy"])
    result = {
        "method": method.name, "params": params, "augment": t["augment"], "views_used": K if not fresh else None,
        "evaluated_on": eval_split, **source.record(),
        "student": t["student"], "epochs": t["epochs"], "seed": seed,
        "last_accuracy": metrics[-1]["test_accuracy"], "best_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"], "wall_seconds": wall,
        "train_seconds": sum(m["epoch_seconds"] for m in metrics),
        "device": str(device), "processes": world, "torch_threads": torch.get_num_threads(),
        "software": {"kdcache": kdcache.__version__, "torch": torch.__version__},
        "config": cfg,
    }
    if rank != 0:  # rank 0 writes the run folder
        return result
    with disk_full(out, f"the run folder keeps its checkpoint of epoch {metrics[-1]['epoch']}; no result.json"):
        save_checkpoint(out / "student.pt", student.cpu(), arch=t["student"], num_classes=data.num_classes,
                        in_channels=data.channels, image_size=space.output_size[0],
                        meta={"test_accuracy": result["last_accuracy"], "method": method.name, "params": params,
                              "store_fingerprint": fingerprint, "dataset": data.describe()})
    save_result(out, metrics, result)
    return result


def processes(device: torch.device, batch_size: int) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world size, whether the process group was started here). Under torchrun (WORLD_SIZE > 1)
    the process group starts here unless the caller started one, gloo on CPUs, nccl on GPUs with GPU LOCAL_RANK;
    each rank then trains on its share of every batch (one process: 0, 1). train_student destroys a group it
    started when the training ends."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise UserError(f"WORLD_SIZE={world!r} (from torchrun) must be an integer >= 1")
    world = int(world)
    if world == 1:
        return device, 0, 1, False
    if batch_size % world:
        raise UserError(f"train.batch_size {batch_size} must be a multiple of the {world} processes: each takes an "
                        "equal share of every batch")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size(), own_group


# ---- configuration ------------------------------------------------------------------------------

def make_optimizer(model, t: dict) -> torch.optim.Optimizer:
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t["lr"], momentum=t["momentum"],
                               nesterov=t["nesterov"], weight_decay=t["weight_decay"])
    return torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])


def learning_rate(t: dict, progress: float) -> float:
    """The lr after `progress` epochs (a float: cosine decays per step; step decays at whole epochs)."""
    if t["schedule"] == "cosine":
        return 0.5 * t["lr"] * (1 + math.cos(math.pi * progress / t["epochs"]))
    if t["schedule"] == "step":
        return t["lr"] * t["lr_decay"] ** sum(int(progress) >= m for m in t["milestones"])
    return t["lr"]



def evaluation_space(space: ViewSpace) -> ViewSpace:
    """No augmentation for the test split: the identity (fixed-size data) or the centre crop (box kinds)."""
    if space.kind == "crop_flip":
        return ViewSpace.identity(space.image_size)
    return ViewSpace.from_config({"kind": "center_crop", "size": space.output_size[0]})
