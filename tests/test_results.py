"""The results-file discipline of every evaluation command (apr.results): concurrent runs on one file,
reruns with other subsets, fingerprints that see replaced files, and output folders that cannot be written.

Each command is run as a user runs it: ``python -m apr.ood``, ``python -m apr.adversarial`` and
``python -m apr.commands.evaluate`` (the concurrent cases as two real processes at once), on a tiny
cnn_tiny checkpoint and the shared digit trees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.checkpoint import save_checkpoint
from apr.cli import run_main
from apr.config import Config, config_to_dict
from apr.errors import UserError
from apr.models import create_model

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"n{k:08d}" for k in range(4)]
CPU = ["--device", "cpu", "--quiet"]

# A command run as ``python -m``, started at a shared moment (the barrier file) and with every forward
# pass slowed down, so that two runs are computing at the same time however the machine schedules them.
RUNNER = """
import importlib, os, sys, time
from pathlib import Path
barrier, module, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
import torch
torch.set_num_threads(1)
from apr.cli import run_main
from apr.inference import ImageClassifier
main = importlib.import_module(module).main
forward = ImageClassifier.forward
def slow(self, images):
    time.sleep(0.3)
    return forward(self, images)
ImageClassifier.forward = slow
while not barrier.exists():
    time.sleep(0.005)
