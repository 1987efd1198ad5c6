"""Stage 3 many times: a grid of methods x students x hyper-parameters x seeds on one cache, on dask.distributed.

A grid file (YAML) names a base pipeline config (data set, teacher, views, store, training protocol)
and the axes to sweep:

    config: configs/demo.yaml           # the base config (relative paths: to the working directory)
    set: {train: {epochs: 3}}           # optional overrides of the base config
    out: runs/grid/demo                 # the grid folder: one sub-folder per run
    students: [fmnist_cnn]
    methods:                            # label -> method and its parameters (pipeline/losses.py)
      kd: {method: kd, params: {T: 4}}
      kd_ls: {method: kd, params: {standardize: true}}
      kd_online: {method: kd, params: {T: 4}, train: {online: true, augment: fresh}}  # + `train` overrides
    params: {T: [2, 4]}                 # optional axes: every value, for each method that has the parameter
    seeds: [0, 1, 2]

Each run's resolved config (method parameters with their defaults filled in) is hashed (sha256 of its
canonical JSON, without the run folder and the device); the hash names the run folder, so the same
run in a re-run or another grid on the same cache lands in the same place. A run whose result.json
exists is skipped; an interrupted one resumes from its checkpoint (train_student does that). Runs
are dask.distributed tasks: on a LocalCluster sized to the machine, or on an existing cluster by
address (whose workers must see the store and the grid folder at the same paths).
"""
import hashlib
import itertools
import json
import os
import time
import traceback
from pathlib import Path

import yaml
from tqdm import tqdm

from kdcache.cluster import dask_client
from kdcache.config import check_config, check_processes, load_config, merge, parse_set, read_yaml
from kdcache.errors import UserError, is_int
from kdcache.methods import METHODS, check_params

GRID_KEYS = {"config", "set", "out", "students", "methods", "params", "seeds"}


def load_grid(path, sets=()) -> dict:
    """The grid file as a dict, its keys checked (yaml.safe_load); `sets` (`kdcache grid --set KEY=VALUE`, in order)
    are added to its `set` overrides of the base config, so the grid.yaml written beside the runs records them."""
    path = Path(path)
    grid = read_yaml(path, "grid file") or {}
    if not isinstance(grid, dict):
        raise UserError(f"grid file {path} must be a YAML mapping at the top level")
    unknown = sorted(set(grid) - GRID_KEYS)
    if unknown:
        raise UserError(f"unknown grid key(s) {', '.join(unknown)} in {path} (known: {', '.join(sorted(GRID_KEYS))})")
    for key in ("out", "methods"):
        if not grid.get(key):
            raise UserError(f"grid file {path} needs `{key}`")
    for key, ok, must_be in (("config", lambda v: v is None or isinstance(v, str) and v, "a config file path"),
                             ("out", lambda v: isinstance(v, str) and "://" not in v, "a local folder path"),
                             ("set", lambda v: v is None or isinstance(v, dict), "a mapping of config overrides")):
        if not ok(grid.get(key)):
            raise UserError(f"grid `{key}` must be {must_be}, got {grid.get(key)!r}")
    for item in sets:
        grid["set"] = deep_update(grid.get("set") or {}, parse_set(item))
    return grid


def deep_update(base: dict, update: dict) -> dict:
    """`update` merged into a copy of `base`, mapping by mapping (a later value wins)."""
    out = dict(base)
    for key, value in update.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_update(out[key], value) if both else value
    return out


