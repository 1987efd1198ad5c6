"""Model zoo and checkpoint I/O.

Two families of networks, all built by name with `build_model`:

* Fashion-MNIST models (`fmnist_resnet` teacher, `fmnist_cnn` / `fmnist_mlp` students,
  `tiny_teacher` for tests). Convolutional ones end in global average pooling, so
  they run at any input size (28x28 grey, 32x32 RGB, 16x16 synthetic data).
* The CIFAR-100 zoo of the KD literature (CRD, Tian et al. 2020; reused by
  mdistiller): resnet8x4/32x4/20/56, wrn_16_2/40_2, vgg8/13. Module names follow
  the CRD code, so state dicts of its released teachers load unchanged.

Plus models from elsewhere, all with random weights (never a download; the weights come
from the user's checkpoint):

* `tv:<name>`: a torchvision classification model;
* `timm:<name>`: a timm model (the optional extra `pip install kdcache[timm]`);
* `python:<package.module>:<callable>`: the user's own factory, called as
  `callable(num_classes=K, in_channels=C, image_size=S)` and returning an nn.Module whose
  output is (batch, K) logits. The module is imported from the installed packages,
  PYTHONPATH or the working directory.

A checkpoint records the architecture string next to the weights, so stage 1 rebuilds
the teacher without the user repeating it and refuses a mismatched config.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcache.errors import UserError
from kdcache.files import torch_bytes, write_atomic

CHECKPOINT_FORMAT = "kdcache-checkpoint-1"
TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
FACTORY_PREFIX = "python:"


# --------------------------------------------------------------------------- blocks

class BasicBlock(nn.Module):
    """Post-activation ResNet basic block (He et al. 2016) as in the CRD CIFAR ResNets."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """Three-stage ResNet: stem conv (widths[0]), stages widths[1:] at strides 1, 2, 2.

    With `blocks` = (depth - 2) / 6 this is the CRD CIFAR ResNet (resnet20: widths
    16,16,32,64; resnet8x4: 32,64,128,256). `stem_stride=2` halves the resolution
    before the first stage, which is what makes `fmnist_resnet` cheap at inference.
    """

    def __init__(self, blocks: int, widths, num_classes: int, in_channels: int = 3, stem_stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], blocks, 1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, 2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, 2)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_like_crd(self)

    @staticmethod
    def _stage(in_planes, planes, blocks, stride):
        return nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(blocks)
        ])

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (Zagoruyko & Komodakis 2016), CRD variant without dropout.

    When the shape changes, the shortcut 1x1 conv takes the pre-activated input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.convShortcut = None
        if in_planes != planes:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideStage(nn.Module):
    """A stage of wide blocks; the `layer` attribute keeps CRD's state-dict key names."""

    def __init__(self, in_planes: int, planes: int, blocks: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(blocks)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: widths 16, 16k, 32k, 64k; (depth - 4) / 6 blocks per stage."""

    def __init__(self, depth: int, k: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(w[0], w[1], n, 1)
        self.block2 = WideStage(w[1], w[2], n, 2)
        self.block3 = WideStage(w[2], w[3], n, 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)
        _init_like_crd(self)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class VGG(nn.Module):
    """CIFAR VGG with batch norm, as in CRD: five conv blocks, max-pool after the
    first three, global average pool, one linear layer (512 -> classes).

    CRD adds a fourth max-pool only for 64x64 inputs; at 32x32 (and below) it is
    skipped, which is what is implemented here.
    """

    def __init__(self, cfg, num_classes: int, in_channels: int = 3):
        super().__init__()
        chans = [in_channels] + [block[-1] for block in cfg]
        for i, block in enumerate(cfg):
            setattr(self, f"block{i}", self._block(block, chans[i]))
        self.classifier = nn.Linear(chans[-1], num_classes)
        _init_like_crd(self)

    @staticmethod
    def _block(widths, in_channels):
        layers = []
        for w in widths:
            layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            in_channels = w
        return nn.Sequential(*layers[:-1])  # the final ReLU is applied in forward (CRD layout)

    def forward(self, x):
        for i in range(5):
            x = F.relu(getattr(self, f"block{i}")(x))
            if i < 3:
                x = F.max_pool2d(x, 2)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _init_like_crd(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convs, unit BN, zero biases: the init the CRD zoo trains with."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------- Fashion-MNIST models

class SmallCNN(nn.Module):
    """Three 3x3 conv layers (16, 32, 64 channels) with BN, two max-pools, GAP, linear.

    About 24k parameters: the weak student that distillation is meant to help.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, widths=(16, 32, 64)):
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class MLP(nn.Module):
    """Flatten -> hidden layers with ReLU -> classes. The input size is fixed at build
    time (in_channels x image_size^2) so a state dict loads without a forward pass."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden=(256, 128)):
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        sizes = [in_channels * image_size * image_size, *hidden]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))

    def forward(self, x):
        if tuple(x.shape[1:]) != self.input_shape:
            raise UserError(
                f"fmnist_mlp was built for inputs {self.input_shape} but got {tuple(x.shape[1:])}; "
                "set image_size / in_channels to match the data"
            )
        return self.net(torch.flatten(x, 1))


# ------------------------------------------------------------------------- registry

_ZOO = {
    # Fashion-MNIST (any size, any channel count)
    "fmnist_resnet": lambda k, c, s: ResNet(1, (32, 32, 64, 128), k, c, stem_stride=2),
    "fmnist_cnn": lambda k, c, s: SmallCNN(k, c),
    "fmnist_mlp": lambda k, c, s: MLP(k, c, s),
    "tiny_teacher": lambda k, c, s: SmallCNN(k, c, widths=(8, 16)),
    # CIFAR-100 zoo of CRD / mdistiller
    "resnet8x4": lambda k, c, s: ResNet(1, (32, 64, 128, 256), k, c),
    "resnet32x4": lambda k, c, s: ResNet(5, (32, 64, 128, 256), k, c),
    "resnet20": lambda k, c, s: ResNet(3, (16, 16, 32, 64), k, c),
    "resnet56": lambda k, c, s: ResNet(9, (16, 16, 32, 64), k, c),
    "wrn_16_2": lambda k, c, s: WideResNet(16, 2, k, c),
    "wrn_40_2": lambda k, c, s: WideResNet(40, 2, k, c),
    "vgg8": lambda k, c, s: VGG([[64], [128], [256], [512], [512]], k, c),
    "vgg13": lambda k, c, s: VGG([[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], k, c),
}
MODEL_NAMES: tuple[str, ...] = tuple(_ZOO)


def build_model(name: str, num_classes: int, in_channels: int = 3, *, image_size: int | None = None) -> nn.Module:
    """A freshly initialised model by zoo name, `tv:NAME`, `timm:NAME` or `python:package.module:callable`.

    `image_size` (None: unknown, taken as 28) matters for `fmnist_mlp` (its first layer's width) and for
    factories, which are given it; a timm model is tried on it once (some, e.g. ViTs, take one size only);
    every other model pools adaptively and accepts any input size.
    """
    known_size, image_size = image_size is not None, 28 if image_size is None else image_size
    if num_classes < 1 or in_channels < 1 or image_size < 1:
        raise UserError(
            f"model {name!r} needs positive num_classes, in_channels and image_size "
            f"(got {num_classes}, {in_channels}, {image_size})"
        )
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, in_channels)
    if name.startswith(TIMM_PREFIX):
        model = _build_timm(name[len(TIMM_PREFIX):], num_classes, in_channels)
        return check_input_size(model, name, in_channels, image_size) if known_size else model
    if name.startswith(FACTORY_PREFIX):
        return _build_factory(name, num_classes, in_channels, image_size)
    if name not in _ZOO:
        raise UserError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}, a torchvision classifier as "
            f"'{TORCHVISION_PREFIX}<name>' (e.g. tv:resnet18), a timm model as '{TIMM_PREFIX}<name>' or your own "
            f"factory as '{FACTORY_PREFIX}package.module:callable'"
        )
    return _ZOO[name](num_classes, in_channels, image_size)


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision.models as tvm  # imported here: only tv: names pay for it

    if name not in tvm.list_models(module=tvm):
        raise UserError(
            f"{TORCHVISION_PREFIX}{name} is not a torchvision classification model; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    if in_channels != 3:
        raise UserError(
            f"{TORCHVISION_PREFIX}{name} takes 3-channel images but the data has {in_channels}; "
            "use a zoo model (e.g. fmnist_resnet) or convert the images to RGB"
        )
    return tvm.get_model(name, weights=None, num_classes=num_classes)


def _build_timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        import timm  # optional: only timm: names need it
    except ImportError:
        raise UserError(f"{TIMM_PREFIX}{name} needs timm, which is not installed: "
                        "pip install 'kdcache[timm]'") from None
    if not timm.is_model(name):
        raise UserError(f"{TIMM_PREFIX}{name} is not a timm model; see timm.list_models()")
    try:  # pretrained=False: never a download, the weights come from the checkpoint
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise UserError(f"timm cannot build {TIMM_PREFIX}{name} with num_classes={num_classes}, "
                        f"in_chans={in_channels}: {_first_line(e)}") from None


def check_input_size(model: nn.Module, name: str, in_channels: int, image_size: int) -> nn.Module:
    """`model`, after one forward pass of two blank images of the data's size (eval mode, no gradient, its mode
    restored): a model that cannot take them fails here in one line, not in the first training step."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, in_channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError, TypeError) as e:
        raise UserError(f"model {name} cannot take {image_size}x{image_size} images with {in_channels} channel(s): "
                        f"{_first_line(e) or type(e).__name__}; pick a model for this image size") from None
    return model.train(was_training)