sys.exit(run_main(main, argv))
"""


def env() -> dict:
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_at_once(tmp_path: Path, module: str, *argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """Start one process per argv, release them together, wait for all."""
    barrier = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, str(barrier), module, *map(str, argv)], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    time.sleep(0.5)
    barrier.touch()
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A cnn_tiny of the digit classes (32 px, no normalisation); its numbers do not matter here."""
    cfg = Config()
    cfg.data.dataset, cfg.data.image_size, cfg.data.val_resize = "imagefolder", 32, 32
    cfg.data.mean, cfg.data.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    cfg.model.name, cfg.train.run_name = "cnn_tiny", "tiny"
    torch.manual_seed(0)
    model = create_model("cnn_tiny", len(CLASSES))
    return save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": len(CLASSES),
                            "classes": CLASSES, "config": config_to_dict(cfg.validate()), "epoch": 1, "step": 1},
                           tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def write_bmps(folder: Path, n: int, seed: int) -> Path:
    """BMP files: same pixel size -> same file size, whatever the content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"im{i}.bmp")
    return folder


@pytest.fixture(scope="module")
def ood_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ood")
    return {name: write_bmps(root / name, 6, seed) for seed, name in enumerate(("a", "b", "c"))}


@pytest.fixture(scope="module")
def c_tree(imagenet_tree, tmp_path_factory) -> Path:
    """Three corruptions at severity 1 of the 24 val digits."""
    from apr.corrupt import make_corrupted_tree

    dst = tmp_path_factory.mktemp("c") / "c"
    make_corrupted_tree(imagenet_tree / "val", dst, corruptions=["gaussian_noise", "shot_noise", "impulse_noise"],
                        severities=(1,), resize=None, crop=None, workers=0, progress=False)
    return dst


def ood_argv(checkpoint, imagenet_tree, out, sets: dict) -> list:
    return ["--checkpoint", checkpoint, "--in", imagenet_tree / "val", "--ood",
            *[f"{name}={path}" for name, path in sets.items()], "--out", out, "--backend", "torchvision",
            "--workers", "0", "--batch-size", "8", *CPU]


def adv_argv(checkpoint, imagenet_tree, out, attacks: list[str], *extra) -> list:
    return ["--checkpoint", checkpoint, "--val", imagenet_tree / "val", "--attack", *attacks, "--max-images", "8",
            "--pgd-steps", "2", "--out", out, "--backend", "torchvision", "--workers", "0", "--batch-size", "8",
            "--device", "cpu", *extra]


def eval_argv(checkpoint, imagenet_tree, c_tree, out, corruptions: list[str]) -> list:
    return ["--checkpoint", checkpoint, "--imagenet-c", c_tree, "--val", imagenet_tree / "val", "--dataset",
            "folder-c", "--corruptions", *corruptions, "--severities", "1", "--out", out, "--backend", "torchvision",
            "--workers", "0", "--batch-size", "8", "--precision", "fp32", "--no-report", *CPU]


# what each command's results file holds, keyed by what a run was asked for
COMMANDS = {
    "ood": ("apr.ood", "tiny.ood.json", lambda data: sorted(data["ood_sets"])),
    "adversarial": ("apr.adversarial.__main__", "tiny.adv.json", lambda data: sorted(data["attacks"])),
    "eval": ("apr.commands.evaluate", "tiny.json", lambda data: sorted(data["corruptions"])),
}


def argv_for(command: str, subset: list[str], out: Path, checkpoint, imagenet_tree, c_tree, ood_sets) -> list:
    if command == "ood":
        return ood_argv(checkpoint, imagenet_tree, out, {name: ood_sets[name] for name in subset})
    if command == "adversarial":
        return adv_argv(checkpoint, imagenet_tree, out, subset)
    return eval_argv(checkpoint, imagenet_tree, c_tree, out, subset)


SUBSETS = {"ood": (["a"], ["b", "c"]), "adversarial": (["fgsm"], ["pgd"]),
           "eval": (["gaussian_noise"], ["shot_noise", "impulse_noise"])}


# ----------------------------------------------------------------------------- concurrent runs, reruns


@pytest.mark.parametrize("command", list(COMMANDS))
def test_two_runs_at_once_on_one_file_keep_both_subsets(command, checkpoint, imagenet_tree, c_tree, ood_sets,
                                                        tmp_path):
    module, name, entries = COMMANDS[command]
    first, second = SUBSETS[command]
    out = tmp_path / "out"
    runs = run_at_once(tmp_path, module, *[argv_for(command, subset, out, checkpoint, imagenet_tree, c_tree, ood_sets)
                                           for subset in (first, second)])
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-2000:] for r in runs]
    assert entries(json.loads((out / name).read_text())) == sorted(first + second)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_rerun_with_another_subset_keeps_the_earlier_entries(command, checkpoint, imagenet_tree, c_tree, ood_sets,
                                                               tmp_path):
    module, name, entries = COMMANDS[command]
    main = __import__(module, fromlist=["main"]).main
    first, second = SUBSETS[command]
    for subset in (first, second):
        assert run_main(main, list(map(str, argv_for(command, subset, tmp_path, checkpoint, imagenet_tree, c_tree,
                                                     ood_sets)))) == 0
    assert entries(json.loads((tmp_path / name).read_text())) == sorted(first + second)


def test_ood_set_whose_files_were_replaced_by_same_size_ones_is_scored_again(checkpoint, imagenet_tree, tmp_path):
    from apr.ood import evaluate_ood

    folder = write_bmps(tmp_path / "set", 4, seed=1)
    args = dict(in_folder=imagenet_tree / "val", ood={"s": str(folder)}, out_dir=tmp_path / "out",
                backend="torchvision", num_workers=0, batch_size=8, precision="fp32", device="cpu", progress=False)
    evaluate_ood(checkpoint, **args)
    size = (folder / "im0.bmp").stat().st_size
    time.sleep(0.05)  # a later write: another mtime, even on a coarse clock
    write_bmps(tmp_path / "other", 1, seed=9)
    (folder / "im0.bmp").write_bytes((tmp_path / "other" / "im0.bmp").read_bytes())
    assert (folder / "im0.bmp").stat().st_size == size
    scored = []
    evaluate_ood(checkpoint, on_set_done=lambda name, record: scored.append(name), **args)
    assert scored == ["s"]


def test_numbers_of_changed_files_are_dropped_at_the_first_save_not_kept_until_rescored(checkpoint, imagenet_tree,
                                                                                       tmp_path, monkeypatch):
    import apr.ood
    from apr.ood import evaluate_ood, load_ood_result

    folder = write_bmps(tmp_path / "set", 4, seed=1)
    args = dict(in_folder=imagenet_tree / "val", ood={"s": str(folder)}, out_dir=tmp_path / "out",
                backend="torchvision", num_workers=0, batch_size=8, precision="fp32", device="cpu", progress=False)
    evaluate_ood(checkpoint, **args)
    write_bmps(folder, 5, seed=2)  # one more file, the others rewritten
    score_set, calls = apr.ood._score_set, []

    def interrupted(image_set, *rest):
        calls.append(image_set.name)
        if image_set.name == "s":
            raise KeyboardInterrupt  # preempted while scoring the changed set
        return score_set(image_set, *rest)

    monkeypatch.setattr(apr.ood, "_score_set", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_ood(checkpoint, **args)
    assert calls == ["in", "s"] and "s" not in load_ood_result(tmp_path / "out" / "tiny.ood.json")["ood_sets"]


def test_files_fingerprint_sees_names_sizes_and_rewrites(tmp_path):
    from apr.results import files_fingerprint

    files = [tmp_path / f"f{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"x" * 10)
    base = files_fingerprint(tmp_path, files)
    assert base["files"] == 3 and base["bytes"] == 30 and files_fingerprint(tmp_path, files) == base
    time.sleep(0.05)
    files[0].write_bytes(b"y" * 10)  # same name, same size, new content
    assert files_fingerprint(tmp_path, files)["sha1"] != base["sha1"]
    files[0].rename(tmp_path / "g0")
    assert files_fingerprint(tmp_path, [tmp_path / "g0", *files[1:]])["sha1"] != base["sha1"]


def test_merge_keeps_every_entry_and_this_runs_own_where_both_have_one():
    from apr.results import merge_entries

    assert merge_entries({"a": 1, "b": 2}, {"b": 3, "c": 4}, computed=["c"]) == {"a": 1, "b": 2, "c": 4}
    assert merge_entries({"a": 1, "b": 2}, {"b": 3}, computed=["b"]) == {"a": 1, "b": 3}


def test_a_file_rewritten_meanwhile_for_another_model_is_not_overwritten(tmp_path):
    from apr.results import ResultsFile

    path = tmp_path / "r.json"

    def read(p):
        return json.loads(p.read_text())

    mine = ResultsFile(path, read, lambda previous: [] if previous["model"] == "A" else ["other model"])
    assert mine.load() is None
    mine.save({"model": "A", "n": 1}, lambda disk, ours: ours)
    path.write_text(json.dumps({"model": "B"}))  # another run of another model, same name
    with pytest.raises(UserError, match="rewritten during this run by another run .*other model"):
        mine.save({"model": "A", "n": 2}, lambda disk, ours: ours)
    assert read(path) == {"model": "B"}


# ----------------------------------------------------------------------------- outputs that cannot be written


def forward_counter(monkeypatch) -> list:
    from apr.inference import ImageClassifier

    calls, forward = [], ImageClassifier.forward

    def counting(self, images):
        calls.append(len(images))
        return forward(self, images)

    monkeypatch.setattr(ImageClassifier, "forward", counting)
    return calls


@pytest.mark.parametrize("command", list(COMMANDS))
def test_out_that_is_a_file_is_refused_before_any_work(command, checkpoint, imagenet_tree, c_tree, ood_sets, tmp_path,
                                                       capsys, monkeypatch):
    calls = forward_counter(monkeypatch)
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    main = __import__(COMMANDS[command][0], fromlist=["main"]).main
    argv = argv_for(command, SUBSETS[command][0], out, checkpoint, imagenet_tree, c_tree, ood_sets)
    assert run_main(main, list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out} is a file, not a folder" in err and "Traceback" not in err
    assert calls == [] and out.read_text() == "not a folder"


def readonly_folder(path: Path) -> Path:
    """A folder no write can go to: a read-only tmpfs for root (who ignores permissions), else mode 0555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"root without mount rights: {done.stderr.decode().strip()}")
    return path


