"""Typed run configuration: YAML recipes -> dataclasses, ``--set a.b=c`` overrides, validation.

One config drives a whole run (as in ffcv-imagenet): a recipe is a YAML file whose sections
mirror the dataclasses below. Unknown keys and wrong types fail loudly, naming the key, so a
typo in a recipe never silently falls back to a default.
"""

from __future__ import annotations

from apr.errors import UserError
import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "AugConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "CheckpointConfig",
    "AdversarialConfig",
    "Config",
    "load_config",
    "resolve_recipe",
    "shipped_recipes",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UserError, ValueError):
    """A recipe or override that cannot be used as written."""


@dataclass
class DataConfig:
    dataset: str = "imagefolder"  # imagefolder (ImageNet layout) | cifar10 | cifar100
    backend: str = "auto"  # auto (DALI if installed, else gpu on CUDA, else torchvision) | dali | gpu | torchvision
    root: str = ""  # ImageNet layout: <root>/<train_dir>/<wnid>/*.JPEG and <root>/<val_dir>/...
    train_dir: str = "train"
    val_dir: str = "val"
    extra_roots: list[str] = field(default_factory=list)  # extra train folders (DeepAugment EDSR/, CAE/)
    image_size: int = 224  # train crop and val crop
    val_resize: int = 256  # val: resize shorter side, then center crop image_size
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    crop_padding: int = 4  # CIFAR: random crop with this padding
    pad_fill: int = 0  # CIFAR: pixel value (0..255) of the crop padding; reference: 128 (RandomCrop fill=128)
    apr_s_before_crop: bool = False  # CIFAR apr_sp: APR-S on the 32x32 image before crop+flip (reference)
    drop_last: bool = True  # CIFAR training: drop the last partial batch; false: keep it (reference DataLoader)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    num_workers: int = 4  # DALI CPU threads / DataLoader workers per process
    verify_images: bool = True  # scan file headers once; skip and count unreadable files


@dataclass
class AugConfig:
    name: str = "none"  # none | apr_p | apr_s | apr_sp
    p_prob: float = 0.6  # APR-P: probability of recombining (one coin per batch by default)
    p_per_sample: bool = False  # APR-P: one coin per image instead of per batch
    s_severity: float = 3.0  # APR-S: op levels drawn uniformly in [0.1, severity]
    fourier_dims: str = "chw"  # chw: one FFT over channels+space (reference) | hw: per channel
    sp_clean_first: bool = False  # apr_sp: first loss half the clean batch instead of APR-S of it (not the reference)
    p_space: str = "unit"  # APR-P on [0,1] images (ours, reference CIFAR) | normalized: on (x-mean)/std (reference ImageNet)
    s_overflow: str = "clamp"  # APR-S result: clamp to [0,1] | wrap (reference: uint8 cast, x mod 256) | none (unclipped)
    p_clamp: bool = True  # APR-P result clamped to [0,1]; false: unclipped floats (the reference)
    s_prob: float = 1.0  # apr_s/apr_sp: probability that APR-S replaces each image (reference FGSM-AT's prob_s)
    loss: str = "sum"  # sum: CE(first half) + CE(second half) (reference core/train.py) | mean: their mean,
    #                    i.e. CE over the 2N batch (reference autoattacks/train_fgsm.py)
    compile: bool = False  # torch.compile the Fourier elementwise kernel (falls back to eager where it fails)


@dataclass
class ModelConfig:
    name: str = "resnet50"  # a timm model name, or one of apr.models' CIFAR nets (wrn40_2, ...)
    num_classes: int = 0  # 0: taken from the data
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    drop_rate: float = 0.0
    # each residual branch starts at zero: timm ResNets zero their last BatchNorm (timm's default, true), the
    # pre-activation CIFAR WRN / PreActResNet their last conv (default false); null = the model's default.
    # The APR reference used torchvision's init: false
    zero_init_last: bool | None = None


