"""Model zoo shapes and sizes, checkpoint round trips and every checkpoint error path."""

import hashlib
import os
import pickle
import random

import pytest
import torch

from kdcache.errors import UserError
from kdcache.models import (
    CHECKPOINT_FORMAT, MODEL_NAMES, build_model, file_sha256, load_checkpoint, save_checkpoint, select_device,
)

CIFAR_ZOO = ["resnet8x4", "resnet32x4", "resnet20", "resnet56", "wrn_16_2", "wrn_40_2", "vgg8", "vgg13"]
FMNIST_ZOO = ["fmnist_resnet", "fmnist_cnn", "fmnist_mlp", "tiny_teacher"]

# Parameter counts (millions, 100 classes) as published in the CRD / mdistiller tables.
PUBLISHED_MILLIONS = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "resnet20": 0.28, "resnet56": 0.86,
    "wrn_16_2": 0.70, "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def with_bn_statistics(model, x):
    """Run train-mode forwards so BN running stats differ from their init (a stronger round trip)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


# ------------------------------------------------------------------------------ zoo

def test_zoo_lists_every_family():
    assert set(MODEL_NAMES) == set(CIFAR_ZOO) | set(FMNIST_ZOO)


@pytest.mark.parametrize("name", CIFAR_ZOO)
def test_cifar_zoo_shape_and_published_size(name):
    model = build_model(name, num_classes=100, in_channels=3).eval()
    assert n_params(model) / 1e6 == pytest.approx(PUBLISHED_MILLIONS[name], rel=0.01)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", FMNIST_ZOO)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 16, 16), (3, 16, 16)])
def test_fmnist_zoo_runs_on_any_image_size(name, shape):
    c, s, _ = shape
    model = build_model(name, num_classes=7, in_channels=c, image_size=s).eval()
    with torch.no_grad():
        assert model(torch.randn(4, *shape)).shape == (4, 7)


def test_fmnist_teacher_is_bigger_than_the_students():
    sizes = {name: n_params(build_model(name, 10, 1)) for name in FMNIST_ZOO}
    assert 10_000 < sizes["fmnist_cnn"] < 100_000  # "a few tens of thousands"
    assert sizes["fmnist_resnet"] > sizes["fmnist_mlp"] > sizes["fmnist_cnn"] > sizes["tiny_teacher"]


def test_state_dict_keys_follow_crd_naming():
    # Same keys as the CRD code, so its released CIFAR-100 teachers load without renaming.
    assert "layer1.0.downsample.0.weight" in build_model("resnet8x4", 100).state_dict()
    assert "layer3.2.bn2.running_var" in build_model("resnet20", 100).state_dict()
    assert "block1.layer.0.convShortcut.weight" in build_model("wrn_16_2", 100).state_dict()
    vgg = build_model("vgg13", 100).state_dict()
    assert {"block0.3.bias", "block0.4.running_mean", "classifier.weight"} <= set(vgg)


def test_mlp_input_width_comes_from_image_size():
    model = build_model("fmnist_mlp", 10, in_channels=3, image_size=16)
    assert model.state_dict()["net.0.weight"].shape[1] == 3 * 16 * 16
    with pytest.raises(UserError, match="image_size"):
        model(torch.randn(2, 3, 28, 28))


def test_unknown_model_lists_the_choices():
    with pytest.raises(UserError, match="fmnist_resnet.*vgg13.*tv:") as e:
        build_model("resnet18", 10)
    assert "\n" not in str(e.value)


def test_torchvision_model_by_name():
    model = build_model("tv:resnet18", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_torchvision_rejects_grey_images_and_non_classifiers():
    with pytest.raises(UserError, match="3-channel"):
        build_model("tv:resnet18", 10, in_channels=1)
    with pytest.raises(UserError, match="not a torchvision classification model"):
        build_model("tv:fasterrcnn_resnet50_fpn", 10)


# ---------------------------------------------------------------------- checkpoints

@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return with_bn_statistics(build_model("fmnist_cnn", 10, 1), torch.randn(16, 1, 16, 16))


@pytest.fixture
def saved(tmp_path, cnn):
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, cnn, arch="fmnist_cnn", num_classes=10, in_channels=1,
                    meta={"test_accuracy": 0.91, "dataset": "fashion-mnist", "epochs": 3})
    return path


def test_checkpoint_round_trip_gives_identical_outputs(saved, cnn):
    x = torch.randn(5, 1, 16, 16)
    model, info = load_checkpoint(saved, arch="fmnist_cnn", num_classes=10, in_channels=1)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), cnn(x))
    assert info["format"] == CHECKPOINT_FORMAT
    assert (info["arch"], info["num_classes"], info["in_channels"]) == ("fmnist_cnn", 10, 1)
    assert info["meta"] == {"test_accuracy": 0.91, "dataset": "fashion-mnist", "epochs": 3}
    assert info["sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()


def test_checkpoint_records_image_size_for_the_mlp(tmp_path):
    mlp = build_model("fmnist_mlp", 4, in_channels=3, image_size=16).eval()
    path = save_checkpoint(tmp_path / "mlp.pt", mlp, arch="fmnist_mlp", num_classes=4, in_channels=3,
                           image_size=16, meta={})
    model, info = load_checkpoint(path)  # everything needed comes from the file
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), mlp(x))
    assert info["image_size"] == 16
    with pytest.raises(UserError, match="image size is 16 but the config says 28"):
        load_checkpoint(path, image_size=28)


def test_save_is_atomic_and_overwrites(tmp_path, cnn):
    path = tmp_path / "sub" / "ckpt.pt"
    for accuracy in (0.5, 0.6):
        save_checkpoint(path, cnn, arch="fmnist_cnn", num_classes=10, in_channels=1, meta={"acc": accuracy})
    assert os.listdir(path.parent) == ["ckpt.pt"]  # no temp files left behind
    assert load_checkpoint(path)[1]["meta"] == {"acc": 0.6}


def test_save_refuses_meta_that_is_not_json(tmp_path, cnn):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "x.pt", cnn, arch="fmnist_cnn", num_classes=10, in_channels=1,
                        meta={"tensor": torch.ones(1)})
    assert not list(tmp_path.iterdir())


def test_plain_state_dict_loads_when_arch_is_given(tmp_path, cnn):
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = cnn(x)
    wrapped = {
        "plain.pt": cnn.state_dict(),
        "crd_style.pt": {"model": cnn.state_dict(), "epoch": 240, "best_acc": torch.tensor(91.0)},
        "data_parallel.pt": {f"module.{k}": v for k, v in cnn.state_dict().items()},
    }
    for name, obj in wrapped.items():
        torch.save(obj, tmp_path / name)
        model, info = load_checkpoint(tmp_path / name, arch="fmnist_cnn", num_classes=10, in_channels=1)
        with torch.no_grad():
            assert torch.equal(model(x), expected), name
        assert info["format"] == "state_dict" and not model.training


def test_plain_state_dict_needs_arch_and_classes(tmp_path, cnn):
    torch.save(cnn.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match="plain state dict; give the architecture and num_classes"):
        load_checkpoint(tmp_path / "sd.pt")


def test_plain_state_dict_of_another_arch_names_the_first_bad_key(tmp_path, cnn):
    torch.save(cnn.state_dict(), tmp_path / "sd.pt")
    expected = r"does not fit fmnist_resnet.*missing key\(s\), first 'conv1\.weight'.*first 'features\.0\.weight'"
    with pytest.raises(UserError, match=expected) as e:
        load_checkpoint(tmp_path / "sd.pt", arch="fmnist_resnet", num_classes=10, in_channels=1)
    assert "\n" not in str(e.value)


def test_plain_state_dict_with_other_class_count_reports_shapes(tmp_path, cnn):
    torch.save(cnn.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match=r"fc\.weight: checkpoint \(10, 64\) vs model \(100, 64\)"):
        load_checkpoint(tmp_path / "sd.pt", arch="fmnist_cnn", num_classes=100, in_channels=1)


@pytest.mark.parametrize("wanted, message", [
    ({"arch": "fmnist_resnet"}, "architecture is 'fmnist_cnn' but the config says 'fmnist_resnet'"),
    ({"num_classes": 100}, "class count is 10 but the config says 100"),
    ({"in_channels": 3}, "input channel count is 1 but the config says 3"),
])
def test_checkpoint_disagreeing_with_config(saved, wanted, message):
    with pytest.raises(UserError, match=message):
        load_checkpoint(saved, **wanted)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("corrupt", ["truncated", "head", "random", "empty", "text", "raw_pickle"])
def test_unreadable_checkpoint(tmp_path, saved, corrupt):
    data = saved.read_bytes()
    content = {
        "truncated": data[: len(data) // 2],
        "head": data[:100],
        "random": random.Random(0).randbytes(4096),  # seeded: a random leading 'c' would read as a GLOBAL
        "empty": b"",
        "text": b"not a checkpoint\n",
        "raw_pickle": pickle.dumps({"a": 1}, protocol=4),
    }[corrupt]
    bad = tmp_path / f"{corrupt}.pt"
    bad.write_bytes(content)
    with pytest.raises(UserError, match="cannot read checkpoint .*truncated or not a torch.save file") as e:
        load_checkpoint(bad, arch="fmnist_cnn", num_classes=10, in_channels=1)
    assert "\n" not in str(e.value)


class _Payload:
    """Unpickling this would create a directory: proof of code execution if it ever appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_arbitrary_pickled_object_is_refused_without_running_it(tmp_path, zip_format):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(str(marker))}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError, match=r"pickles a Python object \(os\.makedirs\).*weights_only=True"):
        load_checkpoint(path, arch="fmnist_cnn", num_classes=10)
    assert not marker.exists()


def test_file_that_holds_no_weights(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="neither a kdcache checkpoint nor a state dict"):
        load_checkpoint(tmp_path / "list.pt", arch="fmnist_cnn", num_classes=10)


def test_newer_checkpoint_format_is_refused(tmp_path, cnn):
    torch.save({"format": "kdcache-checkpoint-99", "state_dict": cnn.state_dict()}, tmp_path / "new.pt")
    with pytest.raises(UserError, match="kdcache-checkpoint-99"):
        load_checkpoint(tmp_path / "new.pt")


# ------------------------------------------------------------------- hashing, device

def test_file_sha256_streams_in_chunks(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(10_000)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(UserError, match="file not found"):
        file_sha256(tmp_path / "missing")


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        select_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            select_device("cuda")
