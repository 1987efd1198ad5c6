"""Bad input: every mistake tried with the commands ends in one line `Error: ...` and a non-zero exit,
never a traceback, and loses nothing already written nor marks anything complete.

CASES is also the table of docs/RELIABILITY.md; regenerate it (it runs every case, slow ones too) with

    .venv/bin/python -m tests.test_bad_input --write docs/RELIABILITY.md

Output rules, checked for every case:
- exit 1 for a mistake the command finds (a UserError); exit 2 for a command-line usage error found by
  click (unknown command or option, a value outside an option's type or range);
- exactly one line starts with `Error:` and it is the last line printed; click's usage errors print
  their `Usage: ...` and `Try '... --help'` lines before it; a run that fails part-way may leave its
  progress bar (tqdm, on stderr) before it; nothing else is printed.
"""
import copy
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from kdcache.stages.cli import cli
from kdcache.models import build_model, save_checkpoint
from kdcache.store import CacheStore


# ---- the shared, read-only inputs ---------------------------------------------------------------

@dataclass
class Env:
    shared: Path      # read-only inputs every case may use; a case must leave it untouched
    teacher: Path     # the smoke teacher checkpoint
    syn: dict         # configs/smoke/synthetic.yaml with that teacher (stage 0 and 1 cases)
    train: dict       # configs/smoke/train.yaml with a complete store and its stage-2 statistics
    store: str        # that complete store
    partial: str      # a store with the same manifest, half of its shards done
    k7: str           # a complete store of the same data set but 7-class teacher logits
    afile: Path       # a plain file


def make_env(shared: Path, teacher: Path, train_cfg: dict) -> Env:
    from kdcache.config import load_config
    from tests.conftest import SMOKE
    syn = load_config(SMOKE, {"teacher": {"checkpoint": str(teacher)}})
    real = CacheStore.open(train_cfg["cache"]["store"])
    n, v, k = real.logits.shape
    layout = dict(num_samples=n, num_views=v, num_params=real.views.shape[2], samples_per_chunk=16,
                  chunks_per_shard=2)
    partial = CacheStore.create(shared / "partial.zarr", real.manifest, num_classes=k, **layout)
    for s in range(partial.num_shards // 2):
        rows = partial.shard_rows(s)
        partial.write_shard(s, real.logits[rows], real.views[rows], real.labels[rows])
    k7 = CacheStore.create(shared / "k7.zarr", dict(real.manifest, teacher=dict(real.manifest["teacher"],
                           num_classes=7)), num_classes=7, **layout)
    for s in range(k7.num_shards):
        rows = k7.shard_rows(s)
        k7.write_shard(s, np.zeros((rows.stop - rows.start, v, 7), np.float16), real.views[rows], real.labels[rows])
    k7.mark_complete_if_done()
    afile = shared / "a_file"
    afile.write_text("not a folder, not a store\n")
    return Env(shared, Path(teacher), syn, json.loads(json.dumps(train_cfg)), real.path, partial.path,
               k7.path, afile)


# ---- helpers the cases use ----------------------------------------------------------------------

def config_file(base: dict, tmp: Path, changes: dict | None = None, name: str = "config.yaml") -> Path:
    """`base` with dotted-key changes ({"train.lr": 0.1}) written as YAML under tmp."""
    cfg = copy.deepcopy(base)
    for dotted, value in (changes or {}).items():
        *sections, key = dotted.split(".")
        node = cfg
        for s in sections:
            node = node[s]
        node[key] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def syn_config(env, tmp, changes=None):
    """The stage 0/1 config writing its store and teacher under tmp."""
    return config_file(env.syn, tmp, {"cache.store": str(tmp / "cache.zarr"), **(changes or {})})


def train_config(env, tmp, changes=None):
    """The stage 3 config reading the shared store, writing its run under tmp."""
    return config_file(env.train, tmp, {"train.out": str(tmp / "run"), **(changes or {})})


def text_file(tmp, name, text):
    (tmp / name).write_text(text)
    return tmp / name


def grid_file(env, tmp, grid=None, **keys):
    """A grid on the shared store (one kd run), with `keys` changed; `grid` replaces it whole."""
    base = config_file(env.train, tmp, name="base.yaml")
    g = grid if grid is not None else {"config": str(base), "out": str(tmp / "grid"), "students": ["fmnist_cnn"],
                                       "methods": {"kd": {"method": "kd"}}, "seeds": [0], **keys}
    return text_file(tmp, "grid.yaml", yaml.safe_dump(g))


def checkpoint(tmp, arch, num_classes):
    path = tmp / f"{arch}_{num_classes}.pt"
    save_checkpoint(path, build_model(arch, num_classes, 1, image_size=16), arch=arch, num_classes=num_classes,
                    in_channels=1, image_size=16, meta={})
    return path


# ---- the cases ----------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    command: str
    bad: str                    # the bad input, in words (the table's second column)
    expect: str                 # a fragment of the expected error line
    code: int                   # 1: a UserError; 2: a click usage error
    make: Callable              # make(env, tmp) -> the command's arguments
    slow: bool = False
    environ: dict | None = None  # environment variables set while the command runs


CASES: list[Case] = []


def case(command, bad, expect, code=1, slow=False, environ=None):
    def register(make):
        CASES.append(Case(make.__name__, command, bad, expect, code, make, slow, environ))
        return make
    return register


# -- any command
@case("kdcache", "unknown command", "No such command 'cache'", code=2)
def unknown_command(env, tmp):
    return ["cache", "--config", "x.yaml"]


@case("stats", "unknown option", "No such option '--gama'", code=2)
def unknown_option(env, tmp):
    return ["stats", env.store, "--gama", "0.1"]


# -- config files (every command loads them the same way; `kdcache config` prints the result)
@case("config", "config file does not exist", "cannot read config")
def config_missing(env, tmp):
    return ["config", "--config", tmp / "nope.yaml"]


@case("config", "YAML syntax error", "is not valid YAML")
def config_yaml_error(env, tmp):
    return ["config", "--config", text_file(tmp, "c.yaml", "train: {lr: 0.1\nseed: 1\n")]


@case("config", "YAML list instead of a mapping", "must be a YAML mapping at the top level")
def config_not_mapping(env, tmp):
    return ["config", "--config", text_file(tmp, "c.yaml", "- train\n- kd\n")]


@case("config", "unknown (misspelt) key", "unknown config key 'train.learning_rate'")
def config_unknown_key(env, tmp):
    return ["config", "--config", text_file(tmp, "c.yaml", "train: {learning_rate: 0.1}\n")]


@case("config", "a section given a value", "config key 'dataset' must be a mapping, got 'fashion-mnist'")
def config_section_value(env, tmp):
    return ["config", "--config", text_file(tmp, "c.yaml", "dataset: fashion-mnist\n")]


@case("config", "binary file (not UTF-8 text)", "is not a text (UTF-8) YAML file")
def config_binary(env, tmp):
    (tmp / "c.yaml").write_bytes(b"\xff\xfe\x00\x81 not text")
    return ["config", "--config", tmp / "c.yaml"]


@case("config", "--config is a folder", "Invalid value for '--config'", code=2)
def config_is_folder(env, tmp):
    return ["config", "--config", tmp]


@case("config", "KEY argument that does not exist", "no config key 'train.nope'")
def config_unknown_dotted(env, tmp):
    return ["config", "train.nope"]


@case("cache-teacher", "dataset.options a list, not a mapping", "config key 'dataset.options' must be a mapping")
def options_not_mapping(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"dataset.options": [512]})]


