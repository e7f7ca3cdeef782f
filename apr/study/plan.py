"""A study as steps: trainings, then per checkpoint its evaluations, then the report.

Each step knows its command, the steps it needs and how to tell it is done, from what the commands
themselves leave behind: a training is done when its run folder holds the checkpoint of its last epoch
and was trained from the same resolved recipe; an evaluation when its results JSON is finished and was
made from the checkpoint now on disk (the ``checkpoint_sha256`` the commands record); the report when
it is newer than every results file. A step whose inputs changed is therefore not done, and only it
(and what depends on it) runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from apr.study import commands as C
from apr.study.spec import Study

__all__ = ["Step", "plan", "step_state", "StepState", "record", "read_record", "attack_folder"]


@dataclass
class Step:
    id: str  # train:<run>, eval:<run>, ood:<run>, attack:<run>:<eps>, report
    module: str
    args: list[str]
    needs: list[str]
    fingerprint: str  # of the step's inputs (resolved recipe, or the command line)
    is_done: Callable[[], bool] = field(repr=False)
    run: str | None = None  # the training run this step belongs to
    before: Callable[[], None] | None = field(default=None, repr=False)  # called before it runs (a new recipe)


def _digest(value, study: Study) -> str:
    """Fingerprint of a step's inputs; the study folder counts as ``<out>``, so a moved study stays done."""
    text = json.dumps(value, sort_keys=True, default=str).replace(str(study.out), "<out>")
    return hashlib.sha256(text.encode()).hexdigest()


