"""Stage 3 on several processes: torchrun + DistributedDataParallel (gloo on CPU) trains the student that one
process trains with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcache.errors import UserError
from kdcache.stages.train_student import train_student
from tests.conftest import REPO, write_config


def run_config(train_store_cfg, tmp_path, name, **train):
    cfg = json.loads(json.dumps(train_store_cfg))
    # an MLP student: no batch norm, whose statistics would differ between a half batch and the whole one
    cfg["train"].update({"student": "fmnist_mlp", "method": "kd", "epochs": 2, "batch_size": 32,
                         "out": str(tmp_path / name), **train})
    return cfg


@pytest.mark.slow
def test_two_processes_train_the_student_one_process_trains(train_store_cfg, tmp_path):
    """Each rank replays its share of the views in a DataLoader worker (train.workers 1), the one process in
    itself."""
    one = train_student(run_config(train_store_cfg, tmp_path, "one"), progress=False)
    cfg = run_config(train_store_cfg, tmp_path, "two", workers=1)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "--no-python", sys.executable, "-m",
                           "kdcache.stages.cli", "train", "--config", write_config(cfg, tmp_path / "two.yaml")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    a = torch.load(tmp_path / "one" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two" / "student.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:  # gradients averaged by all-reduce: equal up to float rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(m1, m2, strict=True):  # every rank's samples counted once
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["train_accuracy"] == y["train_accuracy"] and x["test_accuracy"] == y["test_accuracy"]


def test_a_batch_that_does_not_split_evenly_is_refused(train_store_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # refused before any process group is started
    with pytest.raises(UserError, match="batch_size 32 must be a multiple of the 3 processes"):
        train_student(run_config(train_store_cfg, tmp_path, "three"), progress=False)


@pytest.mark.slow
def test_each_rank_ends_the_process_group_it_started(train_store_cfg, tmp_path):
    """After train_student under torchrun no process group is left (a started one is kept: the caller's)."""
    config = write_config(run_config(train_store_cfg, tmp_path, "ended", epochs=1), tmp_path / "ended.yaml")
    check = ("import os, sys, torch.distributed as dist\n"
             "from kdcache.config import load_config\n"
             "from kdcache.stages.train_student import train_student\n"
             "rank = int(os.environ['RANK'])\n"
             "dist.init_process_group('gloo', store=dist.FileStore(sys.argv[2] + '.store', 2), rank=rank, world_size=2)\n"
             "train_student(load_config(sys.argv[1], {'train': {'out': sys.argv[2]}}), progress=False)\n"
             "assert dist.is_initialized(), 'the caller\\'s process group was destroyed'\n"
             "dist.destroy_process_group()\n"
             "train_student(load_config(sys.argv[1]), progress=False)\n"
             "assert not dist.is_initialized(), 'the process group is still up'\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "--no-python", sys.executable, "-c", check, config,
                           str(tmp_path / "own")], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
