"""YAML configuration: one nested dict of defaults, merged with the user's file, `--set KEY=VALUE` items and
command-line options.

Every key a stage reads is listed in DEFAULTS, so a misspelt key is an error, not a silent default.
Sections a stage does not use are simply ignored by it.
"""
import copy
import os
from pathlib import Path

import yaml

from kdcache.errors import UserError, is_int

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
        "samples_per_chunk": 256,     # chunk = (samples_per_chunk, V, K)
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
    "train": {                        # stage 3 (kdcache train); checked by kdcache.stages.train_student.check_train
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
            raise UserError(f"unknown config key '{name}' (known here: {', '.join(sorted(base))})")
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
    seed = cfg["seed"]
    if not is_int(seed, 0):
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")
    if seed > MAX_SEED:  # torch.manual_seed takes 64 bits; the run's own seed mixing wants 32
        raise UserError(f"seed must be at most {MAX_SEED}, got {seed}")
    for section, key in (("cache", "store"), ("cache", "stats"), ("teacher", "checkpoint")):
        value = cfg[section].get(key)  # a number or list here would become a folder named after it
        if not (isinstance(value, (str, os.PathLike)) and str(value) or value is None and key == "stats"):
            raise UserError(f"{section}.{key} must be a path or URL, got {value!r}")
    return cfg


MAX_SEED = 2**32 - 1


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


def first_difference(old: dict, new: dict, *, ignore=(), old_name: str = "there", where: str = "") -> str:
    """'' when two nested dicts (configs, manifests) are equal, top-level keys in `ignore` aside, else the first
    differing dotted key with both values."""
    for key in sorted(set(old) | set(new)):
        if not where and key in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if diff := first_difference(a, b, old_name=old_name, where=f"{where}{key}."):
                return diff
        elif a != b:
            return f"{where}{key}: {a!r} {old_name}, {b!r} now"
    return ""


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
