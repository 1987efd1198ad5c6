"""Teachers and students from anywhere: `timm:NAME` and the user's own factory `python:package.module:callable`,
through stages 0, 1 and 3 with real stores, and their mistakes as one-line errors."""
import json
import sys

import pytest
import torch
import torch.nn as nn

from kdcache.errors import UserError
from kdcache.models import build_model, load_checkpoint, save_checkpoint
from kdcache.stages.cache_teacher import cache_teacher
from kdcache.stages.train_student import train_student
from kdcache.stages.train_teacher import train_teacher
from kdcache.store import CacheStore
from tests.test_bad_input import run

TIMM = "timm:resnet10t"  # a small timm CNN that takes 1-channel 16x16 images
FACTORY = "python:tests.test_model_sources:tiny_model"


def tiny_model(num_classes, in_channels, image_size):
    """The factory the tests name: a user's own model, built from the data set's shape."""
    assert image_size >= 1
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


NOT_CALLABLE = 5


def wrong_signature(classes):
    return nn.Linear(1, classes)


def not_a_module(num_classes, in_channels, image_size):
    return {"num_classes": num_classes}


# ---- building -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [TIMM, FACTORY])
def test_built_for_the_data_shape(name):
    model = build_model(name, num_classes=4, in_channels=1, image_size=16).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize("name", [TIMM, FACTORY])
def test_checkpoint_round_trip_records_the_architecture_string(tmp_path, name):
    model = build_model(name, 4, 1, image_size=16).eval()
    save_checkpoint(tmp_path / "m.pt", model, arch=name, num_classes=4, in_channels=1, image_size=16, meta={})
    loaded, info = load_checkpoint(tmp_path / "m.pt", arch=name, num_classes=4, in_channels=1)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert info["arch"] == name and torch.equal(loaded(x), model(x))
    with pytest.raises(UserError, match=f"checkpoint architecture is '{name}' but the config says 'tiny_teacher'"):
        load_checkpoint(tmp_path / "m.pt", arch="tiny_teacher")


