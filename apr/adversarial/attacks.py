"""Linf attacks in [0, 1] image space: fast FGSM (training and evaluation), PGD, AutoAttack.

Every attack takes an :class:`apr.inference.ImageClassifier`, whose normalisation sits inside the
model, so ``eps`` and ``alpha`` are in pixel units (8/255 is eight grey levels). The reference code
(``autoattacks/train_fgsm.py``) perturbs *normalised* tensors and therefore divides eps and alpha by
the normalisation std; here nothing is divided.

Gradients are taken with ``torch.autograd.grad`` on the perturbation only: no parameter ``.grad`` is
written, so an attack inside a training step leaves the optimiser's gradients alone. Under DDP the
attack's forward runs in ``no_sync()``, so the input gradient triggers no all-reduce.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from apr.errors import UserError
from apr.inference import eval_mode

__all__ = ["AdversarialError", "parse_eps", "check_eps", "fgsm_perturb", "FGSMPerturbation", "pgd_attack",
           "catastrophic_overfitting_check", "autoattack", "autoattack_settings", "AUTOATTACK_LIBRARY",
           "BF16_ATTACK_WARNING"]

AUTOATTACK_LIBRARY = "pyautoattack"
NORMS = ("Linf", "L2")  # AutoAttack's; FGSM and PGD here are Linf
BF16_ATTACK_WARNING = ("attacking in bf16: low-precision gradients can mask robustness (attacks look weaker "
                       "than they are); report fp32 numbers")


class AdversarialError(UserError, ValueError):
    """An attack or adversarial evaluation asked with impossible settings."""


def parse_eps(text: str | float) -> float:
    """``8/255``, ``0.031`` or ``2`` -> a float in (0, 1]; the fraction form is what papers quote."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise AdversarialError(f"cannot read {text!r} as a perturbation size: give a number like 8/255 or 0.031")
    return _check_positive(value)


def _check_positive(eps: float) -> float:
    if not float(eps) > 0:
        raise AdversarialError(f"eps must be positive, got {eps}")
    return float(eps)


def check_eps(eps: float, name: str = "eps") -> float:
    if not 0.0 < float(eps) <= 1.0:
        raise AdversarialError(f"{name} must be in (0, 1] (images are in [0, 1]; e.g. 8/255), got {eps}")
    return float(eps)


