"""Every step's command line, in one place, in the one flag vocabulary of apr.cli.

A step is ``(module, args)``; the launchers add ``python -m`` / ``torchrun`` (local) or hand the
same pair to slurm/*.sh. When a command's flags are renamed, this module is the one to change.
"""

from __future__ import annotations

from pathlib import Path

TRAIN, EVALUATE, OOD, ADVERSARIAL, REPORT = ("apr.commands.train", "apr.commands.evaluate", "apr.ood",
                                             "apr.adversarial", "apr.report")


def train_args(recipe: Path, overrides: list[str]) -> list[str]:
    """Training (resumable: --resume auto continues an interrupted run of the same folder)."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    return ["--config", str(recipe), *sets, "--resume", "auto", "--no-progress"]


def _data(study) -> list[str]:
    if "cifar" in study.data:
        return ["--cifar", study.data["cifar"]]
    return ["--val", study.data["val"]]


def evaluate_args(study, checkpoint: Path, out: Path, baseline: str | None) -> list[str]:
    """Corruption cells (ImageNet-C / CIFAR-C) and the --suite sets of one checkpoint; no report yet."""
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--no-report", "--no-progress"]
    if study.corruption:
        root = study.corruption["root"]
        args += ["--cifar-c", root] if "cifar" in study.data else ["--imagenet-c", root]
    args += _data(study)
    if study.suites:
        args += ["--suite", *(f"{name}={folder}" for name, folder in study.suites.items())]
    if baseline:
        args += ["--baseline", baseline]
    return args + [str(o) for o in (study.corruption or {}).get("options", [])]


def ood_args(study, checkpoint: Path, out: Path) -> list[str]:
    sets = [f"{name}={path}" for name, path in study.ood["sets"].items()]
    return ["--checkpoint", str(checkpoint), *_data(study), "--ood", *sets,
            "--out", str(out), "--no-progress", *map(str, study.ood.get("options", []))]


def attack_args(study, checkpoint: Path, out: Path, eps: str) -> list[str]:
    attacks = study.attacks.get("attack") or ["pgd", "autoattack"]
    return ["--checkpoint", str(checkpoint), *_data(study), "--attack", *attacks, "--eps", str(eps),
            "--out", str(out), *map(str, study.attacks.get("options", []))]


def report_args(study, results: list[Path], out: Path, baseline: str | None) -> list[str]:
    args = [*map(str, results), "--out", str(out)]
    if baseline:
        args += ["--baseline", baseline]
    return args + [str(o) for o in (study.report or {}).get("options", [])]


def local_argv(python: str, module: str, args: list[str], gpus: int) -> list[str]:
    """The local launcher's command: torchrun (one process per GPU) when the study asks for several."""
    if gpus > 1 and module != REPORT:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                "-m", module, *args]
    return [python, "-m", module, *args]
