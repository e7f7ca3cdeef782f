"""Adversarial evaluation of checkpoints -> ``<out>/<run_name>.adv.json`` (schema ``apr.adv/1``).

One JSON per checkpoint, rewritten atomically after the clean pass and after every attack; a rerun
with the same checkpoint (sha256), the same image subset (fingerprint) and the same attack settings
skips what is done; earlier attacks not asked again are kept, and runs writing the same file at once
merge their attacks under its lock (``apr.results.ResultsFile``). Under torchrun the n images are split
over the ranks and the counts summed.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from apr.adversarial.attacks import AdversarialError, autoattack, autoattack_settings, check_eps, pgd_attack
from apr.data.base import balanced_subset, mix_seed
from apr.distributed import World, all_reduce_sum, broadcast_object
from apr.results import ResultsFile, changed_keys, merge_entries

__all__ = ["SCHEMA", "ATTACKS", "AttackSpec", "pgd_spec", "build_attacks", "stratified_subset", "evaluate_attacks",
           "masking_flags", "load_adv_result", "EPS_SWEEP_FACTORS"]

SCHEMA = "apr.adv/1"
ATTACKS = ("fgsm", "pgd", "autoattack")
EPS_SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0)

# attack(classifier, images, labels, generator) -> adversarial images
AttackFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class AttackSpec:
    """One attack: its full settings (written next to its number and compared on resume) and its function."""

    name: str
    settings: dict
    run: AttackFn = field(repr=False)


def _own_settings(name: str, eps: float, alpha: float, steps: int, restarts: int, random_start: bool) -> dict:
    import apr

    return {"name": name, "eps": eps, "norm": "Linf", "steps": steps, "alpha": alpha, "restarts": restarts,
            "random_start": random_start, "library": "apr", "library_version": getattr(apr, "__version__", None)}


def pgd_spec(name: str, eps: float, alpha: float, steps: int, restarts: int = 1,
             random_start: bool = True) -> AttackSpec:
    """PGD (and FGSM as its one-step case) as an AttackSpec."""
    settings = _own_settings(name, eps, alpha, steps, restarts, random_start)

    def run(model, images, labels, generator):
        return pgd_attack(model, images, labels, eps=eps, alpha=alpha, steps=steps, restarts=restarts,
                          random_start=random_start, generator=generator)

    return AttackSpec(name, settings, run)


def build_attacks(names: Iterable[str], *, eps: float, norm: str = "Linf", pgd_steps: int = 50,
                  pgd_alpha: float | None = None, pgd_restarts: int = 1, seed: int = 0) -> list[AttackSpec]:
    """The attacks asked for, in order: ``fgsm`` (classic, alpha = eps, no random start), ``pgd``, ``autoattack``."""
    names = list(names)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise AdversarialError(f"unknown attack(s) {unknown or names}; choose from {' '.join(ATTACKS)}")
    if norm != "Linf" and set(names) - {"autoattack"}:
        raise AdversarialError("fgsm and pgd are Linf attacks here; use --norm Linf or only --attack autoattack")
    if "pgd" in names and (pgd_steps < 1 or pgd_restarts < 1):  # refused before the clean pass, not after FGSM
        raise AdversarialError(f"PGD needs --pgd-steps >= 1 and --pgd-restarts >= 1, got {pgd_steps} and "
                               f"{pgd_restarts}")
    specs = []
    for name in dict.fromkeys(names):
        if name == "fgsm":
            specs.append(pgd_spec("fgsm", check_eps(eps), check_eps(eps), steps=1, random_start=False))
        elif name == "pgd":
            alpha = check_eps(eps / 4 if pgd_alpha is None else pgd_alpha, "pgd alpha")
            specs.append(pgd_spec("pgd", check_eps(eps), alpha, steps=pgd_steps, restarts=pgd_restarts))
        else:
            settings = autoattack_settings(eps=eps, norm=norm, version="standard", seed=seed)

            def run(model, images, labels, generator):  # noqa: ARG001 - AutoAttack seeds itself
                return autoattack(model, images, labels, eps=eps, norm=norm, version="standard", seed=seed)

            specs.append(AttackSpec("autoattack", settings, run))
    return specs


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The attacked images: :func:`apr.data.base.balanced_subset`, with ``n`` checked against the set."""
    if not 0 < n <= len(labels):
        raise AdversarialError(f"--max-images {n} is not in 1..{len(labels)} (the number of images in the set); "
                               "lower --max-images")
    return balanced_subset(labels, n, seed)


