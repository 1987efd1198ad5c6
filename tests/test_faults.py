"""SIGKILL at chosen points of stages 1, 2 and 3 (the real CLI in a subprocess), then resume.

Each test kills one run at a chain of points, each one when a file-system observable shows it was reached,
and starts the command again after every kill. After each kill nothing may be marked complete early (status,
shard_done against the data written, statistics without their fingerprint, result.json); at the end the
resumed result must equal an uninterrupted run's exactly. The points the older tests cover (stage 1 after
a few shards, stage 3 after its first epoch checkpoint, a grid after its first finished run) are not
repeated here. Results: docs/RELIABILITY.md.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from kdcache.stages.cli import cli
from kdcache.config import DEFAULTS, load_config
from kdcache.errors import UserError
from kdcache.store import CacheStore
from kdcache.stages.compute_stats import compute_stats, read_stat
from tests.conftest import REPO, SMOKE, kdcache, write_config

pytestmark = pytest.mark.slow  # each test starts several Python processes that import torch (~4 s each)


def kill_when(start, reached, what: str, timeout: float = 120, may_finish: bool = False) -> bool:
    """Start a process (`start()`), SIGKILL it as soon as `reached(t0)` is true (polled every 2 ms; t0: when
    it was started, to tell its files from an earlier run's); fail if it ends first, unless the point is the
    run's last few milliseconds (`may_finish`: a loaded machine may not poll in time). True if killed."""
    t0 = time.time()
    proc = start()
    deadline = t0 + timeout
    while not reached(t0):
        if proc.poll() is not None:
            if may_finish and proc.returncode == 0:
                return False
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timeout waiting for {what}")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return proc.returncode == -signal.SIGKILL  # else it ended by itself between the poll and the kill


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def files(folder: Path) -> list[Path]:
    """The files under `folder` now; a writer may remove folders while we walk: then look again."""
    for _ in range(100):
        try:
            return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
        except FileNotFoundError:
            continue
    return []


# ---- stage 1 -------------------------------------------------------------------------------------

def stage1_config(teacher, folder: Path, name: str):
    """512 samples x 18 views in 16 shards of one 32-sample chunk: a run long enough to be killed part-way."""
    cfg = load_config(SMOKE, {"teacher": {"checkpoint": str(teacher)}, "dataset": {"options": {"num_samples": 512}},
                              "views": {"views": "all"},
                              "cache": {"store": str(folder / f"{name}.zarr"), "batch_size": 64,
                                        "samples_per_chunk": 32, "chunks_per_shard": 1}})
    return Path(cfg["cache"]["store"]), write_config(cfg, folder / f"{name}.yaml")


@pytest.fixture(scope="module")
def stage1_reference(tmp_path_factory, teacher_ckpt):
    folder = tmp_path_factory.mktemp("faults_stage1")
    path, config = stage1_config(teacher_ckpt, folder, "reference")
    finish(kdcache("cache-teacher", "--config", config))
    store = CacheStore.open(path)
    return {name: store.group[name][:] for name in ("logits", "views", "labels")} | {"manifest": store.manifest}


def done_records(path: Path, parity: int | None = None) -> int:
    """Shards recorded done: shard_done chunk files `c/<shard>` (one per shard, written only when set to 1;
    zarr writes each file as `<name>.<uuid>.partial` first, then renames it), optionally of one parity."""
    names = [p.name for p in files(path / "shard_done" / "c") if p.name.isdigit()]
    return sum(parity is None or int(n) % 2 == parity for n in names)


def check_stage1(path: Path, ref: dict) -> str:
    """Nothing complete early: every shard recorded done holds exactly the reference's rows; the status
    says complete only when every shard is done. Returns the state found, for the message."""
    if not (path / "zarr.json").exists():
        return "no store yet"
    store = CacheStore.open(path)
    done = store.done()
    assert store.status == "incomplete" or (store.status == "complete" and done.all())
    for s in np.flatnonzero(done):
        rows = store.shard_rows(s)
        for name in ("logits", "views", "labels"):
            np.testing.assert_array_equal(store.group[name][rows], ref[name][rows], err_msg=f"{name} of shard {s}")
    return f"{int(done.sum())}/{store.num_shards} shards done, status {store.status}"


def assert_equal_to_reference(path: Path, ref: dict):
    store = CacheStore.open(path)
    assert store.status == "complete" and store.done().all()
    for name in ("logits", "views", "labels"):
        np.testing.assert_array_equal(store.group[name][:], ref[name], err_msg=name)
    drop = lambda m: {k: v for k, v in m.items() if k != "software"}  # noqa: E731
    assert drop(store.manifest) == drop(ref["manifest"])


def test_stage1_killed_at_three_points_resumes_to_the_uninterrupted_store(tmp_path, teacher_ckpt, stage1_reference):
    path, config = stage1_config(teacher_ckpt, tmp_path, "killed")
    shards = 512 // 32
    points = [
        ("while the store is being created",  # or just after, when the creation was faster than a poll
         lambda t0: any(tmp_path.glob(".killed.zarr.creating-*")) or (path / "zarr.json").exists()),
        ("when the first shard's data file appears",
         lambda t0: any(".partial" not in p.name for p in files(path / "logits" / "c"))),
        ("when every shard is recorded done, before the status flips", lambda t0: done_records(path) == shards),
    ]
    states = []
    for i, (what, reached) in enumerate(points):
        killed = kill_when(lambda: kdcache("cache-teacher", "--config", config), reached, what,
                           may_finish=i == len(points) - 1)
        states.append(f"{what}: {check_stage1(path, stage1_reference)}" + ("" if killed else " (run ended first)"))
    store = CacheStore.open(path)
    done_before = np.flatnonzero(store.done())
    stamps = {s: (path / "logits" / "c" / str(s) / "0" / "0").stat().st_mtime_ns for s in done_before}

    finish(kdcache("cache-teacher", "--config", config))
    assert_equal_to_reference(path, stage1_reference)
    for s, stamp in stamps.items():  # shards finished before the kill were not computed again
        assert (path / "logits" / "c" / str(s) / "0" / "0").stat().st_mtime_ns == stamp
    print("\n".join(states))


def test_stage1_one_of_two_processes_killed(tmp_path, teacher_ckpt, stage1_reference):
    """Two processes share the store; one is killed half-way through its shards, the other finishes:
    the store stays incomplete (the survivor must not flip the status) until the killed one is re-run."""
    path, config = stage1_config(teacher_ckpt, tmp_path, "shared")
    other = kdcache("cache-teacher", "--config", config, "--num-shards", 2, "--shard-index", 1)
    kill_when(lambda: kdcache("cache-teacher", "--config", config, "--num-shards", 2, "--shard-index", 0),
              lambda t0: done_records(path, parity=0) >= 4, "process 0 recorded half of its 8 shards")
    finish(other)
    check_stage1(path, stage1_reference)
    store = CacheStore.open(path)
    done = store.done()
    assert store.status == "incomplete" and done[1::2].all() and not done[0::2].all()

    finish(kdcache("cache-teacher", "--config", config, "--num-shards", 2, "--shard-index", 0))
    assert_equal_to_reference(path, stage1_reference)


# ---- stage 2 -------------------------------------------------------------------------------------

def stats_store(path: Path) -> str:
    """A complete store of random logits (no teacher needed): 8192 samples x 8 views x 50 classes in
    4 shards, big enough that computing every statistic takes about a second."""
    rng = np.random.default_rng(0)
    n, v, k = 8192, 8, 50
    store = CacheStore.create(path, {"test": "faults", "logits": {"dtype": "float16"}}, num_samples=n, num_views=v, num_classes=k, num_params=1,
                              samples_per_chunk=256, chunks_per_shard=8)
    for s in range(store.num_shards):
        rows = store.shard_rows(s)
        m = rows.stop - rows.start
        store.write_shard(s, rng.normal(0, 3, (m, v, k)).astype(np.float16), np.zeros((m, v, 1), np.int32),
                          rng.integers(0, k, m).astype(np.int32))
    assert store.mark_complete_if_done()
    return str(path)


ALL = dict(DEFAULTS["stats"])  # what `kdcache stats STORE` computes: every statistic, gammas 0.1 and 0.3


def stat_arrays(path) -> dict:
    group = zarr.open_group(str(path), mode="r")["stats"]
    return {name: group[name] for name in group.array_keys()}


def check_stage2(path) -> str:
    """Every stats array either carries its fingerprint (finished: read_stat hands it out) or has none and
    read_stat refuses it as interrupted."""
    store = CacheStore.open(path)
    fresh, refused = 0, 0
    for name, a in stat_arrays(path).items():
        attrs = a.attrs.asdict()
        if "logits_fingerprint" in attrs:
            assert read_stat(store, attrs["statistic"], **attrs["params"]).shape == a.shape
            fresh += 1
        else:
            with pytest.raises(UserError, match="incomplete"):
                read_stat(store, attrs["statistic"], **attrs["params"])
            refused += 1
    return f"{fresh} arrays with a fingerprint, {refused} without (refused by read_stat)"


@pytest.fixture(scope="module")
def stats_reference(tmp_path_factory):
    """Every statistic of a random-logits store, computed without interruption."""
    ref = stats_store(tmp_path_factory.mktemp("faults_stage2") / "reference.zarr")
    compute_stats(ref, ALL, progress=False)
    return ref


def assert_same_stats(ref_root, root):
    a, b = stat_arrays(ref_root), stat_arrays(root)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
        assert a[name].attrs.asdict() == b[name].attrs.asdict()


def test_stage2_killed_at_three_points_keeps_finished_arrays_and_resumes(tmp_path, stats_reference):
    path = stats_store(tmp_path / "killed.zarr")
    early = dict(ALL, statistics=["mean", "entropy"])  # finished before the kills
    compute_stats(path, early, progress=False)
    stats = Path(path) / "stats"
    kept = {p: p.stat().st_mtime_ns for name in ("mean", "entropy") for p in files(stats / name)}

    def new(paths, t0):  # written by this run, not an earlier one (files may vanish while we look)
        found = []
        for p in paths:
            try:
                if p.stat().st_mtime > t0:
                    found.append(p)
            except FileNotFoundError:
                pass
        return found

    def metadata(t0):
        return new([p for p in stats.glob("*/zarr.json") if p.parent.name not in ("mean", "entropy")], t0)

    def chunks(t0):
        return new([f for f in files(stats) if "/c/" in f.as_posix() and ".partial" not in f.name
                    and f.parts[len(stats.parts)] not in ("mean", "entropy")], t0)

    def fingerprinted(t0):
        for p in metadata(t0):
            try:
                if "logits_fingerprint" in p.read_text():
                    return True
            except FileNotFoundError:
                pass
        return False

    points = [("output arrays created, before their first chunk", metadata),
              ("some output shards written", chunks),
              ("fingerprints being written", fingerprinted)]
    states = []
    for what, reached in points:
        killed = kill_when(lambda: kdcache("stats", path), reached, what, may_finish=what.startswith("fingerprints"))
        states.append(f"{what}: {check_stage2(path)}" + ("" if killed else " (run ended first)"))
        assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished arrays untouched

    done = CliRunner().invoke(cli, ["stats", path])
    assert done.exit_code == 0, done.output
    assert "already up to date" in done.output
    assert_same_stats(stats_reference, path)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    print("\n".join(states))


def test_stage2_overlay_killed_while_created_and_mid_compute(tmp_path, stats_reference):
    """`kdcache stats STORE --out OVERLAY` (a consumer of a shared store): killed right as the overlay
    appears, then part-way; the store itself is never written, and the overlay ends as the store's own
    statistics would."""
    path = stats_store(tmp_path / "shared.zarr")
    overlay = tmp_path / "overlay.zarr"
    before = {p: p.stat().st_mtime_ns for p in files(Path(path))}
    points = [("the overlay's zarr.json appears", lambda t0: (overlay / "zarr.json").exists()),
              ("some output shards written into the overlay",
               lambda t0: any("/c/" in f.as_posix() and ".partial" not in f.name for f in files(overlay / "stats")))]
    store = CacheStore.open(path)
    for what, reached in points:
        kill_when(lambda: kdcache("stats", path, "--out", overlay), reached, what)
        if (overlay / "zarr.json").exists():  # never an overlay without its attributes (no later run could use it)
            attrs = json.loads((overlay / "zarr.json").read_text())["attributes"]
            assert attrs["format"] == "kdcache-stats-overlay" and attrs["cache_fingerprint"] == store.fingerprint()
        with pytest.raises(UserError, match="no statistics overlay|has no|incomplete"):
            read_stat(store, "entropy", overlay=overlay)
    done = CliRunner().invoke(cli, ["stats", path, "--out", str(overlay)])
    assert done.exit_code == 0, done.output
    assert_same_stats(stats_reference, overlay)
    assert {p: p.stat().st_mtime_ns for p in files(Path(path))} == before  # the shared store untouched


# ---- stage 3 -------------------------------------------------------------------------------------

# The CLI with a hook that touches MARKS/<epoch>-<step> after every optimiser step (train_student's on_step):
# the file-system observable of "the run is in the middle of an epoch". It changes nothing else.
HOOKED = """
import pathlib, sys
import kdcache.stages.train_student as stage
from kdcache.stages.cli import main
marks = pathlib.Path(sys.argv.pop(1))
marks.mkdir(parents=True, exist_ok=True)
train = stage.train_student
def train_student(cfg, **kw):
    return train(cfg, on_step=lambda i: (marks / f"{i['epoch']}-{i['step']}").touch(), **kw)
stage.train_student = train_student
main()
"""


def kdcache_marked(marks: Path, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", HOOKED, str(marks), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


TIMING = ("epoch_seconds", "eval_seconds", "samples_per_second")


def metrics_lines(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def check_stage3(out: Path, ref_metrics: list, final: bool) -> str:
    """Nothing complete early: no result.json or student.pt before the end; the checkpoint (atomic) holds
    k finished epochs equal to the uninterrupted run's first k; metrics.jsonl has k lines (k-1 when the
    kill fell between the checkpoint's rename and the metrics file's)."""
    if not final:
        assert not (out / "result.json").exists() and not (out / "student.pt").exists()
    if not (out / "checkpoint.pt").exists():
        assert not metrics_lines(out)
        return "no checkpoint yet"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    k = state["epoch"]
    assert without_timing(state["metrics"]) == without_timing(ref_metrics[:k])
    lines = metrics_lines(out)
    assert len(lines) in (k - 1, k) and without_timing(lines) == without_timing(ref_metrics[:len(lines)])
    return f"checkpoint after epoch {k}, {len(lines)} metrics lines, result.json {(out / 'result.json').exists()}"


def test_stage3_killed_at_three_points_resumes_to_the_uninterrupted_run(tmp_path, train_store_cfg):
    cfg = json.loads(json.dumps(train_store_cfg))
    epochs = 3
    cfg["train"].update(epochs=epochs, batch_size=8)  # 16 steps per epoch
    config = write_config(cfg, tmp_path / "train.yaml")
    finish(kdcache("train", "--config", config, "--out", tmp_path / "full"))
    full = tmp_path / "full"
    ref = torch.load(full / "checkpoint.pt", weights_only=True)

    out = tmp_path / "killed"
    points = [
        ("mid-epoch 1 (after step 3), before any checkpoint", "0-3"),
        (f"during the last epoch (after step 3 of epoch {epochs})", f"{epochs - 1}-3"),
        ("after the last epoch's checkpoint, before result.json", lambda t0: len(metrics_lines(out)) == epochs),
    ]
    states = []
    for i, (what, reached) in enumerate(points):
        marks = tmp_path / f"marks{i}"
        if isinstance(reached, str):
            reached = (lambda mark: lambda t0: mark.exists())(marks / reached)
        last = i == len(points) - 1
        killed = kill_when(lambda: kdcache_marked(marks, "train", "--config", config, "--out", out), reached, what,
                           may_finish=last)
        states.append(f"{what}: {check_stage3(out, ref['metrics'], final=last)}" + ("" if killed else " (run ended first)"))

    finish(kdcache("train", "--config", config, "--out", out))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == ref["epoch"] == epochs
    for k, v in ref["model"].items():
        assert torch.equal(v, state["model"][k]), k
    assert without_timing(state["metrics"]) == without_timing(ref["metrics"])
    assert without_timing(metrics_lines(out)) == without_timing(metrics_lines(full))
    a, b = (torch.load(d / "student.pt", weights_only=True) for d in (full, out))
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (full, out))
    for key in ("last_accuracy", "best_accuracy", "best_epoch", "epochs", "store_fingerprint"):
        assert ra[key] == rb[key], key
    print("\n".join(states))
