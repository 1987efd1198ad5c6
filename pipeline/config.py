"""YAML configuration: one nested dict of defaults, merged with the user's file, `--set KEY=VALUE` items and
command-line options, then checked once, here (`check_config`).

Every key a stage reads is listed in DEFAULTS, so a misspelt key is an error, not a silent default. Every
section's values are checked when a config is loaded (`load_config`, and `kdcache grid` per run), whichever
command loads it: a bad value in any section fails before anything starts (a teacher, a dask cluster), with
the one-line message naming the key. Left to the stage that opens the data: what needs it (whether
dataset.root holds the data set and dataset.subset fits it, the class count bounding cache.topk, the image
size of crop_flip views).
The checks stay plain functions on plain dicts (no schema library): each one is also what a stage calls on a
dict handed to it from Python (`check_train`, `check_cache`), and the kinds' own checkers (views, encodings,
methods, stats settings) are the library's, shared with the stores they describe.
"""
import copy
import math
import os
from pathlib import Path

import yaml

from kdcache.data import check_dataset
from kdcache.encodings import logits_entry
from kdcache.errors import UserError, colon_hint, is_int, is_number
from kdcache.methods import build
from kdcache.stats import check_settings
from kdcache.store import LAYOUTS
from kdcache.views import ViewSpace

DEFAULTS = {
    "device": "auto",                 # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    "seed": 0,
    "dataset": {
        "name": "fashion-mnist",      # fashion-mnist | cifar100 | imagefolder | synthetic
        "root": None,                 # folder of the data set; None = the data set's default location
        "subset": None,               # keep the first N training samples (ids 0..N-1)
        "options": {},                # extra options of the data set (synthetic: num_samples, num_classes, ...)
    },
    "teacher": {
        "arch": "fmnist_resnet",
        "checkpoint": "checkpoints/fashion-mnist/fmnist_resnet.pt",
        # stage 0 (bootstrap a teacher when the user has none)
        "epochs": 8,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 5e-4,
    },
    "views": {                        # checked by kdcache.views.ViewSpace.from_config (see there per kind)
        "kind": "crop_flip",          # crop_flip | resized_crop_flip | center_crop
        "padding": 2,                 # crop_flip: zero padding before the crop
        "flip": True,                 # horizontal flip views
        "views": 8,                   # "all" (every view of a finite space) or K views per sample
        "seed": 0,                    # seed of the K sampled views (recorded in the store)
    },
    "cache": {
        "store": "stores/fashion-mnist/fmnist_resnet.zarr",
        "encoding": "dense",          # dense | {topk: k} | {quantized: 8|16} | {sampled: draws, temperature: T
                                      # (default 1), seed: s (default 0)}: how the store holds the logits
                                      # (docs/FORMAT.md, "Logit encodings"); sampled: kd at T, ttm/wttm at 1/T
        "dtype": "float16",           # float16 | float32 | bfloat16: dense logits (and top-k values: float16|float32)
        "samples_per_chunk": 256,     # chunk = (samples_per_chunk, V, K), or (samples_per_chunk, 1, K) view-major
        "layout": "sample-major",     # sample-major | view-major: a chunk holds one view of its samples, so an epoch
                                      # reads 1/V of the store (large stores read from Zarr); stage 3 then chooses
                                      # the epoch's view per chunk of samples (docs/FORMAT.md, "Layout")
        "chunks_per_shard": 16,       # shard = the unit of work, resume and ownership between processes
        "batch_size": 512,            # teacher batch, in (sample, view) images
        "amp": False,                 # CUDA only: run the teacher under float16 autocast
        "workers": 0,                 # DataLoader processes decoding images and replaying views (0: in process)
        "stats": None,                # statistics overlay (kdcache stats STORE --out OVERLAY); None: the store itself
        "topk": None,                 # k: shorthand for encoding {topk: k}: the k largest logits per row + the
                                      # log of the rest's softmax mass (large K; docs/BENCHMARKS.md "Top-k storage")
    },
    "stats": {                        # stage 2 (kdcache stats); names and formulas: pipeline/stats.py
        "statistics": "all",          # "all" or a list of names, e.g. [mlt_temperature, wttm_power_sum]
        "t_base": 2.0,                # LS effective temperature T_base * std (LS paper default 2)
        "gammas": [0.1, 0.3],         # WTTM power sums U_gamma (reported gammas: 0.1, 0.3)
        "std": "unbiased",            # unbiased (K-1, the LS authors' code) | population (K, the LS paper)
        "ece_bins": 15,               # calibration error bins
        "scheduler": None,            # address of a running dask.distributed scheduler
        "workers": None,              # N: start a local cluster of N processes; None: local threads
    },
    "train": {                        # stage 3 (kdcache train); checked by check_train below
        "student": "fmnist_cnn",      # zoo name (pipeline/models.py), tv:NAME, timm:NAME or python:module:callable
        "method": "kd",               # ce | kd | ttm | wttm | dkd | mlt (formulas: pipeline/losses.py)
        "params": {},                 # the method's hyper-parameters (pipeline/methods/); missing = defaults
        "online": False,              # true: run the teacher live instead of reading the cache
        "augment": "cached",          # cached: one of the V cached views per sample and epoch | fresh: a new
                                      # view from the whole view space every step (CE-only, online KD)
        "views_used": None,           # K: use a fixed subset of K of the V cached views per sample; None: all
        "validation": None,           # M: evaluate on the last M training images instead of the test split
        "epochs": 10,
        "batch_size": 128,
        "optimizer": "sgd",           # sgd (momentum, weight decay) | adamw
        "lr": 0.05,
        "momentum": 0.9,              # sgd only
        "nesterov": False,            # sgd only
        "weight_decay": 5e-4,
        "schedule": "cosine",         # cosine (per step, down to 0) | step (x lr_decay at each milestone) | constant
        "milestones": [],             # step: epochs after which the lr is multiplied by lr_decay
        "lr_decay": 0.1,
        "memory_gb": 4.0,             # load the cached logits when they take at most this, else read Zarr blocks
        "chunks_per_block": 16,       # Zarr reading: store chunks read (and shuffled) together
        "workers": 0,                 # DataLoader processes decoding images and replaying views (0: in process)
        "eval_batch_size": 1024,
        "out": "runs/fashion-mnist/kd",  # run folder: metrics.jsonl, checkpoint.pt, student.pt, result.json
    },
}