def _build_factory(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The user's own model: `python:package.module:callable`, called with keyword arguments only."""
    module_name, _, attr = name[len(FACTORY_PREFIX):].partition(":")
    if not (all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
        raise UserError(f"model {name!r} must be '{FACTORY_PREFIX}package.module:callable'")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the user's own folder, after installed packages
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"model {name!r}: cannot import {module_name} ({_first_line(e)}); install it, add its "
                        "folder to PYTHONPATH or run from the folder that holds it") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise UserError(f"model {name!r}: module {module_name} has no attribute {attr!r}")
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:  # not callable, or another signature
        raise UserError(f"model {name!r} must be callable as {attr}(num_classes=..., in_channels=..., "
                        f"image_size=...) ({_first_line(e)})") from None
    except ValueError:
        pass  # no signature to inspect (a builtin): the call itself tells
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------- checkpoints

def save_checkpoint(
    path, model: nn.Module, *, arch: str, num_classes: int, in_channels: int,
    meta: dict, image_size: int | None = None,
) -> Path:
    """Write model weights plus what is needed to rebuild them, atomically.

    The file is a torch.save of plain containers and tensors (loadable with
    weights_only=True); `meta` must be JSON-able (accuracy, data set, epochs ...).
    A temp file in the same directory is renamed over `path`, so a crash never
    leaves a half-written checkpoint under the final name.
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": json.loads(json.dumps(meta)),  # fails early on non-JSON values
    }
    if image_size is not None:
        payload["image_size"] = int(image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, torch_bytes(payload))


def load_checkpoint(
    path, *, arch: str | None = None, num_classes: int | None = None, in_channels: int | None = None,
    image_size: int | None = None, device="cpu",
) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint; returns (model in eval mode, info).

    Accepts our format (the arguments, when given, must agree with what it records)
    or a plain state dict, which needs `arch` and `num_classes` (in_channels
    defaults to 3). State dicts wrapped as {"model": ...} or {"state_dict": ...}
    and DataParallel "module." prefixes, as in CRD's released teachers, are unwrapped.
    info: format, arch, num_classes, in_channels, image_size, meta, path, sha256.
    """
    path = Path(path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and "format" in obj:
        info = _check_ours(path, obj, arch=arch, num_classes=num_classes,
                           in_channels=in_channels, image_size=image_size)
        state = obj["state_dict"]
    else:
        state = _plain_state_dict(obj)
        if state is None:
            raise UserError(f"{path} holds neither a kdcache checkpoint nor a state dict of tensors")
        if arch is None or num_classes is None:
            raise UserError(f"{path} is a plain state dict; give the architecture and num_classes to load it")
        info = {
            "format": "state_dict", "arch": arch, "num_classes": num_classes,
            "in_channels": 3 if in_channels is None else in_channels,
            "image_size": image_size, "meta": {},
        }
    build_kw = {} if info["image_size"] is None else {"image_size": info["image_size"]}
    model = build_model(info["arch"], info["num_classes"], info["in_channels"], **build_kw)
    _check_fits(path, model, state, info)
    model.load_state_dict(state, strict=False)  # _check_fits has verified every key but BN counters
    info.update(path=str(path), sha256=file_sha256(path))
    dev = device if isinstance(device, torch.device) else select_device(device)
    return model.to(dev).eval(), info


def _torch_load(path: Path):
    if not path.is_file():
        raise UserError(f"checkpoint not found (or not a file): {path}")
    try:
        with warnings.catch_warnings():  # pickle-protocol chatter; failures are reported below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files; all mean "cannot use it"
        message = str(e)
        blocked = re.search(r"GLOBAL (\S+)", message)
        if blocked:
            raise UserError(
                f"{path} pickles a Python object ({blocked.group(1)}), not just tensors and plain containers; "
                "refusing to load it (weights_only=True). Re-save it with torch.save(model.state_dict(), path)"
            ) from None
        if "weights only load failed" in message.lower():
            reason = "not valid pickle data"
        else:
            reason = f"{type(e).__name__}: {message.strip().split('. ')[0][:120]}"
        raise UserError(f"cannot read checkpoint {path} (truncated or not a torch.save file): {reason}") from None


def _check_ours(path, obj, **wanted) -> dict:
    if obj["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {obj['format']!r}; this version reads {CHECKPOINT_FORMAT!r}")
    missing = {"arch", "num_classes", "in_channels", "state_dict", "meta"} - set(obj)
    if missing:
        raise UserError(f"{path} is an incomplete kdcache checkpoint: no {', '.join(sorted(missing))}")
    info = {k: obj[k] for k in ("format", "arch", "num_classes", "in_channels", "meta")}
    info["image_size"] = obj.get("image_size")
    labels = {"arch": "architecture", "num_classes": "class count",
              "in_channels": "input channel count", "image_size": "image size"}
    for key, want in wanted.items():
        have = info[key]
        if want is not None and have is not None and want != have:
            raise UserError(f"{path}: checkpoint {labels[key]} is {have!r} but the config says {want!r}; "
                            f"fix the config or use the checkpoint that matches it")
    if info["image_size"] is None:
        info["image_size"] = wanted["image_size"]
    return info


def _plain_state_dict(obj):
    """The tensor dict inside a user's checkpoint, or None if there is none."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return None
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _check_fits(path, model: nn.Module, state: dict, info: dict) -> None:
    """One-line summary of why a state dict does not fit the model, if it does not."""
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent in very old files
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if shapes:
        k, have, want = shapes[0]
        problems.append(f"{len(shapes)} shape mismatch(es), first {k}: checkpoint {have} vs model {want}")
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
    raise UserError(
        f"{path} does not fit {info['arch']} (num_classes={info['num_classes']}, "
        f"in_channels={info['in_channels']}): {'; '.join(problems)}"
    )


def file_sha256(path) -> str:
    """Hex sha256 of a file, streamed (checkpoints can be large)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; asking for a missing GPU is a user error."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but CUDA is not available here; use 'cpu' or 'auto'")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UserError(f"device {name!r} does not exist; this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device(name)
    raise UserError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
