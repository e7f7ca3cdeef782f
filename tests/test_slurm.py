"""slurm for real: a one-node cluster (tests/slurm_cluster.py) runs slurm/train.sh and slurm/eval.sh.

The time-limit signal (the scripts' own ``--signal=USR1@120``, reached by lowering the job's time limit),
a preemption and ``scancel`` stop the tasks cleanly; the job requeues once and resumes to the weights
(bit-exact) and results of an uninterrupted run. To make the signal land mid-epoch on any machine speed,
a test pauses the job's tasks (SIGSTOP) before lowering the limit: slurm sends SIGCONT with its signal.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from apr.checkpoint import RunLock, find_latest_checkpoint, load_checkpoint
from apr.train import RunLog

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SH, EVAL_SH = ROOT / "slurm" / "train.sh", ROOT / "slurm" / "eval.sh"
CPU_JOB = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]
JOB_ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
CORRUPTIONS = ["gaussian_noise", "brightness", "contrast", "fog"]


@pytest.fixture(autouse=True)
def empty_queue_after(request):
    """A test that failed half-way must not leave its jobs running on the shared test cluster."""
    yield
    if "slurm_cluster" in request.fixturenames:
        request.getfixturevalue("slurm_cluster").cancel_all()


# ----------------------------------------------------------------------------- data, recipe, references


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory, digits_images) -> Path:
    """10 classes of real digits: 400 train images (50 steps of 8 per epoch), 100 val."""
    from conftest import write_imagefolder

    images, labels = digits_images
    root = tmp_path_factory.mktemp("digits")
    classes = [f"n{k:08d}" for k in range(10)]
    write_imagefolder(root / "train", images[:400], labels[:400], classes)
    write_imagefolder(root / "val", images[400:500], labels[400:500], classes)
    return root


@pytest.fixture(scope="module")
def recipe(digits_tree, tmp_path_factory) -> Path:
    """A complete recipe file: 2 epochs of cnn_tiny, deterministic, DataLoader workers (signalled by slurm too)."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"root": str(digits_tree), "backend": "torchvision", "num_workers": 1, "image_size": 32,
                 "val_resize": 32, "crop_scale": [0.5, 1.0]},
        "model": {"name": "cnn_tiny"},
        "optim": {"lr": 0.05, "lr_base_batch": 0},
        "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", "deterministic": True, "log_every": 1,
                  "val_every": 0, "num_threads": 1, "run_name": "run"},
    }))
    return path


def train_args(out: Path, run: str, *extra: str) -> list[str]:
    return ["--set", f"train.output_dir={out}", "--set", f"train.run_name={run}", *extra]