@dataclass
class OptimConfig:
    lr: float = 0.1  # base learning rate for a global batch of `lr_base_batch`
    lr_base_batch: int = 256  # lr is scaled by global_batch / lr_base_batch (0 disables scaling)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "step"  # step | multistep | cosine | constant | cyclic (per step 0 -> lr at mid-run -> 0)
    step_size: int = 30  # step: epochs between decays
    milestones: list[int] = field(default_factory=list)  # multistep: epochs at which lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warmup from 0 over this many epochs
    # cyclic only: [low, high] momentum moving against the lr, high at the ends, low at the lr peak (torch
    # CyclicLR's cycle_momentum, on in the reference's FGSM training: [0.8, 0.9]); []: optim.momentum throughout
    cyclic_momentum: list[float] = field(default_factory=list)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # per process; global batch = batch_size * world size
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (with a GradScaler) | fp32
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (CPU tests, exact resume checks)
    val_every: int = 1  # epochs between validations (0: only at the end)
    log_every: int = 50  # steps between CSV log rows
    max_steps_per_epoch: int = 0  # >0 truncates each epoch (smoke runs, benchmarks)
    output_dir: str = "runs"
    run_name: str = ""  # "" -> derived from model and aug
    num_threads: int = 0  # torch CPU threads per process; 0: the cores of this process / local processes - loader threads


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # >0: also save every N optimizer steps (mid-epoch)
    keep_last: int = 2
    keep_best: bool = True


@dataclass
class AdversarialConfig:
    """Adversarial training (fast FGSM-AT, Wong et al. 2020, as the reference's autoattacks/train_fgsm.py).

    ``eps``/``alpha`` are in pixel units of [0, 1] images (the reference divides them by the std because
    it perturbs normalised tensors); a fraction like "8/255" is accepted and stored as a float.
    """

    method: str = "none"  # none | fgsm
    eps: float | str = 8 / 255  # Linf radius
    alpha: float | str = 10 / 255  # FGSM step size
    random_start: bool = True  # delta ~ U(-eps, eps) before the step (fast FGSM); false: classic FGSM start at 0
    check_every_epoch: bool = True  # 5-step PGD accuracy on one training batch per epoch (overfitting guard)
    check_alpha: float | str = 2 / 255  # that PGD's step size (reference: 2/255)
    check_steps: int = 5
    overfit_drop: float = 0.2  # warn when that accuracy falls by more than this below the best epoch's


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)

    def validate(self) -> "Config":
        _check_finite(self, "")
        _choice("data.dataset", self.data.dataset, ("imagefolder", "cifar10", "cifar100"))
        from apr.data import BACKENDS  # noqa: PLC0415 - the backends' list lives with the loaders

        _choice("data.backend", self.data.backend, BACKENDS)
        _choice("aug.name", self.aug.name, ("none", "apr_p", "apr_s", "apr_sp"))
        _choice("aug.fourier_dims", self.aug.fourier_dims, ("chw", "hw"))
        _choice("aug.p_space", self.aug.p_space, ("unit", "normalized"))
        _choice("aug.s_overflow", self.aug.s_overflow, ("clamp", "wrap", "none"))
        _choice("optim.schedule", self.optim.schedule, ("step", "multistep", "cosine", "constant", "cyclic"))
        _choice("aug.loss", self.aug.loss, ("sum", "mean"))
        _validate_adversarial(self.adversarial)
        _choice("train.precision", self.train.precision, ("auto", "bf16", "fp16", "fp32"))
        if not 0.0 <= self.aug.p_prob <= 1.0:
            raise ConfigError(f"aug.p_prob must lie in [0, 1], got {self.aug.p_prob}")
        if not 0.0 <= self.aug.s_prob <= 1.0:
            raise ConfigError(f"aug.s_prob must lie in [0, 1], got {self.aug.s_prob}")
        if self.optim.schedule == "cyclic" and self.optim.warmup_epochs > 0:
            raise ConfigError("optim.schedule=cyclic ramps up from 0 by itself: set optim.warmup_epochs=0")
        if self.optim.cyclic_momentum and (self.optim.schedule != "cyclic" or len(self.optim.cyclic_momentum) != 2
                                           or not 0 <= self.optim.cyclic_momentum[0] <= self.optim.cyclic_momentum[1] < 1):
            raise ConfigError(f"optim.cyclic_momentum must be [] or [low, high] with 0 <= low <= high < 1, and needs "
                              f"optim.schedule=cyclic; got {self.optim.cyclic_momentum} with {self.optim.schedule}")
        if self.aug.s_severity < 0.1:
            raise ConfigError(f"aug.s_severity must be >= 0.1, got {self.aug.s_severity}")
        if len(self.data.crop_scale) != 2 or not 0 < self.data.crop_scale[0] <= self.data.crop_scale[1] <= 1:
            raise ConfigError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.data.crop_scale}")
        if len(self.data.mean) != 3 or len(self.data.std) != 3:
            raise ConfigError("data.mean and data.std need three values (R, G, B)")
        _check_reference_data(self.data, self.aug)
        for key, value in (("train.epochs", self.train.epochs), ("train.batch_size", self.train.batch_size),
                           ("data.image_size", self.data.image_size)):
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if self.optim.schedule == "multistep" and not self.optim.milestones:
            raise ConfigError("optim.schedule=multistep needs optim.milestones, e.g. [60, 120, 160]")
        # numbers that would otherwise fail deep inside a run (after the data scan), or silently do nothing
        for key, value, low in (
            ("optim.lr", self.optim.lr, 0), ("optim.momentum", self.optim.momentum, 0),
            ("optim.weight_decay", self.optim.weight_decay, 0), ("optim.lr_base_batch", self.optim.lr_base_batch, 0),
            ("optim.warmup_epochs", self.optim.warmup_epochs, 0), ("optim.step_size", self.optim.step_size, 1),
            ("train.val_every", self.train.val_every, 0), ("train.log_every", self.train.log_every, 1),
            ("train.max_steps_per_epoch", self.train.max_steps_per_epoch, 0),
            ("checkpoint.every_steps", self.checkpoint.every_steps, 0),
            ("checkpoint.keep_last", self.checkpoint.keep_last, 1), ("model.num_classes", self.model.num_classes, 0),
            ("data.num_workers", self.data.num_workers, 0), ("data.crop_padding", self.data.crop_padding, 0),
            ("data.val_resize", self.data.val_resize, 0), ("train.num_threads", self.train.num_threads, 0),
        ):
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
        if not self.optim.gamma > 0:
            raise ConfigError(f"optim.gamma must be > 0, got {self.optim.gamma}")
        if self.optim.warmup_epochs > self.train.epochs:
            raise ConfigError(f"optim.warmup_epochs={self.optim.warmup_epochs} exceeds train.epochs={self.train.epochs}")
        if not 0 <= self.model.drop_rate < 1:
            raise ConfigError(f"model.drop_rate must lie in [0, 1), got {self.model.drop_rate}")
        if not all(s > 0 for s in self.data.std):
            raise ConfigError(f"data.std must be positive (images are divided by it), got {self.data.std}")
        return self


