"""Shared fixtures: the smoke configuration (synthetic data, tiny teacher) with paths under tmp."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdcache.config import load_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke" / "synthetic.yaml"


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """The smoke teacher, trained once per session by stage 0."""
    from kdcache.stages.train_teacher import train_teacher
    path = tmp_path_factory.mktemp("teacher") / "tiny_teacher.pt"
    cfg = load_config(SMOKE, {"teacher": {"checkpoint": str(path)}})
    train_teacher(cfg, progress=False)
    return path


@pytest.fixture
def smoke_cfg(tmp_path, teacher_ckpt):
    """A fresh copy of the smoke config writing under tmp_path, with the trained teacher."""
    return load_config(SMOKE, {"teacher": {"checkpoint": str(teacher_ckpt)},
                               "cache": {"store": str(tmp_path / "cache.zarr")}})


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(copy.deepcopy(cfg)))
    return path


def kdcache(*args, **kw) -> subprocess.Popen:
    """Start the real CLI in a subprocess (as a user would run it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", "from kdcache.stages.cli import main; main()", *map(str, args)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="session")
def train_store_cfg(tmp_path_factory, teacher_ckpt):
    """The smoke train config (configs/smoke/train.yaml) with its store built and stage-2 statistics computed."""
    from kdcache.stages.cache_teacher import cache_teacher
    from kdcache.stages.compute_stats import compute_stats
    tmp = tmp_path_factory.mktemp("train_store")
    cfg = load_config(REPO / "configs" / "smoke" / "train.yaml",
                      {"teacher": {"checkpoint": str(teacher_ckpt)}, "cache": {"store": str(tmp / "cache.zarr")}})
    cache_teacher(cfg, progress=False)
    compute_stats(cfg["cache"]["store"], cfg["stats"], progress=False)
    return cfg


def image_folder(root: Path, counts: dict) -> Path:
    """root/images/{train,val}/<class>/<k>.png, RGB images of different sizes (counts: class -> images per split),
    and root/teacher.pt, a tiny_teacher for those classes with a recorded test accuracy (stage 1 cannot measure
    it on a folder). Returns the checkpoint's path."""
    import torch
    from torchvision.io import write_png

    from kdcache.models import build_model, save_checkpoint
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls, n in counts.items():
            (root / "images" / split / cls).mkdir(parents=True)
            for k in range(n):
                img = torch.randint(0, 256, (3, 20 + k, 24 + 3 * k), dtype=torch.uint8, generator=g)
                write_png(img, str(root / "images" / split / cls / f"{k}.png"))
    torch.manual_seed(0)
    save_checkpoint(root / "teacher.pt", build_model("tiny_teacher", len(counts), 3), arch="tiny_teacher",
                    num_classes=len(counts), in_channels=3, meta={"test_accuracy": 0.5})
    return root / "teacher.pt"
