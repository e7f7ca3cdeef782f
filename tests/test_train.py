"""Training loop: every aug trains on real JPEGs, exact resume after SIGTERM, DDP on 2 CPU ranks,
NaN guard, schedules, and the entry script."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apr.checkpoint import find_latest_checkpoint, load_checkpoint
from apr.config import load_config
from apr.train import TrainingDiverged, make_lr_lambda, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(root: Path, out: Path, *extra: str):
    return load_config(overrides=[
        f"data.root={root}", "data.image_size=32", "data.val_resize=32", "data.crop_scale=[0.5, 1.0]",
        "data.num_workers=1", "model.name=cnn_tiny", "optim.lr=0.05", "optim.lr_base_batch=0",
        "optim.schedule=cosine", "train.epochs=2", "train.batch_size=16", "train.precision=fp32",
        "train.deterministic=true", "train.log_every=1", f"train.output_dir={out}", "train.run_name=run",
        *extra,
    ])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("aug", ["none", "apr_p", "apr_s", "apr_sp"])
def test_each_aug_trains_on_real_jpegs_with_dali(imagenet_tree, tmp_path, aug):
    cfg = tiny_config(imagenet_tree, tmp_path, f"aug.name={aug}", "train.epochs=1")
    result = train(cfg, progress=False)
    assert result.status == "finished" and result.global_step == 4  # 64 images / 16
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "best.pt").is_file()
    state = load_checkpoint(find_latest_checkpoint(run))
    assert state["epoch"] == 1 and state["step"] == 0 and state["classes"] == [f"n{k:08d}" for k in range(4)]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    val = [r for r in rows if r["val_top1_error"]]
    assert len(val) == 1 and 0.0 <= float(val[0]["val_top1_error"]) <= 1.0
    assert result.history[0]["val_count"] == 24  # every val image exactly once


def test_apr_loss_uses_both_halves(imagenet_tree, tmp_path):
    """With APR the loss is CE(clean) + CE(apr): about twice the single-batch CE at init."""
    seen = {}

    def record(info):
        seen.setdefault(info["step"], float(info["loss"]))

    cfg = tiny_config(imagenet_tree, tmp_path, "aug.name=apr_p", "aug.p_prob=1.0", "train.epochs=1",
                      "optim.lr=0.0", "optim.momentum=0.0", "optim.weight_decay=0.0")
    train(cfg, progress=False, on_step_end=record)
    # an untrained 4-class head gives CE close to ln 4 per half
    assert 2 * 1.0 < seen[1] < 2 * 2.0


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_resume_after_sigterm_mid_epoch_gives_identical_weights(imagenet_tree, tmp_path, backend):
    extra = (f"data.backend={backend}", "aug.name=apr_sp")
    straight = train(tiny_config(imagenet_tree, tmp_path / "a", *extra), progress=False)
    assert straight.status == "finished"

    def preempt(info):
        if info["epoch"] == 1 and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(imagenet_tree, tmp_path / "b", *extra)
    first = train(cfg, progress=False, on_step_end=preempt)
    assert (first.status, first.epoch, first.step) == ("preempted", 1, 2)
    assert find_latest_checkpoint(tmp_path / "b" / "run").name == "checkpoint-e0001-s0000002.pt"
    second = train(cfg, resume="auto", progress=False)
    assert second.status == "finished" and second.global_step == straight.global_step
    a = weights(find_latest_checkpoint(tmp_path / "a" / "run"))
    b = weights(find_latest_checkpoint(tmp_path / "b" / "run"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # the logged running mean after the resume is the straight run's (sum since the epoch start / steps)
    straight_log, resumed_log = logged_losses(tmp_path / "a" / "run"), logged_losses(tmp_path / "b" / "run")
    assert sorted(resumed_log) == sorted(straight_log) == [(e, s) for e in (1, 2) for s in (1, 2, 3, 4)]
    for key, value in straight_log.items():
        assert resumed_log[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert second.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-4)


def logged_losses(run: Path) -> dict[tuple[int, int], float]:
    """(epoch, step) -> the mean loss metrics.csv logged there (the last row wins after a resume)."""
    rows = csv.DictReader(open(run / "metrics.csv"))
    return {(int(r["epoch"]), int(r["step"])): float(r["loss"]) for r in rows if r["loss"]}


def test_preemption_at_the_last_step_of_an_epoch_resumes_without_replaying_it(imagenet_tree, tmp_path):
    """A signal (or an every_steps save) on an epoch's last batch: the epoch end saves (e+1, 0) and
    validates; a mid-epoch file (e, last step) would resume into a second pass over the whole epoch."""
    extra = ("checkpoint.every_steps=4",)  # 4 steps per epoch: a periodic save falls on the last batch too
    straight = train(tiny_config(imagenet_tree, tmp_path / "a", *extra), progress=False)

    def preempt(info):
        if info["epoch"] == 0 and info["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(imagenet_tree, tmp_path / "b", *extra)
    first = train(cfg, progress=False, on_step_end=preempt)
    assert (first.status, first.epoch, first.step) == ("preempted", 1, 0)
    run = tmp_path / "b" / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == ["checkpoint-e0001-s0000000.pt"]
    state = load_checkpoint(run / "checkpoint-e0001-s0000000.pt")
    assert state["best_metric"] == state["history"][0]["val_top1_error"]  # this epoch's val counts for best.pt
    second = train(cfg, resume="auto", progress=False)
    assert second.global_step == straight.global_step == 8
    assert [h["epoch"] for h in second.history] == [1, 2]
    a = weights(find_latest_checkpoint(tmp_path / "a" / "run"))
    b = weights(find_latest_checkpoint(run))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_a_run_folder_is_never_shared_by_two_runs(imagenet_tree, tmp_path):
    """Without --resume, or from an older checkpoint, next to newer checkpoints: the new run's saves
    would be pruned at once (they sort older) and --resume auto would go back to the other run."""
    from apr.checkpoint import CheckpointError

    cfg = tiny_config(imagenet_tree, tmp_path, "train.epochs=1", "checkpoint.every_steps=2",
                      "checkpoint.keep_last=3")
    train(cfg, progress=False)
    run = tmp_path / "run"
    names = sorted(p.name for p in run.glob("checkpoint-*.pt"))
    assert names == ["checkpoint-e0000-s0000002.pt", "checkpoint-e0001-s0000000.pt"]
    with pytest.raises(CheckpointError, match="already holds checkpoints .*--resume auto"):
        train(cfg, progress=False)
    with pytest.raises(CheckpointError, match="holds the newer checkpoint-e0001-s0000000.pt"):
        train(cfg, resume=str(run / names[0]), progress=False)
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == names  # nothing touched
    assert train(cfg, resume=str(run / names[1]), progress=False).status == "finished"  # the newest: fine
    assert train(cfg, resume="auto", progress=False).status == "finished"


def test_nan_loss_before_a_preemption_save_keeps_the_last_good_checkpoint(imagenet_tree, tmp_path):
    """The loss is only read at log points; a preemption save in between must not write NaN weights
    as the newest checkpoint (the requeued job would resume from it)."""
    import apr.train as train_module

    original = train_module.create_model
    params = []

    def capture(*a, **k):
        model = original(*a, **k)
        params.extend(model.parameters())
        return model

    def poison_then_preempt(info):
        if info["epoch"] == 1 and info["step"] == 1:
            with torch.no_grad():
                for p in params:
                    p.fill_(float("nan"))
        if info["epoch"] == 1 and info["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(imagenet_tree, tmp_path, "train.log_every=50")
    train_module.create_model = capture
    try:
        with pytest.raises(TrainingDiverged, match="loss became non-finite in epoch 2 by step 2; the last good "
                                                   "checkpoint is .*checkpoint-e0001-s0000000.pt"):
            train(cfg, progress=False, on_step_end=poison_then_preempt)
    finally:
        train_module.create_model = original
    assert find_latest_checkpoint(tmp_path / "run").name == "checkpoint-e0001-s0000000.pt"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(imagenet_tree, tmp_path):
    from apr.checkpoint import load_model_for_eval

    def poison(info):
        if info["epoch"] == 1 and info["step"] == 1:
            with torch.no_grad():
                for p in poison.model_params:
                    p.fill_(float("nan"))

    cfg = tiny_config(imagenet_tree, tmp_path, "train.log_every=2")
    # reach the model through the optimizer's params: the callback gets no model on purpose
    import apr.train as train_module

    original = train_module.create_model

    def capture(*a, **k):
        model = original(*a, **k)
        poison.model_params = list(model.parameters())
        return model

    train_module.create_model = capture
    try:
        with pytest.raises(TrainingDiverged, match="loss became non-finite in epoch 2 by step 2; the last good "
                                                   "checkpoint is .*checkpoint-e0001-s0000000.pt"):
            train(cfg, progress=False, on_step_end=poison)
    finally:
        train_module.create_model = original
    latest = find_latest_checkpoint(tmp_path / "run")
    assert latest.name == "checkpoint-e0001-s0000000.pt"
    model, *_ = load_model_for_eval(latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_schedules_and_warmup():
    cfg = load_config(overrides=["train.epochs=100", "optim.schedule=step", "optim.step_size=30"])
    f = make_lr_lambda(cfg, steps_per_epoch=10)
    assert f(0) == 1.0 and f(299) == 1.0 and f(300) == pytest.approx(0.1) and f(900) == pytest.approx(1e-3)
    cfg = load_config(overrides=["train.epochs=200", "optim.schedule=multistep", "optim.gamma=0.2",
                                 "optim.milestones=[60, 120, 160, 190]"])
    f = make_lr_lambda(cfg, steps_per_epoch=1)
    assert [round(f(e), 6) for e in (59, 60, 120, 160, 190)] == [1.0, 0.2, 0.04, 0.008, 0.0016]
    cfg = load_config(overrides=["train.epochs=10", "optim.schedule=cosine", "optim.warmup_epochs=2"])
    f = make_lr_lambda(cfg, steps_per_epoch=5)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(30) == pytest.approx(0.5) and f(49) < 0.01


def test_missing_data_root_is_a_clear_error(tmp_path):
    from apr.data import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "nope")):
        train(tiny_config(tmp_path / "nope", tmp_path), progress=False)


def test_entry_script_help_and_config_errors():
    out = subprocess.run([sys.executable, str(ROOT / "train_imagenet.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--resume" in out.stdout and "SECTION.KEY=VALUE" in out.stdout
    out = subprocess.run([sys.executable, str(ROOT / "train_imagenet.py"), "--set", "train.epocs=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown config key(s) train.epocs" in out.stderr


# a torchrun worker: train() with the model captured, then this rank's weight hash written to <out>/rank<R>.txt
WORKER = textwrap.dedent("""
    import hashlib, os, sys, torch
    sys.path.insert(0, {root!r})
    from apr.config import load_config
    from apr import train as T
    captured = {{}}
    original = T.create_model
    def capture(*a, **k):
        captured["model"] = original(*a, **k)
        return captured["model"]
    T.create_model = capture
    {setup}
    cfg = load_config(overrides={overrides!r})
    T.train(cfg, resume={resume!r}, progress=False)
    flat = torch.cat([p.detach().flatten() for p in captured["model"].parameters()])
    rank = os.environ["RANK"]
    open(os.path.join({out!r}, f"rank{{rank}}.txt"), "w").write(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
""")


@pytest.mark.parametrize("adversarial, port", [([], 29517), (["adversarial.method=fgsm"], 29527)],
                         ids=["standard", "fgsm"])
def test_torchrun_two_cpu_ranks_keep_identical_weights(imagenet_tree, tmp_path, adversarial, port):
    overrides = [f"data.root={imagenet_tree}", "data.image_size=32", "data.val_resize=32", "data.num_workers=1",
                 "model.name=cnn_tiny", "aug.name=apr_sp", "train.epochs=1", "train.batch_size=8",
                 "train.precision=fp32", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=ddp",
                 "optim.lr_base_batch=0", *adversarial]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), overrides=overrides, out=str(tmp_path), setup="", resume=None))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", str(script)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]
    run = tmp_path / "runs" / "ddp"
    state = load_checkpoint(find_latest_checkpoint(run))
    assert state["global_step"] == 4  # 64 images / (2 ranks x 8)
    if adversarial:  # the PGD check, averaged over both ranks' batches (8 images each)
        accuracy = state["history"][-1]["pgd_accuracy"]
        assert 0.0 <= accuracy <= 1.0 and abs(accuracy * 16 - round(accuracy * 16)) < 1e-9
    assert len(state["loader_state"]) == 2 and len(state["rng"]) == 2
    assert len(list(run.glob("metrics.csv"))) == 1
    assert not list(run.glob("*.tmp"))


SIGNAL_ONE_RANK = """
import atexit, signal
from apr.checkpoint import PreemptionFlag
_check = T.stop_requested
def _usr1_to_rank_1_only(run, force_check=False):
    if os.environ["RANK"] == "1" and run.global_step == 2 and not run.preempt.is_set:
        os.kill(os.getpid(), signal.SIGUSR1)  # slurm's time-limit warning, landing on one task only
    return _check(run, force_check)
T.stop_requested = _usr1_to_rank_1_only
atexit.register(lambda: open(os.path.join({out!r}, "signal" + os.environ["RANK"]), "w").write(
    str(PreemptionFlag.last_received)))
"""


def test_a_signal_that_reaches_one_rank_stops_every_rank_with_that_signal(imagenet_tree, tmp_path):
    """slurm signals each task on its own: a rank whose peer stopped first must stop too, and hold the
    peer's signal, so that rank 0 requeues after a USR1 that only rank 1 received."""
    overrides = [f"data.root={imagenet_tree}", "data.image_size=32", "data.val_resize=32", "data.num_workers=0",
                 "model.name=cnn_tiny", "train.epochs=3", "train.batch_size=8", "train.precision=fp32",
                 f"train.output_dir={tmp_path / 'runs'}", "train.run_name=one", "optim.lr_base_batch=0",
                 "train.val_every=0"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), overrides=overrides, out=str(tmp_path), resume=None,
                                    setup=SIGNAL_ONE_RANK.format(out=str(tmp_path))))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29537", str(script)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"signal{r}").read_text() for r in range(2)] == [str(int(signal.SIGUSR1))] * 2
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "runs" / "one"))
    assert state["global_step"] == 4  # of 12: stopped at the first cross-rank check (the end of epoch 1 of 3)
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()