def _input_gradient(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE(model(inputs), labels) / d inputs, without touching any parameter's ``.grad``."""
    no_sync = getattr(model, "no_sync", None)  # DDP: no gradient all-reduce for the attack pass
    with (no_sync() if callable(no_sync) else contextlib.nullcontext()), torch.enable_grad():
        inputs = inputs.detach().requires_grad_(True)
        loss = F.cross_entropy(model(inputs), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, inputs)
    return grad


def _random_start(images: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """delta ~ U(-eps, eps) drawn on the CPU generator (same numbers on every device), clamped to [0, 1]."""
    noise = torch.rand(images.shape, generator=generator, dtype=torch.float32)
    if images.device.type == "cuda":
        noise = noise.pin_memory()
    delta = (noise.to(images.device, non_blocking=True) * 2 - 1) * eps
    return (images + delta).clamp(0, 1) - images


def _signed_steps(model, images, labels, delta, *, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """``steps`` times: delta += alpha * sign(grad), then projection to the eps-ball and to [0, 1]."""
    for _ in range(steps):
        grad = _input_gradient(model, images + delta, labels)
        delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
        delta = (images + delta).clamp(0, 1) - images
    return delta


def fgsm_perturb(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, alpha: float,
                 random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fast FGSM (Wong et al. 2020): random start in the eps-ball, one signed step of ``alpha``, projection.

    ``random_start=False, alpha=eps`` is the classic FGSM of Goodfellow et al. Returns detached images
    in [0, 1]; the model's train/eval mode is left as it is (training uses batch statistics, as the reference).
    """
    check_eps(eps)
    check_eps(alpha, "alpha")
    images = images.detach()
    delta = _random_start(images, eps, generator) if random_start else torch.zeros_like(images)
    return (images + _signed_steps(model, images, labels, delta, eps=eps, alpha=alpha, steps=1)).detach()


@dataclass(frozen=True)
class FGSMPerturbation:
    """The training-step hook: ``perturb(model, images, labels, generator) -> adversarial images``.

    Reference values (CIFAR-10): eps 8/255, alpha 10/255, random start.
    """

    eps: float = 8 / 255
    alpha: float = 10 / 255
    random_start: bool = True

    def __post_init__(self):
        check_eps(self.eps)
        check_eps(self.alpha, "alpha")

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return fgsm_perturb(model, images, labels, eps=self.eps, alpha=self.alpha,
                            random_start=self.random_start, generator=generator)


def pgd_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, alpha: float,
               steps: int, random_start: bool = True, generator: torch.Generator | None = None,
               restarts: int = 1) -> torch.Tensor:
    """Linf PGD (Madry et al.): per image, the restart with the highest final loss is kept.

    AutoAttack has no plain PGD, so this is the project's own; ``fgsm_perturb`` is its one-step case.
    """
    check_eps(eps)
    check_eps(alpha, "alpha")
    if steps < 1 or restarts < 1:
        raise AdversarialError(f"PGD needs steps >= 1 and restarts >= 1, got steps={steps}, restarts={restarts}")
    images = images.detach()
    best, best_loss = images.clone(), torch.full((len(images),), -float("inf"), device=images.device)
    for _ in range(restarts):
        delta = _random_start(images, eps, generator) if random_start else torch.zeros_like(images)
        adv = images + _signed_steps(model, images, labels, delta, eps=eps, alpha=alpha, steps=steps)
        with torch.no_grad():
            loss = F.cross_entropy(model(adv), labels, reduction="none")
        better = loss > best_loss
        best[better], best_loss[better] = adv[better], loss[better]
    return best.detach()


def catastrophic_overfitting_check(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
                                   *, alpha: float = 2 / 255, steps: int = 5,
                                   generator: torch.Generator | None = None) -> float:
    """Accuracy under 5-step PGD on one batch: the reference's guard against catastrophic overfitting.

    FGSM training can collapse within an epoch (FGSM accuracy high, PGD accuracy near 0); the reference
    stops when this number drops by more than 0.2 from one epoch to the next. Runs in eval mode so the
    check does not move BatchNorm statistics (and so does not change the training trajectory).
    """
    with eval_mode(model):
        adv = pgd_attack(model, images, labels, eps=eps, alpha=alpha, steps=steps, random_start=True,
                         generator=generator)
        with torch.no_grad():
            correct = (model(adv).argmax(1) == labels).sum()
    return float(correct) / max(len(labels), 1)


def autoattack_settings(*, eps: float, norm: str = "Linf", version: str = "standard",
                        attacks: list[str] | None = None, seed: int = 0, n_iter: int | None = None) -> dict:
    """Everything that defines an AutoAttack run, as written next to its number."""
    import pyautoattack

    if norm not in NORMS:
        raise AdversarialError(f"norm must be one of {' | '.join(NORMS)}, got {norm!r}")
    (check_eps if norm == "Linf" else _check_positive)(eps)
    if version not in ("standard", "custom"):
        raise AdversarialError(f"AutoAttack version must be 'standard' (or 'custom' for quick checks), got {version!r}")
    if version != "custom" and (attacks is not None or n_iter is not None):
        raise AdversarialError("attacks and n_iter can only be chosen with version='custom' (standard fixes them)")
    if version == "standard":
        attacks = ["apgd-ce", "apgd-t", "fab-t", "square"]
        detail = {"apgd_iters": 100, "apgd_t_target_classes": 9, "fab_t_target_classes": 9, "square_queries": 5000}
    else:
        detail = {"apgd_iters": 100 if n_iter is None else int(n_iter)}
    return {"name": "autoattack", "eps": float(eps), "norm": norm, "version": version, "attacks": list(attacks or []),
            "seed": int(seed), **detail, "library": AUTOATTACK_LIBRARY, "library_version": pyautoattack.__version__}


AUTOATTACK_MIN_CLASSES = 10  # standard APGD-T and FAB-T attack the 9 highest other classes of every image


def check_autoattack_classes(num_classes: int, source: str) -> None:
    """Refuse the standard AutoAttack ensemble up front for a model with fewer than 10 classes (its APGD-T and
    FAB-T need 9 target classes; pyautoattack fails deep inside them), naming the attacks that do apply."""
    if int(num_classes) < AUTOATTACK_MIN_CLASSES:
        raise AdversarialError(
            f"{source} has {num_classes} classes; the standard AutoAttack ensemble needs at least "
            f"{AUTOATTACK_MIN_CLASSES} (APGD-T and FAB-T attack 9 target classes): run --attack fgsm pgd, "
            "which apply to any number of classes")


def autoattack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, norm: str = "Linf",
               version: str = "standard", attacks: list[str] | None = None, seed: int = 0,
               n_iter: int | None = None, batch_size: int = 250) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020) through ``pyautoattack``: adversarial images of ``images``.

    ``version='standard'``: APGD-CE, APGD-T (9 target classes), FAB-T (9), Square (5000 queries), 100
    iterations each, as the library fixes them. ``custom`` with ``attacks``/``n_iter`` is for quick checks.
    """
    from pyautoattack import AutoAttack

    settings = autoattack_settings(eps=eps, norm=norm, version=version, attacks=attacks, seed=seed, n_iter=n_iter)
    adversary = AutoAttack(model, attacks=attacks if version == "custom" else None, device=images.device, eps=eps,
                           norm=norm, seed=seed, version=version)
    adversary.verbose = False
    if n_iter is not None:
        for component in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
            component.n_iter = int(n_iter)
    if version == "standard" and settings["attacks"] != adversary.attacks_to_run:
        warnings.warn(f"{AUTOATTACK_LIBRARY} runs {adversary.attacks_to_run} for 'standard'", stacklevel=2)
    with eval_mode(model):
        adv, _ = adversary.run_standard_evaluation(images.detach(), labels, batch_size=batch_size)
    return adv.detach()