def slug(step_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", step_id)


def state_dir(study: Study) -> Path:
    return study.out / ".study"


def log_path(study: Study, step_id: str) -> Path:
    return study.out / "logs" / f"{slug(step_id)}.log"


# ----------------------------------------------------------------------------- step records


def read_record(study: Study, step_id: str) -> dict | None:
    path = state_dir(study) / "steps" / f"{slug(step_id)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def record(study: Study, step: Step, status: str, **extra) -> None:
    """What the runner knows of a step (running / done / failed / submitted), beside the step's own files."""
    from apr.io import atomic_write_json
    from apr.results import now

    log = Path(extra.pop("log", log_path(study, step.id)))
    log = log.relative_to(study.out) if log.is_relative_to(study.out) else log  # a moved study keeps its logs
    data = {"id": step.id, "status": status, "fingerprint": step.fingerprint, "host": socket.gethostname(),
            "time": now(), "log": str(log), **extra}
    atomic_write_json(state_dir(study) / "steps" / f"{slug(step.id)}.json", data)


def step_log(study: Study, step_id: str, rec: dict | None = None) -> Path:
    """The step's log file: where its record says (slurm's output file), else logs/<step>.log."""
    rec = rec if rec is not None else read_record(study, step_id) or {}
    return study.out / rec["log"] if rec.get("log") else log_path(study, step_id)


# ----------------------------------------------------------------------------- done?


_SHA_CACHE: dict[tuple, str] = {}


def checkpoint_sha(path: Path) -> str | None:
    """SHA-256 of a checkpoint (cached by size and mtime: a study asks for it once per step)."""
    from apr.results import file_sha256

    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def results_done(outputs: list[Path], checkpoint: Path) -> bool:
    """Every results JSON is finished and was made from the checkpoint now at ``checkpoint``."""
    sha = checkpoint_sha(checkpoint)
    for path in outputs:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if not (data.get("finished") or data.get("complete")) or data.get("checkpoint_sha256") != sha:
            return False
    return sha is not None


def _fingerprint_matches(study: Study, step: Step) -> bool:
    rec = read_record(study, step.id)
    return rec is None or rec.get("fingerprint") == step.fingerprint


# ----------------------------------------------------------------------------- the plan


@dataclass
class _Run:
    name: str  # <training>_s<seed>
    training: str
    seed: int
    checkpoint: Path  # the checkpoint of the last epoch


def _training_steps(study: Study) -> tuple[list[Step], list[_Run]]:
    from apr.config import config_to_dict, load_config

    steps, runs = [], []
    for training in study.trainings:
        for seed in training.seeds:
            name = f"{training.name}_s{seed}"
            overrides = [*training.overrides, f"train.seed={seed}", f"train.output_dir={study.out / 'runs'}",
                         f"train.run_name={name}"]
            cfg = load_config(training.recipe, overrides)
            run_dir = study.out / "runs" / name
            final = run_dir / f"checkpoint-e{cfg.train.epochs:04d}-s{0:07d}.pt"
            step = Step(f"train:{name}", C.TRAIN, C.train_args(training.recipe, overrides), [],
                        _digest(config_to_dict(cfg), study), is_done=lambda: False, run=name)
            step.is_done = lambda step=step, final=final: final.is_file() and _fingerprint_matches(study, step)
            step.before = lambda step=step, run_dir=run_dir: _set_aside(study, step, run_dir)
            steps.append(step)
            runs.append(_Run(name, training.name, seed, final))
    return steps, runs


def _set_aside(study: Study, step: Step, run_dir: Path) -> None:
    """A run folder trained from another recipe is renamed (never deleted), so the new recipe starts fresh."""
    rec = read_record(study, step.id)
    if rec is not None and rec.get("fingerprint") != step.fingerprint and run_dir.exists():
        target = run_dir.with_name(f"{run_dir.name}.replaced-{rec['fingerprint'][:8]}")
        os.replace(run_dir, target)
        print(f"{step.id}: the recipe changed since {run_dir} was trained; the old run is kept as {target}")


def _baseline_run(study: Study, run: _Run, runs: list[_Run], section: dict | None) -> str | None:
    """The baseline run of the same seed (else its first seed) normalising CE in this study."""
    name = (section or {}).get("baseline")
    if not name:
        return None
    same = [r for r in runs if r.training == name and r.seed == run.seed]
    return (same or [r for r in runs if r.training == name])[0].name


def _result_step(study: Study, step_id: str, module: str, args: list[str], needs: list[str],
                 outputs: list[Path], run: _Run) -> Step:
    step = Step(step_id, module, args, needs, _digest([module, args], study), is_done=lambda: False, run=run.name)
    step.is_done = lambda: _fingerprint_matches(study, step) and results_done(outputs, run.checkpoint)
    return step


def attack_folder(study: Study, eps: str) -> Path:
    """Where the attack results of one eps go: eval/ for a single eps, eval/eps-<eps>/ for several."""
    eval_dir = study.out / "eval"
    if len(study.attacks["eps"]) == 1:
        return eval_dir
    return eval_dir / f"eps-{re.sub(r'[^0-9A-Za-z.]+', '_', str(eps))}"


def _evaluation_steps(study: Study, runs: list[_Run]) -> list[Step]:
    eval_dir, steps = study.out / "eval", []
    for run in runs:
        needs = [f"train:{run.name}"]
        if study.corruption or study.suites:
            baseline = _baseline_run(study, run, runs, study.corruption)
            outputs = ([eval_dir / f"{run.name}.json"] if study.corruption else []) + (
                [eval_dir / f"{run.name}.shift.json"] if study.suites else [])
            extra = [f"eval:{baseline}"] if baseline and baseline != run.name and study.corruption else []
            steps.append(_result_step(study, f"eval:{run.name}", C.EVALUATE,
                                      C.evaluate_args(study, run.checkpoint, eval_dir,
                                                      baseline if study.corruption else None),
                                      needs + extra, outputs, run))
        if study.ood:
            steps.append(_result_step(study, f"ood:{run.name}", C.OOD, C.ood_args(study, run.checkpoint, eval_dir),
                                      needs, [eval_dir / f"{run.name}.ood.json"], run))
        for eps in (study.attacks or {}).get("eps", []):
            folder = attack_folder(study, eps)
            steps.append(_result_step(study, f"attack:{run.name}:{eps}", C.ADVERSARIAL,
                                      C.attack_args(study, run.checkpoint, folder, eps), needs,
                                      [folder / f"{run.name}.adv.json"], run))
    return steps


def _report_step(study: Study, evaluations: list[Step], runs: list[_Run]) -> Step:
    folders = sorted({study.out / "eval"} | ({attack_folder(study, e) for e in study.attacks["eps"]}
                                             if study.attacks else set()))
    baseline = _baseline_run(study, runs[0], runs, study.report if (study.report or {}).get("baseline")
                             else study.corruption)
    out = study.out / "report"
    args = C.report_args(study, folders, out, baseline)
    step = Step("report", C.REPORT, args, [s.id for s in evaluations], _digest([C.REPORT, args], study),
                is_done=lambda: False)

    def done() -> bool:
        report = out / "report.md"
        if not (report.is_file() and _fingerprint_matches(study, step)):
            return False
        newest = max((p.stat().st_mtime_ns for f in folders if f.is_dir() for p in f.glob("*.json")), default=0)
        return report.stat().st_mtime_ns >= newest

    step.is_done = done
    return step


def plan(study: Study) -> list[Step]:
    """Every step of the study in an order that respects ``needs`` (trainings first, report last)."""
    trainings, runs = _training_steps(study)
    evaluations = _evaluation_steps(study, runs)
    baseline_first = sorted(evaluations, key=lambda s: not any(s.id in o.needs for o in evaluations))
    report = [_report_step(study, evaluations, runs)] if study.report is not None and evaluations else []
    steps = trainings + baseline_first + report
    _chain_done(steps)
    return steps


def _chain_done(steps: list[Step]) -> None:
    """A step is done only when what it needs is done too (a training to redo makes its evaluations stale)."""
    by_id = {s.id: s for s in steps}
    for step in steps:
        own, needs = step.is_done, [by_id[n] for n in step.needs]
        step.is_done = lambda own=own, needs=needs: all(n.is_done() for n in needs) and own()


# ----------------------------------------------------------------------------- status


@dataclass
class StepState:
    status: str  # pending | running | done | failed | submitted
    detail: str = ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_error_line(log: Path) -> str:
    """The line that says why a step failed: its ``error:`` line, else the last line of its log."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if line.startswith("error:")]
    lines = [line for line in lines if not line.startswith("(run with --debug")]
    return (errors or lines or ["(empty log)"])[-1]


def failure(rec: dict, log: Path) -> str:
    """Why a step failed, in a line: how its command exited and its log's error line."""
    rc = rec.get("rc") or 0
    if rc < 0:
        why = f"killed by {signal.Signals(-rc).name}: " if -rc in signal.valid_signals() else f"exit {rc}: "
    else:
        why = f"exit {rc}: " if rc else ""
    return why + last_error_line(log)


def step_state(study: Study, step: Step, jobs_alive: Callable[[str], bool | None] | None = None) -> StepState:
    """pending / running / done / failed for ``status`` and for the launchers' skip decision. A step whose
    command exited non-zero stays failed whatever files it left (the next ``run`` runs it again)."""
    rec = read_record(study, step.id)
    current = rec is not None and rec.get("fingerprint") == step.fingerprint
    log = step_log(study, step.id, rec or {})
    if current and rec["status"] == "failed":
        return StepState("failed", failure(rec, log))
    if step.is_done():
        return StepState("done")
    if not current:
        return StepState("pending", "inputs changed" if rec else "")
    if rec["status"] == "running":
        if rec.get("host") != socket.gethostname() or _alive(int(rec.get("pid", 0))):
            return StepState("running", f"pid {rec.get('pid')} on {rec.get('host')}")
        return StepState("pending", "interrupted: resumes on the next run")
    if rec["status"] == "submitted":
        alive = jobs_alive(rec["job"]) if jobs_alive else None
        if alive or alive is None:
            return StepState("running", f"slurm job {rec['job']}")
        return StepState("failed", f"slurm job {rec['job']} ended without its results: {last_error_line(log)}")
    return StepState("pending", "its results are gone or incomplete")
