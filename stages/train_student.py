"""Stage 3: train a student against the cached teacher targets (or, with `online`, a live teacher).

One loop serves both modes; only where the teacher logits come from differs:
- offline: the store's logits (and stage-2 statistics) for the view each sample draws this epoch;
- online: the teacher runs on the very images the student sees.
The student's input is re-created from the view's parameters by `apply_views`, the function stage 1
fed the teacher with, so offline targets match the inputs exactly.

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

Targets are loaded into memory once when they fit (`train.memory_gb`); otherwise they are read from
Zarr a block of `chunks_per_block` chunks at a time (the next block in a background thread), and the
epoch order shuffles blocks of randomly chosen chunks instead of all samples. Stage-2 statistics are
(N, V) arrays, a small fraction of the logits: they are always loaded.

Run folder (`train.out`): metrics.jsonl (one line per epoch), checkpoint.pt (resume state, tensors
and plain types only), student.pt (the final student, a kdcache.models checkpoint), result.json.
"""
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import kdcache
from kdcache.config import first_difference
from kdcache.data import holdout, load_dataset
from kdcache.errors import UserError, is_int, is_number
from kdcache.files import disk_full, torch_bytes, write_atomic
from kdcache.inference import accuracy
from kdcache.losses import check_params, distill_loss
from kdcache.models import build_model, load_checkpoint, save_checkpoint, select_device
from kdcache.dataset import block_shuffled, cached_stats, epoch_views, mix, store_bytes, view_subset
from kdcache.sharing import enclosing_store, group_exists
from kdcache.store import CacheStore, decode_logits
from kdcache.views import ViewSpace, apply_views

RUN_FORMAT = "kdcache-train-run-1"
READ_ROWS = 4096  # rows per read of the in-memory and live sources (lets the next read overlap training)


