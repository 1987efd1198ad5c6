"""The writer lock: a second writer is refused with who holds the store, one job's processes share it,
stale locks of dead processes are taken over, and locks are released on errors too."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kdcache.stages.cli import cli
from kdcache.errors import UserError
from kdcache.sharing import held_locks, writer_lock
from kdcache.store import CacheStore
from kdcache.stages.cache_teacher import cache_teacher
from tests.conftest import kdcache, write_config


@pytest.fixture
def live_pid():
    """The pid of a running process: a lock holder that is alive."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_lock(store, name, pid, host=None, job=None, command="kdcache cache-teacher --config other.yaml"):
    """Write a lock as docs/FORMAT.md describes it: what another kdcache process holding it wrote."""
    folder = Path(store) / "locks" / name
    folder.mkdir(parents=True)
    (folder.parent / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    (folder / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "kdcache_lock": {"host": host or socket.gethostname(), "pid": pid, "job": job, "command": command,
                         "started": "2026-11-22T09:00:00+00:00"}}}))


def invoke(*args):
    """(exit code, output) of the CLI in-process; errors are one line, never a traceback."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output.strip()


@pytest.fixture
def half_store(smoke_cfg, tmp_path):
    """A store with shard-index 1 of 2 done (its job's other process has yet to run); (config file, store)."""
    config = write_config(smoke_cfg, tmp_path / "c.yaml")
    code, out = invoke("cache-teacher", "--config", config, "--num-shards", 2, "--shard-index", 1)
    assert code == 0, out
    return config, smoke_cfg["cache"]["store"]


def test_second_writer_is_refused_with_who_holds_the_store(half_store, live_pid):
    config, store = half_store
    plant_lock(store, "cache-teacher-0-of-1", live_pid)
    code, out = invoke("cache-teacher", "--config", config)
    assert code == 1
    assert out.splitlines()[-1] == (
        f"Error: {store} is being written by another process: locks/cache-teacher-0-of-1 held by pid {live_pid} on "
        f"{socket.gethostname()} since 2026-11-22T09:00:00+00:00 (kdcache cache-teacher --config other.yaml); wait "
        f"for it to finish, or if that process is gone, delete {store}/locks/cache-teacher-0-of-1 and retry")
    assert CacheStore.open(store).status == "incomplete"  # nothing written
    assert (Path(store) / "locks" / "cache-teacher-0-of-1").exists()  # and the holder's lock left alone


def test_a_dead_processs_lock_is_taken_over(half_store):
    config, store = half_store
    pid = dead_pid()  # e.g. a SIGKILLed stage 1
    plant_lock(store, "cache-teacher-0-of-1", pid)
    code, out = invoke("cache-teacher", "--config", config)
    assert code == 0, out
    assert f"warning: taking over the stale lock locks/cache-teacher-0-of-1 of pid {pid}" in out  # on stderr
    assert CacheStore.open(store).status == "complete" and held_locks(store) == {}


def test_a_lock_from_another_host_is_never_taken_over(half_store):
    config, store = half_store
    plant_lock(store, "stats", 1, host="gpu-node-7")
    code, out = invoke("cache-teacher", "--config", config)
    assert code == 1 and "locks/stats held by pid 1 on gpu-node-7" in out
    assert f"delete {store}/locks/stats and retry" in out


def test_processes_of_one_job_share_the_store_and_other_jobs_are_refused(half_store, live_pid):
    """--num-shards 2: process 0 runs while process 1 holds its lock; a job cut into 3 is another job."""
    config, store = half_store
    plant_lock(store, "cache-teacher-1-of-2", live_pid, job="cache-teacher-of-2")
    code, out = invoke("cache-teacher", "--config", config, "--num-shards", 3, "--shard-index", 0)
    assert code == 1 and "locks/cache-teacher-1-of-2 held by pid" in out
    code, out = invoke("cache-teacher", "--config", config, "--num-shards", 2, "--shard-index", 1)
    assert code == 1 and "locks/cache-teacher-1-of-2 held by pid" in out  # the same shard index twice
    code, out = invoke("cache-teacher", "--config", config, "--num-shards", 2, "--shard-index", 0)
    assert code == 0, out
    assert CacheStore.open(store).status == "complete"
    assert list(held_locks(store)) == ["cache-teacher-1-of-2"]  # only the (planted) other process's


def test_overwrite_is_refused_while_another_process_writes(half_store, live_pid):
    config, store = half_store
    plant_lock(store, "cache-teacher-1-of-2", live_pid, job="cache-teacher-of-2")
    code, out = invoke("cache-teacher", "--config", config, "--overwrite")
    assert code == 1 and "locks/cache-teacher-1-of-2 held by pid" in out
    assert CacheStore.open(store).done().sum() > 0  # not deleted


def test_stats_is_refused_while_another_writer_holds_the_store(smoke_cfg, tmp_path, live_pid):
    store = cache_teacher(smoke_cfg, progress=False).path
    plant_lock(store, "stats", live_pid, command="kdcache stats")
    code, out = invoke("stats", store, "--stat", "entropy")
    assert code == 1 and f"locks/stats held by pid {live_pid}" in out and "(kdcache stats)" in out
    assert "stats" not in CacheStore.open(store).group
    code, out = invoke("cache-teacher", "--config", write_config(smoke_cfg, tmp_path / "c.yaml"))
    assert code == 1 and f"locks/stats held by pid {live_pid}" in out  # stage 1 is kept out too

    shutil.rmtree(Path(store) / "locks" / "stats")
    plant_lock(store, "cache-teacher-0-of-1", live_pid, job="cache-teacher-of-1")
    code, out = invoke("stats", store, "--stat", "entropy")
    assert code == 1 and "locks/cache-teacher-0-of-1 held by pid" in out


def test_stats_into_an_overlay_locks_the_overlay(smoke_cfg, live_pid, tmp_path):
    store = cache_teacher(smoke_cfg, progress=False).path
    overlay = tmp_path / "overlay.zarr"
    code, out = invoke("stats", store, "--stat", "entropy", "--out", overlay)
    assert code == 0 and held_locks(str(overlay)) == {}, out
    plant_lock(overlay, "stats", live_pid, command="kdcache stats")
    code, out = invoke("stats", store, "--stat", "margin", "--out", overlay)
    assert code == 1 and f"{overlay} is being written by another process: locks/stats" in out


def test_lock_is_released_when_the_writer_fails(smoke_cfg, tmp_path):
    store = cache_teacher(smoke_cfg, progress=False).path
    with pytest.raises(ValueError), writer_lock(store, "stats"):
        assert list(held_locks(store)) == ["stats"]
        raise ValueError("the stage fails")
    assert held_locks(store) == {}
    assert not (Path(store) / "locks" / "stats").exists()


def test_exactly_one_of_many_racing_writers_gets_the_lock(smoke_cfg):
    store = cache_teacher(smoke_cfg, progress=False).path
    start, inside, results = threading.Barrier(8), threading.Event(), []

    def writer():
        start.wait()
        try:
            with writer_lock(store, "stats"):
                results.append("held")
                inside.wait(5)  # hold it until every other writer has tried
        except UserError:
            results.append("refused")
            if results.count("refused") == 7:
                inside.set()

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["held"] + ["refused"] * 7
    assert held_locks(store) == {}


@pytest.mark.slow
def test_stage1_twice_on_the_same_store_runs_once(smoke_cfg, tmp_path):
    """A real second stage-1 job started while the first runs is refused; the first completes undisturbed."""
    cfg = json.loads(json.dumps(smoke_cfg))
    cfg["dataset"]["options"]["num_samples"] = 1024
    cfg["views"]["views"] = "all"
    cfg["cache"].update(samples_per_chunk=32, chunks_per_shard=1, batch_size=64)
    config = write_config(cfg, tmp_path / "c.yaml")
    first = kdcache("cache-teacher", "--config", config)
    lock = Path(cfg["cache"]["store"]) / "locks" / "cache-teacher-0-of-1" / "zarr.json"
    while not lock.exists():
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.01)
    code, out = invoke("cache-teacher", "--config", config)
    assert code == 1 and f"held by pid {first.pid}" in out and "cache-teacher --config" in out
    assert first.wait() == 0, first.stderr.read()
    store = CacheStore.open(cfg["cache"]["store"])
    assert store.status == "complete" and store.done().all() and held_locks(store.path) == {}
    assert np.isfinite(store.logits[...].astype(np.float32)).all()
