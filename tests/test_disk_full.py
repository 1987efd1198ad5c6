"""A full disk, for real: each stage writes onto a small tmpfs mounted for the test (skipped where mounting
is not permitted), ends in one `Error:` line naming the path and what was kept, marks nothing complete,
leaves no temporary file, and resumes to the end once space is freed (the tmpfs is grown)."""
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import SMOKE, write_config
from tests.test_bad_input import run


@pytest.fixture
def small_disk(tmp_path):
    """mount(size): a tmpfs of `size` bytes at tmp_path/disk; grow(size) frees space; unmounted at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(disk)
        return disk

    def grow(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield mount, grow
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


def leftovers(folder: Path) -> list:
    """Temporary files of an interrupted write: ours (.NAME.*.tmp), zarr's (*.partial), store creation."""
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".creating-" in p.name]


def one_error_line(code, lines, error, crashed) -> str:
    assert crashed is None, crashed
    assert code == 1 and lines and lines[-1] == error, lines
    assert sum(line.startswith("Error:") for line in lines) == 1, lines
    assert "no space left on the device of" in error, error
    return error


def test_stage1_disk_full_keeps_the_recorded_shards_and_resumes(small_disk, tmp_path, teacher_ckpt):
    mount, grow = small_disk
    disk = mount(160 * 1024)  # the empty store and a few shards, not all 16
    from kdcache.config import load_config
    cfg = load_config(SMOKE, {"teacher": {"checkpoint": str(teacher_ckpt)},
                              "cache": {"store": str(disk / "cache.zarr"), "samples_per_chunk": 16}})
    config = write_config(cfg, tmp_path / "c.yaml")
    error = one_error_line(*run(["cache-teacher", "--config", config]))
    assert str(disk / "cache.zarr") in error and "shards are written and recorded done" in error
    from kdcache.store import CacheStore
    store = CacheStore.open(disk / "cache.zarr")
    assert store.status == "incomplete" and 0 < store.done().sum() < store.num_shards, error
    assert not leftovers(disk) and not (disk / "cache.zarr" / "locks" / "cache-teacher-0-of-1").exists()
    grow(8 * 2**20)
    code, lines, _, crashed = run(["cache-teacher", "--config", config])
    assert code == 0 and crashed is None, lines
    assert CacheStore.open(disk / "cache.zarr").status == "complete" and not leftovers(disk)


def test_stage2_disk_full_keeps_finished_statistics_and_resumes(small_disk, train_store_cfg):
    mount, grow = small_disk
    disk = mount(48 * 1024)  # the overlay and a few statistics arrays
    store = train_store_cfg["cache"]["store"]
    args = ["stats", store, "--out", disk / "overlay.zarr", "--stat", "all"]
    error = one_error_line(*run(args))
    assert str(disk / "overlay.zarr") in error and "statistics finished before are kept" in error
    assert not leftovers(disk)
    grow(8 * 2**20)
    code, lines, _, crashed = run(args)
    assert code == 0 and crashed is None, lines
    from kdcache.stages.compute_stats import read_stat
    from kdcache.store import CacheStore
    assert read_stat(CacheStore.open(store), "entropy", overlay=str(disk / "overlay.zarr")) is not None


def test_stage3_disk_full_keeps_the_last_checkpoint_and_resumes(small_disk, tmp_path, train_store_cfg):
    mount, grow = small_disk
    cfg = dict(train_store_cfg, train=dict(train_store_cfg["train"], out=str(tmp_path / "probe"), epochs=1))
    config = write_config(cfg, tmp_path / "c.yaml")
    assert run(["train", "--config", config])[0] == 0
    size = (tmp_path / "probe" / "checkpoint.pt").stat().st_size
    disk = mount(int(size * 1.6))  # one checkpoint fits, not its successor beside it
    error = one_error_line(*run(["train", "--config", config, "--out", disk / "run", "--epochs", "2"]))
    assert str(disk / "run") in error and "keeps its checkpoint of epoch 1" in error, error
    assert torch.load(disk / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not leftovers(disk) and not (disk / "run" / "result.json").exists()
    grow(64 * 2**20)
    code, lines, _, crashed = run(["train", "--config", config, "--out", disk / "run", "--epochs", "2"])
    assert code == 0 and crashed is None, lines
    assert (disk / "run" / "result.json").exists() and not leftovers(disk)