def test_cifar_recipe_trains_and_resumes_exactly(cifar10_folder, tmp_path):
    """The CIFAR path (in-memory uint8 tensors, crop 32 pad 4 + flip on the device) through the same loop."""
    extra = ("data.dataset=cifar10", f"data.root={cifar10_folder}", "aug.name=apr_sp", "train.batch_size=16",
             "data.mean=[0.4914, 0.4822, 0.4465]", "data.std=[0.2470, 0.2435, 0.2616]")
    straight = train(tiny_config(cifar10_folder, tmp_path / "a", *extra), progress=False)
    assert straight.status == "finished" and straight.global_step == 10  # 80 / 16 x 2 epochs
    assert straight.history[-1]["val_count"] == 40

    def preempt(info):
        if info["epoch"] == 1 and info["step"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # slurm's warning signal

    cfg = tiny_config(cifar10_folder, tmp_path / "b", *extra)
    assert train(cfg, progress=False, on_step_end=preempt).status == "preempted"
    train(cfg, resume="auto", progress=False)
    a = weights(find_latest_checkpoint(tmp_path / "a" / "run"))
    b = weights(find_latest_checkpoint(tmp_path / "b" / "run"))
    assert load_checkpoint(find_latest_checkpoint(tmp_path / "a" / "run"))["classes"][0] == "digit_0"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)