@case("cache-teacher", "seed not an integer", "seed must be an integer >= 0, got 'abc'")
def seed_not_integer(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"seed": "abc"})]


@case("stats", "cache.stats (the overlay) a number", "cache.stats must be a path or URL, got 5")
def overlay_number(env, tmp):
    return ["stats", "--config", train_config(env, tmp, {"cache.stats": 5}), "--stat", "entropy"]


@case("train", "teacher.checkpoint empty", "teacher.checkpoint must be a path or URL, got None")
def checkpoint_null(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"teacher.checkpoint": None}), "--online"]


@case("cache-teacher", "unknown device", "unknown device 'gpu'")
def unknown_device(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--device", "gpu"]


@case("train-teacher", "CUDA device on a machine without one", "CUDA is not available")
def cuda_missing(env, tmp):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["train-teacher", "--config", syn_config(env, tmp), "--device", "cuda", "--checkpoint", tmp / "t.pt"]


# -- stage 0
@case("train-teacher", "--epochs 0", "Invalid value for '--epochs'", code=2)
def teacher_epochs_option(env, tmp):
    return ["train-teacher", "--config", syn_config(env, tmp), "--epochs", "0"]


@case("train-teacher", "teacher.epochs a word", "teacher.epochs must be an integer >= 1, got 'three'")
def teacher_epochs_word(env, tmp):
    return ["train-teacher", "--config", syn_config(env, tmp, {"teacher.epochs": "three"}),
            "--checkpoint", tmp / "t.pt"]


@case("train-teacher", "negative teacher.batch_size", "teacher.batch_size must be an integer >= 1, got -4")
def teacher_negative_batch(env, tmp):
    return ["train-teacher", "--config", syn_config(env, tmp, {"teacher.batch_size": -4}),
            "--checkpoint", tmp / "t.pt"]


@case("train-teacher", "teacher.lr a word", "teacher.lr must be a number > 0, got 'fast'")
def teacher_lr_word(env, tmp):
    return ["train-teacher", "--config", syn_config(env, tmp, {"teacher.lr": "fast"}), "--checkpoint", tmp / "t.pt"]


@case("train-teacher", "unknown model architecture", "unknown model 'resnet_of_doom'")
def teacher_unknown_arch(env, tmp):
    return ["train-teacher", "--config", syn_config(env, tmp, {"teacher.arch": "resnet_of_doom"}),
            "--checkpoint", tmp / "t.pt"]


@case("train-teacher", "checkpoint path inside a file (unwritable)", "cannot write the teacher checkpoint")
def teacher_unwritable(env, tmp):
    return ["train-teacher", "--config", syn_config(env, tmp), "--checkpoint", env.afile / "t.pt"]


# -- stage 1
@case("cache-teacher", "unknown data set", "unknown data set 'mnist-of-doom'")
def unknown_dataset(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"dataset.name": "mnist-of-doom"})]


@case("cache-teacher", "data folder missing", "Fashion-MNIST folder /nonexistent/data not found")
def data_folder_missing(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {
        "dataset.name": "fashion-mnist", "dataset.root": "/nonexistent/data", "dataset.options": {}})]


@case("cache-teacher", "dataset.root a number", "dataset.root must be a folder path, got 7")
def data_root_number(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {
        "dataset.name": "fashion-mnist", "dataset.root": 7, "dataset.options": {}})]