def _check_reference_data(data: DataConfig, aug: AugConfig) -> None:
    """The CIFAR reference-mode switches: where they apply and what they combine with."""
    if not 0 <= data.pad_fill <= 255:
        raise ConfigError(f"data.pad_fill is a pixel value 0..255 (the reference pads with 128), got {data.pad_fill}")
    if not data.drop_last and data.dataset not in ("cifar10", "cifar100"):
        raise ConfigError("data.drop_last=false applies to the CIFAR loader only (data.dataset cifar10 or cifar100); "
                          "the ImageNet loaders always drop the last partial batch")
    if not data.apr_s_before_crop:
        return
    if data.dataset not in ("cifar10", "cifar100"):
        raise ConfigError("data.apr_s_before_crop applies to the CIFAR loader only (data.dataset cifar10 or cifar100); "
                          "the ImageNet loaders crop before APR-S, as the reference's imagenet.py does")
    if aug.name != "apr_sp" or aug.sp_clean_first:
        raise ConfigError("data.apr_s_before_crop needs aug.name=apr_sp with aug.sp_clean_first=false: the loader "
                          "then yields APR-S images and the loop adds APR-P, as the reference's --aug aprs (it has "
                          f"no APR-S-only mode); got aug.name={aug.name}, sp_clean_first={aug.sp_clean_first}")


def _pixel_size(key: str, value: float | str) -> float:
    """A perturbation size in (0, 1]: a number or a fraction written as text ("8/255")."""
    from fractions import Fraction

    try:
        number = float(Fraction(value.strip())) if isinstance(value, str) else float(value)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{key} must be a number or a fraction like 8/255, got {value!r}") from None
    if not (math.isfinite(number) and 0.0 < number <= 1.0):
        raise ConfigError(f"{key} must lie in (0, 1] in pixel units of [0, 1] images (e.g. 8/255), got {value!r}")
    return number