def test_resume_on_another_world_size_with_ranks_that_list_the_folder_differently(imagenet_tree, tmp_path):
    """1 process preempted mid-epoch, resumed by 2 (torchrun, gloo): rank 0 picks the checkpoint for all
    (rank 1 sees no checkpoint here), and the schedule follows the new world: 4 steps per epoch and the
    lr scaled to the new global batch, as if the run had used 2 processes from that epoch on."""
    overrides = [f"data.root={imagenet_tree}", "data.image_size=32", "data.val_resize=32", "data.num_workers=1",
                 "model.name=cnn_tiny", "aug.name=apr_p", "train.epochs=2", "train.batch_size=8",
                 "train.precision=fp32", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=grow",
                 "optim.lr=0.05", "optim.lr_base_batch=16", "optim.schedule=step", "optim.step_size=1",
                 "optim.gamma=0.5"]

    def preempt(info):
        if info["epoch"] == 0 and info["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(load_config(overrides=overrides), progress=False, on_step_end=preempt)
    assert (first.status, first.epoch, first.step, first.global_step) == ("preempted", 0, 3, 3)
    script = tmp_path / "worker.py"
    # this node's (stale) view of the shared run folder: rank 1 sees no checkpoint yet
    setup = ('import apr.checkpoint as C\n'
             'if os.environ["RANK"] == "1": C.find_latest_checkpoint = lambda run_dir: None')
    script.write_text(WORKER.format(root=str(ROOT), overrides=overrides, out=str(tmp_path), setup=setup,
                                    resume="auto"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29518", str(script)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint was written by 1 processes, now 2" in proc.stderr
    hashes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "runs" / "grow"))
    assert state["global_step"] == 8 and len(state["loader_state"]) == 2  # 2 epochs x 64 / (2 x 8)
    # base lr 0.05 x 16/16 for the new global batch of 16, halved after each of the 2 epochs
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.25)
    assert state["scheduler"]["last_epoch"] == 8


