"""The slurm launcher: slurm schedules, we only submit.

The trainings that are not done go as one job array of slurm/train.sh (line i of an args file is
training i's command line); every evaluation of a checkpoint is a slurm/eval.sh job with
``--dependency=afterok`` on its training's array task (and on the baseline's evaluation where CE is
normalised by it); the report waits for all of them. Preemption and requeue behave as in slurm/*.sh.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

from apr.errors import UserError
from apr.study.local import study_lock
from apr.study.plan import Step, record, slug, state_dir, step_state
from apr.study.spec import Study

__all__ = ["SlurmError", "submit", "slurm_scripts", "job_alive"]


class SlurmError(UserError, RuntimeError):
    """sbatch is missing or refused a job."""


def slurm_scripts() -> Path:
    """The project's slurm/ folder (a checkout of apr: the scripts are not package data)."""
    import apr

    folder = Path(apr.__file__).resolve().parent.parent / "slurm"
    if not (folder / "train.sh").is_file():
        raise SlurmError(f"slurm/train.sh not found next to the apr package ({folder}); the slurm launcher runs "
                         "from a checkout of apr")
    return folder


def _sbatch(argv: list[str], dry_run: bool, echo, fake_id: list[int]) -> str:
    """Submit; return the job id (``--parsable``). A dry run prints the command and invents an id."""
    command = ["sbatch", "--parsable", *argv]
    if dry_run:
        fake_id[0] += 1
        echo(shlex.join(command))
        return f"DRYRUN{fake_id[0]}"
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: the slurm launcher needs slurm's client commands on PATH") from None
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused {shlex.join(command)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def job_alive(job: str) -> bool | None:
    """Whether slurm still lists the job (pending, running, requeued); None when squeue is not there."""
    try:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return done.returncode == 0 and bool(done.stdout.strip())


def _options(study: Study, kind: str) -> list[str]:
    """The study's extra sbatch options (partition, account, GPUs, time...): slurm: {options, train, eval}."""
    return [*study.slurm.get("options", []), *study.slurm.get(kind, [])]


def _train_array(study: Study, trainings: list[Step], dry_run: bool, echo, fake) -> dict[str, str]:
    """One job array for the trainings: line i of the args file = CONFIG and options of training i."""
    lines = []
    for step in trainings:
        if step.before is not None and not dry_run:
            step.before()
        config, options = step.args[1], [a for a in step.args[2:] if a not in ("--resume", "auto", "--no-progress")]
        lines.append(shlex.join([config, *options]))
    args_file = state_dir(study) / f"train-args-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    if not dry_run:
        from apr.io import atomic_write_text

        atomic_write_text(args_file, "\n".join(lines) + "\n")
    output = study.out / "logs" / "train-%A_%a.out"
    job = _sbatch([f"--array=0-{len(trainings) - 1}", f"--job-name=apr-study-{study.name}", f"--output={output}",
                   *_options(study, "train"), str(slurm_scripts() / "train.sh"), "--args-file", str(args_file)],
                  dry_run, echo, fake)
    for i, step in enumerate(trainings):
        echo(f"{step.id}: submitted as array task {job}_{i}")
    return {step.id: f"{job}_{i}" for i, step in enumerate(trainings)}


def submit(study: Study, steps: list[Step], dry_run: bool = False, echo=print) -> int:
    """Submit every step that is not done (or already queued), with afterok dependencies; 0 on success."""
    with study_lock(study):
        states = {s.id: step_state(study, s, job_alive) for s in steps}
        todo = [s for s in steps if states[s.id].status not in ("done", "running")]
        jobs = {s.id: states[s.id].detail.split()[-1] for s in steps
                if states[s.id].status == "running" and states[s.id].detail.startswith("slurm job")}
        fake = [0]
        if not dry_run:
            (study.out / "logs").mkdir(parents=True, exist_ok=True)  # slurm does not create --output's folder
        trainings = [s for s in todo if s.module.endswith(".train")]
        if trainings:
            jobs.update(_train_array(study, trainings, dry_run, echo, fake))
        for step in (s for s in todo if not s.module.endswith(".train")):
            needs = [jobs[n] for n in step.needs if n in jobs]
            output = study.out / "logs" / f"{slug(step.id)}-%j.out"
            dependency = [f"--dependency=afterok:{':'.join(needs)}"] if needs else []
            jobs[step.id] = _sbatch([*dependency, f"--job-name=apr-study-{study.name}", f"--output={output}",
                                     *_options(study, "eval"), str(slurm_scripts() / "eval.sh"), "--module",
                                     step.module, *step.args], dry_run, echo, fake)
            echo(f"{step.id}: submitted as job {jobs[step.id]}" + (f" (afterok {', '.join(needs)})" if needs else ""))
        if not dry_run:
            for step in todo:
                record(study, step, "submitted", job=jobs[step.id], log=_slurm_log(study, step, jobs[step.id]))
        for step in steps:
            if step not in todo:
                echo(f"{step.id}: {states[step.id].status} {states[step.id].detail}".rstrip())
    if not dry_run:
        echo(f"submitted {len(todo)} step(s) of study {study.name}; apr-study status shows their progress")
    return 0


def _slurm_log(study: Study, step: Step, job: str) -> str:
    """Where slurm writes the step's output (the --output patterns above, filled in)."""
    if "_" in job and step.module.endswith(".train"):
        array, index = job.split("_", 1)
        return str(study.out / "logs" / f"train-{array}_{index}.out")
    return str(study.out / "logs" / f"{slug(step.id)}-{job}.out")