def train_student(cfg: dict, *, progress: bool = True, on_step=None) -> dict:
    """Train cfg['train']['student'] with cfg['train']['method']; returns the result (also in result.json).

    on_step(info): called after every optimiser step with {epoch, step, ids, views, loss, ce, kd}
    (numpy ids and view indices, float losses): what the parity test compares.
    """
    started = time.perf_counter()
    t = check_train(cfg["train"])
    method, params = t["method"], check_params(t["method"], t["params"])
    device = select_device(cfg["device"])
    d = cfg["dataset"]
    data = load_dataset(d["name"], "train", root=d["root"], subset=d["subset"], **d["options"])
    if t["validation"] is None:
        test, eval_split = load_dataset(d["name"], "test", root=d["root"], **d["options"]), "test"
    else:
        full = load_dataset(d["name"], "train", root=d["root"], **d["options"])
        test = holdout(full, t["validation"], len(data))
        eval_split = f"validation: training images {len(full) - len(test)}..{len(full) - 1}"
    fresh = t["augment"] == "fresh"

    # Where targets come from: the store, a live teacher, or nowhere (CE needs no teacher).
    store, teacher = None, None
    if method != "ce" and not t["online"]:
        if fresh:
            raise UserError("train.augment 'fresh' draws views the cache holds no targets for: use it with "
                            "train.online: true (online KD) or method ce, or augment 'cached' to read the store")
        store = open_store(cfg["cache"]["store"], data, cfg["views"])
        space = ViewSpace.from_manifest(store.manifest["views"])
        stats = cached_stats(store, method, params, cfg["cache"]["stats"])
        in_memory = store_bytes(store) <= t["memory_gb"] * 2**30
        source = (MemoryTargets(store, stats) if in_memory else ZarrTargets(store, stats, t["chunks_per_block"]))
    else:
        space = ViewSpace.from_config(cfg["views"], data.image_size)
        source = LiveViews(space, data, fresh_seed=cfg["seed"] if fresh else None)
        if method != "ce":
            teacher, _ = load_checkpoint(cfg["teacher"]["checkpoint"], arch=cfg["teacher"]["arch"],
                                         num_classes=data.num_classes, in_channels=data.channels, device=device)
    fingerprint = store.fingerprint() if store is not None else None

    torch.manual_seed(cfg["seed"])
    student = build_model(t["student"], data.num_classes, data.channels, image_size=space.output_size[0]).to(device)
    opt = make_optimizer(student, t)
    out = make_run_folder(t["out"])  # now, not after the first epoch
    metrics, wall, first_epoch = resume(out, student, opt, cfg, fingerprint)

    N, V, seed, bs = len(data), space.num_views, cfg["seed"], t["batch_size"]
    K = t["views_used"] or V
    if K > V:
        raise UserError(f"train.views_used {K} is more than the {V} views per sample "
                        f"{'the store holds' if store is not None else 'of the config'}")
    subset = view_subset(N, V, K, space.seed) if K < V else None
    steps = math.ceil(N / bs)
    labels = torch.from_numpy(data.labels)
    eval_space = evaluation_space(space)
    w_ce, w_kd = params["w_ce"], params.get("w_kd", 0.0)
    tick = started
    for epoch in range(first_epoch, t["epochs"]):
        torch.manual_seed(mix(seed, epoch, 1) >> 1)  # stochastic layers (dropout), if the student has any
        student.train()
        if fresh:
            views = np.full(N, -1)  # no cached view: LiveViews draws a new one per sample and epoch
        else:
            views = epoch_views(N, K, seed, epoch)
            if subset is not None:
                views = subset[np.arange(N), views]
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, ce, kd, correct (summed over samples)
        epoch_start = time.perf_counter()
        batches = source.batches(source.blocks(N, seed, epoch), views, bs, epoch)
        bar = tqdm(batches, total=steps, leave=False, desc=f"stage 3 epoch {epoch + 1}/{t['epochs']}",
                   disable=None if progress else True)  # None: no bar when stderr is not a terminal (logs)
        for step, b in enumerate(bar):
            lr = learning_rate(t, epoch + step / steps)
            for group in opt.param_groups:
                group["lr"] = lr
            ids = torch.from_numpy(b["ids"])
            x = apply_views(batch_images(data, b["ids"], device), b["params"], space, data.mean, data.std)
            y = labels[ids].to(device)
            z_s = student(x)
            ce = F.cross_entropy(z_s, y)
            if method == "ce":
                kd = torch.zeros((), device=device)
            else:
                if teacher is not None:
                    with torch.no_grad():
                        z_t = teacher(x)
                else:
                    z_t = torch.from_numpy(b["logits"]).to(device)
                row_stats = {k: torch.from_numpy(b[k]).to(device) for k in source.stat_names}
                kd = distill_loss(method, z_s, z_t, y, params=params, stats=row_stats, epoch=epoch + 1)
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
        loss_sum, ce_sum, kd_sum, correct = (sums / N).tolist()
        if not math.isfinite(loss_sum):
            raise UserError(f"the training loss is not finite in epoch {epoch + 1} ({method}, lr {t['lr']}); "
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
        save_run(out, {"format": RUN_FORMAT, "epoch": epoch + 1, "config": json.dumps(run_config(cfg)),
                       "store_fingerprint": fingerprint, "model": student.state_dict(),
                       "optimizer": opt.state_dict(), "metrics": metrics, "wall_seconds": wall})
        if progress:
            print(f"epoch {epoch + 1}/{t['epochs']}: loss {loss_sum:.4f}, train acc {correct:.4f}, "
                  f"test acc {test_acc:.4f} ({train_seconds:.1f} s)", flush=True)

    best = max(metrics, key=lambda m: m["test_accuracy"])
    result = {
        "method": method, "params": params, "mode": "online" if teacher is not None else
        ("offline" if store is not None else "no teacher (ce)"),
        "augment": t["augment"], "views_used": K if not fresh else None, "evaluated_on": eval_split,
        "targets": source.kind, "store": store.path if store else None, "store_fingerprint": fingerprint,
        "stats_overlay": cfg["cache"]["stats"] if store else None,
        "teacher": store.manifest["teacher"] if store else (cfg["teacher"] if teacher is not None else None),
        "student": t["student"], "epochs": t["epochs"], "seed": seed,
        "last_accuracy": metrics[-1]["test_accuracy"], "best_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"], "wall_seconds": wall,
        "train_seconds": sum(m["epoch_seconds"] for m in metrics),
        "device": str(device), "torch_threads": torch.get_num_threads(),
        "software": {"kdcache": kdcache.__version__, "torch": torch.__version__},
        "config": cfg,
    }
    with disk_full(out, f"the run folder keeps its checkpoint of epoch {metrics[-1]['epoch']}; no result.json"):
        save_checkpoint(out / "student.pt", student.cpu(), arch=t["student"], num_classes=data.num_classes,
                        in_channels=data.channels, image_size=space.output_size[0],
                        meta={"test_accuracy": result["last_accuracy"], "method": method, "params": params,
                              "store_fingerprint": fingerprint, "dataset": data.describe()})
    with disk_full(out, f"the run folder keeps its checkpoint of epoch {metrics[-1]['epoch']}; no result.json, "
                        "so the run is not marked finished"):
        write_metrics(out, metrics)  # again: a run killed between checkpoint and metrics file resumes here
        write_atomic(out / "result.json", json.dumps(result, indent=1))
    return result