@pytest.fixture
def mounts():
    mounted = []
    yield mounted
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_read_only_out_is_refused_before_any_work(command, checkpoint, imagenet_tree, c_tree, ood_sets, tmp_path,
                                                  capsys, monkeypatch, mounts):
    out = readonly_folder(tmp_path / "ro")
    mounts.append(out)
    calls = forward_counter(monkeypatch)
    main = __import__(COMMANDS[command][0], fromlist=["main"]).main
    argv = argv_for(command, SUBSETS[command][0], out, checkpoint, imagenet_tree, c_tree, ood_sets)
    assert run_main(main, list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write to --out {out}" in err and "Traceback" not in err
    assert calls == []


# RLIMIT_FSIZE stands for a full disk on any machine: a write past it fails with EFBIG (SIGXFSZ ignored)
LIMITED = """
import resource, signal, sys, importlib
limit, module, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
from apr.cli import run_main
main = importlib.import_module(module).main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(run_main(main, argv))
"""


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("limit, message", [(0, "cannot write to --out"), (2000, "cannot write .*tiny")])
def test_full_disk_is_one_error_line_naming_the_path(command, limit, message, checkpoint, imagenet_tree, c_tree,
                                                     ood_sets, tmp_path):
    """No room at all: refused before any work; room for the probe but not the results: the results path
    is named, no temporary file is left and what is there is an earlier save, whole."""
    import re

    module, name, _ = COMMANDS[command]
    out = tmp_path / "out"
    argv = argv_for(command, SUBSETS[command][0], out, checkpoint, imagenet_tree, c_tree, ood_sets)
    done = subprocess.run([sys.executable, "-c", LIMITED, str(limit), module, *map(str, argv)], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(f"error: {message}", done.stderr) and "Traceback" not in done.stderr, done.stderr[-2000:]
    left = [p for p in out.iterdir() if not p.name.endswith(".lock")]
    assert not [p for p in left if p.name.endswith(".tmp")]
    assert all(json.loads(p.read_text())["schema"] for p in left)  # an earlier save, whole, or nothing


# ----------------------------------------------------------------------------- broken report inputs


@pytest.fixture(scope="module")
def ood_result(checkpoint, imagenet_tree, ood_sets, tmp_path_factory) -> str:
    """The text of a real ``*.ood.json``."""
    from apr.ood import evaluate_ood

    out = tmp_path_factory.mktemp("ood_result")
    evaluate_ood(checkpoint, in_folder=imagenet_tree / "val", ood={"a": str(ood_sets["a"])}, out_dir=out,
                 backend="torchvision", num_workers=0, batch_size=8, precision="fp32", device="cpu", progress=False)
    return (out / "tiny.ood.json").read_text()


def edited(text: str, change) -> str:
    data = json.loads(text)
    change(data)
    return json.dumps(data)


BROKEN = {
    "truncated": lambda text: text[: len(text) // 2],
    "auroc_a_word": lambda text: edited(text, lambda d: d["ood_sets"]["a"]["metrics"]["msp"].update(auroc="high")),
    "count_a_word": lambda text: edited(text, lambda d: d["ood_sets"]["a"].update(count="many")),
    "sets_a_list": lambda text: edited(text, lambda d: d.update(ood_sets=["a"])),
    "in_distribution_a_number": lambda text: edited(text, lambda d: d.update(in_distribution=3)),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_report_on_a_folder_with_a_broken_file_names_it(case, ood_result, tmp_path, capsys):
    from apr.report import main as report

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "good.ood.json").write_text(ood_result)
    (folder / "bad.ood.json").write_text(BROKEN[case](ood_result))
    assert run_main(report, [str(folder), "--out", str(tmp_path / "report"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert f"error: {folder / 'bad.ood.json'}" in err and "--skip-broken" in err and "Traceback" not in err
    assert not (tmp_path / "report" / "report.md").exists()
    with pytest.warns(UserWarning, match=f"left out of the report: {folder / 'bad.ood.json'}"):
        assert run_main(report, [str(folder), "--out", str(tmp_path / "report"), "--no-plots", "--skip-broken"]) == 0
    assert "good.ood.json" in json.dumps(json.loads((tmp_path / "report" / "summary.json").read_text()))


def test_report_on_a_shift_file_without_suites_names_it(tmp_path, capsys):
    from apr.report import main as report

    path = tmp_path / "m.shift.json"
    path.write_text(json.dumps({"schema": "apr.shift/1", "run_name": "m", "clean": None, "suites": None}))
    assert run_main(report, [str(path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: 'suites' is None" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--pgd-steps", "0"], ["--pgd-restarts", "0"], ["--max-images", "0"]])
def test_bad_attack_numbers_are_refused_before_any_pass(flag, checkpoint, imagenet_tree, tmp_path, capsys,
                                                        monkeypatch):
    from apr.adversarial.__main__ import main

    calls = forward_counter(monkeypatch)
    argv = adv_argv(checkpoint, imagenet_tree, tmp_path, ["fgsm", "pgd"])
    argv = [str(a) for a in argv]
    i = argv.index(flag[0]) if flag[0] in argv else len(argv)
    argv[i:i + 2] = flag
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert f"error: " in err and flag[0] in err and calls == []


def test_report_into_a_read_only_folder_is_one_error_line(ood_result, tmp_path, capsys, mounts):
    from apr.report import main as report

    (tmp_path / "r.ood.json").write_text(ood_result)
    out = readonly_folder(tmp_path / "ro")
    mounts.append(out)
    assert run_main(report, [str(tmp_path / "r.ood.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write to --out {out}" in err and "Traceback" not in err


TORCH_SAVE = """
import resource, signal, sys, torch
from apr.cli import run_main
from apr.io import atomic_open
def main(argv):
    with atomic_open(argv[0]) as f:
        torch.save({"w": torch.zeros(10000)}, f)
    return 0
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
sys.exit(run_main(main, sys.argv[1:]))
"""


def test_a_checkpoint_on_a_full_disk_is_named_not_an_opaque_torch_error(tmp_path):
    """torch.save reports a failed write as 'unexpected pos ...'; training's checkpoints must say the disk is full."""
    done = subprocess.run([sys.executable, "-c", TORCH_SAVE, str(tmp_path / "last.pt")], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"error: cannot write {tmp_path / 'last.pt'}: File too large" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no temporary file left


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EDQUOT"])
def test_any_command_prints_a_full_or_read_only_disk_as_one_line(code):
    """Writes outside atomic_open (a training run's lock file, a log) too."""
    import errno

    from apr.cli import format_user_error

    exc = OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/runs/x/.run.lock")
    assert format_user_error(exc) == str(exc) and "/runs/x/.run.lock" in str(exc)


def test_training_into_a_read_only_folder_stops_before_the_first_step(imagenet_tree, tmp_path, mounts):
    out = readonly_folder(tmp_path / "ro")
    mounts.append(out)
    overrides = [f"data.root={imagenet_tree}", "data.image_size=32", "data.val_resize=32", "data.num_workers=0",
                 "model.name=cnn_tiny", "train.epochs=1", "train.batch_size=16", "train.precision=fp32",
                 f"train.output_dir={out}", "train.run_name=run"]
    done = subprocess.run([sys.executable, "-m", "apr.commands.train", *[a for o in overrides for a in ("--set", o)]],
                          env=env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and str(out / "run") in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "epoch" not in done.stdout.lower()
