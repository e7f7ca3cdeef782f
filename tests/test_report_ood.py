"""apr.report's OOD section: tables equal the apr.ood JSON, the histogram figure is a real PNG,
malformed files are refused with a clear message.

The results files come from the real ``apr.ood.evaluate_ood`` on tiny data: two hand-set cnn_tiny
detectors (a baseline and an "APR-SP" recipe) against two OOD sets, one clean-cut and one mixed
with in-distribution-like images, so the numbers differ between sets and runs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apr.checkpoint import save_checkpoint
from apr.config import Config, config_to_dict
from apr.report import ReportError, format_percent, write_report
from apr.report.ood import SCHEMA, SCORE_ORDER, check_ood_result

from test_ood import FAST, bright_images, dark_detector, write_nested_pngs
from test_report import parse_table

CLASSES = [f"n{k:08d}" for k in range(4)]
METRIC_COLUMNS = {"auroc": "AUROC", "fpr95": "FPR95"}
TITLES = {"max_logit": "### Max logit (the reference's score): AUROC / FPR95",
          "msp": "### Maximum softmax probability (MSP): AUROC / FPR95",
          "energy": "### Energy (logsumexp of the logits, T = 1): AUROC / FPR95"}


def save_run(path: Path, aug: str, run_name: str, red_only: bool) -> Path:
    """A dark-image detector checkpoint (see tests/test_ood.py); ``red_only`` looks at the red channel
    with a higher threshold, so it ranks the images differently."""
    cfg = Config()
    cfg.data.dataset, cfg.data.image_size, cfg.data.val_resize = "imagefolder", 32, 32
    cfg.data.mean, cfg.data.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    cfg.model.name, cfg.train.run_name, cfg.aug.name = "cnn_tiny", run_name, aug
    model = dark_detector(len(CLASSES))
    if red_only:
        with torch.no_grad():
            conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            conv.weight[0, 1:, 1, 1] = 0.0
            next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).bias[0] = 0.9
    return save_checkpoint({"model": model.state_dict(), "model_name": "cnn_tiny", "num_classes": len(CLASSES),
                            "classes": CLASSES, "config": config_to_dict(cfg.validate()), "epoch": 1, "step": 1}, path)


def make_ood_results(root: Path, imagenet_tree: Path, digits_images) -> Path:
    """Two real ``<run>.ood.json`` files (baseline and APR-SP recipes) in ``root / 'results'``."""
    from apr.ood import evaluate_ood

    bright = write_nested_pngs(root / "bright", bright_images(16, seed=11))
    mixed = write_nested_pngs(root / "mixed", np.concatenate([bright_images(8, seed=12), digits_images[0][300:308]]))
    out = root / "results"
    for aug, name, red_only in (("none", "base", True), ("apr_sp", "aprsp", False)):
        ckpt = save_run(root / f"{name}.pt", aug, name, red_only)
        evaluate_ood(ckpt, in_folder=imagenet_tree / "val", ood={"bright": str(bright), "mixed": str(mixed)},
                     out_dir=out, **FAST)
    return out


@pytest.fixture(scope="module")
def ood_dir(tmp_path_factory, imagenet_tree, digits_images) -> Path:
    torch.set_num_threads(1)
    return make_ood_results(tmp_path_factory.mktemp("ood_report"), imagenet_tree, digits_images)


def load(folder: Path) -> dict[str, dict]:
    return {p.name.split(".")[0]: json.loads(p.read_text()) for p in sorted(folder.glob("*.ood.json"))}


def test_tables_equal_the_json(ood_dir, tmp_path):
    runs = load(ood_dir)
    assert set(runs) == {"base", "aprsp"}
    md = write_report([ood_dir], tmp_path / "out", plots=False).read_text()
    by_method = {"baseline": runs["base"], "APR-SP": runs["aprsp"]}
    sets = ["bright", "mixed"]
    # the mixed set holds in-distribution-like digits: not separable, so its numbers are not trivial
    assert runs["aprsp"]["ood_sets"]["mixed"]["metrics"]["max_logit"]["auroc"] < 0.95
    mixed_msp = [runs[r]["ood_sets"]["mixed"]["metrics"]["msp"]["auroc"] for r in ("base", "aprsp")]
    assert abs(mixed_msp[0] - mixed_msp[1]) > 0.01  # the two runs' rows cannot be swapped unnoticed
    assert md.index(TITLES["max_logit"]) < md.index(TITLES["msp"]) < md.index(TITLES["energy"])
    for score in SCORE_ORDER:
        rows = parse_table(md, TITLES[score])
        assert [r["Method"] for r in rows] == ["baseline", "APR-SP"]
        for row in rows:
            record = by_method[row["Method"]]["ood_sets"]
            for key, column in METRIC_COLUMNS.items():
                for name in sets:
                    assert row[f"{name} {column}"] == format_percent(100 * record[name]["metrics"][score][key])
                mean = np.mean([100 * record[name]["metrics"][score][key] for name in sets])  # re-derived
                assert row[f"Mean {column}"] == format_percent(mean)
    reference = parse_table(md, "### Max logit: the reference's five numbers per OOD set")
    assert len(reference) == 4
    for row in reference:
        metrics = by_method[row["Method"]]["ood_sets"][row["OOD set"]]["metrics"]["max_logit"]
        assert float(row["TNR at 95% TPR"]) == pytest.approx(100 * (1 - metrics["fpr95"]), abs=0.0051)
        assert row["AUROC"] == format_percent(100 * metrics["auroc"])
        assert row["Detection acc."] == format_percent(100 * metrics["detection_accuracy"])
        assert row["AUPR-in"] == format_percent(100 * metrics["aupr_in"])
        assert row["AUPR-out"] == format_percent(100 * metrics["aupr_out"])
    ind_rows = parse_table(md, "### In-distribution set (imagefolder): top-1 error and calibration")
    for row in ind_rows:
        ind = by_method[row["Method"]]["in_distribution"]
        assert row["Images"] == "24" == str(ind["count"])
        assert row["Top-1 err."] == format_percent(100 * ind["top1_error"])
        assert row["ECE (15 bins)"] == format_percent(100 * ind["ece"])
        assert row["RMS calib. err. (15 bins)"] == format_percent(100 * ind["rms_calibration_error"])
        assert row["RMS calib. err. (AugMix adaptive)"] == format_percent(100 * ind["adaptive_rms_calibration_error"])
    assert "CIFAR-10 test set in, CIFAR-100 test set out, score = max logit" in md
    assert "100 − FPR95" in md and "†" not in md
    # summary.json holds the same numbers, unrounded
    block = json.loads((tmp_path / "out" / "summary.json").read_text())["sections"]["ood"]
    assert block["schema"] == SCHEMA and block["sets"] == sets and block["scores"] == list(SCORE_ORDER)
    for run in block["runs"]:
        record = by_method[run["label"]]["ood_sets"]
        for name in sets:
            for key in ("auroc", "fpr95", "aupr_in"):
                assert run["sets"][name]["metrics"]["energy"][key] == pytest.approx(
                    100 * record[name]["metrics"]["energy"][key], rel=1e-12)


def test_histogram_figure_is_a_real_png(ood_dir, tmp_path):
    md = write_report([ood_dir], tmp_path / "out").read_text()
    path = tmp_path / "out" / "ood_histograms.png"
    assert "(ood_histograms.png)" in md
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert img.shape[0] > 300 and img.shape[1] > 600  # 2 sets x 2 runs of panels
    assert img.std() > 10
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sections"]["ood"]["figures"] == ["ood_histograms.png"]
    write_report([ood_dir], tmp_path / "none", plots=False)
    assert not (tmp_path / "none" / "ood_histograms.png").exists()


def test_a_missing_set_marks_the_mean_partial(ood_dir, tmp_path):
    runs = load(ood_dir)
    short = copy.deepcopy(runs["base"])
    del short["ood_sets"]["mixed"]
    md = write_report([short, runs["aprsp"]], tmp_path / "out", plots=False).read_text()
    rows = {r["Method"]: r for r in parse_table(md, TITLES["max_logit"])}
    assert rows["baseline"]["mixed AUROC"] == "—"
    bright = runs["base"]["ood_sets"]["bright"]["metrics"]["max_logit"]["auroc"]
    assert rows["baseline"]["Mean AUROC"] == format_percent(100 * bright) + "†"
    assert not rows["APR-SP"]["Mean AUROC"].endswith("†")
    assert "† baseline lacks the OOD set(s) mixed" in md


def test_runs_of_one_recipe_are_told_apart_by_name(ood_dir, tmp_path):
    runs = load(ood_dir)
    twin = copy.deepcopy(runs["aprsp"])
    twin["run_name"] = "aprsp-seed1"
    md = write_report([runs["aprsp"], twin], tmp_path / "out", plots=False).read_text()
    assert [r["Method"] for r in parse_table(md, TITLES["msp"])] == ["APR-SP (aprsp)", "APR-SP (aprsp-seed1)"]


def _break(result: dict, how: str) -> None:
    record = result["ood_sets"]["bright"]
    if how == "no in-distribution":
        result["in_distribution"] = None
    elif how == "no sets":
        result["ood_sets"] = {}
    elif how == "negative count":
        record["count"] = -3
    elif how == "auroc above 1":
        record["metrics"]["max_logit"]["auroc"] = 1.5
    elif how == "histogram sum":
        record["histograms"]["msp"]["out"][0] += 1
    elif how == "missing score":
        del record["metrics"]["energy"]
    elif how == "error above 1":
        result["in_distribution"]["top1_error"] = 7.0


@pytest.mark.parametrize("how, message", [
    ("no in-distribution", "no in-distribution block .* re-run python -m apr.ood"),
    ("no sets", "no finished OOD set; re-run python -m apr.ood"),
    ("negative count", "OOD set 'bright': count must be a number of images >= 1, got -3"),
    ("auroc above 1", "OOD set 'bright': max_logit auroc must be a fraction in \\[0, 1\\], got 1.5"),
    ("histogram sum", "msp histogram: the 'out' histogram holds 17 scores but its set has 16 images"),
    ("missing score", "OOD set 'bright' has no metrics for the score 'energy'"),
    ("error above 1", "in_distribution.top1_error must be a fraction in \\[0, 1\\], got 7.0"),
])
def test_malformed_files_are_refused(ood_dir, tmp_path, how, message):
    result = load(ood_dir)["base"]
    _break(result, how)
    path = tmp_path / "broken.ood.json"
    path.write_text(json.dumps(result))
    with pytest.raises(ReportError, match=message):
        write_report([path], tmp_path / "out", plots=False)


def test_mixed_in_distribution_sets_are_refused(ood_dir, tmp_path):
    runs = load(ood_dir)
    runs["base"]["in_distribution"]["kind"] = "cifar10"
    with pytest.raises(ReportError, match="mix in-distribution sets \\(cifar10, imagefolder\\)"):
        write_report(list(runs.values()), tmp_path / "out", plots=False)


def test_schema_and_scores_are_the_evaluators():
    import apr.ood

    assert SCHEMA == apr.ood.SCHEMA and set(SCORE_ORDER) == set(apr.ood.SCORE_NAMES)
    with pytest.raises(ReportError, match="not an OOD results file"):
        check_ood_result({"schema": "apr.adv/1"}, "x.json")