def test_a_factory_in_the_working_directory(tmp_path, monkeypatch):
    """`kdcache` runs from .venv/bin: the user's folder is searched too (after the installed packages)."""
    (tmp_path / "kdcache_user_models.py").write_text(
        "import torch.nn as nn\n\nclass Net(nn.Linear):\n"
        "    def __init__(self, num_classes, in_channels, image_size):\n"
        "        super().__init__(in_channels * image_size ** 2, num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "kdcache_user_models", raising=False)
    assert build_model("python:kdcache_user_models:Net", 3, 1, image_size=4).out_features == 3


@pytest.mark.parametrize("name, message", [
    ("timm:resnet_of_doom", "timm:resnet_of_doom is not a timm model; see timm.list_models()"),
    ("python:tests.test_model_sources", "must be 'python:package.module:callable'"),
    ("python::tiny_model", "must be 'python:package.module:callable'"),
    ("python:tests.test_model_sources:tiny_model:x", "must be 'python:package.module:callable'"),
    ("python:no_such_package.models:net", "cannot import no_such_package.models (No module named 'no_such_package')"),
    ("python:tests.test_model_sources:nope", "module tests.test_model_sources has no attribute 'nope'"),
    ("python:tests.test_model_sources:NOT_CALLABLE", "must be callable as NOT_CALLABLE(num_classes=..."),
    ("python:tests.test_model_sources:wrong_signature", "must be callable as wrong_signature(num_classes=..."),
    ("python:tests.test_model_sources:not_a_module", "returned dict, not a torch.nn.Module"),
    ("timm_resnet10t", "or your own factory as 'python:package.module:callable'"),
])
def test_mistakes_are_one_line(name, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as e:
        build_model(name, 4, 1, image_size=16)
    assert "\n" not in str(e.value)


def test_a_timm_model_that_cannot_take_the_image_size_fails_at_build_in_one_line():
    """A ViT takes one input size (224 by default): the first training step would fail deep in timm."""
    with pytest.raises(UserError, match=r"model timm:vit_tiny_patch16_224 cannot take 16x16 images with 1 channel") as e:
        build_model("timm:vit_tiny_patch16_224", 4, 1, image_size=16)
    assert "\n" not in str(e.value)
    model = build_model(TIMM, 4, 1, image_size=16)  # a CNN pools: built, and left in training mode
    assert model.training


def test_without_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if it were not installed
    with pytest.raises(UserError, match=r"needs timm, which is not installed: pip install 'kdcache\[timm\]'"):
        build_model(TIMM, 4, 1)


# ---- through the stages -------------------------------------------------------------------------

def student_run(cfg, tmp_path, student, store):
    """cfg's stage 3 section set for one short KD epoch of `student` on `store`, writing under tmp_path."""
    cfg = json.loads(json.dumps(cfg))
    cfg["cache"]["store"] = str(store)
    cfg["train"].update(student=student, method="kd", epochs=1, batch_size=64, out=str(tmp_path / "run"))
    return cfg


def check_student(result, tmp_path, student):
    assert result["student"] == student and 0 <= result["last_accuracy"] <= 1
    saved, info = load_checkpoint(tmp_path / "run" / "student.pt", arch=student)
    assert info["arch"] == student and info["image_size"] == 16


def test_factory_teacher_and_timm_student_through_stages_0_1_3(smoke_cfg, tmp_path):
    cfg = json.loads(json.dumps(smoke_cfg))
    cfg["teacher"].update(arch=FACTORY, checkpoint=str(tmp_path / "factory.pt"), epochs=1)
    assert 0 <= train_teacher(cfg, progress=False) <= 1  # stage 0
    store = cache_teacher(cfg, progress=False)  # stage 1 rebuilds the factory model from the checkpoint
    assert store.status == "complete" and store.manifest["teacher"]["arch"] == FACTORY
    assert torch.isfinite(torch.from_numpy(store.logits[:].astype("float32"))).all()
    result = train_student(student_run(cfg, tmp_path, TIMM, store.path), progress=False)  # stage 3
    check_student(result, tmp_path, TIMM)
    assert result["teacher"]["arch"] == FACTORY


def test_timm_teacher_and_factory_student_through_stages_1_3(smoke_cfg, tmp_path):
    cfg = json.loads(json.dumps(smoke_cfg))
    ckpt = tmp_path / "timm.pt"
    save_checkpoint(ckpt, build_model(TIMM, 4, 1, image_size=16), arch=TIMM, num_classes=4, in_channels=1,
                    image_size=16, meta={"test_accuracy": None})  # a user's timm checkpoint
    cfg["teacher"].update(arch=TIMM, checkpoint=str(ckpt))
    store = cache_teacher(cfg, progress=False)
    assert store.status == "complete" and store.manifest["teacher"]["arch"] == TIMM
    code, lines, _, crashed = run(["verify", store.path, "--spot-check", "4", "--checkpoint", ckpt])
    assert code == 0 and crashed is None, lines  # the teacher rebuilt from the manifest gives the stored logits
    result = train_student(student_run(cfg, tmp_path, FACTORY, store.path), progress=False)
    check_student(result, tmp_path, FACTORY)
    assert CacheStore.open(store.path).manifest["teacher"]["arch"] == TIMM


def test_a_timm_student_from_the_command_line(train_store_cfg, tmp_path):
    """The smoke train config on its complete store, the student chosen with --set."""
    from tests.conftest import write_config
    path = write_config(train_store_cfg, tmp_path / "train.yaml")
    code, lines, _, crashed = run(["train", "--config", path, "--out", tmp_path / "run",
                                   "--set", f"train.student={TIMM}"])
    assert code == 0 and crashed is None, lines
    assert json.loads((tmp_path / "run" / "result.json").read_text())["config"]["train"]["student"] == TIMM


def test_a_bad_factory_is_one_error_line_before_any_work(smoke_cfg, tmp_path):
    from tests.conftest import write_config
    path = write_config(smoke_cfg, tmp_path / "c.yaml")
    code, lines, error, crashed = run(["train-teacher", "--config", path,
                                       "--set", "teacher.arch=python:tests.test_model_sources:not_a_module"])
    assert (code, crashed) == (1, None) and lines == [error] and "not a torch.nn.Module" in error