def test_a_diverging_lr_never_saves_non_finite_weights(imagenet_tree, tmp_path, capsys):
    """lr 1000 with a save after every step: the weights go non-finite one step before the loss does;
    no such weights may be saved, nor may the good checkpoints be pruned in their favour."""
    cfg = tiny_config(imagenet_tree, tmp_path, "optim.lr=1000", "optim.schedule=constant",
                      "checkpoint.every_steps=1", "checkpoint.keep_last=2", "train.log_every=50")
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, progress=False)
    run = tmp_path / "run"
    saved = sorted(run.glob("checkpoint-*.pt"))
    for path in saved:
        assert all(torch.isfinite(v).all() for v in weights(path).values() if v.is_floating_point()), path.name
    assert not list(run.glob(".*.tmp"))
    message = str(err.value)
    assert re.search(r"(loss|weights) became non-finite in epoch \d+ by step \d+", message), message
    if saved:
        assert f"the last good checkpoint is {saved[-1]}" in message
    else:
        assert f"no checkpoint was saved in {run} before it" in message


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from apr.checkpoint import RunLock
    lock = RunLock({run!r}).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_run_in_a_locked_folder_names_the_running_process(imagenet_tree, tmp_path):
    """Another live process trains in the folder: both a fresh start and --resume auto stop, naming its
    pid and host, and touch nothing. The kernel frees the lock when that process dies (even SIGKILL)."""
    import socket

    from apr.checkpoint import RunFolderBusy

    cfg = tiny_config(imagenet_tree, tmp_path, "train.epochs=1")
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT), run=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (None, "auto"):
            with pytest.raises(RunFolderBusy, match=f"in use by another training run \\(pid {holder.pid} on host "
                                                     f"{re.escape(socket.gethostname())}"):
                train(cfg, resume=resume, progress=False)
        assert not list(run.glob("checkpoint-*.pt")) and not (run / "config.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait()
    assert train(cfg, resume="auto", progress=False).status == "finished"


def test_the_lock_is_held_for_the_whole_run_and_released_after(imagenet_tree, tmp_path):
    from apr.checkpoint import RunFolderBusy, RunLock

    cfg = tiny_config(imagenet_tree, tmp_path, "train.epochs=1")
    outcomes = []

    def try_second_lock(info):
        if info["step"] == 2:
            try:
                RunLock(tmp_path / "run").acquire().release()
                outcomes.append("acquired")
            except RunFolderBusy as exc:
                outcomes.append(str(exc))

    train(cfg, progress=False, on_step_end=try_second_lock)
    assert len(outcomes) == 1 and f"pid {os.getpid()}" in outcomes[0]
    RunLock(tmp_path / "run").acquire().release()  # free once train() returned

    def crash(info):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):  # and after a crash inside the run
        train(tiny_config(imagenet_tree, tmp_path, "train.run_name=crash"), progress=False, on_step_end=crash)
    RunLock(tmp_path / "crash").acquire().release()


