"""Studies (apr.study): a tiny study of two trainings on real digit photos, run end to end by the local
launcher as subprocesses (train, corruption evaluation, OOD, report), then rerun: done steps are skipped,
a changed recipe re-runs only its steps, a killed step resumes, a failed step stops only what needs it,
a second run is refused; strict study files; the shipped studies plan; the slurm launcher's submissions."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from apr.study import load_study, plan
from apr.study.cli import main

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "apr" / "configs" / "studies").glob("*.yaml"))

RECIPE = """\
data: {{dataset: imagefolder, backend: torchvision, root: /nowhere, image_size: 32, val_resize: 32,
        crop_scale: [0.5, 1.0], num_workers: 0, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
aug: {{name: {aug}}}
model: {{name: cnn_tiny, channels_last: false}}
optim: {{lr: {lr}, lr_base_batch: 0, schedule: cosine}}
train: {{epochs: 1, batch_size: 16, precision: fp32, val_every: 0, log_every: 5, num_threads: 1}}
checkpoint: {{keep_last: 1}}
"""

STUDY = """\
name: tiny
paths: {{data: {data}, c: {c}, ood: {ood}}}
set: ["data.root=${{paths.data}}"]
trainings:
  - {{name: base, recipe: recipe_base.yaml}}
  - {{name: sp, recipe: recipe_sp.yaml}}
data: {{val: "${{paths.data}}/val"}}
corruption:
  root: ${{paths.c}}
  baseline: base
  options: [--corruptions, gaussian_noise, contrast, --severities, 1, 3, --backend, torchvision, --workers, 0,
            --precision, fp32]
suites: {{imagenet-sketch: "${{paths.data}}/val"}}
ood:
  sets: {{bright: "${{paths.ood}}"}}
  options: [--backend, torchvision, --workers, 0, --precision, fp32]
report: {{baseline: base}}
"""

STEPS = ["train:base_s0", "train:sp_s0", "eval:base_s0", "ood:base_s0", "eval:sp_s0", "ood:sp_s0", "report"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def study_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", env())
    done = subprocess.run([sys.executable, "-m", "apr.study", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kwargs)
    if check and done.returncode != 0:
        logs = [Path(p) for p in re.findall(r"^\S+: FAILED, see (\S+):", done.stdout, re.M)]
        tails = "".join(f"\n--- {log}:\n" + "\n".join(log.read_text().splitlines()[-30:]) for log in logs)
        raise AssertionError(f"apr.study {' '.join(map(str, args))} -> {done.returncode}\n{done.stdout}\n"
                             f"{done.stderr}{tails}")
    return done


def states(study: Path, **kwargs) -> dict[str, str]:
    """``apr-study status``: step id -> pending / running / done / failed (and the rest of its line)."""
    lines = study_cli("status", study, "--out", study.parent / "out", **kwargs).stdout.splitlines()
    return {line.split()[0]: " ".join(line.split()[1:]) for line in lines}


def ran(stdout: str) -> list[str]:
    """The steps a run started (``<id>: running (...)``)."""
    return re.findall(r"^(\S+): running", stdout, re.M)


@pytest.fixture(scope="module")
def study_data(imagenet_tree, tmp_path_factory) -> dict:
    from apr.corrupt import make_corrupted_tree

    base = tmp_path_factory.mktemp("study_data")
    make_corrupted_tree(imagenet_tree / "val", base / "c", corruptions=["gaussian_noise", "contrast"],
                        severities=(1, 3), resize=None, crop=None, workers=0, progress=False)
    rng = np.random.default_rng(1)
    (base / "bright").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(180, 256, (32, 32, 3), dtype=np.uint8)).save(base / "bright" / f"{i}.png")
    return {"data": imagenet_tree, "c": base / "c", "ood": base / "bright"}


def write_study(folder: Path, data: dict, sp_lr: float = 0.05) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe_base.yaml").write_text(RECIPE.format(aug="none", lr=0.05))
    (folder / "recipe_sp.yaml").write_text(RECIPE.format(aug="apr_sp", lr=sp_lr))
    path = folder / "study.yaml"
    path.write_text(STUDY.format(**data))
    return path


@pytest.fixture(scope="module")
def finished(study_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny study run once from nothing."""
    path = write_study(tmp_path_factory.mktemp("tiny") / "study", study_data)
    return path, study_cli("run", path, "--out", path.parent / "out")


def copy_of(finished, tmp_path: Path) -> Path:
    """A copy of the finished study (its folder, recipes and results) to change."""
    shutil.copytree(finished[0].parent, tmp_path / "study")
    return tmp_path / "study" / "study.yaml"


def logs(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "logs").glob("*.log")}


# ----------------------------------------------------------------------------- the local launcher


def test_tiny_study_end_to_end(finished):
    path, done = finished
    out = path.parent / "out"
    assert ran(done.stdout) == STEPS
    for name in ("base_s0", "sp_s0"):
        corruption = json.loads((out / "eval" / f"{name}.json").read_text())
        assert corruption["finished"] and set(corruption["corruptions"]) == {"gaussian_noise", "contrast"}
        assert corruption["metrics"]["normalisation"] != "alexnet"  # CE normalised by the study's baseline
        assert json.loads((out / "eval" / f"{name}.ood.json").read_text())["complete"]
        shift = json.loads((out / "eval" / f"{name}.shift.json").read_text())  # the --suite sets, same step
        assert shift["finished"] and list(shift["suites"]) == ["imagenet-sketch"], shift.keys()
    report = (out / "report" / "report.md").read_text()
    assert "base_s0" in report and "sp_s0" in report
    assert all(state.startswith("done") for state in states(path).values()), states(path)


def test_rerun_skips_what_is_done(finished, tmp_path):
    path = copy_of(finished, tmp_path)
    before = logs(path.parent / "out")
    done = study_cli("run", path, "--out", path.parent / "out")
    assert ran(done.stdout) == [] and done.stdout.count(": done") == len(STEPS)
    assert logs(path.parent / "out") == before


def test_changed_recipe_reruns_only_its_steps(finished, tmp_path, study_data):
    path = copy_of(finished, tmp_path)
    out = path.parent / "out"
    write_study(path.parent, study_data, sp_lr=0.02)  # the sp recipe changes, base's does not
    pending = {k for k, v in states(path).items() if not v.startswith("done")}
    assert pending == {"train:sp_s0", "eval:sp_s0", "ood:sp_s0", "report"}
    base_json = (out / "eval" / "base_s0.json").read_text()
    done = study_cli("run", path, "--out", out)
    assert ran(done.stdout) == ["train:sp_s0", "eval:sp_s0", "ood:sp_s0", "report"]
    assert (out / "eval" / "base_s0.json").read_text() == base_json
    assert list((out / "runs").glob("sp_s0.replaced-*")), "the run of the old recipe is kept, renamed"
    assert yaml.safe_load((out / "runs" / "sp_s0" / "config.yaml").read_text())["optim"]["lr"] == 0.02


def test_failed_step_stops_only_what_needs_it(finished, tmp_path, study_data):
    path = copy_of(finished, tmp_path)
    out = path.parent / "out"
    recipe = path.parent / "recipe_sp.yaml"
    recipe.write_text(recipe.read_text().replace("cnn_tiny", "no_such_net"))
    done = study_cli("run", path, "--out", out, check=False)
    assert done.returncode == 1
    assert ran(done.stdout) == ["train:sp_s0"]
    assert "eval:sp_s0: not run, it needs train:sp_s0" in done.stdout
    assert "report: not run" in done.stdout
    now = states(path)
    assert now["train:sp_s0"].startswith("failed") and "no_such_net" in now["train:sp_s0"]
    assert all(now[s].startswith("done") for s in ("train:base_s0", "eval:base_s0", "ood:base_s0"))
    assert json.loads((out / "eval" / "base_s0.json").read_text())["finished"]


def test_a_step_that_exits_non_zero_is_failed_even_with_its_results_written(finished, tmp_path):
    """The exit status is the command's verdict (a crash in teardown, a killed peer rank): the step is failed,
    its line says how it exited, and the next run runs it again."""
    from apr.study.local import run_local

    path = copy_of(finished, tmp_path)
    out = path.parent / "out"
    (out / "report" / "report.md").unlink()
    python = tmp_path / "python"  # the real command, then a non-zero exit
    python.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\necho "something broke on the way out"\nexit 3\n')
    python.chmod(0o755)
    study = load_study(path, out=out)
    said: list[str] = []
    assert run_local(study, plan(study), python=str(python), echo=lambda *a, **k: said.append(" ".join(a))) == 1
    assert (out / "report" / "report.md").is_file()
    assert any(line.startswith("report: FAILED") and line.endswith("exit 3: something broke on the way out")
               for line in said), said
    assert states(path)["report"].startswith("failed")
    done = study_cli("run", path, "--out", out)
    assert ran(done.stdout) == ["report"] and states(path)["report"].startswith("done")


def test_killed_step_resumes(finished, tmp_path):
    path = copy_of(finished, tmp_path)
    out = path.parent / "out"
    recipe = path.parent / "recipe_sp.yaml"  # a longer sp run that saves after every step
    recipe.write_text(recipe.read_text().replace("epochs: 1,", "epochs: 4,").replace("keep_last: 1", "every_steps: 1"))
    shutil.rmtree(out / "runs" / "sp_s0")
    record = out / ".study" / "steps" / "train_sp_s0.json"
    first = subprocess.Popen([sys.executable, "-m", "apr.study", "run", str(path), "--out", str(out)], env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ('"running"' in record.read_text()
                                              and list((out / "runs" / "sp_s0").glob("checkpoint-*.pt"))):
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the runner and its step, as a crash would
        first.wait()
    assert list((out / "runs" / "sp_s0").glob("checkpoint-*.pt")), "the training never saved a checkpoint"
    assert "interrupted" in states(path)["train:sp_s0"]
    done = study_cli("run", path, "--out", out)
    assert ran(done.stdout) == ["train:sp_s0", "eval:sp_s0", "ood:sp_s0", "report"]
    assert "resumed from" in (out / "logs" / "train_sp_s0.log").read_text()
    assert all(state.startswith("done") for state in states(path).values())


def test_two_processes_per_step_run_under_torchrun(study_data, tmp_path):
    """gpus: 2 on the local launcher: every step but the report runs as torchrun with 2 processes (CPU, gloo
    here; one per GPU on a GPU machine), and the study ends done as with one."""
    path = write_study(tmp_path, study_data)
    path.write_text(path.read_text().replace("name: tiny\n", "name: tiny\ngpus: 2\n"))
    done = study_cli("run", path, "--out", tmp_path / "out")
    assert ran(done.stdout) == STEPS
    logs = {step: (tmp_path / "out" / "logs" / f"{step.replace(':', '_')}.log").read_text() for step in STEPS}
    for step in STEPS[:-1]:
        command = logs[step].splitlines()[1]
        assert " -m torch.distributed.run --standalone --nproc_per_node 2 -m apr." in command, (step, command)
    assert "2 process(es), global batch 32" in logs["train:base_s0"]
    assert " -m apr.report " in logs["report"].splitlines()[1]
    for name in ("base_s0", "sp_s0"):
        assert json.loads((tmp_path / "out" / "eval" / f"{name}.json").read_text())["finished"]
        assert json.loads((tmp_path / "out" / "eval" / f"{name}.ood.json").read_text())["complete"]
    assert all(state.startswith("done") for state in states(path).values())


def test_second_run_is_refused_naming_the_first(study_data, tmp_path):
    from apr.study.local import study_lock

    path = write_study(tmp_path, study_data)
    with study_lock(load_study(path, out=tmp_path / "out")):
        second = study_cli("run", path, "--out", tmp_path / "out", check=False)
    assert second.returncode == 2
    assert re.search(rf"^error: study tiny .* is already being run by pid {os.getpid()} on \S+ since ",
                     second.stderr, re.M), second.stderr
    assert not (tmp_path / "out" / "runs").exists()


# ----------------------------------------------------------------------------- study files


@pytest.mark.parametrize("change, message", [
    (lambda s: s + "reprot: {}\n", "unknown study key(s) reprot"),
    (lambda s: s.replace("report: {baseline: base}", "report: {baseline: base, baseline: sp}"), "duplicate key"),
    (lambda s: s.replace("recipe_sp.yaml", "recipe_nope.yaml"), "recipe recipe_nope.yaml not found"),
    (lambda s: s.replace("${paths.c}", "${paths.imagenet_c}"), "${paths.imagenet_c} is not defined"),
    (lambda s: s.replace("baseline: base\n  options", "baseline: nobody\n  options"), "'nobody' is not a training"),
    (lambda s: s.replace("name: sp,", "name: base,"), "must be unique"),
    (lambda s: s.replace("ood:\n  sets", "ood:\n  set"), "unknown study key(s) ood.set"),
    (lambda s: s.replace("data: {val:", "data: {cifar: x, val:"), "give val"),
])
def test_bad_study_files_are_one_line_errors(change, message, study_data, tmp_path, capsys):
    path = write_study(tmp_path, study_data)
    path.write_text(change(path.read_text()))
    assert main(["status", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: ") and message in err[0], err


def test_set_must_name_a_path_variable(study_data, tmp_path, capsys):
    path = write_study(tmp_path, study_data)
    assert main(["status", str(path), "--set", "train.epochs=3"]) == 2
    assert "a study takes --set paths.NAME=VALUE" in capsys.readouterr().err


def test_missing_data_is_refused_before_any_step(study_data, tmp_path, capsys):
    path = write_study(tmp_path, study_data)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--set", "paths.ood=/no/such/folder"]) == 2
    assert "data not found: /no/such/folder" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_studies_load_and_plan(path, tmp_path):
    study = load_study(path, ["paths.cifar10=/data/c10"] if "cifar" in path.stem else [], out=tmp_path)
    steps = plan(study)
    runs = sum(len(t.seeds) for t in study.trainings)
    per_run = bool(study.corruption or study.suites) + bool(study.ood) + len((study.attacks or {}).get("eps", []))
    assert len(steps) == runs * (1 + per_run) + 1 and steps[-1].id == "report"
    assert {"imagenet_resnet50": 5, "cifar10_wrn40_2": 12, "cifar10_fgsm": 4}[path.stem] == runs
    assert all(s.module == "apr.commands.train" for s in steps[:runs])
    ids = [s.id for s in steps]
    assert all(ids.index(n) < ids.index(s.id) for s in steps for n in s.needs)  # dependency order
    if "cifar" in path.stem:
        assert all("data.root=/data/c10" in s.args for s in steps[:runs])


def test_dry_run_prints_the_commands(study_data, tmp_path):
    path = write_study(tmp_path, study_data)
    lines = study_cli("run", path, "--out", tmp_path / "out", "--dry-run").stdout.splitlines()
    assert len(lines) == len(STEPS) and not (tmp_path / "out" / "runs").exists()
    assert "-m apr.commands.train --config" in lines[0] and "--resume auto" in lines[0]
    assert "-m apr.report" in lines[-1] and "--baseline base_s0" in lines[-1]


def test_slurm_dry_run_submits_an_array_and_afterok_dependencies(study_data, tmp_path):
    path = write_study(tmp_path, study_data)
    lines = study_cli("run", path, "--out", tmp_path / "out", "--launcher", "slurm", "--dry-run").stdout.splitlines()
    sbatch = [line for line in lines if line.startswith("sbatch")]
    assert "--array=0-1" in sbatch[0] and "slurm/train.sh --args-file" in sbatch[0]
    evals = sbatch[1:-1]
    assert len(evals) == 4 and all("slurm/eval.sh --module apr." in line for line in evals)
    assert "--dependency=afterok:DRYRUN1_0 " in evals[0]  # base's evaluation after base's training
    sp_eval = next(line for line in evals if "--module apr.commands.evaluate" in line and "sp_s0" in line)
    assert re.search(r"afterok:DRYRUN1_1:DRYRUN\d ", sp_eval)  # sp's after its training and base's evaluation
    assert "--module apr.report" in sbatch[-1] and sbatch[-1].count("DRYRUN") == 4


# ----------------------------------------------------------------------------- the slurm launcher, on a real slurm


def test_the_tiny_study_on_slurm(slurm_cluster, study_data, tmp_path):
    """Trainings as a job array, evaluations afterok their training (and the baseline's evaluation), the report
    afterok all of them; the test cluster keeps no accounting (no sacct), so job states come from scontrol."""
    path = write_study(tmp_path, study_data)
    with open(path, "a") as f:
        f.write("slurm: {options: [--gpus-per-node=0, --ntasks-per-node=1, --cpus-per-task=1, --time=10]}\n")
    out = tmp_path / "out"
    run_env = {**slurm_cluster.env, **env()}
    done = study_cli("run", path, "--out", out, "--launcher", "slurm", env=run_env)
    jobs = dict(re.findall(r"^(\S+): submitted as (?:array task |job )(\S+)", done.stdout, re.M))
    assert list(jobs) == STEPS, done.stdout
    array = jobs["train:base_s0"].split("_")[0]
    assert jobs["train:sp_s0"] == f"{array}_1"
    queued = dict(line.split(None, 1) for line in slurm_cluster.run("squeue", "-h", "-o", "%i %E").stdout.splitlines()
                  if line.strip())
    assert f"afterok:{array}_1" in queued.get(jobs["eval:sp_s0"], ""), queued  # while the training runs
    assert states(path, env=run_env)["eval:sp_s0"].startswith("running")  # submitted and queued
    def finished_or_stuck():
        reasons = slurm_cluster.run("squeue", "-h", "-o", "%r").stdout.split()
        return "stuck" if "DependencyNeverSatisfied" in reasons else not reasons

    assert slurm_cluster.wait_until(finished_or_stuck, timeout=600, what="every job of the study done") is True, (
        "\n".join(f"{p.name}: {p.read_text()[-800:]}" for p in sorted((out / "logs").glob("*.out"))))
    finished_jobs = [*slurm_cluster.array_jobs(array), *(slurm_cluster.job(j) for s, j in jobs.items() if "_" not in j)]
    assert {j["JobState"] for j in finished_jobs} == {"COMPLETED"} and len(finished_jobs) == len(STEPS)
    assert "base_s0" in (out / "report" / "report.md").read_text()
    assert all(state.startswith("done") for state in states(path, env=run_env).values())
    again = study_cli("run", path, "--out", out, "--launcher", "slurm", env=run_env).stdout
    assert "submitted as" not in again and "submitted 0 step(s)" in again