def _validate_adversarial(adv: AdversarialConfig) -> None:
    """Checks ``adversarial`` and turns its sizes into floats (so the saved config holds numbers)."""
    _choice("adversarial.method", adv.method, ("none", "fgsm"))
    adv.eps = _pixel_size("adversarial.eps", adv.eps)
    adv.alpha = _pixel_size("adversarial.alpha", adv.alpha)
    adv.check_alpha = _pixel_size("adversarial.check_alpha", adv.check_alpha)
    if adv.check_steps < 1:
        raise ConfigError(f"adversarial.check_steps must be >= 1, got {adv.check_steps}")
    if not 0.0 < adv.overfit_drop <= 1.0:
        raise ConfigError(f"adversarial.overfit_drop must lie in (0, 1] (an accuracy drop), got {adv.overfit_drop}")


def _check_finite(node: Any, prefix: str) -> None:
    """Refuse NaN and infinities anywhere (``--set optim.lr=.nan``): every comparison with NaN is
    False, so a range check alone lets it through and the run dies later with a NaN loss."""
    if dataclasses.is_dataclass(node):
        for f in fields(node):
            _check_finite(getattr(node, f.name), f"{prefix}{f.name}" if not prefix else f"{prefix}.{f.name}")
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_finite(item, f"{prefix}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix} must be a finite number, got {node}")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


# ---------------------------------------------------------------------------------------
# dict <-> dataclass with type checks


class _OverrideText(str):
    """A ``--set`` value as typed: read as YAML (5, 0.1, true, [1, 2]) unless the key holds text,
    so ``--set data.root=2024`` stays the string "2024" and ``--set train.precision=fp32`` is text."""


_YAML11_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against ``annotation`` (bool, int, float, str, list[...])."""
    if isinstance(value, _OverrideText):
        value = str(value) if annotation is str else _parse_value(value)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null, got {value!r}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_EXPONENT.match(value.strip()):
            return float(value)  # PyYAML reads 1e-4 (no dot) as text; it is a number
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        hint = " (quote it in YAML: yes/no/on/off read as booleans)" if isinstance(value, bool) else ""
        raise ConfigError(f"{key} must be a string, got {value!r}{hint}")
    raise ConfigError(f"{key}: unsupported config type {annotation!r}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known keys in {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, annotation)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data or {}, "").validate()


def config_to_dict(config: Config) -> dict:
    return asdict(config)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                source = key_node.start_mark.name
                where = f"{source}: " if source and not str(source).startswith("<") else ""
                raise ConfigError(f"{where}duplicate key {key!r} on lines {seen[key]} and {line}; keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_value(text: str) -> Any:
    # YAML scalars: 5 -> int, 0.1 -> float, true -> bool, [1, 2] -> list, abc -> str
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a config dict."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _OverrideText(text.strip())
    return data


RECIPE_SKIP = ("studies",)  # folders of apr/configs that hold other files than training recipes


def recipes_root() -> Path:
    """``apr/configs`` of the imported package (the checkout's ``configs/`` links to it)."""
    import importlib.resources

    return Path(str(importlib.resources.files("apr") / "configs"))


def shipped_recipes() -> dict[str, Path]:
    """The training recipes shipped as package data (``apr/configs``), by name: the file stem."""
    root = recipes_root()
    files = sorted(p for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] not in RECIPE_SKIP)
    return {p.stem: p for p in files}


def resolve_recipe(spec: str | Path) -> Path:
    """A recipe given as a path, or by the name of a shipped one (``resnet50_apr_sp``, ``imagenet/...yaml``).

    A file that exists wins, so a user's own ``my.yaml`` is never shadowed by a shipped name.
    """
    path = Path(spec)
    if path.is_file():
        return path
    recipes = shipped_recipes()
    parts = (path.with_suffix("") if path.suffix == ".yaml" else path).parts
    name = parts[-1] if parts else ""
    if name in recipes and recipes[name].with_suffix("").parts[-len(parts):] == parts:
        return recipes[name]
    import difflib

    close = difflib.get_close_matches(name, list(recipes), n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else "none has a close name"
    raise ConfigError(f"config file not found: {spec} is neither a file nor a shipped recipe ({hint}; "
                      "`apr-train --list-configs` lists them all)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, a file or a shipped name (or start from defaults), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = resolve_recipe(path)
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections")
    return config_from_dict(apply_overrides(data, overrides or []))


def save_config(config: Config, path: str | Path) -> None:
    from apr.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