# Sections whose keys depend on a `kind`: a different kind replaces the section, its own checker validates it.
BY_KIND = ("views",)
# Free-form mappings whose keys their user checks (the data set, the method): merged key by key, new keys allowed.
FREE_FORM = ("dataset.options", "train.params")


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Recursively merge `update` into a copy of `base`; keys that `base` lacks are errors."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        name = f"{where}{key}"
        if name in BY_KIND and isinstance(value, dict):
            same_kind = value.get("kind", base[key]["kind"]) == base[key]["kind"]
            out[key] = {**base[key], **value} if same_kind else dict(value)
            continue
        if name in FREE_FORM and isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = {**base[key], **value}
            continue
        if key not in base:
            raise UserError(f"unknown config key '{name}' (known here: {', '.join(sorted(base))}){colon_hint([key])}")
        if isinstance(base[key], dict) and not isinstance(value, dict):
            raise UserError(f"config key '{name}' must be a mapping, got {value!r}")
        if isinstance(base[key], dict) and base[key]:
            out[key] = merge(base[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def load_config(path=None, overrides: dict | None = None, sets=()) -> dict:
    """Defaults <- YAML file <- `sets` ("KEY=VALUE" strings, `--set`, in order) <- overrides (the command's own
    options: a nested dict whose None values are ignored). Every layer is checked alike: unknown keys are errors."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        data = read_yaml(path, "config")
        data = {} if data is None else data  # an empty file: the defaults
        if not isinstance(data, dict):
            raise UserError(f"config {path} must be a YAML mapping at the top level")
        cfg = merge(cfg, data)
    for item in sets:  # one at a time: a later --set of the same key wins
        one = parse_set(item)
        try:
            cfg = merge(cfg, one)
        except UserError as e:
            raise UserError(f"--set {item.partition('=')[0]}: {e}") from None
    cfg = merge(cfg, _drop_none(overrides or {}))
    return check_config(cfg)


MAX_SEED = 2**32 - 1
PROCESSES_PER_CORE = 8
MAX_PROCESSES = PROCESSES_PER_CORE * (os.cpu_count() or 1)  # local processes a setting may start (workers)
ANY_IMAGE_SIZE = (2**16, 2**16)  # stands in for the data set's (H, W) at load: no view check but crop_flip's reads it


def check_config(cfg: dict) -> dict:
    """`cfg` (a merged config) when every section's values are valid, else UserError (one line, naming the key).

    Called by load_config and by `kdcache grid` for each run's config, so every command fails at load.
    """
    seed = cfg["seed"]
    if not is_int(seed, 0):
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")
    if seed > MAX_SEED:  # torch.manual_seed takes 64 bits; the run's own seed mixing wants 32
        raise UserError(f"seed must be at most {MAX_SEED}, got {seed}")
    device = cfg["device"]  # its form; whether this machine has it is kdcache.models.select_device's question
    name = device.strip().lower() if isinstance(device, str) else ""
    if not (name in ("auto", "cpu", "cuda") or name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    for section, key in (("cache", "store"), ("cache", "stats"), ("teacher", "checkpoint")):
        value = cfg[section].get(key)  # a number or list here would become a folder named after it
        if not (isinstance(value, (str, os.PathLike)) and str(value) or value is None and key == "stats"):
            raise UserError(f"{section}.{key} must be a path or URL, got {value!r}")
    d = cfg["dataset"]
    check_dataset(d["name"], root=d["root"], subset=d["subset"], **d["options"])
    check_teacher(cfg["teacher"])
    ViewSpace.from_config(cfg["views"], ANY_IMAGE_SIZE)
    cache = check_cache(cfg["cache"])
    encoding = cache["encoding"]
    k = cache["topk"] if cache["topk"] is not None else encoding.get("topk") if isinstance(encoding, dict) else None
    if k is not None and not is_int(k, 1):  # its upper bound, the class count, is the data set's: checked by stage 1
        raise UserError(f"cache.topk must be an integer >= 1 (and below the class count) or null for the full "
                        f"logits, got {k!r}")
    logits_entry(cache, k + 1 if k is not None else 2)
    check_settings(cfg["stats"])
    check_processes(cfg["stats"]["workers"], "--workers")  # stats.workers, or `kdcache stats --workers`
    build(check_train(cfg["train"])["method"], cfg["train"]["params"])  # each method checks its own parameters
    return cfg


def check_processes(n, what: str) -> None:
    """`n` local worker processes (a dask LocalCluster's; None: none asked for): UserError unless 1..MAX_PROCESSES, so
    an absurd count fails in one line instead of forking until the machine runs out of memory."""
    if n is not None and not is_int(n, 1):
        raise UserError(f"{what} must be >= 1, got {n!r} (an integer: local worker processes)")
    if n is not None and n > MAX_PROCESSES:
        raise UserError(f"{what} must be at most {MAX_PROCESSES} ({PROCESSES_PER_CORE} local worker processes per core "
                        f"of this machine), got {n!r}")


def check_teacher(t: dict) -> dict:
    """The `teacher` section's stage-0 settings (stage 0 also makes the checkpoint's folder, when it runs)."""
    for key, ok, must_be in (("epochs", lambda v: is_int(v, 1), "an integer >= 1"),
                             ("batch_size", lambda v: is_int(v, 1), "an integer >= 1"),
                             ("lr", lambda v: is_number(v) and v > 0, "a number > 0"),
                             ("weight_decay", lambda v: is_number(v) and v >= 0, "a number >= 0"),
                             ("checkpoint", lambda v: isinstance(v, str) and v, "a file path")):
        if not ok(t[key]):
            raise UserError(f"teacher.{key} must be {must_be}, got {t[key]!r}")
    return t


def check_cache(c: dict) -> dict:
    """The `cache` section's types and ranges (its encoding: kdcache.encodings.logits_entry; CacheStore.create
    checks the dtype and the layout again, for callers that skip this)."""
    for key, ok, must_be in (("store", lambda v: isinstance(v, (str, os.PathLike)) and str(v), "a folder path or URL"),
                             ("batch_size", lambda v: is_int(v, 1), "an integer >= 1"),
                             ("workers", lambda v: is_int(v, 0) and v <= MAX_PROCESSES,
                              f"an integer >= 0 (DataLoader worker processes), at most {MAX_PROCESSES}"),
                             ("samples_per_chunk", lambda v: is_int(v, 1), "an integer >= 1"),
                             ("chunks_per_shard", lambda v: is_int(v, 1), "an integer >= 1"),
                             ("layout", lambda v: v in LAYOUTS, " or ".join(LAYOUTS)),
                             ("amp", lambda v: isinstance(v, bool), "true or false")):
        if not ok(c[key]):
            raise UserError(f"cache.{key} must be {must_be}, got {c[key]!r}")
    return c


def check_train(t: dict) -> dict:
    """The `train` section's types, ranges and combinations (its method's parameters: kdcache.methods.build)."""
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
    need("workers", lambda v: is_int(v, 0) and v <= MAX_PROCESSES,
         f"an integer >= 0 (DataLoader processes replaying the views; 0: in process), at most {MAX_PROCESSES}")
    need("eval_batch_size", integer(1), "an integer >= 1")
    need("out", lambda v: isinstance(v, str) and v, "a folder path")
    if t["augment"] == "fresh" and t["views_used"] is not None:
        raise UserError("train.views_used picks cached views; with train.augment 'fresh' every view is new: drop one")
    if t["schedule"] == "step" and not t["milestones"]:
        raise UserError("train.schedule 'step' needs train.milestones (epochs after which the lr decays)")
    return t


def parse_set(item: str) -> dict:
    """`--set KEY=VALUE` as the one-key mapping a config file would hold ({"train": {"lr": 0.1}} for
    train.lr=0.1), so load_config checks it like the file. VALUE is YAML (yaml.safe_load): 0.1, 16, [2, 4],
    null, true; an empty VALUE is refused rather than read as null."""
    key, eq, text = item.partition("=")
    parts = key.split(".")
    if not eq or not all(p and not any(c.isspace() for c in p) for p in parts):
        raise UserError(f"--set {item!r} must be KEY=VALUE with a dotted KEY such as train.lr (e.g. train.lr=0.1)")
    if not text.strip():
        raise UserError(f"--set {item!r} has no value; write {key}=null for none")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        why = ", ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None))))
        raise UserError(f"--set {item!r}: the value is not valid YAML ({why or str(e).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"--set {key}: the value is nested too deeply to be a config value") from None
    plain(value, f"--set {key}")
    for part in reversed(parts):
        value = {part: value}
    return value


def check_memory(nbytes: int, what: str) -> None:
    """UserError when `what` needs more than half the memory available now: refused up front instead of
    failing (or swapping) part-way."""
    available = _available_memory()
    if nbytes > available / 2:
        raise UserError(f"{what} needs {nbytes / 2**30:.3g} GiB of memory, more than half of the "
                        f"{available / 2**30:.3g} GiB available: lower it")


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


MAX_YAML_BYTES = 2**20  # configs and grid files are a few kB; /dev/zero or a data file is a mistake


def read_yaml(path: Path, what: str):
    """The YAML document of the text file `path` (yaml.safe_load); UserError for anything that is not a
    readable regular UTF-8 text file of at most MAX_YAML_BYTES, or not valid YAML."""
    try:
        if not path.is_file():
            raise UserError(f"{what} {path} is not a regular file" if path.exists() else
                            f"cannot read {what} {path}: No such file or directory")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise UserError(f"{what} {path} is not a YAML text file ({path.stat().st_size} bytes; at most "
                            f"{MAX_YAML_BYTES} expected)")
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text (UTF-8) YAML file") from None
    if "\x00" in text:
        raise UserError(f"{what} {path} is not a text (UTF-8) YAML file (it holds NUL bytes)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be a config") from None
    plain(data, f"{what} {path}")
    return data


def plain(value, where: str, key: str = "") -> None:
    """UserError unless `value` holds only what JSON holds (a run records its config as JSON): YAML's binary,
    timestamps and sets are refused, naming the key."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UserError(f"{where}: key {k!r} under '{key or '(top)'}' must be a string")
            plain(v, where, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for v in value:
            plain(v, where, key)
    elif not (value is None or isinstance(value, (str, bool, int, float))):
        raise UserError(f"{where}: '{key}' holds a YAML {type(value).__name__}; configs take strings, numbers, "
                        "true/false, null, lists and mappings")


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