@case("cache-teacher", "option the data set does not take", "does not take options ['colour']")
def dataset_unknown_option(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"dataset.options": {"colour": True}})]


@case("cache-teacher", "subset larger than the data set", "subset 100000 is larger than synthetic train")
def subset_too_large(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"dataset.subset": 100000})]


@case("cache-teacher", "teacher checkpoint missing", "checkpoint not found")
def checkpoint_missing(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--checkpoint", tmp / "nope.pt"]


@case("cache-teacher", "checkpoint of random bytes", "cannot read checkpoint")
def checkpoint_random_bytes(env, tmp):
    (tmp / "random.pt").write_bytes(os.urandom(4096))
    return ["cache-teacher", "--config", syn_config(env, tmp), "--checkpoint", tmp / "random.pt"]


@case("cache-teacher", "checkpoint that pickles a Python object", "pickles a Python object")
def checkpoint_pickled_model(env, tmp):
    torch.save(build_model("tiny_teacher", 4, 1), tmp / "module.pt")  # a whole nn.Module, not tensors
    return ["cache-teacher", "--config", syn_config(env, tmp), "--checkpoint", tmp / "module.pt"]


@case("cache-teacher", "checkpoint of another architecture",
      "checkpoint architecture is 'fmnist_cnn' but the config says 'tiny_teacher'")
def checkpoint_other_arch(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--checkpoint", checkpoint(tmp, "fmnist_cnn", 4)]


@case("cache-teacher", "checkpoint of another class count", "checkpoint class count is 7 but the config says 4")
def checkpoint_other_classes(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--checkpoint", checkpoint(tmp, "tiny_teacher", 7)]


@case("cache-teacher", "--batch-size 0", "Invalid value for '--batch-size'", code=2)
def cache_batch_option(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--batch-size", "0"]


@case("cache-teacher", "negative cache.batch_size", "cache.batch_size must be an integer >= 1, got -5")
def cache_negative_batch(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"cache.batch_size": -5})]


@case("cache-teacher", "cache.samples_per_chunk a word", "cache.samples_per_chunk must be an integer >= 1, got 'big'")
def cache_chunk_word(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"cache.samples_per_chunk": "big"})]


@case("cache-teacher", "cache.dtype float64", "cache dtype must be one of float16, float32, got 'float64'")
def cache_dtype(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"cache.dtype": "float64"})]


@case("cache-teacher", "views.views 0", "views.views ('all' or a count) must be an integer >= 1, got 0")
def views_zero(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"views.views": 0})]


@case("cache-teacher", "unknown view kind", "unknown view kind 'rotate'")
def views_unknown_kind(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"views": {"kind": "rotate"}})]