def fingerprint(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def _count_correct(classifier, batches, device, attack: AttackSpec | None, seed: int, world: World,
                   progress=None) -> tuple[int, int]:
    """(correct, seen) over all ranks: clean when ``attack`` is None, else on the attack's images."""
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for batch_index, (images, labels) in enumerate(batches):
        images, labels = images.to(device), labels.to(device)
        if attack is not None:
            generator = torch.Generator().manual_seed(mix_seed(seed, batch_index, world.rank))
            images = attack.run(classifier, images, labels, generator)
        with torch.no_grad():
            correct[0] += (classifier(images).argmax(1) == labels).sum()
        correct[1] += len(labels)
        if progress is not None:
            progress.update(len(labels))
    total = all_reduce_sum(correct, world)
    return int(total[0].item()), int(total[1].item())


def masking_flags(result: dict) -> list[str]:
    """Signs of gradient masking (Athalye et al. 2018) in a result: each flag names what it saw."""
    flags = []
    clean = result["clean"]["accuracy"] if result.get("clean") else None
    attacks = result.get("attacks", {})
    acc = {name: a["robust_accuracy"] for name, a in attacks.items()}
    if "pgd" in acc and "fgsm" in acc and acc["pgd"] > acc["fgsm"]:
        flags.append(f"pgd_weaker_than_fgsm: PGD robust accuracy {acc['pgd']:.4f} > FGSM {acc['fgsm']:.4f}")
    for name, value in acc.items():
        if clean is not None and value > clean:
            flags.append(f"robust_above_clean: {name} robust accuracy {value:.4f} > clean {clean:.4f}")
    sweep = result.get("eps_sweep")
    if sweep and sweep.get("robust_accuracy"):
        values = sweep["robust_accuracy"]
        rises = [i for i in range(1, len(values)) if values[i] > values[i - 1]]
        if rises:
            pairs = ", ".join(f"eps {sweep['eps'][i]:.4g}: {values[i]:.4f} > {values[i - 1]:.4f}" for i in rises)
            flags.append(f"eps_sweep_not_decreasing: robust accuracy rises with eps ({pairs})")
        elif len(values) > 1 and values[0] > 0 and values[-1] >= values[0]:
            flags.append(f"eps_sweep_flat: robust accuracy {values[0]:.4f} at eps {sweep['eps'][0]:.4g} "
                         f"does not fall by eps {sweep['eps'][-1]:.4g}")
    return flags


def load_adv_result(path: str | Path) -> dict:
    import json

    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise AdversarialError(f"cannot read {path}: {exc}; delete it to start over")
    if result.get("schema") != SCHEMA:
        raise AdversarialError(f"{path} is not an {SCHEMA} file (schema {result.get('schema')!r})")
    return result


def _results_file(out_path: Path, identity: dict) -> ResultsFile:
    """The results file, reusable (and mergeable) for the same checkpoint, data and precision."""
    return ResultsFile(out_path, load_adv_result,
                       lambda previous: [f"it was made with other {', '.join(keys)}"
                                         for keys in [changed_keys(previous, identity)] if keys])


def _merge(on_disk: dict, ours: dict, computed: set, settings: dict) -> dict:
    """This run's result with every attack another run (or an earlier one) put in the file meanwhile
    (one of this run's attacks with other settings is dropped, not kept stale)."""
    def current(name, attack) -> bool:
        return name not in settings or attack.get("settings") == settings[name]

    merged = {**ours, "attacks": merge_entries(on_disk.get("attacks") or {}, ours["attacks"], computed, current)}
    merged["clean"] = ours["clean"] or on_disk.get("clean")
    if "eps_sweep" not in computed:
        merged["eps_sweep"] = on_disk.get("eps_sweep") or ours["eps_sweep"]
    merged["flags"] = masking_flags(merged)
    return merged


def evaluate_attacks(classifier, make_batches: Callable[[], Iterable], *, attacks: list[AttackSpec],
                     out_path: str | Path, identity: dict, extra: dict, n: int, seed: int, device,
                     world: World = World(), sweep: list[AttackSpec] | None = None,
                     make_sweep_batches: Callable[[], Iterable] | None = None, progress_factory=None) -> dict:
    """Clean accuracy, then each attack (and the optional eps sweep), resuming finished ones from ``out_path``.

    ``identity`` (checkpoint sha256, data fingerprint, precision, ...) must match for a resume; an
    attack is reused only when its settings match too. Rank 0 writes the JSON after each step.
    """
    out_path = Path(out_path)
    results_file = _results_file(out_path, identity)
    previous = broadcast_object(results_file.load() if world.is_main else None, world) or {}
    settings = {attack.name: json.loads(json.dumps(attack.settings)) for attack in attacks}  # as the file holds them
    old_attacks = previous.get("attacks", {})
    # earlier attacks not asked for this time stay: they are measurements of the same model and images;
    # an asked one made with other settings goes at the first save (not kept stale until it is rerun)
    kept = {name: done for name, done in old_attacks.items()
            if name not in settings or done.get("settings") == settings[name]}
    result = {"schema": SCHEMA, **identity, **extra, "n": n, "seed": seed, "clean": previous.get("clean"),
              "attacks": kept, "eps_sweep": previous.get("eps_sweep"), "flags": [], "finished": False}

    computed: set[str] = set()
    written = [result]

    def save():
        result["flags"] = masking_flags(result)
        if world.is_main:
            written[0] = results_file.save(result, lambda on_disk, ours: _merge(on_disk, ours, computed, settings))

    def measure(attack: AttackSpec | None, batches_fn, label: str) -> dict:
        bar = progress_factory(label) if progress_factory is not None and world.is_main else None
        start = time.perf_counter()
        correct, seen = _count_correct(classifier, batches_fn(), device, attack, seed, world, bar)
        if bar is not None:
            bar.close()
        return {"correct": correct, "n": seen, "accuracy": correct / max(seen, 1),
                "seconds": round(time.perf_counter() - start, 3)}

    if result["clean"] is None:
        result["clean"] = measure(None, make_batches, "clean")
        save()
    for attack in attacks:
        done = old_attacks.get(attack.name)
        if done is not None and done.get("settings") == attack.settings:
            result["attacks"][attack.name] = done
            continue
        counts = measure(attack, make_batches, attack.name)
        result["attacks"][attack.name] = {"settings": attack.settings, "correct": counts["correct"],
                                          "n": counts["n"], "robust_accuracy": counts["accuracy"],
                                          "seconds": counts["seconds"]}
        computed.add(attack.name)
        save()
    if sweep:
        result["eps_sweep"] = _run_sweep(sweep, previous.get("eps_sweep"), measure, make_sweep_batches)
        computed.add("eps_sweep")
    result["finished"] = True
    save()
    result = written[0]
    for flag in result["flags"]:
        if world.is_main:
            warnings.warn(f"{out_path.name}: possible gradient masking: {flag}", stacklevel=2)
    return result


def _run_sweep(sweep: list[AttackSpec], done: dict | None, measure, make_batches) -> dict:
    """Robust accuracy of a short PGD at growing eps (on a small subset); it should fall monotonically."""
    settings = [s.settings for s in sweep]
    if done and done.get("settings") == settings:
        return done
    values, counts = [], []
    for spec in sweep:
        measured = measure(spec, make_batches, f"sweep eps={spec.settings['eps']:.4g}")
        values.append(measured["accuracy"])
        counts.append(measured["n"])
    return {"settings": settings, "eps": [s.settings["eps"] for s in sweep], "robust_accuracy": values, "n": counts}