def test_stale_temp_files_are_removed_and_a_truncated_newest_checkpoint_falls_back(imagenet_tree, tmp_path,
                                                                                   capsys):
    """A SIGKILL mid-save leaves .checkpoint-*.tmp; a torn copy (or disk full) leaves a truncated newest
    file: --resume auto removes the first and continues from the checkpoint before the second."""
    cfg = tiny_config(imagenet_tree, tmp_path, "train.epochs=1", "checkpoint.every_steps=1", "checkpoint.keep_last=3")

    def preempt(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(cfg, progress=False, on_step_end=preempt).status == "preempted"
    run = tmp_path / "run"
    names = sorted(p.name for p in run.glob("checkpoint-*.pt"))
    assert names == [f"checkpoint-e0000-s000000{k}.pt" for k in (1, 2, 3)]
    newest = run / names[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    stale = [run / ".checkpoint-e0000-s0000004.pt.x1y2z3.tmp", run / ".best.pt.abcd.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    result = train(cfg, resume="auto", progress=False)
    err = capsys.readouterr().err
    assert result.status == "finished" and result.global_step == 4
    assert not any(path.exists() for path in stale) and not list(run.glob(".*.tmp"))
    assert f"cannot read checkpoint {newest}" in err and "falling back to the previous checkpoint" in err
    assert "resumed from " + str(run / names[1]) in err
    assert (run / (names[-1] + ".corrupt")).is_file()  # kept aside, out of the checkpoint sequence


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_imagenet.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=ROOT, timeout=300)


def test_entry_script_user_errors_are_one_line_and_debug_keeps_the_traceback(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("train:\n  epochs: [1, 2\n")
    out_dir = f"train.output_dir={tmp_path / 'runs'}"
    cases = [
        (["--config", str(recipe)], "YAML syntax error"),
        (["--set", "optim.lr=.nan"], "optim.lr must be a finite number"),
        (["--set", f"data.root={tmp_path / 'nope'}", "--set", out_dir], str(tmp_path / "nope")),
        (["--set", f"data.root={tmp_path}", "--set", out_dir, "--resume", str(tmp_path / "missing.pt")],
         f"--resume {tmp_path / 'missing.pt'}: no such checkpoint file"),
    ]
    for args, message in cases:
        out = run_script(*args)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert out.returncode == 2 and len(errors) == 1 and message in errors[0], (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
    out = run_script("--config", str(recipe), "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "error:" not in out.stderr


def test_print_config_shows_the_resolved_thread_count(monkeypatch):
    from apr.train import resolve_num_threads

    out = run_script("--print-config", "--set", "data.num_workers=1")
    assert out.returncode == 0 and "num_threads: 0" in out.stdout
    cfg = load_config(overrides=["data.num_workers=1"])
    assert f"# train.num_threads 0 (auto) resolves to {resolve_num_threads(cfg)} here" in out.stdout
    out = run_script("--print-config", "--set", "train.num_threads=3")
    assert "num_threads: 3" in out.stdout and "resolves to" not in out.stdout


def test_auto_threads_share_this_process_cores_between_local_ranks_and_the_loader(monkeypatch):
    from apr.train import resolve_num_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    cfg = load_config(overrides=["data.num_workers=4"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert resolve_num_threads(cfg) == 28  # 32 cores - 4 loader threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_num_threads(cfg) == 4  # 32 / 4 processes - 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_num_threads(cfg) == 1  # 32 / 8 - 4 = 0 -> at least one
    assert resolve_num_threads(load_config(overrides=["train.num_threads=6"])) == 6  # explicit wins


def test_training_runs_with_the_resolved_threads_and_restores_them(imagenet_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    before = torch.get_num_threads()
    seen = []
    cfg = tiny_config(imagenet_tree, tmp_path, "train.epochs=1", "train.max_steps_per_epoch=1")
    train(cfg, progress=False, on_step_end=lambda info: seen.append(torch.get_num_threads()))
    assert seen == [2]  # 3 cores - 1 loader thread
    assert "2 CPU thread(s) per process" in capsys.readouterr().err
    assert torch.get_num_threads() == before


def test_train_step_is_ce_of_both_halves_and_one_sgd_step():
    """Against a hand-built reference: normalise, APR-P with a copy of the generator, CE + CE, w -= lr * grad."""
    import copy

    import torch.nn.functional as F

    from apr.augment import APRPolicy, apr_p
    from apr.inference import ImageClassifier
    from apr.train import train_step

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    reference = copy.deepcopy(net)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    classifier = ImageClassifier(net, mean, std, precision="fp32")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    generator = torch.Generator().manual_seed(7)
    ref_generator = torch.Generator().manual_seed(7)
    calls = []
    loss = train_step(classifier, optimizer, images, labels, policy=APRPolicy("apr_p", p_prob=1.0),
                      generator=generator, backward=lambda value: (calls.append(1), value.backward()))

    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    mixed = apr_p(images, prob=1.0, generator=ref_generator)
    expected = (F.cross_entropy(reference((images - m) / s), labels)
                + F.cross_entropy(reference((mixed - m) / s), labels))
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert calls == [1] and not loss.requires_grad
    for new, old in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(new, (old - 0.1 * old.grad).detach(), rtol=1e-5, atol=1e-6)
    # aug none: one half, plain CE of the clean batch
    with torch.no_grad():
        expected = F.cross_entropy(net((images - m) / s), labels)  # the loss before this step's update
    loss = train_step(classifier, optimizer, images, labels, policy=APRPolicy("none"), generator=generator)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# the training step on CUDA (bf16, channels_last, APR-SP) against the fp32 CPU step


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def one_apr_sp_step(images, labels, device: str, precision: str, channels_last: bool) -> tuple[float, torch.Tensor]:
    """Loss and the parameter update of one train_step of cnn_tiny from the same weights and draws."""
    from apr.augment import APRPolicy
    from apr.inference import ImageClassifier
    from apr.models import create_model
    from apr.train import train_step

    torch.manual_seed(0)
    net = create_model("cnn_tiny", 4).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    classifier = ImageClassifier(net, IMAGENET_MEAN, IMAGENET_STD, precision=precision, channels_last=channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().cpu().clone() for p in net.parameters()]
    loss = train_step(classifier, optimizer, images.to(device), labels.to(device),
                      policy=APRPolicy("apr_sp", p_prob=1.0), generator=torch.Generator().manual_seed(0))
    update = torch.cat([(p.detach().cpu().float() - b).flatten() for p, b in zip(net.parameters(), before)])
    return float(loss), update


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bf16_channels_last_apr_sp_step_agrees_with_the_fp32_cpu_step(digits_images, device):
    """bf16 rounds every activation and gradient to 8 significant bits (2**-9 relative each; cnn_tiny's forward
    has 8 such roundings): the loss within 2 %, the update's direction within cos 0.99 and its size within 5 %.
    APR-SP's few level flips between devices move an image by <= 1e-2 (see conftest.assert_images_close)."""
    images = torch.from_numpy(digits_images[0][:16].transpose(0, 3, 1, 2).astype("float32") / 255.0)
    labels = torch.from_numpy(digits_images[1][:16] % 4)
    want_loss, want = one_apr_sp_step(images, labels, "cpu", "fp32", channels_last=False)
    loss, got = one_apr_sp_step(images, labels, device, "bf16", channels_last=True)
    assert abs(loss - want_loss) <= 0.02 * abs(want_loss), (loss, want_loss)
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) >= 0.99
    assert abs(float(got.norm() / want.norm()) - 1) <= 0.05
    _, shuffled = one_apr_sp_step(images, labels.roll(1), "cpu", "fp32", channels_last=False)
    assert float(torch.nn.functional.cosine_similarity(shuffled, want, dim=0)) < 0.9  # the bound can fail
