"""The study file: which trainings, which evaluations of each checkpoint, which report.

Validated as strictly as a recipe (apr/config.py): unknown keys, duplicate keys, wrong types, missing
recipes and undefined ``${paths.NAME}`` variables are one-line errors that name the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from apr.config import _UniqueKeyLoader  # the recipes' loader: refuses duplicate keys
from apr.errors import UserError

__all__ = ["StudyError", "Study", "Training", "load_study"]

_VARIABLE = re.compile(r"\$\{paths\.([A-Za-z0-9_]+)\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyError(UserError, ValueError):
    """A study file or a study option that cannot be used as written."""


@dataclass
class Training:
    name: str  # training name in the study; run name = <name>_s<seed>
    recipe: Path
    seeds: list[int]
    overrides: list[str]  # the study's `set`, then the training's own


@dataclass
class Study:
    name: str
    file: Path
    out: Path
    paths: dict[str, str]
    gpus: int
    trainings: list[Training]
    data: dict[str, str]  # val and/or cifar: the in-distribution test data of every evaluation
    corruption: dict[str, Any] | None
    suites: dict[str, str]
    ood: dict[str, Any] | None
    attacks: dict[str, Any] | None
    report: dict[str, Any] | None
    slurm: dict[str, list[str]] = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)


# key -> its kind (str, int, "strings", "mapping", ...); a dict is a nested section
_SCHEMA: dict[str, Any] = {
    "name": str, "out": str, "paths": "mapping", "gpus": int, "set": "strings", "trainings": "trainings",
    "data": {"val": str, "cifar": str},
    "corruption": {"root": str, "baseline": str, "options": "strings"},
    "suites": "mapping",
    "ood": {"sets": "mapping", "options": "strings"},
    "attacks": {"attack": "strings", "eps": "strings", "options": "strings"},
    "report": {"baseline": str, "options": "strings"},
    "slurm": {"options": "strings", "train": "strings", "eval": "strings"},  # extra sbatch options
}
_TRAINING = {"name": str, "recipe": str, "seeds": "ints", "set": "strings"}


def _check(where: str, value: Any, kind: Any) -> None:
    """One value against its schema entry; the message names the key."""
    ok = {str: lambda v: isinstance(v, str), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          "strings": lambda v: isinstance(v, list) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                                           for x in v),
          "ints": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
          "mapping": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
          "trainings": lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)}
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise StudyError(f"{where} must be a mapping with keys {', '.join(kind)}")
        _keys(where, value, kind)
        return
    if not ok[kind](value):
        what = {str: "a string", int: "an integer", "strings": "a list of strings", "ints": "a list of integers",
                "mapping": "a mapping of NAME: text", "trainings": "a non-empty list of trainings"}[kind]
        raise StudyError(f"{where} must be {what}, got {value!r}")


def _keys(where: str, data: dict, schema: dict) -> None:
    unknown = sorted(set(data) - set(schema))
    if unknown:
        prefix = f"{where}." if where else ""
        raise StudyError(f"unknown study key(s) {', '.join(prefix + k for k in unknown)}; known keys in "
                         f"{where or 'the top level'}: {', '.join(schema)}")
    for key, value in data.items():
        _check(f"{where}.{key}" if where else key, value, schema[key])


def _substitute(node: Any, paths: dict[str, str], source: Path) -> Any:
    """``${paths.NAME}`` in every string of the study, from ``paths`` (after --set paths.NAME=...)."""
    if isinstance(node, dict):
        return {k: _substitute(v, paths, source) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, paths, source) for v in node]
    if isinstance(node, str):
        def value(match: re.Match) -> str:
            if match.group(1) not in paths:
                raise StudyError(f"{source}: ${{paths.{match.group(1)}}} is not defined; add it under paths: or "
                                 f"give --set paths.{match.group(1)}=VALUE")
            return paths[match.group(1)]
        return _VARIABLE.sub(value, node)
    return node


def _apply_sets(paths: dict[str, str], sets: list[str]) -> dict[str, str]:
    paths = dict(paths)
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("paths.") or not key[len("paths."):]:
            raise StudyError(f"--set {item!r}: a study takes --set paths.NAME=VALUE (recipe values go in the "
                             "study's set: list)")
        paths[key[len("paths."):]] = value
    return paths


def recipe_search_path(study_file: Path) -> list[Path]:
    """Where a relative recipe is looked for: the study's folder, the configs folder above it, the
    current folder, then the recipes shipped in the package."""
    import apr

    package = Path(apr.__file__).resolve().parent
    return [study_file.parent, study_file.parent.parent, Path.cwd(), package / "configs", package.parent / "configs"]


def _resolve_recipe(text: str, study_file: Path, where: str) -> Path:
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [base / path for base in recipe_search_path(study_file)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise StudyError(f"{where}: recipe {text} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def _trainings(raw: list[dict], common: list[str], study_file: Path) -> list[Training]:
    trainings, names = [], set()
    for i, item in enumerate(raw):
        where = f"trainings[{i}]"
        _keys(where, item, _TRAINING)
        for key in ("name", "recipe"):
            if key not in item:
                raise StudyError(f"{where} needs {key}:")
        name = item["name"]
        if not _NAME.match(name) or name in names:
            raise StudyError(f"{where}: name {name!r} must be unique and made of letters, digits, _ . -")
        names.add(name)
        seeds = item.get("seeds", [0])
        if not seeds or len(set(seeds)) != len(seeds):
            raise StudyError(f"{where}.seeds must be a non-empty list of distinct integers, got {seeds}")
        trainings.append(Training(name, _resolve_recipe(item["recipe"], study_file, where), list(seeds),
                                  [*common, *map(str, item.get("set", []))]))
    return trainings


def _check_sections(study: Study) -> None:
    """What the evaluations need from each other (a baseline that is a training, data for OOD...)."""
    names = {t.name for t in study.trainings}
    for section, data in (("corruption", study.corruption), ("report", study.report)):
        if data and data.get("baseline") and data["baseline"] not in names:
            raise StudyError(f"{section}.baseline {data['baseline']!r} is not a training of this study "
                             f"({', '.join(sorted(names))})")
    if len(study.data) > 1:
        raise StudyError("data: give val (an ImageNet-layout folder) or cifar (the CIFAR python folder), not both")
    needs_data = [s for s, v in (("corruption", study.corruption), ("suites", study.suites), ("ood", study.ood),
                                 ("attacks", study.attacks)) if v]
    if needs_data and not study.data:
        raise StudyError(f"{', '.join(needs_data)} need the in-distribution test data: add data: {{val: FOLDER}} "
                         "or data: {cifar: FOLDER}")
    if study.corruption is not None and "root" not in study.corruption:
        raise StudyError("corruption needs root: (the ImageNet-C-layout tree, or the CIFAR-C folder with data.cifar)")
    if study.ood is not None and not study.ood.get("sets"):
        raise StudyError("ood needs sets: {NAME: PATH, ...}")
    if study.attacks is not None and not study.attacks.get("eps"):
        study.attacks["eps"] = ["8/255"]
    if study.gpus < 1:
        raise StudyError(f"gpus must be >= 1, got {study.gpus}")


def load_study(path: str | Path, sets: list[str] | None = None, out: str | Path | None = None) -> Study:
    """Read and validate a study file; ``sets`` = ``paths.NAME=VALUE`` strings from the command line."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    with open(path) as f:
        raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study must be a YAML mapping (trainings:, corruption:, ood:, ...)")
    try:
        _keys("", raw, _SCHEMA)
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None
    if "trainings" not in raw:
        raise StudyError(f"{path}: a study needs trainings: (a list of name:, recipe:, seeds:, set:)")
    paths = _apply_sets(raw.get("paths", {}), sets or [])
    data = _substitute(raw, paths, path)
    name = data.get("name", path.stem)
    try:
        trainings = _trainings(data["trainings"], list(map(str, data.get("set", []))), path)
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None
    study = Study(name=name, file=path.resolve(), out=Path(out or data.get("out") or f"studies/{name}").resolve(),
                  paths=paths, gpus=data.get("gpus", 1), trainings=trainings, data=data.get("data", {}),
                  corruption=data.get("corruption"), suites=data.get("suites", {}), ood=data.get("ood"),
                  attacks=data.get("attacks"), report=data.get("report", {}),
                  slurm={k: list(map(str, v)) for k, v in data.get("slurm", {}).items()}, raw=raw)
    try:
        _check_sections(study)
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None
    return study


def missing_paths(study: Study) -> list[str]:
    """Data folders the study names that do not exist here (checked before a local run starts)."""
    named = [*study.data.values(), *study.suites.values(), *(study.ood or {}).get("sets", {}).values()]
    if study.corruption:
        named.append(study.corruption["root"])
    return [p for p in named if not Path(p).exists()]
