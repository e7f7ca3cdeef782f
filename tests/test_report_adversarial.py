"""apr.report's adversarial section: tables equal the apr.adversarial JSON, settings and masking
flags sit next to their numbers, the eps-sweep figure is a real PNG, malformed files are refused;
and one report over corruption + OOD + adversarial results has the three sections in order.

The results files come from the real ``python -m apr.adversarial`` (FGSM, 3-step PGD, eps sweep)
on two tiny trained cnn_tiny checkpoints; the AutoAttack entry (too slow for a unit test) is added
with the real ``autoattack_settings`` and the flags recomputed with the real ``masking_flags``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from apr.adversarial.__main__ import main as adv_main
from apr.adversarial.attacks import autoattack_settings
from apr.adversarial.run import masking_flags
from apr.checkpoint import save_checkpoint
from apr.config import Config, config_to_dict
from apr.inference import ImageClassifier
from apr.models import create_model
from apr.report import ReportError, format_percent, write_report
from apr.report.adversarial import MASK, SCHEMA, eps_text, flag_concerns

from test_report import make_result, parse_table
from test_report_ood import make_ood_results

REPO = Path(__file__).resolve().parents[1]
TABLE = "### Robust accuracy"


def train_checkpoint(path: Path, cifar10_folder: Path, aug: str, run_name: str, seed: int) -> Path:
    """cnn_tiny fitted for 30 Adam steps on the 80 training digits, saved with ``aug`` as its recipe."""
    from apr.data import load_cifar

    images, labels, classes = load_cifar(cifar10_folder, "cifar10", train=True)
    cfg = Config()
    cfg.data.dataset, cfg.data.image_size = "cifar10", 32
    cfg.data.mean, cfg.data.std = [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]
    cfg.model.name, cfg.train.run_name, cfg.aug.name = "cnn_tiny", run_name, aug
    torch.manual_seed(seed)
    model = create_model("cnn_tiny", len(classes))
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255
    classifier = ImageClassifier(model, cfg.data.mean, cfg.data.std)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.cross_entropy(classifier(x), torch.tensor(labels)).backward()
        optimizer.step()
    return save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": len(classes),
                            "classes": list(classes), "config": config_to_dict(cfg), "epoch": 1, "step": 30}, path)


def add_autoattack(path: Path) -> None:
    """An AutoAttack entry with the real standard settings; it leaves no more images correct than PGD."""
    result = json.loads(path.read_text())
    pgd = result["attacks"]["pgd"]
    correct = max(pgd["correct"] - 1, 0)
    result["attacks"]["autoattack"] = {"settings": autoattack_settings(eps=8 / 255), "correct": correct,
                                       "n": pgd["n"], "robust_accuracy": correct / pgd["n"], "seconds": 1.0}
    result["flags"] = masking_flags(result)
    path.write_text(json.dumps(result))


@pytest.fixture(scope="module")
def adv_dir(tmp_path_factory, cifar10_folder) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adv_report")
    out = root / "results"
    for aug, name, seed in (("none", "base", 0), ("apr_sp", "aprsp", 1)):
        ckpt = train_checkpoint(root / f"{name}.pt", cifar10_folder, aug, name, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # masking warnings of a tiny model are expected; the report is tested
            assert adv_main(["--checkpoint", str(ckpt), "--cifar", str(cifar10_folder), "--attack", "fgsm", "pgd",
                             "--eps", "8/255", "--n", "20", "--batch-size", "10", "--pgd-steps", "3", "--out",
                             str(out), "--device", "cpu", "--eps-sweep", "--sweep-n", "10", "--sweep-steps", "2"]) == 0
        add_autoattack(out / f"{name}.adv.json")
    return out


def load(folder: Path) -> dict[str, dict]:
    return {p.name.split(".")[0]: json.loads(p.read_text()) for p in sorted(folder.glob("*.adv.json"))}


def strip_mark(cell: str) -> tuple[str, bool]:
    return (cell[: -len(MASK) - 1], True) if cell.endswith(f" {MASK}") else (cell, False)


def concerned(result: dict, column: str) -> bool:
    return any(column in flag_concerns(f)[1] for f in result["flags"])


def test_tables_equal_the_json(adv_dir, tmp_path):
    runs = load(adv_dir)
    md = write_report([adv_dir], tmp_path / "out", plots=False).read_text()
    by_method = {"baseline": runs["base"], "APR-SP": runs["aprsp"]}
    rows = parse_table(md, TABLE)
    assert [r["Method"] for r in rows] == ["baseline", "APR-SP"]
    columns = {"fgsm": "FGSM (8/255)", "pgd": "PGD-3 (8/255)", "autoattack": "AutoAttack (8/255)"}
    for row in rows:
        result = by_method[row["Method"]]
        value, marked = strip_mark(row["Clean acc."])
        assert value == format_percent(100 * result["clean"]["accuracy"])  # the stored rate, as a percent
        assert float(value) == pytest.approx(100 * result["clean"]["correct"] / result["clean"]["n"], abs=0.0051)
        assert marked == concerned(result, "clean")
        for name, column in columns.items():
            attack = result["attacks"][name]
            value, marked = strip_mark(row[column])
            assert value == format_percent(100 * attack["robust_accuracy"])
            assert float(value) == pytest.approx(100 * attack["correct"] / attack["n"], abs=0.0051)  # re-derived
            assert marked == concerned(result, name)
        assert row["Gradient-masking flags"] == "none" or row["Gradient-masking flags"].startswith(MASK)
        assert (row["Gradient-masking flags"] == "none") == (not result["flags"])
    settings = {r["Attack"]: r for r in parse_table(md, "### Attack settings")}
    assert settings["PGD"]["Eps"] == "8/255" and settings["PGD"]["Step size"] == "2/255"
    assert settings["PGD"]["Steps"] == "3" and settings["PGD"]["Restarts"] == "1"
    assert settings["PGD"]["Random start"] == "yes" and settings["FGSM"]["Random start"] == "no"
    assert settings["FGSM"]["Steps"] == "1" and settings["FGSM"]["Step size"] == "8/255"
    assert settings["PGD"]["Images"] == "20" and settings["PGD"]["Runs"] == "baseline, APR-SP"
    assert settings["PGD"]["Library"].startswith("apr ")
    import pyautoattack

    auto = settings["AutoAttack"]
    assert auto["Library"] == f"pyautoattack {pyautoattack.__version__}" and auto["Norm"] == "Linf"
    assert auto["Steps"] == "100 (APGD)" and "apgd-ce, apgd-t, fab-t, square" in auto["Details"]
    assert "Square queries 5000" in auto["Details"]
    data = {r["Method"]: r for r in parse_table(md, "### Adversarial runs")}
    assert data["APR-SP"]["Images attacked"] == "cifar10, 20 of 40 images (seed 0)"
    assert data["APR-SP"]["Precision"] == "fp32" and data["APR-SP"]["Finished"] == "yes"
    block = json.loads((tmp_path / "out" / "summary.json").read_text())["sections"]["adversarial"]
    assert block["schema"] == SCHEMA and block["attacks"] == ["fgsm", "pgd", "autoattack"]
    for run in block["runs"]:
        result = by_method[run["label"]]
        assert run["clean_accuracy"] == pytest.approx(100 * result["clean"]["accuracy"], rel=1e-12)
        assert run["eps_sweep"]["robust_accuracy"] == pytest.approx(
            [100 * v for v in result["eps_sweep"]["robust_accuracy"]], rel=1e-12)


def test_masking_flags_sit_next_to_the_numbers_they_concern(adv_dir, tmp_path):
    result = load(adv_dir)["aprsp"]
    n = result["clean"]["n"]
    result["clean"].update(correct=10, accuracy=10 / n)
    fgsm, pgd = result["attacks"]["fgsm"], result["attacks"]["pgd"]
    fgsm.update(correct=4, robust_accuracy=4 / n)
    pgd.update(correct=12, robust_accuracy=12 / n)  # PGD weaker than FGSM, and above clean
    result["attacks"]["autoattack"].update(correct=2, robust_accuracy=2 / n)
    result["eps_sweep"]["robust_accuracy"] = [0.5, 0.5, 0.5, 0.5]
    result["flags"] = masking_flags(result)
    assert {f.split(":")[0] for f in result["flags"]} == {"pgd_weaker_than_fgsm", "robust_above_clean",
                                                          "eps_sweep_flat"}
    md = write_report([result], tmp_path / "out", plots=False).read_text()
    row = parse_table(md, TABLE)[0]
    assert n == 20  # so the percents below are exact: 4/20, 12/20, 10/20, 2/20
    assert row["FGSM (8/255)"] == f"20.00 {MASK}" and row["PGD-3 (8/255)"] == f"60.00 {MASK}"
    assert row["Clean acc."] == f"50.00 {MASK}"
    assert row["AutoAttack (8/255)"] == "10.00"  # no flag concerns it
    assert row["Eps sweep"] == f"{MASK} see flags"
    flags = row["Gradient-masking flags"]
    assert "PGD leaves more images correct than FGSM" in flags and "PGD robust accuracy above the clean" in flags
    assert "robust accuracy does not fall over the eps sweep" in flags


def test_eps_sweep_figure_is_a_real_png(adv_dir, tmp_path):
    md = write_report([adv_dir], tmp_path / "out").read_text()
    assert "(adversarial_eps_sweep.png)" in md
    img = np.asarray(Image.open(tmp_path / "out" / "adversarial_eps_sweep.png").convert("RGB"), dtype=np.float32)
    assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 10
    no_sweep = [dict(r, eps_sweep=None) for r in load(adv_dir).values()]
    md = write_report(no_sweep, tmp_path / "none").read_text()
    assert "adversarial_eps_sweep.png" not in md and not (tmp_path / "none" / "adversarial_eps_sweep.png").exists()
    assert all(r["Eps sweep"] == "—" for r in parse_table(md, TABLE))


def _break(result: dict, how: str) -> None:
    if how == "no clean":
        result["clean"] = None
    elif how == "correct above n":
        result["attacks"]["pgd"].update(correct=25, robust_accuracy=1.25)
    elif how == "rate not count":
        result["attacks"]["fgsm"]["robust_accuracy"] = 0.99
    elif how == "other images":
        pgd = result["attacks"]["pgd"]
        pgd.update(n=10, correct=min(pgd["correct"], 10), robust_accuracy=min(pgd["correct"], 10) / 10)
    elif how == "sweep lengths":
        result["eps_sweep"]["n"] = [10]
    elif how == "no settings":
        del result["attacks"]["fgsm"]["settings"]
    elif how == "zero images":
        result["clean"].update(n=0, correct=0)


@pytest.mark.parametrize("how, message", [
    ("no clean", "no clean pass yet; re-run python -m apr.adversarial"),
    ("correct above n", "<dict>: attack 'pgd': correct = 25 is more than the 20 images attacked; re-run it"),
    ("rate not count", "attack 'fgsm': robust_accuracy 0.99 is not correct/n"),
    ("other images", "attack 'pgd' ran on 10 images but the clean pass on 20"),
    ("sweep lengths", "eps_sweep needs lists 'eps', 'robust_accuracy' and 'n' of one length"),
    ("no settings", "attack 'fgsm' lacks its settings"),
    ("zero images", "clean: n must be a number of images >= 1, got 0"),
])
def test_malformed_files_are_refused(adv_dir, tmp_path, how, message):
    result = load(adv_dir)["base"]
    _break(result, how)
    with pytest.raises(ReportError, match=message):
        write_report([result], tmp_path / "out", plots=False)


def test_correct_above_n_is_refused(adv_dir, tmp_path):
    result = load(adv_dir)["base"]
    result["clean"].update(correct=21, accuracy=1.0)
    with pytest.raises(ReportError, match="clean: correct = 21 is more than the 20 images attacked"):
        write_report([result], tmp_path / "out", plots=False)


def test_eps_text_and_flag_codes():
    assert eps_text(8 / 255) == "8/255" and eps_text(0.031) == "7.91/255" and eps_text(0.5, "L2") == "0.5"
    flags = masking_flags({"clean": {"accuracy": 0.5}, "attacks": {"fgsm": {"robust_accuracy": 0.3},
                                                                   "pgd": {"robust_accuracy": 0.6}},
                           "eps_sweep": {"eps": [1, 2], "robust_accuracy": [0.2, 0.3]}})
    assert [flag_concerns(f) for f in flags] == [("pgd_weaker_than_fgsm", ["fgsm", "pgd"]),
                                                 ("robust_above_clean", ["pgd", "clean"]),
                                                 ("eps_sweep_not_decreasing", ["eps_sweep"])]
    import apr.adversarial.run

    assert SCHEMA == apr.adversarial.run.SCHEMA


def test_one_report_over_corruption_ood_and_adversarial_results(adv_dir, tmp_path, imagenet_tree, digits_images):
    folder = tmp_path / "all"
    folder.mkdir()
    for name in ("base", "aprsp"):
        (folder / f"{name}.adv.json").write_text((adv_dir / f"{name}.adv.json").read_text())
    ood = make_ood_results(tmp_path / "ood", imagenet_tree, digits_images)
    for path in ood.glob("*.ood.json"):
        (folder / path.name).write_text(path.read_text())
    for i, (name, aug) in enumerate((("base", "none"), ("aprsp", "apr_sp"))):
        (folder / f"{name}.json").write_text(json.dumps(make_result(name, aug, seed=i)))
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "apr.report", str(folder), "--out", str(out)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    positions = [md.index(h) for h in ("# Robustness report", "## Results", "## Out-of-distribution detection",
                                       "## Adversarial robustness")]
    assert positions == sorted(positions)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 2 and list(summary["sections"]) == ["ood", "adversarial"]
    for png in ("ce_per_corruption.png", "ood_histograms.png", "adversarial_eps_sweep.png"):
        assert (out / png).stat().st_size > 5_000, png
    # the corruption tables stay free of OOD / adversarial columns
    corruption_part = md[:md.index("## Out-of-distribution detection")]
    assert "AUROC" not in corruption_part and "FGSM" not in corruption_part
    broken = json.loads((folder / "aprsp.adv.json").read_text())
    broken["clean"]["correct"] = 99
    (folder / "aprsp.adv.json").write_text(json.dumps(broken))
    proc = subprocess.run([sys.executable, "-m", "apr.report", str(folder), "--out", str(out)], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "aprsp.adv.json: clean" in proc.stderr


def test_columns_name_the_settings_all_runs_share(adv_dir, tmp_path):
    runs = load(adv_dir)
    runs["aprsp"]["attacks"]["pgd"]["settings"]["steps"] = 5  # PGD steps differ between the runs
    for result in runs.values():
        result["attacks"]["autoattack"]["settings"] = autoattack_settings(eps=0.5, norm="L2")
    md = write_report(list(runs.values()), tmp_path / "out", plots=False).read_text()
    header = list(parse_table(md, TABLE)[0])
    assert header[2:5] == ["FGSM (8/255)", "PGD-k (8/255)", "AutoAttack (L2 0.5)"]
    pgd_rows = {r["Runs"]: r for r in parse_table(md, "### Attack settings") if r["Attack"] == "PGD"}
    assert pgd_rows["baseline"]["Steps"] == "3" and pgd_rows["APR-SP"]["Steps"] == "5"
    auto = next(r for r in parse_table(md, "### Attack settings") if r["Attack"] == "AutoAttack")
    assert auto["Eps"] == "0.5" and auto["Norm"] == "L2" and auto["Step size"] == "—"