# ---- configuration ------------------------------------------------------------------------------

def check_train(t: dict) -> dict:
    """Validate the `train` config section (pipeline/config.py lists its keys); UserError on mistakes."""
    def need(key, ok, must_be):
        if not ok(t[key]):
            raise UserError(f"train.{key} must be {must_be}, got {t[key]!r}")

    def integer(low):
        return lambda v: is_int(v, low)

    def number(low, high=math.inf, open_low=False):
        return lambda v: is_number(v) and (v > low if open_low else v >= low) and v <= high

    need("student", lambda v: isinstance(v, str) and v, "a model name (pipeline/models.py)")
    need("method", lambda v: isinstance(v, str), "a method name")
    need("params", lambda v: isinstance(v, dict), "a mapping of the method's parameters")
    need("online", lambda v: isinstance(v, bool), "true or false")
    need("augment", lambda v: v in ("cached", "fresh"), "'cached' (the cached views) or 'fresh' (a new view every step)")
    need("views_used", lambda v: v is None or is_int(v, 1), "null (all cached views) or an integer >= 1")
    need("validation", lambda v: v is None or is_int(v, 1),
         "null (evaluate on the test split) or an integer >= 1 (the last M training images)")
    need("epochs", integer(1), "an integer >= 1")
    need("batch_size", integer(1), "an integer >= 1")
    need("optimizer", lambda v: v in ("sgd", "adamw"), "'sgd' or 'adamw'")
    need("lr", number(0, open_low=True), "a number > 0")
    need("momentum", number(0, 1), "a number in [0, 1]")
    need("nesterov", lambda v: isinstance(v, bool), "true or false")
    need("weight_decay", number(0), "a number >= 0")
    need("schedule", lambda v: v in ("cosine", "step", "constant"), "'cosine', 'step' or 'constant'")
    need("milestones", lambda v: isinstance(v, list) and all(integer(1)(m) for m in v) and v == sorted(v),
         "an ascending list of epochs (integers >= 1)")
    need("lr_decay", number(0, 1, open_low=True), "a number in (0, 1]")
    need("memory_gb", number(0), "a number >= 0 (GiB; 0 always reads from Zarr)")
    need("chunks_per_block", integer(1), "an integer >= 1")
    need("eval_batch_size", integer(1), "an integer >= 1")
    need("out", lambda v: isinstance(v, str) and v, "a folder path")
    if t["augment"] == "fresh" and t["views_used"] is not None:
        raise UserError("train.views_used picks cached views; with train.augment 'fresh' every view is new: drop one")
    if t["schedule"] == "step" and not t["milestones"]:
        raise UserError("train.schedule 'step' needs train.milestones (epochs after which the lr decays)")
    check_params(t["method"], t["params"])
    return t


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


# ---- the store and its statistics ---------------------------------------------------------------

def open_store(path, data, views: dict) -> CacheStore:
    """The complete store at `path`, checked to hold targets for `data` (same fingerprint, classes) on the
    config's `views` (which online KD and CE-only runs draw from: all modes of one config see the same views)."""
    if not group_exists(path):
        raise UserError(f"no cache store at {path}: build it with `kdcache cache-teacher --config ...` "
                        "(make cache-teacher), or point --cache at an existing store")
    store = CacheStore.open(path)
    if store.status != "complete":
        raise UserError(f"store {path} is incomplete ({int(store.done().sum())}/{store.num_shards} shards): "
                        "finish it with `kdcache cache-teacher` first")
    m = store.manifest["dataset"]
    if m["fingerprint"] != data.fingerprint():
        raise UserError(f"store {path} was built on another data set ({m['name']} {m['split']}, N={m['num_samples']}, "
                        f"fingerprint {m['fingerprint'][:12]}) than the config's ({data.name} {data.split}, "
                        f"N={len(data)}, fingerprint {data.fingerprint()[:12]}): fix `dataset` or use that data "
                        "set's store")
    K = store.num_classes
    if K != data.num_classes:
        raise UserError(f"store {path} holds {K}-class teacher logits but the student is built for the data set's "
                        f"{data.num_classes} classes: distil from a teacher of the same label set")
    pre = store.manifest["preprocessing"]
    if list(pre["mean"]) != list(data.mean) or list(pre["std"]) != list(data.std):
        raise UserError(f"store {path} normalised inputs with mean {pre['mean']}, std {pre['std']} but this "
                        f"version uses {list(data.mean)}, {list(data.std)}: rebuild the store")
    cached = ViewSpace.from_manifest(store.manifest["views"])
    wanted = ViewSpace.from_config(views, data.image_size)
    if cached != wanted:
        raise UserError(f"store {path} caches other views ({cached.kind}, {cached.num_views} per sample, seed "
                        f"{cached.seed}) than the config's `views` ({wanted.kind}, {wanted.num_views}, seed "
                        f"{wanted.seed}): make the config's views section describe the store")
    return store


