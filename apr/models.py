"""Model factory: timm names for ImageNet nets, plus the CIFAR nets timm does not ship, and
loading of third-party weight files.

The APR paper trains ResNet-50 on ImageNet (timm ``resnet50``, same architecture as
torchvision's) and WRN-40-2 on CIFAR; its adversarial experiments use PreActResNet-18 ("Fast is
better than free"). Nothing is ever downloaded: models start from scratch, as in the paper, or
from a weights file the user names (:func:`create_model_from_weights`).

``zero_init_last`` (config ``model.zero_init_last``): ``None`` keeps each model's own default.
timm ResNets zero the last BatchNorm of every residual block (timm's default, ``True``); the APR
reference used torchvision's init, which does not (``False``). The CIFAR WideResNet and
PreActResNet are pre-activation nets: their blocks end in a conv, not a BatchNorm (zeroing
``bn2`` there would sit before a ReLU and freeze the branch), so they default to no zero init,
as the reference; ``True`` zeroes the last conv of each block instead (timm's ResNetV2 rule).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from apr.errors import UserError

__all__ = ["create_model", "WideResNet", "PreActResNet", "TinyCNN", "list_local_models", "ModelError",
           "WeightsError", "read_state_dict", "load_weights", "normalisation_for", "WeightsModel",
           "create_model_from_weights", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(UserError, ValueError):
    """A model name or shape that cannot be built."""


class WeightsError(UserError, ValueError):
    """A weights file that cannot be read safely or does not fit the model."""


class _WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs (Zagoruyko & Komodakis), pre-activation blocks."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0,
                 zero_init_last: bool = False):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ModelError(f"WideResNet depth must be 6n+4 (e.g. 16, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        layers, in_planes = [], widths[0]
        for stage, stride in zip(range(1, 4), (1, 2, 2)):
            for block in range(n):
                layers.append(_WideBasic(in_planes, widths[stage], stride if block == 0 else 1, drop_rate))
                in_planes = widths[stage]
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        if zero_init_last:
            _zero_last_convs(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    def get_classifier(self) -> nn.Module:
        return self.fc


def _zero_last_convs(blocks: nn.Module) -> None:
    """Zero the last conv of every pre-activation block: each residual branch starts as identity."""
    for block in blocks.modules():
        if isinstance(block, (_WideBasic, _PreActBlock)):
            nn.init.zeros_(block.conv2.weight)


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 conv shortcut on the block's input when the shape changes.

    The shortcut takes the raw input, not the pre-activated one, as in "Fast is better than free"
    (locuslab/fast_adversarial) and the APR reference's ``autoattacks/preact_resnet.py``; the
    attribute names follow theirs so their state dicts load unchanged.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class PreActResNet(nn.Module):
    """PreActResNet for 32x32 inputs (He et al. 2016, identity mappings): a 3x3 stem, four stages of
    64-128-256-512 channels, a final BN + ReLU, global average pooling, a linear head.

    ``[2, 2, 2, 2]`` is PreActResNet-18: 11,172,170 parameters for 10 classes (the often quoted
    11,171,146 is the variant without the final BatchNorm). PyTorch's default init, as the reference.
    Global average pooling equals the reference's 4x4 pooling at 32x32 and also accepts other sizes.
    """

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 zero_init_last: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        in_planes = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), num_blocks), start=1):
            strides = [1 if stage == 1 else 2] + [1] * (count - 1)
            blocks = []
            for stride in strides:
                blocks.append(_PreActBlock(in_planes, planes, stride))
                in_planes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        if zero_init_last:
            _zero_last_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = stage(out)
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    def get_classifier(self) -> nn.Module:
        return self.linear


class TinyCNN(nn.Module):
    """A few-thousand-parameter conv net: fast enough for tests and the CPU demo."""

    def __init__(self, num_classes: int, width: int = 16, drop_rate: float = 0.0):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width),
        )
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.fc(self.drop(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


_WRN = re.compile(r"^wrn(\d+)_(\d+)$")
_PREACT = {"preact_resnet18": (2, 2, 2, 2)}


def list_local_models() -> list[str]:
    return ["cnn_tiny", "cnn_small", "preact_resnet18", "wrn16_2", "wrn28_10", "wrn40_2", "wrn<depth>_<k>"]


def create_model(name: str, num_classes: int, drop_rate: float = 0.0, zero_init_last: bool | None = None) -> nn.Module:
    """Build a freshly initialised classifier by name (never downloads weights).

    ``zero_init_last``: ``None`` keeps the model's own default (see the module docstring).
    """
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if name in ("cnn_tiny", "cnn_small"):
        if zero_init_last:
            raise ModelError(f"{name} has no residual blocks: model.zero_init_last does not apply (leave it null)")
        return TinyCNN(num_classes, width=16 if name == "cnn_tiny" else 32, drop_rate=drop_rate)
    if name in _PREACT:
        if drop_rate:
            raise ModelError(f"{name} has no dropout (as the reference): set model.drop_rate to 0")
        return PreActResNet(_PREACT[name], num_classes, zero_init_last=bool(zero_init_last))
    match = _WRN.match(name)
    if match:
        return WideResNet(int(match.group(1)), int(match.group(2)), num_classes, drop_rate,
                          zero_init_last=bool(zero_init_last))
    return _create_timm_model(name, num_classes, drop_rate, zero_init_last)


def _create_timm_model(name: str, num_classes: int, drop_rate: float, zero_init_last: bool | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ModelError(
            f"unknown model {name!r}: use a timm model name (e.g. resnet50, resnet18, resnet10t) "
            f"or one of {', '.join(list_local_models())}"
        )
    kwargs = {} if zero_init_last is None else {"zero_init_last": bool(zero_init_last)}
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
    except TypeError as exc:
        if "zero_init_last" not in str(exc):
            raise
        raise ModelError(f"timm model {name!r} has no zero_init_last option: leave model.zero_init_last null") from None


# --------------------------------------------------------------------------- third-party weights

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")  # where training scripts tuck the weights
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU, without running any code from it.

    ``.safetensors`` through safetensors; anything else (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``)
    through ``torch.load(weights_only=True)``, which refuses pickled Python objects. A state dict
    nested under ``state_dict`` / ``model`` (training-script checkpoints) is found, and the
    ``module.`` prefix of DataParallel/DDP (``_orig_mod.`` of torch.compile) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    raw = _read_safetensors(path) if path.name.endswith(".safetensors") else _read_torch_file(path)
    state = _find_state_dict(raw, path)
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"cannot read {path} as a safetensors file ({exc})") from None


def _read_torch_file(path: Path):
    from apr.checkpoint import load_failure

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError (empty) ...
        raise WeightsError(f"cannot read {path} as a PyTorch weights file: {load_failure(path, exc)}") from None


def _find_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Descend through ``{"state_dict": ...}``-style wrappers down to a mapping of tensors."""
    for _ in range(4):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        inner = next((k for k in _NESTED_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = obj[inner]
    found = f"keys {list(obj)[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise WeightsError(f"{path} holds no state dict (a mapping of names to tensors, possibly under "
                       f"{' / '.join(_NESTED_KEYS)}); found {found}")


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Name the first tensor that is missing, unexpected or of another shape, before loading anything."""
    own = model.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself (files saved before PyTorch 0.4.1 lack it)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    more = lambda keys: f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""  # noqa: E731
    problems = []
    if wrong:
        key = wrong[0]
        problems.append(f"tensor {key} has shape {tuple(state[key].shape)} in the file but "
                        f"{tuple(own[key].shape)} in the model{more(wrong)}")
    if missing:
        problems.append(f"tensor {missing[0]} of the model is missing from the file{more(missing)}")
    if unexpected:
        problems.append(f"the file's tensor {unexpected[0]} is not in the model{more(unexpected)}")
    if not problems:
        return
    hint = ""
    if len(missing) + len(wrong) >= len(own) - sum(k.endswith("num_batches_tracked") for k in own):
        hint = " — no tensor fits: are these weights for another architecture?"
    raise WeightsError(f"{source} does not fit {type(model).__name__}: {'; '.join(problems)}{hint}")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weights file into ``model`` (in place, returned); a mismatch is a ``WeightsError``
    naming the tensor, and nothing is loaded then."""
    state = read_state_dict(path)
    _check_fits(model, state, f"weights file {path}")
    _refuse_non_finite(state, path)
    model.load_state_dict(state)
    return model


def _refuse_non_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    from apr.checkpoint import refuse_non_finite

    refuse_non_finite(state, f"weights file {path}", WeightsError)


def normalisation_for(name: str, mean=None, std=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a model's weights expect: as given, else timm's pretrained config for ``name``
    (no download), else ImageNet's, with a log line saying so."""
    if (mean is None) != (std is None):
        raise WeightsError("give both mean and std, or neither (to take them from timm's pretrained config)")
    if mean is not None:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.mean and cfg.std:
        log.info("normalisation of %s from timm's pretrained config: mean %s, std %s", name, cfg.mean, cfg.std)
        return tuple(cfg.mean), tuple(cfg.std)
    log.warning("no normalisation known for %s: using ImageNet's mean %s and std %s (give mean/std if its "
                "weights were trained with others)", name, IMAGENET_MEAN, IMAGENET_STD)
    return IMAGENET_MEAN, IMAGENET_STD


@dataclass
class WeightsModel:
    """A model built from a weights file, with the normalisation its weights expect:
    ``ImageClassifier(w.model, w.mean, w.std, precision)`` evaluates it."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    source: str


def create_model_from_weights(name: str, path: str | Path, num_classes: int | None = None, *,
                              mean=None, std=None) -> WeightsModel:
    """Build ``name`` (any timm name or a local model) and load ``path`` into it, in eval mode.

    ``num_classes``: ``None`` (or 0) reads it from the file's classifier head (e.g. ``fc.weight``).
    """
    state = read_state_dict(path)
    model = create_model(name, num_classes or 1000)
    if not num_classes:  # None or 0: from the head; without one, the fit check below names what is missing
        num_classes = _head_classes(model, state) or 1000
        if num_classes != 1000:
            model = create_model(name, num_classes)
    _check_fits(model, state, f"weights file {path}")
    _refuse_non_finite(state, path)
    model.load_state_dict(state)
    mean, std = normalisation_for(name, mean, std)
    return WeightsModel(model.eval(), mean, std, num_classes, str(path))


def _head_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the file's classifier weight (the tensor the model calls its classifier), if present."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_name = next((n for n, m in model.named_modules() if m is head and n), None)
    weight = state.get(f"{head_name}.weight") if head_name else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None