def run_key(cfg: dict) -> str:
    """sha256 of the run's canonical JSON config, without what does not change its result (folder, device)."""
    c = {k: v for k, v in cfg.items() if k != "device"}
    c["train"] = {k: v for k, v in c["train"].items() if k != "out"}
    return hashlib.sha256(json.dumps(c, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def expand_grid(grid: dict) -> list[dict]:
    """Every run of the grid: {key, folder, label, student, seed, axes, cfg, error}, in a stable order.

    `axes` holds the swept hyper-parameters that apply to the run's method. A run whose method or
    parameters are invalid keeps its UserError message in `error` (reported; the others still run); any other
    bad value (the `set` overrides, a method's `train`) is a UserError here, before a cluster starts.
    """
    base = load_config(grid.get("config"), None)
    overrides = grid.get("set") or {}
    train_set = overrides.get("train") if isinstance(overrides, dict) else None
    decided = [f"train.{k}" for k in ("method", "params", "out") if isinstance(train_set, dict) and k in train_set]
    if decided:  # every run sets these itself: a value here would be silently replaced
        raise UserError(f"grid `set` cannot set {', '.join(decided)}: the grid sets it per run (use `methods` "
                        "with their params, `params` axes and `out`)")
    base = merge(base, overrides)
    try:
        check_config(base)
    except UserError as e:
        raise UserError(f"grid `set`: {e}") from None
    methods = grid["methods"]
    if not isinstance(methods, dict):
        raise UserError("grid `methods` must map a label to {method: NAME, params: {...}}")
    students = grid["students"] if "students" in grid else [base["train"]["student"]]  # absent: the base's;
    seeds = grid["seeds"] if "seeds" in grid else [base["seed"]]  # an empty list would silently run it too
    for key, values, ok, what in (
            ("students", students, lambda v: isinstance(v, str) and v, "model names"),
            ("seeds", seeds, lambda v: is_int(v, 0), "integers >= 0")):
        if not (isinstance(values, list) and values and all(ok(v) for v in values)):
            raise UserError(f"grid `{key}` must be a non-empty list of {what}, got {values!r}")
    axes = grid.get("params") or {}
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise UserError("grid `params` must map a parameter name to a non-empty list of values, e.g. {T: [2, 4]}")
    out = Path(grid["out"])
    runs, seen, swept_somewhere = [], set(), set()
    for label, spec in methods.items():
        if not isinstance(spec, dict) or set(spec) - {"method", "params", "train"}:
            raise UserError(f"grid method {label!r} must be {{method: NAME, params: {{...}}, train: {{...}}}}, "
                            f"got {spec!r}")
        method = spec.get("method", label)
        train = spec.get("train") or {}
        if not isinstance(train, dict) or {"method", "params", "out", "student"} & set(train):
            raise UserError(f"grid method {label!r}: `train` overrides the train section except method, params, "
                            f"student and out, got {train!r}")
        swept = [a for a in axes if method in METHODS and a in METHODS[method].parameters]
        swept_somewhere.update(swept)
        for student, values, seed in itertools.product(students, itertools.product(*(axes[a] for a in swept)), seeds):
            chosen = dict(zip(swept, values))
            params, error = {**(spec.get("params") or {}), **chosen}, None
            try:
                params = check_params(method, params)
            except UserError as e:
                error = str(e)
            cfg = merge(base, {"seed": seed, "train": {**train, "student": student, "method": method}})
            cfg["train"]["params"] = params
            if error is None:
                try:
                    check_config(cfg)
                except UserError as e:
                    raise UserError(f"grid method {label!r} (student {student}, seed {seed}): {e}") from None
            key = run_key(cfg)
            if key in seen:  # two labels that resolve to one run train once
                continue
            seen.add(key)
            cfg["train"]["out"] = str(out / key[:16])
            runs.append({"key": key, "folder": cfg["train"]["out"], "label": label, "student": student,
                         "seed": seed, "axes": chosen, "cfg": cfg, "error": error})
    unused = [a for a in axes if a not in swept_somewhere]  # a typo would silently sweep nothing
    if unused:
        raise UserError(f"no method of the grid takes the swept parameter(s) {', '.join(map(str, unused))}; "
                        "check the spelling (parameters per method: pipeline/methods/)")
    return runs


def train_run(cfg: dict, threads: dict) -> dict:
    """The dask task: one train_student call with torch limited to this worker's share of the cores."""
    import torch
    from distributed import get_worker

    from kdcache.stages.train_student import train_student
    torch.set_num_threads(threads.get(get_worker().address, 1))
    out = Path(cfg["train"]["out"])
    log_event(out, "start")
    result = train_student(cfg, progress=False)
    log_event(out, "finish")
    return {k: result[k] for k in ("last_accuracy", "best_accuracy", "wall_seconds")}


def log_event(out: Path, event: str) -> None:
    """One line per start and finish of a run in its folder (events.jsonl): the history of its attempts."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid()}) + "\n")


def thread_shares(client) -> dict:
    """worker address -> torch threads: the host's cores divided among the task slots of its workers."""
    cores = client.run(os.cpu_count)
    workers = client.scheduler_info()["workers"]
    slots = {}
    for addr, w in workers.items():
        slots[w["host"]] = slots.get(w["host"], 0) + w["nthreads"]
    return {addr: max(1, cores.get(addr, 1) // slots[w["host"]]) for addr, w in workers.items()}


def run_grid(grid_path, *, sets=(), workers: int | None = None, scheduler: str | None = None,
             progress: bool = True) -> dict:
    """Run every unfinished run of the grid; returns {runs, done, skipped, failed: {folder: error}}.

    Writes config.json (the resolved config plus grid labels) into each run folder before it starts
    and error.txt when it fails; a failure never stops the other runs.
    """
    from distributed import as_completed

    check_processes(workers, "--workers")
    grid = load_grid(grid_path, sets)
    runs = expand_grid(grid)
    out = Path(grid["out"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the grid folder {out}: {e.strerror} ({e.filename})") from None
    (out / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    (out / "runs.json").write_text(json.dumps([Path(r["folder"]).name for r in runs], indent=1))
    failed, skipped, todo = {}, [], []
    for r in runs:
        folder = Path(r["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(
            {k: r[k] for k in ("key", "label", "student", "seed", "axes", "cfg")}, indent=1))
        (folder / "error.txt").unlink(missing_ok=True)
        if r["error"]:
            fail(folder, r["error"], failed)
        elif (folder / "result.json").exists():
            skipped.append(r)
        else:
            todo.append(r)
    if progress:
        print(f"grid {grid_path}: {len(runs)} runs, {len(skipped)} already finished, {len(todo)} to run"
              + (f", {len(failed)} invalid" if failed else ""), flush=True)
    if todo:
        with dask_client(scheduler, workers or min(os.cpu_count() or 1, len(todo))) as client:
            threads = thread_shares(client)
            futures = {client.submit(train_run, r["cfg"], threads, key=f"run-{r['key'][:16]}", pure=False): r
                       for r in todo}
            bar = tqdm(as_completed(futures), total=len(futures), desc="grid runs", disable=not progress)
            for future in bar:
                r = futures[future]
                if future.status == "error":
                    e = future.exception()
                    text = str(e) if isinstance(e, UserError) else "".join(
                        traceback.format_exception(type(e), e, future.traceback()))
                    fail(Path(r["folder"]), text, failed)
                    bar.write(f"FAILED {r['label']} {r['student']} seed {r['seed']} ({r['folder']}): "
                              f"{text.strip().splitlines()[-1]}")
    trained = [r for r in todo if r["folder"] not in failed]
    return {"runs": len(runs), "done": len(trained), "skipped": len(skipped), "failed": failed, "out": str(out)}


def fail(folder: Path, error: str, failed: dict) -> None:
    (folder / "error.txt").write_text(error)
    failed[str(folder)] = error