@case("cache-teacher", "--out inside a file (unwritable)", "cannot write cache store")
def store_unwritable(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", env.afile / "cache.zarr"]


@case("cache-teacher", "--out is a file", "cannot write cache store")
def store_is_file(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", env.afile]


@case("cache-teacher", "--out is a folder of other files", "cannot write cache store")
def store_other_folder(env, tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "precious.txt").write_text("keep me")
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", tmp / "mine"]


@case("cache-teacher", "--overwrite on a folder that is not a store (not deleted)", "cannot write cache store")
def overwrite_other_folder(env, tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "precious.txt").write_text("keep me")
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", tmp / "mine", "--overwrite"]


@case("cache-teacher", "store built from another manifest, no --overwrite",
      "was built from a different manifest (dataset")
def store_other_manifest(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", env.store]


@case("cache-teacher", "--shard-index outside 0..num-shards-1", "--shard-index must be in 0..1, got 2")
def shard_index_range(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--num-shards", "2", "--shard-index", "2"]


@case("cache-teacher", "WORLD_SIZE not an integer (torchrun's variables)", "WORLD_SIZE='abc' and RANK='0'",
      environ={"WORLD_SIZE": "abc"})
def world_size_word(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp)]


@case("cache-teacher", "--overwrite with several processes", "--overwrite cannot be combined with several processes")
def overwrite_with_shards(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--num-shards", "2", "--shard-index", "0",
            "--overwrite"]


# -- stage 2
@case("stats", "store does not exist", "no cache store at")
def stats_store_missing(env, tmp):
    return ["stats", tmp / "nothing.zarr"]


@case("stats", "store path is a file", "no cache store at")
def stats_store_is_file(env, tmp):
    return ["stats", env.afile]


@case("stats", "folder that is not a store", "no cache store at")
def stats_not_a_store(env, tmp):
    return ["stats", env.shared]


@case("stats", "incomplete store", "is incomplete (2/4 shards done): finish stage 1")
def stats_incomplete(env, tmp):
    return ["stats", env.partial]


@case("stats", "unknown statistic", "unknown statistic(s) 'temperature'")
def stats_unknown(env, tmp):
    return ["stats", env.store, "--stat", "temperature"]


@case("stats", "gamma <= 0", "stats.gammas (gamma) must be a finite number > 0, got -1.0")
def stats_bad_gamma(env, tmp):
    return ["stats", env.store, "--gamma", "-1"]


@case("stats", "T_base nan", "stats.t_base (T_base) must be a finite number > 0, got nan")
def stats_nan_t_base(env, tmp):
    return ["stats", env.store, "--t-base", "nan"]


@case("stats", "--std not a convention", "Invalid value for '--std'", code=2)
def stats_std_choice(env, tmp):
    return ["stats", env.store, "--std", "sample"]


@case("stats", "--workers 0", "--workers must be >= 1, got 0")
def stats_workers_zero(env, tmp):
    return ["stats", env.store, "--stat", "entropy", "--workers", "0"]


@case("stats", "--workers with --scheduler", "give either --scheduler ADDRESS or --workers N, not both")
def stats_workers_and_scheduler(env, tmp):
    return ["stats", env.store, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"]


@case("stats", "scheduler address that is not an address", "cannot connect to the dask scheduler at not-an-address")
def stats_bad_address(env, tmp):
    return ["stats", env.store, "--stat", "entropy", "--scheduler", "not-an-address"]


@case("stats", "unreachable scheduler", "cannot connect to the dask scheduler at tcp://127.0.0.1:1", slow=True)
def stats_unreachable_scheduler(env, tmp):
    return ["stats", env.store, "--stat", "entropy", "--scheduler", "tcp://127.0.0.1:1"]


@case("stats", "--plot into a file", "Invalid value for '--plot'", code=2)
def stats_plot_into_file(env, tmp):
    return ["stats", env.store, "--plot", env.afile]


# -- stage 3
@case("train", "unknown method", "unknown distillation method 'fitnet'")
def train_unknown_method(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.method": "fitnet"})]


@case("train", "unknown method parameter", "unknown parameter(s) gamma for method 'kd'")
def train_unknown_param(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.params": {"gamma": 0.1}})]


@case("train", "method parameter of the wrong type", "parameter T='hot' must be a number > 0")
def train_param_type(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.params": {"T": "hot"}})]


@case("train", "wttm without its stage-2 statistic",
      "has no stats/wttm_power_sum_gamma0.3; compute it with: kdcache stats")
def train_missing_wttm_stats(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.method": "wttm", "train.params": {"gamma": 0.3}})]


@case("train", "mlt without its stage-2 statistic", "--stat mlt_temperature --std population")
def train_missing_mlt_stats(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.method": "mlt",
                                                         "train.params": {"unbiased_std": False}})]


@case("train", "incomplete store", "is incomplete (2/4 shards): finish it with `kdcache cache-teacher`")
def train_incomplete_store(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--cache", env.partial]


@case("train", "store does not exist", "no cache store at")
def train_store_missing(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--cache", tmp / "none.zarr"]


@case("train", "store of another data set", "was built on another data set")
def train_other_dataset(env, tmp):
    options = dict(env.train["dataset"]["options"], seed=1)  # same shapes, other images
    return ["train", "--config", train_config(env, tmp, {"dataset.options": options})]


@case("train", "store of another class count than the student", "holds 7-class teacher logits but the student")
def train_other_class_count(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--cache", env.k7]


@case("train", "store of other views than the config", "caches other views")
def train_other_views(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"views.views": 3})]


@case("train", "negative train.batch_size", "train.batch_size must be an integer >= 1, got -1")
def train_negative_batch(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.batch_size": -1})]


@case("train", "train.lr a word", "train.lr must be a number > 0, got 'fast'")
def train_lr_word(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.lr": "fast"})]


@case("train", "unknown student model", "unknown model 'resnet1000'")
def train_unknown_student(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.student": "resnet1000"})]


@case("train", "--epochs 0", "Invalid value for '--epochs'", code=2)
def train_epochs_option(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--epochs", "0"]


@case("train", "run folder (--out) is a file", "cannot write the run folder")
def train_out_is_file(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--out", env.afile]


@case("train", "run folder holding a checkpoint.pt of random bytes", "cannot read the run checkpoint")
def train_random_run_checkpoint(env, tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "checkpoint.pt").write_bytes(os.urandom(1000))
    return ["train", "--config", train_config(env, tmp)]


@case("train", "run folder holding a run of another config", "holds a run with another config (train.lr: 0.2 there")
def train_other_run(env, tmp):
    from kdcache.rundir import RUN_FORMAT, run_config
    other = copy.deepcopy(env.train)
    other["train"].update(out=str(tmp / "run"), lr=0.2)
    (tmp / "run").mkdir()
    torch.save({"format": RUN_FORMAT, "epoch": 1, "config": json.dumps(run_config(other))}, tmp / "run" / "checkpoint.pt")
    return ["train", "--config", train_config(env, tmp)]


# -- grids
@case("grid", "grid file does not exist", "cannot read grid file")
def grid_missing(env, tmp):
    return ["grid", tmp / "nope.yaml"]


@case("grid", "YAML syntax error", "is not valid YAML")
def grid_yaml_error(env, tmp):
    return ["grid", text_file(tmp, "grid.yaml", "methods: [kd\n")]


@case("grid", "binary grid file (not UTF-8 text)", "is not a text (UTF-8) YAML file")
def grid_binary(env, tmp):
    (tmp / "grid.yaml").write_bytes(b"\xff\xfe\x00\x81 not text")
    return ["grid", tmp / "grid.yaml"]


@case("grid", "empty grid file", "needs `out`")
def grid_empty(env, tmp):
    return ["grid", text_file(tmp, "grid.yaml", "")]


@case("grid", "unknown grid key", "unknown grid key(s) method")
def grid_unknown_key(env, tmp):
    return ["grid", grid_file(env, tmp, method={"kd": {}})]


@case("grid", "axis no method of the grid takes (typo)", "no method of the grid takes the swept parameter(s) Tt")
def grid_unknown_axis(env, tmp):
    return ["grid", grid_file(env, tmp, params={"Tt": [2, 4]})]


@case("grid", "axis with an empty list", "must map a parameter name to a non-empty list")
def grid_empty_axis(env, tmp):
    return ["grid", grid_file(env, tmp, params={"T": []})]


@case("grid", "seeds a number, not a list", "grid `seeds` must be a non-empty list of integers >= 0, got 3")
def grid_seeds_number(env, tmp):
    return ["grid", grid_file(env, tmp, seeds=3)]


@case("grid", "students a string, not a list", "grid `students` must be a non-empty list of model names, got 'fmnist_cnn'")
def grid_students_string(env, tmp):
    return ["grid", grid_file(env, tmp, students="fmnist_cnn")]


@case("grid", "methods a list", "grid `methods` must map a label to")
def grid_methods_list(env, tmp):
    return ["grid", grid_file(env, tmp, methods=["kd", "dkd"])]


@case("grid", "method entry with an unknown key", "grid method 'kd' must be {method: NAME, params: {...}")
def grid_method_key(env, tmp):
    return ["grid", grid_file(env, tmp, methods={"kd": {"method": "kd", "T": 4}})]


@case("grid", "base config missing", "cannot read config")
def grid_base_missing(env, tmp):
    return ["grid", grid_file(env, tmp, config=str(tmp / "nope.yaml"))]


@case("grid", "`set` with an unknown config key", "unknown config key 'train.lrr'")
def grid_set_unknown(env, tmp):
    return ["grid", grid_file(env, tmp, set={"train": {"lrr": 0.1}})]


@case("grid", "`set` of method parameters (each run replaces them)", "grid `set` cannot set train.params")
def grid_set_params(env, tmp):
    return ["grid", grid_file(env, tmp, set={"train": {"params": {"standardize": True}}})]


@case("grid", "grid folder (out) is a file", "cannot write the grid folder")
def grid_out_is_file(env, tmp):
    return ["grid", grid_file(env, tmp, out=str(env.afile))]


@case("grid", "--workers with --scheduler", "give --workers (a local cluster) or --scheduler (an existing one), not both")
def grid_workers_and_scheduler(env, tmp):
    return ["grid", grid_file(env, tmp), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"]


@case("grid", "--workers 0", "Invalid value for '--workers'", code=2)
def grid_workers_zero(env, tmp):
    return ["grid", grid_file(env, tmp), "--workers", "0"]


@case("grid", "scheduler address that is not an address", "cannot connect to the dask scheduler at not-an-address")
def grid_bad_address(env, tmp):
    return ["grid", grid_file(env, tmp), "--scheduler", "not-an-address"]


@case("grid", "unreachable scheduler", "cannot connect to the dask scheduler at tcp://127.0.0.1:1", slow=True)
def grid_unreachable_scheduler(env, tmp):
    return ["grid", grid_file(env, tmp), "--scheduler", "tcp://127.0.0.1:1"]


# -- reports
@case("report", "empty folder", "is not a grid folder (no runs.json)")
def report_empty(env, tmp):
    return ["report", tmp]


@case("report", "runs.json that is not JSON", "cannot read the grid listing")
def report_bad_listing(env, tmp):
    text_file(tmp, "runs.json", "{not json")
    return ["report", tmp]


@case("report", "a listed run folder is missing", "cannot read run 0123456789abcdef")
def report_missing_run(env, tmp):
    text_file(tmp, "runs.json", json.dumps(["0123456789abcdef"]))
    return ["report", tmp]


@case("report", "RUN_DIR is a file", "Invalid value for 'RUN_DIR'", code=2)
def report_on_file(env, tmp):
    return ["report", env.afile]


# -- stores shared by URL, writer lock, statistics overlays (issue 6)
def store_copy(env, tmp, source=None) -> Path:
    """A private copy of the shared complete store (or of `source`), for cases that damage or lock it."""
    shutil.copytree(source or env.store, tmp / "copy.zarr")
    return tmp / "copy.zarr"


def lock_of_another_host(store: Path, name="cache-teacher-0-of-1"):
    """The lock document a writer on another machine leaves in the store (pipeline/sharing.py)."""
    (store / "locks" / name).mkdir(parents=True)
    (store / "locks" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (store / "locks" / name / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "kdcache_lock": {"host": "another-host", "pid": 4242, "job": None, "command": "kdcache cache-teacher",
                         "started": "2026-11-22T09:00:00+00:00"}}}))


@case("stats", "URL of an unknown protocol", "unknown storage protocol 'foo://'")
def url_unknown_protocol(env, tmp):
    return ["stats", "foo://bucket/cache.zarr"]


@case("cache-teacher", "--out an http:// URL (read-only)", "http URLs are read-only")
def url_http_write(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", "http://127.0.0.1:1/cache.zarr"]


@case("info", "http:// server that does not answer", "cannot reach http://127.0.0.1:1/cache.zarr")
def url_http_unreachable(env, tmp):
    return ["info", "http://127.0.0.1:1/cache.zarr"]


@case("info", "s3:// endpoint that does not answer (botocore retries: ~20 s)", "cannot reach s3://bucket/cache.zarr",
      slow=True, environ={"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "x",
                          "AWS_SECRET_ACCESS_KEY": "y"})
def url_s3_unreachable(env, tmp):
    return ["info", "s3://bucket/cache.zarr"]


@case("cache-teacher", "store locked by a writer on another host", "locks/cache-teacher-0-of-1")
def store_locked(env, tmp):
    copy = store_copy(env, tmp, env.partial)  # incomplete: stage 1 would write its missing shards
    lock_of_another_host(copy)
    return ["cache-teacher", "--config", config_file(env.train, tmp), "--out", copy]


@case("stats", "store locked by a writer on another host", "locks/cache-teacher-0-of-1")
def stats_locked(env, tmp):
    copy = store_copy(env, tmp)
    lock_of_another_host(copy)
    return ["stats", copy, "--stat", "entropy"]


@case("train", "--stats overlay that does not exist", "no statistics overlay at")
def overlay_missing(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.method": "wttm"}), "--stats", tmp / "none.zarr"]


@case("train", "--stats overlay of another cache", "belongs to another cache")
def overlay_other_cache(env, tmp):
    import zarr
    group = zarr.open_group(str(tmp / "overlay.zarr"), mode="w-", zarr_format=3)
    group.attrs.update({"format": "kdcache-stats-overlay", "format_version": 1, "cache_fingerprint": "0" * 64,
                        "cache": "elsewhere.zarr"})
    return ["train", "--config", train_config(env, tmp, {"train.method": "wttm"}), "--stats", tmp / "overlay.zarr"]


@case("stats", "--out the cache store itself (not an overlay)", "is not a kdcache statistics overlay")
def overlay_is_store(env, tmp):
    copy = store_copy(env, tmp)
    return ["stats", copy, "--out", copy, "--stat", "entropy"]


# -- damaged stores, `kdcache info` and `kdcache verify` (issue 6)
@case("info", "store does not exist", "no cache store at")
def info_missing(env, tmp):
    return ["info", tmp / "none.zarr"]


@case("verify", "a flipped byte in a logits chunk", "logits")
def verify_flipped_byte(env, tmp):
    copy = store_copy(env, tmp)
    chunk = copy / "logits" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return ["verify", copy]


@case("train", "a truncated logits chunk", "fails its crc32c checksum")
def train_truncated_chunk(env, tmp):
    copy = store_copy(env, tmp)
    chunk = copy / "logits" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    return ["train", "--config", train_config(env, tmp), "--cache", copy]


@case("stats", "a missing logits shard file", "missing")
def stats_missing_chunk(env, tmp):
    copy = store_copy(env, tmp)
    (copy / "logits" / "c" / "1" / "0" / "0").unlink()
    return ["stats", copy, "--stat", "entropy"]


@case("info", "store whose zarr.json was deleted", "no cache store at")
def info_deleted_manifest(env, tmp):
    copy = store_copy(env, tmp)
    (copy / "zarr.json").unlink()
    return ["info", copy]


@case("train", "manifest edited by hand", "was edited after creation")
def train_edited_manifest(env, tmp):
    copy = store_copy(env, tmp)
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["manifest"]["teacher"]["test_accuracy"] = 0.99
    (copy / "zarr.json").write_text(json.dumps(doc))
    return ["train", "--config", train_config(env, tmp), "--cache", copy]


@case("stats", "store of a newer format version", "newer than this kdcache reads")
def stats_newer_version(env, tmp):
    copy = store_copy(env, tmp)
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["format_version"] = 2
    (copy / "zarr.json").write_text(json.dumps(doc))
    return ["stats", copy]


@case("verify", "store of a wrong format version", "unknown format version 'one'")
def verify_wrong_version(env, tmp):
    copy = store_copy(env, tmp)
    doc = json.loads((copy / "zarr.json").read_text())
    doc["attributes"]["format_version"] = "one"
    (copy / "zarr.json").write_text(json.dumps(doc))
    return ["verify", copy]


@case("verify", "an array's shape edited in its zarr.json", "but the manifest says 4")
def verify_edited_shape(env, tmp):
    copy = store_copy(env, tmp)
    doc = json.loads((copy / "logits" / "zarr.json").read_text())
    doc["shape"][2] = 5
    (copy / "logits" / "zarr.json").write_text(json.dumps(doc))
    return ["verify", copy]


@case("verify", "--spot-check without --checkpoint", "--spot-check needs --checkpoint")
def verify_spot_no_checkpoint(env, tmp):
    return ["verify", env.store, "--spot-check", "4"]


@case("verify", "--checkpoint without --spot-check", "only used by --spot-check")
def verify_checkpoint_no_spot(env, tmp):
    return ["verify", env.store, "--checkpoint", checkpoint(tmp, "tiny_teacher", 4)]


@case("verify", "--spot-check with another teacher's checkpoint", "has sha256")
def verify_spot_other_teacher(env, tmp):
    return ["verify", env.store, "--spot-check", "4", "--checkpoint", checkpoint(tmp, "tiny_teacher", 4)]


# -- top-k stores (issue 6)
@case("cache-teacher", "cache.topk not smaller than the class count", "topk")
def topk_too_large(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"cache.topk": 4})]


@case("cache-teacher", "cache.topk a word", "topk")
def topk_word(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp, {"cache.topk": "ten"})]


# -- nothing of a user's is ever deleted or mixed into a store; no output that silently vanishes (issue 7)
@case("cache-teacher", "--overwrite on a Zarr group that is not a kdcache store (a user's arrays)",
      "--overwrite refused: ")
def overwrite_foreign_group(env, tmp):
    import zarr
    group = zarr.open_group(str(tmp / "mine.zarr"), mode="w-", zarr_format=3)
    group.create_array("precious", shape=(4,), dtype="int32")[:] = [1, 2, 3, 4]
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", tmp / "mine.zarr", "--overwrite"]


@case("cache-teacher", "--out inside a complete store", "would be inside the Zarr store")
def cache_out_inside_store(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", f"{env.store}/x.zarr"]


@case("stats", "--out (the overlay) inside the cache store", "would be inside the Zarr store")
def stats_out_inside_store(env, tmp):
    return ["stats", env.store, "--out", f"{env.store}/x.zarr", "--stat", "entropy"]


@case("train", "run folder (--out) that is the cache store", "would be inside the Zarr store")
def train_out_is_store(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--out", env.store]


@case("train", "run folder (--out) inside the cache store", "would be inside the Zarr store")
def train_out_inside_store(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--out", f"{env.store}/runs/kd"]


@case("train", "run folder (--out) a URL", "train.out must be a local folder path")
def train_out_url(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--out", "s3://bucket/run"]


@case("cache-teacher", "--out inside a stage-3 run folder", "would be inside the stage-3 run folder")
def cache_out_inside_run(env, tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text("{}\n")
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", tmp / "run" / "cache.zarr"]


@case("cache-teacher", "--out memory:// (gone when the process exits)", "memory:// lives only inside this process")
def cache_out_memory(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--out", "memory://cache.zarr"]


@case("stats", "--out memory:// (gone when the process exits)", "memory:// lives only inside this process")
def stats_out_memory(env, tmp):
    return ["stats", env.store, "--out", "memory://overlay.zarr", "--stat", "entropy"]


@case("cache-teacher", "--shard-index without --num-shards", "--shard-index 1 needs --num-shards")
def shard_index_alone(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--shard-index", "1"]


@case("cache-teacher", "--num-shards 2 without --shard-index", "--num-shards 2 needs --shard-index")
def num_shards_alone(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--num-shards", "2"]


@case("grid", "students an empty list", "grid `students` must be a non-empty list of model names, got []")
def grid_students_empty(env, tmp):
    return ["grid", grid_file(env, tmp, students=[])]


@case("grid", "seeds an empty list", "grid `seeds` must be a non-empty list of integers >= 0, got []")
def grid_seeds_empty(env, tmp):
    return ["grid", grid_file(env, tmp, seeds=[])]


@case("grid", "config a number, not a path", "grid `config` must be a config file path, got 5")
def grid_config_number(env, tmp):
    return ["grid", grid_file(env, tmp, config=5)]


@case("config", "--config a device file (/dev/zero), not a text file", "is not a regular file")
def config_device_file(env, tmp):
    return ["config", "--config", "/dev/zero"]


@case("config", "config holding NUL bytes", "is not a text (UTF-8) YAML file (it holds NUL bytes)")
def config_nul_bytes(env, tmp):
    return ["config", "--config", text_file(tmp, "c.yaml", "train: {lr: 0.1}\n\x00\n")]


# -- --set overrides (every command with --config) and models from elsewhere
@case("config", "--set item without '=' (not KEY=VALUE)", "--set 'train.lr' must be KEY=VALUE")
def set_not_key_value(env, tmp):
    return ["config", "--set", "train.lr"]


@case("train", "--set of an unknown (misspelt) key", "--set train.learning_rate: unknown config key 'train.learning_rate'")
def set_unknown_key(env, tmp):
    return ["train", "--config", train_config(env, tmp), "--set", "train.learning_rate=0.1"]


@case("cache-teacher", "--set value that is not valid YAML", "--set 'cache.batch_size=[64': the value is not valid YAML")
def set_bad_yaml(env, tmp):
    return ["cache-teacher", "--config", syn_config(env, tmp), "--set", "cache.batch_size=[64"]


@case("train", "student a python: factory whose module does not exist",
      "cannot import no_such_package (No module named 'no_such_package')")
def student_factory_missing(env, tmp):
    return ["train", "--config", train_config(env, tmp, {"train.student": "python:no_such_package:net"})]


@case("train-teacher", "teacher a timm: name timm does not have", "timm:resnet_of_doom is not a timm model")
def teacher_timm_unknown(env, tmp):
    return ["train-teacher", "--config", syn_config(env, tmp, {"teacher.arch": "timm:resnet_of_doom",
                                                                "teacher.checkpoint": str(tmp / "t.pt")})]


# ---- running a case ------------------------------------------------------------------------------

PROGRESS = re.compile(r"\d+%\||\[\d\d:\d\d|% Completed|^grid .*: \d+ runs, ")  # progress bars; grid status
USAGE = ("Usage: ", "Try '")


def run(args, environ=None):
    """Run a command in-process: (exit code, its non-empty output lines, the last `Error:` line, the
    exception's repr if it raised one (a traceback for a user) else None)."""
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="kdcache", env=environ)
    if environ:  # fsspec caches S3 file systems by their arguments, not by the environment they read
        fsspec.get_filesystem_class("s3").clear_instance_cache()  # (AWS_ENDPOINT_URL): forget this case's
    lines = [line for line in result.output.splitlines() if line.strip()]
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    error = next((line for line in reversed(lines) if line.startswith("Error:")), "")
    return result.exit_code, lines, error, (repr(result.exception) if crashed else None)


def snapshot(*roots) -> dict:
    """Every file under `roots`: its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in Path(r).rglob("*") if p.is_file()}


def complete_stores(root) -> set:
    """Stores under `root` whose status says complete."""
    out = set()
    for meta in Path(root).rglob("zarr.json"):
        attrs = json.loads(meta.read_text()).get("attributes", {})
        if attrs.get("status") == "complete":
            out.add(meta.parent)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory, teacher_ckpt, train_store_cfg):
    return make_env(tmp_path_factory.mktemp("bad_input_shared"), teacher_ckpt, train_store_cfg)


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_bad_input_gives_one_error_line_and_loses_nothing(c, env, tmp_path):
    args = c.make(env, tmp_path)  # writes the case's files
    shared_store = Path(env.store)
    before = snapshot(env.shared, shared_store, tmp_path)
    complete_before = complete_stores(tmp_path)
    cwd_before = set(os.listdir())  # a relative path made of a wrong value would land here

    code, lines, error, crashed = run(args, c.environ)

    assert crashed is None, f"{c.id}: a traceback ({crashed})"
    assert code == c.code, (code, lines)
    assert lines and lines[-1] == error and c.expect in error, lines
    assert sum(line.startswith("Error:") for line in lines) == 1, lines
    others = lines[:-1]
    allowed = (lambda line: line.startswith(USAGE)) if c.code == 2 else (lambda line: PROGRESS.search(line))
    assert all(allowed(line) for line in others), others
    # nothing lost: the shared inputs unchanged, every file of the case's folder still there, unchanged
    after = snapshot(env.shared, shared_store, tmp_path)
    assert {p: s for p, s in after.items() if p in before} == before
    assert set(after) >= set(before)
    assert not [p for p in after if p not in before and (p.is_relative_to(env.shared) or p.is_relative_to(shared_store))]
    assert set(os.listdir()) == cwd_before
    # nothing marked complete: no store newly complete, no run result
    assert complete_stores(tmp_path) == complete_before
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("student.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["unknown_dataset", "teacher_epochs_word", "stats_incomplete", "grid_seeds_number"])
def test_a_real_process_prints_the_same_single_line(case_id, env, tmp_path):
    """The installed entry point (a real process, its own stderr) gives what the in-process runner saw."""
    from tests.conftest import kdcache
    c = next(c for c in CASES if c.id == case_id)
    args = c.make(env, tmp_path)
    proc = kdcache(*args)
    out, err = proc.communicate(timeout=120)
    lines = [line for line in (out + err).splitlines() if line.strip() and not PROGRESS.search(line)]
    assert proc.returncode == c.code and "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("Error:") and c.expect in lines[0], lines


def test_the_case_list_is_long_enough_and_unique():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    assert {"config", "train-teacher", "cache-teacher", "stats", "train", "grid", "report"} <= {c.command for c in CASES}


# ---- the table of docs/RELIABILITY.md -----------------------------------------------------------

def markdown_table(env: Env) -> str:
    """Run every case and tabulate what it gives (paths shortened to <tmp> and <shared>)."""
    rows = ["| # | command | bad input | exit | what it prints (the error line) |", "|---:|---|---|---:|---|"]
    traces = 0
    for i, c in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            try:
                code, lines, error, crashed = run(c.make(env, tmp), c.environ)
            except pytest.skip.Exception as e:
                code, error, crashed = "-", f"(skipped: {e.msg})", None
            if crashed:
                traces += 1
                error = f"TRACEBACK {crashed}"
            for path, name in ((str(tmp), "<tmp>"), (str(env.shared), "<shared>"),
                               (str(Path(env.store).parent), "<shared>")):
                error = error.replace(path, name)
        rows.append(f"| {i} | {c.command} | {c.bad} | {code} | {error.replace('|', '&#124;')} |")
    counts = (f"{len(CASES)} cases over {len({c.command for c in CASES} - {'kdcache'})} commands and the top level; "
              f"{sum(c.code == 1 for c in CASES)} exit 1 (the command refuses), "
              f"{sum(c.code == 2 for c in CASES)} exit 2 (click usage errors); {traces} tracebacks.")
    return "\n".join([counts, "", *rows])


TABLE_START, TABLE_END = "<!-- bad-input table: start -->", "<!-- bad-input table: end -->"


def main():
    """Build the shared inputs as the test fixtures do (smoke teacher, store, statistics), run every case
    and print the table, or with `--write FILE` replace the table between FILE's markers."""
    from kdcache.config import load_config
    from kdcache.stages.cache_teacher import cache_teacher
    from kdcache.stages.compute_stats import compute_stats
    from kdcache.stages.train_teacher import train_teacher
    from tests.conftest import REPO, SMOKE
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        teacher = root / "tiny_teacher.pt"
        train_teacher(load_config(SMOKE, {"teacher": {"checkpoint": str(teacher)}}), progress=False)
        (root / "store").mkdir()
        cfg = load_config(REPO / "configs" / "smoke" / "train.yaml",
                          {"teacher": {"checkpoint": str(teacher)}, "cache": {"store": str(root / "store" / "cache.zarr")}})
        cache_teacher(cfg, progress=False)
        compute_stats(cfg["cache"]["store"], cfg["stats"], progress=False)
        (root / "shared").mkdir()
        env = make_env(root / "shared", teacher, cfg)
        table = markdown_table(env)
    if sys.argv[1:2] == ["--write"]:
        doc = Path(sys.argv[2])
        text = doc.read_text()
        start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
        doc.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    else:
        sys.stdout.write(table + "\n")


if __name__ == "__main__":
    main()