# ---- per-epoch views and order ------------------------------------------------------------------

def shuffled(n: int, seed: int, epoch: int) -> list[np.ndarray]:
    """A random permutation of 0..n-1, cut into reads of READ_ROWS rows."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + READ_ROWS] for i in range(0, n, READ_ROWS)]


# ---- target sources: the same batches from memory, Zarr blocks, or live views -------------------

class Source:
    """Yields batches {ids, views, params, [logits], [stats...]} over reads of rows (numpy arrays).

    Subclasses define `blocks` (the epoch order as a list of reads) and `read(rows, views, epoch)`. The
    next read runs in a background thread while the current one's batches train.
    """
    kind, stat_names = "", ()

    def batches(self, blocks, views: np.ndarray, batch_size: int, epoch: int = 0):
        carry = None
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._read, blocks[0], views, epoch) if blocks else None
            for i in range(len(blocks)):
                part = pending.result()
                pending = pool.submit(self._read, blocks[i + 1], views, epoch) if i + 1 < len(blocks) else None
                if carry is not None:
                    part = {k: np.concatenate([carry[k], v]) for k, v in part.items()}
                size = len(part["ids"])
                full = size - size % batch_size
                for s in range(0, full, batch_size):
                    yield {k: v[s:s + batch_size] for k, v in part.items()}
                carry = {k: v[full:] for k, v in part.items()} if full < size else None
        if carry is not None:
            yield carry

    def _read(self, rows, views, epoch):
        return {"ids": rows, "views": views[rows], **self.read(rows, views[rows], epoch)}


class MemoryTargets(Source):
    """Logits (or a top-k store's arrays, rebuilt per read) and view params loaded from the store once, and checked
    as they are loaded: finite, in range, and every chunk of rows the one stage 1 wrote there (its digest)."""
    kind = "memory"

    def __init__(self, store: CacheStore, stats: dict):
        rows, digests = slice(0, store.views.shape[0]), store.recorded_digests()
        self.parts = {n: store.read_rows(n, rows, digests) for n in store.logit_arrays}
        self.params = store.read_rows("views", rows, digests)
        self.num_classes = store.num_classes
        self.stats = {k: a[...] for k, a in stats.items()}
        self.stat_names = tuple(stats)

    def blocks(self, n, seed, epoch):
        return shuffled(n, seed, epoch)

    def read(self, rows, views, epoch=0):
        logits = decode_logits({n: a[rows, views] for n, a in self.parts.items()}, self.num_classes)
        return {"params": self.params[rows, views], "logits": logits,
                **{k: a[rows, views] for k, a in self.stats.items()}}


class ZarrTargets(Source):
    """Logits and view params read from Zarr a block of whole chunks at a time (never row by row), and checked as
    read like MemoryTargets' (finite, in range, each chunk the one stage 1 wrote there): zarr decodes whole chunks
    anyway, so holding them costs memory for one block, not extra reading."""
    kind = "zarr"

    def __init__(self, store: CacheStore, stats: dict, chunks_per_block: int):
        self.store, self.chunks_per_block = store, chunks_per_block
        self.digests = store.recorded_digests()
        self.stats = {k: a[...] for k, a in stats.items()}
        self.stat_names = tuple(stats)

    def blocks(self, n, seed, epoch):
        return block_shuffled(n, seed, epoch, self.store.labels.chunks[0], self.chunks_per_block)

    def read(self, rows, views, epoch=0):
        c, n = self.store.samples_per_chunk, self.store.views.shape[0]
        chunks = np.unique(rows // c)
        spans = [slice(int(k) * c, min((int(k) + 1) * c, n)) for k in chunks]
        at = np.searchsorted(chunks, rows // c) * c + rows % c  # each row's place in the chunks read

        def select(name):
            whole = np.concatenate([self.store.read_rows(name, span, self.digests) for span in spans])
            return whole[at, views]

        parts = {name: select(name) for name in self.store.logit_arrays}
        return {"params": select("views"), "logits": decode_logits(parts, self.store.num_classes),
                **{k: a[rows, views] for k, a in self.stats.items()}}


class LiveViews(Source):
    """No cache: view params of the config's view space (online KD, CE-only); the teacher runs live.

    Cached augmentation: the V views the store would hold. For fixed-size images the (N, V, P) params
    are drawn once, as stage 1 did: drawing them is a per-sample RNG and should cost no more here than
    reading them from a store does. Fresh augmentation (fresh_seed set): a new view per sample and
    epoch from the whole space, `ViewSpace.random_params` keyed by (training seed, epoch).
    """
    kind = "live"

    def __init__(self, space: ViewSpace, data, fresh_seed: int | None = None):
        self.space, self.data, self.fresh_seed = space, data, fresh_seed
        fixed = data.image_size is not None and fresh_seed is None
        self.params = space.sample_params(np.arange(len(data)), data.image_size) if fixed else None
        self.kind = "live" if fresh_seed is None else "live, fresh views"

    def blocks(self, n, seed, epoch):
        return shuffled(n, seed, epoch)

    def read(self, rows, views, epoch=0):
        if self.fresh_seed is not None:
            sizes = self.data.image_size or self.data.image_sizes(rows)
            return {"params": self.space.random_params(rows, mix(self.fresh_seed, epoch, 3) >> 1, sizes)}
        if self.params is not None:
            return {"params": self.params[rows, views]}
        params = self.space.sample_params(rows, self.data.image_sizes(rows))
        return {"params": params[np.arange(len(rows)), views]}


def batch_images(data, ids: np.ndarray, device):
    """uint8 images of `ids` on `device` (a list for variable-size image folders)."""
    if data.image_size is not None:
        return data.images(ids).to(device)
    return [data.image(int(i)).to(device) for i in ids]


def evaluation_space(space: ViewSpace) -> ViewSpace:
    """No augmentation for the test split: the identity (fixed-size data) or the centre crop (box kinds)."""
    if space.kind == "crop_flip":
        return ViewSpace.identity(space.image_size)
    return ViewSpace.from_config({"kind": "center_crop", "size": space.output_size[0]})


# ---- run folder: checkpoint, resume, files ------------------------------------------------------

def run_config(cfg: dict) -> dict:
    """The config that defines a run's result (the device may change between a run and its resume)."""
    return {k: v for k, v in cfg.items() if k != "device"}


def resume(out: Path, student, opt, cfg: dict, fingerprint):
    """Load the run folder's checkpoint into student and optimiser; returns (metrics, wall seconds, epochs done)."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return [], 0.0, 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file means the same thing to the user
        raise UserError(f"cannot read the run checkpoint {path} ({type(e).__name__}); "
                        "delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise UserError(f"{path} is not a kdcache training checkpoint; use another train.out")
    diff = first_difference(json.loads(state["config"]), json.loads(json.dumps(run_config(cfg))))
    if diff:
        raise UserError(f"run folder {out} holds a run with another config ({diff}); "
                        "use another train.out (--out) or delete the folder")
    if state["store_fingerprint"] != fingerprint:
        raise UserError(f"run folder {out} was trained from a store with another fingerprint; the store changed "
                        "since: use another train.out (--out) or delete the folder")
    student.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return list(state["metrics"]), float(state["wall_seconds"]), int(state["epoch"])


def make_run_folder(location) -> Path:
    """The run folder, created: a local folder that is neither a Zarr store nor inside one (a run written
    there would add strays that `kdcache info` lists and `verify` misses)."""
    if "://" in str(location) or "::" in str(location):
        raise UserError(f"train.out must be a local folder path, got the URL {location}")
    out = Path(location)
    store = enclosing_store(out, itself=True)
    if store is not None:
        raise UserError(f"the run folder {out} would be inside the Zarr store {store}: choose a train.out (--out) "
                        "outside any store")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the run folder {out}: {e.strerror} ({e.filename})") from None
    return out


def save_run(out: Path, state: dict) -> None:
    """The epoch checkpoint (atomic) and the metrics file it implies (rewritten whole, so they always agree).
    A full disk keeps the previous epoch's checkpoint (or this one's when only the metrics failed)."""
    kept = state["epoch"] - 1
    with disk_full(out, lambda: f"the run folder keeps its checkpoint of epoch {kept}" if kept else
                   "no epoch was saved"):
        write_atomic(out / "checkpoint.pt", torch_bytes(state))
        kept += 1
        write_metrics(out, state["metrics"])


def write_metrics(out: Path, metrics: list) -> None:
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
