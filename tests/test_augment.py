"""Fresh augmentation, a fixed subset of K cached views, and validation on held-out training images."""
import json
from pathlib import Path

import numpy as np
import pytest

from kdcache.data import holdout, load_dataset
from kdcache.errors import UserError
from kdcache.views import ViewSpace
from kdcache.dataset import epoch_views, view_subset
from kdcache.stages.train_student import train_student
from tests.test_train_student import run as steps_of  # (result, per-step records) of a run with overrides


@pytest.fixture
def cfg(train_store_cfg, tmp_path):
    c = json.loads(json.dumps(train_store_cfg))
    c["train"]["out"] = str(tmp_path / "run")
    return c


def test_view_subset_is_fixed_nested_and_random_per_sample():
    a = view_subset(500, 50, 4, views_seed=0)
    assert a.shape == (500, 4) and ((0 <= a) & (a < 50)).all()
    assert all(len(set(row)) == 4 for row in a.tolist())             # distinct views
    np.testing.assert_array_equal(view_subset(500, 50, 2, 0), a[:, :2])  # nested: K=2 holds K=1's view
    assert len(np.unique(a[:, 0])) > 40                               # not the same view for every sample
    assert (view_subset(500, 50, 4, views_seed=1) != a).any()         # a property of the store's views seed


def test_views_used_restricts_every_epoch_to_the_subset(cfg):
    """K = 2 of 18 cached views: over 6 epochs each sample sees exactly its 2 subset views."""
    cfg["train"]["batch_size"] = 64
    result, steps = steps_of(cfg, method="kd", epochs=6, views_used=2)
    seen = {}
    for s in steps:
        for i, v in zip(s["ids"].tolist(), s["views"].tolist()):
            seen.setdefault(i, set()).add(v)
    allowed = view_subset(128, 18, 2, views_seed=cfg["views"].get("seed", 0))
    assert all(seen[i] == set(allowed[i].tolist()) for i in range(128))
    assert result["views_used"] == 2 and result["augment"] == "cached"


def test_fresh_views_come_from_the_whole_space_and_are_reproducible(cfg, tmp_path):
    """CE with fresh augmentation: views differ between epochs and seeds, cover more than the 18
    cached ones' share, and a re-run gives the same losses (a pure function of seed and epoch)."""
    cfg["views"]["views"] = 2  # the config caches 2 views per sample; fresh draws ignore that
    cfg["train"]["batch_size"] = 128
    _, a = steps_of(cfg, method="ce", epochs=3, augment="fresh")
    assert all((s["views"] == -1).all() for s in a)
    cfg["train"]["out"] = str(tmp_path / "again")
    result, b = steps_of(cfg, method="ce", epochs=3, augment="fresh")
    assert [s["loss"] for s in a] == [s["loss"] for s in b]
    assert result["augment"] == "fresh" and result["targets"] == "live, fresh views"
    space = ViewSpace.from_config(cfg["views"], (16, 16))
    keys = [space.random_params(np.arange(128), e, (16, 16)) for e in range(3)]
    assert any((keys[0] != keys[1]).any(axis=1))
    cfg["train"]["out"] = str(tmp_path / "cached")
    _, c = steps_of(cfg, method="ce", epochs=3, augment="cached")
    assert [s["loss"] for s in a] != [s["loss"] for s in c]


def test_online_kd_with_fresh_views_trains(cfg):
    result, steps = steps_of(cfg, method="kd", epochs=1, online=True, augment="fresh")
    assert result["mode"] == "online" and np.isfinite([s["kd"] for s in steps]).all()
    assert all(s["kd"] > 0 for s in steps)


@pytest.mark.parametrize("train, message", [
    ({"method": "kd", "augment": "fresh"}, "holds no targets"),
    ({"method": "ce", "augment": "fresh", "views_used": 2}, "drop one"),
    ({"method": "kd", "views_used": 19}, "more than the 18 views"),
    ({"method": "kd", "views_used": 0}, "views_used"),
    ({"method": "kd", "augment": "random"}, "augment"),
    ({"method": "ce", "validation": 200}, "dataset.subset to at most 56"),
])
def test_refusals(cfg, train, message):
    cfg["train"].update(train)
    with pytest.raises(UserError, match=message):
        train_student(cfg, progress=False)
    assert not Path(cfg["train"]["out"], "result.json").exists()


def test_validation_evaluates_on_the_held_out_training_images(cfg):
    cfg["dataset"]["subset"] = 128
    result, _ = steps_of(cfg, method="ce", epochs=1, validation=100)
    assert result["evaluated_on"] == "validation: training images 156..255"
    d = cfg["dataset"]
    full = load_dataset(d["name"], "train", **d["options"])
    val = holdout(full, 100, 128)
    np.testing.assert_array_equal(val.labels, full.labels[156:])
    with pytest.raises(UserError, match="at most 156"):
        holdout(full, 100, 157)


def test_epoch_views_cover_the_subset_before_repeating():
    v = np.stack([epoch_views(50, 4, 0, e) for e in range(4)], axis=1)
    assert all(sorted(row) == [0, 1, 2, 3] for row in v.tolist())


def test_cli_options_set_the_modes(cfg, tmp_path):
    from click.testing import CliRunner

    from kdcache.stages.cli import cli
    from tests.conftest import write_config
    path = write_config(cfg, tmp_path / "c.yaml")
    r = CliRunner().invoke(cli, ["train", "--config", str(path), "--augment", "fresh", "--views-used", "2"])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith("Error: train.views_used picks")
    r = CliRunner().invoke(cli, ["train", "--config", str(path), "--views-used", "3", "--epochs", "1",
                                 "--out", str(tmp_path / "k3")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "k3" / "result.json").read_text())["views_used"] == 3