def train_here(recipe: Path, out: Path, run: str, nproc: int = 1) -> Path:
    """The uninterrupted reference run, outside slurm (torchrun for several processes): its run folder."""
    launch = [sys.executable, "-m", "apr.commands.train"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                  f"--master_port={free_port()}", "-m", "apr.commands.train"]
    proc = subprocess.run([*launch, "--config", str(recipe), "--no-progress", *train_args(out, run)],
                          env={**os.environ, **JOB_ENV}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    return train_here(recipe, tmp_path_factory.mktemp("reference"), "ref")


# ----------------------------------------------------------------------------- helpers


def metrics_rows(run_dir: Path) -> list[tuple[int, int]]:
    rows = csv.DictReader(open(run_dir / "metrics.csv"))
    return [(int(r["epoch"]), int(r["step"])) for r in rows if r["loss"]]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(find_latest_checkpoint(a))["model"], load_checkpoint(find_latest_checkpoint(b))["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def matches(path: Path, pattern: str) -> list[re.Match]:
    return list(re.finditer(pattern, path.read_text()))


def pause_tasks(cluster, job: int, ready, timeout: float = 240) -> list[int]:
    """Once ``ready()``, SIGSTOP every process of the job's step 0; slurm's SIGCONT + signal resume them."""
    cluster.wait_until(ready, timeout=timeout, poll=0.05, what="the job's progress")
    pids = cluster.pids(job)
    assert pids, cluster.job(job)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def resume_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def complete_after_time_limit(cluster, job: int, ready, log: Path, when_paused=None):
    """Pause the job's tasks once ``ready()``, let the time-limit signal stop them, and wait for the requeued
    job: it completes after exactly one restart. ``when_paused()`` runs while the tasks stand still (its
    value is returned)."""
    pids = pause_tasks(cluster, job, ready)
    try:
        at_pause = when_paused() if when_paused is not None else None
        reach_time_limit_signal(cluster, job)
        info = cluster.wait_done(job, timeout=300, log=log)
    finally:
        resume_all(pids)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log.read_text()[-3000:]
    return at_pause


def reach_time_limit_signal(cluster, job: int) -> None:
    """Lower the time limit so that 60-120 s remain: the script's --signal=USR1@120 fires at slurm's next
    time-limit check (every 30 s); after the requeue, raise it again so that the resumed job finishes."""
    run_time = cluster.job(job)["RunTime"].split(":")
    seconds = int(run_time[-1]) + 60 * int(run_time[-2]) + 3600 * int(run_time[0].split("-")[-1])
    cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={seconds // 60 + 2}")
    cluster.wait_until(lambda: cluster.job(job).get("Restarts") == "1", timeout=120, what="the requeue")
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=30")


def has_rows(run_dir: Path, n: int):
    return lambda: (run_dir / "metrics.csv").exists() and len(metrics_rows(run_dir)) >= n


def assert_resumed_where_it_stopped(log: Path, signum: int) -> tuple[int, int]:
    saved = matches(log, rf"signal {signum}: saved epoch (\d+) step (\d+);")
    assert len(saved) == 1, log.read_text()[-3000:]
    epoch, step = int(saved[0][1]), int(saved[0][2])
    assert 0 < step < 50, "the save at the signal is mid-epoch"
    resumed = matches(log, r"resumed from \S+checkpoint-e(\d+)-s(\d+)\.pt at epoch (\d+), step (\d+)")
    assert [(int(m[1]) + 1, int(m[2]), int(m[3]), int(m[4])) for m in resumed] == [(epoch, step, epoch, step)]
    return epoch, step


def assert_trained_like(run_dir: Path, reference: Path) -> None:
    rows = metrics_rows(run_dir)
    assert len(rows) == len(set(rows)), "an (epoch, step) row appears twice in metrics.csv"
    assert sorted(rows) == sorted(metrics_rows(reference)) == [(e, s) for e in (1, 2) for s in range(1, 51)]
    assert_same_weights(run_dir, reference)
    RunLock(run_dir).acquire().release()  # the run lock is free


# ----------------------------------------------------------------------------- train.sh


def test_time_limit_signal_saves_mid_epoch_requeues_once_and_resumes_to_identical_weights(
        slurm_cluster, recipe, reference, tmp_path):
    log = tmp_path / "job.out"
    job = slurm_cluster.submit(TRAIN_SH, str(recipe), *train_args(tmp_path, "run"),
                               sbatch=[*CPU_JOB, f"--output={log}"], env=JOB_ENV)
    complete_after_time_limit(slurm_cluster, job, has_rows(tmp_path / "run", 5), log)
    assert len(matches(log, r"requeueing job")) == 1
    assert_resumed_where_it_stopped(log, signal.SIGUSR1)
    assert_trained_like(tmp_path / "run", reference)


def test_preemption_saves_and_slurm_requeues(slurm_cluster, recipe, reference, tmp_path):
    """A job of a higher-PriorityTier partition preempts (PreemptMode=REQUEUE): SIGTERM, then SIGKILL after
    GraceTime; the tasks save at once and rank 0 requeues (once: slurm requeues only a job still running)."""
    log = tmp_path / "job.out"
    job = slurm_cluster.submit(TRAIN_SH, str(recipe), *train_args(tmp_path, "run"),
                               sbatch=[*CPU_JOB, f"--output={log}"], env=JOB_ENV)
    pids = pause_tasks(slurm_cluster, job, has_rows(tmp_path / "run", 5))
    try:  # every CPU of the node: the training job must make room
        urgent = slurm_cluster.submit(None, sbatch=["--partition=urgent", f"--ntasks={slurm_cluster.cpus}", "--wrap=true",
                                                    f"--output={tmp_path / 'urgent.out'}"])
        slurm_cluster.wait_until(lambda: slurm_cluster.job(job).get("Restarts") == "1", timeout=120)
        assert slurm_cluster.wait_done(urgent, timeout=120)["JobState"] == "COMPLETED"
        info = slurm_cluster.wait_done(job, timeout=300, log=log)
    finally:
        resume_all(pids)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log.read_text()[-3000:]
    assert len(matches(log, r"preempted and saved; requeueing job")) == 1
    assert_resumed_where_it_stopped(log, signal.SIGTERM)
    assert_trained_like(tmp_path / "run", reference)


def test_two_srun_tasks_train_and_resume_exactly_as_two_processes(slurm_cluster, recipe, tmp_path):
    """World size 2 from SLURM_PROCID/SLURM_NTASKS (no torchrun), stopped by the time-limit signal and
    resumed: the weights of an uninterrupted 2-process torchrun run, bit for bit."""
    reference = train_here(recipe, tmp_path / "torchrun", "ref", nproc=2)
    log = tmp_path / "job.out"
    job = slurm_cluster.submit(TRAIN_SH, str(recipe), *train_args(tmp_path, "run"),
                               sbatch=[*CPU_JOB, "--ntasks-per-node=2", f"--output={log}"], env=JOB_ENV)
    complete_after_time_limit(slurm_cluster, job, has_rows(tmp_path / "run", 3), log)
    text = log.read_text()
    assert text.count("2 process(es), global batch 16") == 2 and len(matches(log, r"requeueing job")) == 1
    assert len(matches(log, r"rank \d stopped cleanly after SIGUSR1")) == 2
    rows = metrics_rows(tmp_path / "run")
    assert len(rows) == len(set(rows)) and sorted(rows) == sorted(metrics_rows(reference))  # 25 steps per epoch
    assert_same_weights(tmp_path / "run", reference)


def test_scancel_leaves_no_process_and_releases_the_run_lock(slurm_cluster, recipe, tmp_path):
    """(And before it: ``scancel --signal=USR2`` prints the task's Python stacks into the job log and the
    training runs on, the diagnosis of a job that seems hung.)"""
    log = tmp_path / "job.out"
    job = slurm_cluster.submit(TRAIN_SH, str(recipe), *train_args(tmp_path, "run", "--set", "train.epochs=100"),
                               sbatch=[*CPU_JOB, f"--output={log}"], env=JOB_ENV)
    slurm_cluster.wait_until(has_rows(tmp_path / "run", 3), timeout=240, poll=0.1)
    slurm_cluster.cancel(job, "--signal=USR2")
    dumped = r'File ".*apr/train\.py", line \d+ in (run_epoch|train_step|_loop)'
    slurm_cluster.wait_until(lambda: re.search(dumped, log.read_text()), timeout=30, what="the stack dump")
    rows = len(metrics_rows(tmp_path / "run"))
    slurm_cluster.wait_until(has_rows(tmp_path / "run", rows + 2), timeout=60, poll=0.1, what="training going on")
    pids = slurm_cluster.pids(job) + slurm_cluster.pids(job, "batch")
    slurm_cluster.cancel(job)
    info = slurm_cluster.wait_done(job, timeout=60)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    slurm_cluster.wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout=30,
                             what="every process of the job gone")
    RunLock(tmp_path / "run").acquire().release()
    assert slurm_cluster.job(job)["JobState"] == "CANCELLED"  # and it stays cancelled: nothing requeued it


def test_array_task_takes_its_line_of_the_args_file(slurm_cluster, recipe, tmp_path):
    """``sbatch --array=0-K slurm/train.sh --args-file FILE``: task i runs line i, shell words as shlex.join writes."""
    out = tmp_path / "runs with space"
    lines = [shlex.join([str(recipe), *train_args(out, name, "--set", "train.epochs=1", "--set", f"optim.lr={lr}")])
             for name, lr in (("first", 0.05), ("it's second", 0.02))]
    args_file = tmp_path / "args.txt"
    args_file.write_text("\n".join(lines) + "\n")
    job = slurm_cluster.submit(TRAIN_SH, "--args-file", str(args_file),
                               sbatch=[*CPU_JOB, "--array=0-1", f"--output={tmp_path / 'task-%a.out'}"], env=JOB_ENV)
    slurm_cluster.wait_until(lambda: not slurm_cluster.squeue("-j", str(job)), timeout=300, what="both tasks done")
    tasks = slurm_cluster.array_jobs(job)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"] and {t["JobState"] for t in tasks} == {"COMPLETED"}
    for name, lr in (("first", 0.05), ("it's second", 0.02)):
        state = load_checkpoint(find_latest_checkpoint(out / name))
        assert state["epoch"] == 1 and state["config"]["optim"]["lr"] == lr


# ----------------------------------------------------------------------------- eval.sh


@pytest.fixture(scope="module")
def c_tree(digits_tree, tmp_path_factory) -> Path:
    from apr.corrupt import make_corrupted_tree

    dst = tmp_path_factory.mktemp("c") / "c"
    make_corrupted_tree(digits_tree / "val", dst, corruptions=CORRUPTIONS, severities=(1, 2, 3, 4, 5),
                        resize=None, crop=None, workers=0, progress=False)
    return dst


def eval_args(checkpoint: Path, c_tree: Path, val: Path, out: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--imagenet-c", str(c_tree), "--val", str(val), "--out", str(out),
            "--corruptions", *CORRUPTIONS, "--backend", "torchvision", "--workers", "1", "--precision", "fp32",
            "--device", "cpu", "--batch-size", "4", "--no-report", "--quiet"]


def cells(results: Path) -> int:
    try:
        return sum(len(v) for v in json.loads(results.read_text())["corruptions"].values())
    except (OSError, ValueError, KeyError):
        return 0


def test_eval_stopped_by_the_time_limit_resumes_without_recomputing(slurm_cluster, reference, digits_tree, c_tree,
                                                                   tmp_path):
    checkpoint = find_latest_checkpoint(reference)
    args = eval_args(checkpoint, c_tree, digits_tree / "val", tmp_path / "here")
    proc = subprocess.run([sys.executable, "-m", "apr.commands.evaluate", *args], env={**os.environ, **JOB_ENV},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = json.loads((tmp_path / "here" / "ref.json").read_text())

    log, results = tmp_path / "job.out", tmp_path / "slurm" / "ref.json"
    args = eval_args(checkpoint, c_tree, digits_tree / "val", tmp_path / "slurm")
    job = slurm_cluster.submit(EVAL_SH, "--module", "apr.commands.evaluate", *args,
                               sbatch=[*CPU_JOB, f"--output={log}"], env=JOB_ENV)
    done_at_stop = complete_after_time_limit(slurm_cluster, job, lambda: cells(results) >= 2, log,
                                             when_paused=lambda: cells(results))
    assert len(matches(log, r"requeueing job")) == 1
    assert len(matches(log, r"rank 0 stopped cleanly after SIGUSR1")) == 1
    resumed = json.loads(results.read_text())
    for key in ("clean", "corruptions", "metrics", "finished"):
        assert resumed[key] == straight[key], key
    assert 2 <= done_at_stop < 20
    # one allocation was stopped mid-way (it never reports), the requeued one evaluated only what was left
    evaluated = [int(m[1]) for m in matches(log, r"ref: evaluated (\d+) images")]
    assert len(evaluated) == 1 and 0 < evaluated[0] <= 100 * (20 - done_at_stop), log.read_text()[-3000:]
    # the older interface (paths in variables) on the finished folder: every cell is reused, none recomputed
    before = results.read_bytes()
    env = {**JOB_ENV, "IMAGENET_C": str(c_tree), "IMAGENET_VAL": str(digits_tree / "val"), "OUT": str(tmp_path / "slurm"),
           "BACKEND": "torchvision", "WORKERS": "0", "PRECISION": "fp32", "BATCH_SIZE": "4",
           "EXTRA_ARGS": "--corruptions " + " ".join(CORRUPTIONS) + " --device cpu --no-report"}
    again = slurm_cluster.submit(EVAL_SH, str(checkpoint), sbatch=[*CPU_JOB, f"--output={tmp_path / 'again.out'}"],
                                 env=env)
    assert slurm_cluster.wait_done(again, timeout=300)["JobState"] == "COMPLETED", (tmp_path / "again.out").read_text()
    assert json.loads(results.read_bytes())["corruptions"] == json.loads(before)["corruptions"]


# ----------------------------------------------------------------------------- without a cluster


def test_resume_drops_metrics_rows_logged_after_its_checkpoint(tmp_path):
    """A run killed (SIGKILL, GraceTime over) after its last save logged steps the resumed run trains again."""
    log = RunLog(tmp_path, enabled=True)
    for step in range(1, 8):
        log.write(epoch=1, step=step, global_step=step, loss="1.0")
    log.write(epoch=1, step=7, global_step=7, val_top1_error="0.5")
    assert log.forget_after(4) == 4
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4]
    assert log.forget_after(4) == 0


STUBBORN = """
import time
print("started", flush=True)
for _ in range(3):  # a stop raised where it is swallowed (like a fork hook or a finalizer) ...
    try:
        time.sleep(30)
    except BaseException:
        print("swallowed", flush=True)
time.sleep(30)  # ... is raised again: this sleep is interrupted too
print("ran to the end", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_ends_the_command_cleanly_even_where_it_is_swallowed(tmp_path, sig):
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "apr.slurm", "stubborn"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "ran to the end" not in out and out.count("swallowed") >= 1
    assert f"stopped cleanly after {signal.Signals(sig).name}" in err and "requeue" not in err


EXITING = """
import signal, time
from apr.checkpoint import PreemptionFlag
print("started", flush=True)
while PreemptionFlag.last_received != signal.SIGTERM:  # still exiting after its stop when the SIGTERM comes
    try:
        time.sleep(30)
    except BaseException:
        print("swallowed", flush=True)
time.sleep(30)
"""


def test_a_task_reports_the_signal_that_stopped_it_not_the_requeues_sigterm(tmp_path):
    """Rank 0 requeues as soon as it is done; slurm then sends SIGTERM to every task, and a peer still exiting
    after its SIGUSR1 stop gets it: it must still say SIGUSR1 stopped it (the SIGTERM named after)."""
    (tmp_path / "exiting.py").write_text(EXITING)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "SLURM_PROCID": "1"}
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "apr.slurm", "exiting"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGUSR1)
    assert proc.stdout.readline().strip() == "swallowed"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)  # its last 30 s sleep is interrupted too
    assert proc.returncode == 0 and "rank 1 stopped cleanly after SIGUSR1 (then SIGTERM)" in err, err


WORKER = """
import faulthandler, multiprocessing, os, signal, sys, time
from apr.checkpoint import ignore_stop_signals

def worker():
    ignore_stop_signals()
    for sig in (signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM):
        os.kill(os.getpid(), sig)
    time.sleep(0.5)

faulthandler.register(signal.SIGUSR2, all_threads=True)  # as apr.slurm does, before the loader forks
child = multiprocessing.get_context("fork").Process(target=worker)
child.start()
child.join()
sys.exit(child.exitcode)
"""


def test_data_loading_workers_leave_every_slurm_signal_to_their_parent(tmp_path):
    """A worker ignores SIGTERM / SIGUSR1 (the parent saves and ends it) and SIGUSR2: its stack dump would
    interleave with the parent's in the one job log (seen: a dump no line of which could be read)."""
    done = subprocess.run([sys.executable, "-c", WORKER], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "most recent call first" not in done.stderr, done.stderr


def test_slurm_ranks_become_the_torchrun_variables():
    from apr.distributed import adopt_slurm_ranks

    step = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_JOB_ID": "1234", "MASTER_ADDR": "node07"}
    env = dict(step)
    assert adopt_slurm_ranks(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("3", "1", "4", "2")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node07", "21234")
    for unchanged in ({**step, "RANK": "0"}, {"SLURM_PROCID": "0", "SLURM_JOB_ID": "1"},  # torchrun; a batch shell
                      {**step, "SLURM_STEP_NUM_TASKS": "1"}):  # a one-task step
        before = dict(unchanged)
        assert not adopt_slurm_ranks(unchanged) and unchanged == before


@pytest.mark.parametrize("script", ["train.sh", "eval.sh"])
def test_every_sbatch_default_is_a_plain_option_the_command_line_overrides(script):
    """sbatch lets a command-line option win over an #SBATCH line; the scripts must not hard-code what users
    override (partition, account, time, nodes, GPUs, CPUs) anywhere else, nor use torchrun."""
    text = (ROOT / "slurm" / script).read_text()
    lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=USR1@120" in lines and "#SBATCH --requeue" in lines
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "torchrun" not in body and "apr.slurm" in body
    for fixed in ("--partition", "--account", "--time", "--nodes", "--gpus-per-node"):
        assert fixed not in body
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / script)]).returncode == 0
