"""apr.report: report.md numbers equal the results JSON, plots are real PNGs, the published
table appears only where it applies, and the CLI works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apr.metrics import ALEXNET_ERRORS, CORRUPTIONS, EXTRA_CORRUPTIONS, compute_metrics
from apr.report import (PARTIAL_MARK, PUBLISHED_TITLE, SHORT_NAMES, ReportError, format_percent, run_label, summarize,
                        write_report)

REPO = Path(__file__).resolve().parents[1]


def make_result(run_name: str, aug: str, extra_roots=(), scale: float = 0.8, clean: float = 0.24,
                dataset: str = "imagenet-c", seed: int = 0, drop=(), extras: bool = True) -> dict:
    """A results dict shaped like apr.evaluation's output, with errors that grow with severity."""
    rng = np.random.default_rng(seed)
    names = list(CORRUPTIONS) + (list(EXTRA_CORRUPTIONS) if extras else [])
    corruptions = {}
    for c in names:
        base = ALEXNET_ERRORS.get(c, 0.6)
        corruptions[c] = {}
        for s in range(1, 6):
            if f"{c}/{s}" in drop:
                continue
            err = float(np.clip(scale * base * (0.7 + 0.12 * s) + rng.normal(0, 0.01), 0.01, 0.99))
            corruptions[c][str(s)] = {"error": err, "count": 500, "ece": float(rng.uniform(0.02, 0.2))}
    result = {
        "schema": "apr.eval/1", "run_name": run_name, "checkpoint": f"runs/{run_name}/best.pt",
        "checkpoint_sha256": "ab" * 32,
        "config": {"aug": {"name": aug}, "data": {"extra_roots": list(extra_roots)}},
        "aug": aug, "extra_roots": list(extra_roots), "dataset": dataset,
        "clean": {"error": clean, "top5_error": clean / 3, "count": 500, "ece": 0.031},
        "corruptions": corruptions,
        "versions": {"apr": "0.1.0", "torch": "2.14.1"}, "throughput_images_per_s": 1234.5,
        "created": "2025-01-01T00:00:00",
    }
    result["metrics"] = compute_metrics(result, allow_partial=bool(drop))
    return result


FIVE = [
    ("r50-base", "none", (), 0.85, 0.239),
    ("r50-aprp", "apr_p", (), 0.78, 0.240),
    ("r50-aprs", "apr_s", (), 0.77, 0.236),
    ("r50-aprsp", "apr_sp", (), 0.72, 0.238),
    ("r50-da-aprsp", "apr_sp", ("/data/deepaugment/EDSR", "/data/deepaugment/CAE"), 0.64, 0.242),
]


@pytest.fixture()
def five_files(tmp_path) -> list[Path]:
    paths = []
    for i, (name, aug, extra, scale, clean) in enumerate(FIVE):
        path = tmp_path / "results" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(make_result(name, aug, extra, scale, clean, seed=i)))
        paths.append(path)
    return paths


def parse_table(md: str, heading: str) -> list[dict[str, str]]:
    """Rows of the first markdown table after `heading`, as {column header: cell text}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            break
        elif line.startswith("#"):
            return []
    header, body = table[0], table[2:]
    return [dict(zip(header, row)) for row in body]


def test_run_labels_from_saved_config():
    assert run_label({"aug": "none", "extra_roots": []}) == "baseline"
    assert run_label({"config": {"aug": {"name": "apr_sp"}, "data": {"extra_roots": ["EDSR", "CAE"]}}}) == \
        "DeepAugment + APR-SP"
    assert run_label({"config": {"aug": {"name": "apr_p"}, "data": {"extra_roots": []}}}) == "APR-P"


def test_report_numbers_equal_json(five_files, tmp_path):
    report = write_report(five_files, tmp_path / "out", plots=False)
    md = report.read_text()
    results = {json.loads(p.read_text())["run_name"]: json.loads(p.read_text()) for p in five_files}
    rows = parse_table(md, "## Results")
    assert [r["Method"] for r in rows] == ["baseline", "APR-P", "APR-S", "APR-SP", "DeepAugment + APR-SP"]
    for row in rows:
        res = results[row["Run"]]
        m = res["metrics"]  # written by the evaluator; the report must show the same numbers
        assert row["Clean err."] == format_percent(100 * res["clean"]["error"])
        assert row["mCE"] == format_percent(m["mce"])
        assert row["Rel. mCE"] == format_percent(m["relative_mce"])
        assert row["Mean corr. err."] == format_percent(m["mean_corruption_error"])
        assert row["ECE"] == format_percent(100 * res["clean"]["ece"])
        for c in CORRUPTIONS:
            assert row[SHORT_NAMES[c]] == format_percent(m["ce"][c])
        # an independent recomputation of one CE straight from the cells
        gn = sum(res["corruptions"]["gaussian_noise"][str(s)]["error"] for s in range(1, 6))
        assert row["Gauss"] == format_percent(100 * gn / (5 * ALEXNET_ERRORS["gaussian_noise"]))
    extra = {r["Method"]: r for r in parse_table(md, "## Extra corruptions (held out; not part of mCE)")}
    res = results["r50-da-aprsp"]
    spatter = np.mean([res["corruptions"]["spatter"][str(s)]["error"] for s in range(1, 6)])
    assert extra["DeepAugment + APR-SP"]["Spatter"] == format_percent(100 * spatter)
    assert extra["DeepAugment + APR-SP"]["Mean"] == format_percent(res["metrics"]["extra_mean_error"])
    sev = {r["Method"]: r for r in parse_table(md, "## Error by severity (mean top-1 error over the 15 corruptions)")}
    s3 = np.mean([res["corruptions"][c]["3"]["error"] for c in CORRUPTIONS])
    assert sev["DeepAugment + APR-SP"]["Severity 3"] == format_percent(100 * s3)
    # summary.json holds the same numbers, unrounded
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    by_name = {r["run_name"]: r for r in summary["runs"]}
    for name, res in results.items():
        assert by_name[name]["mce"] == pytest.approx(res["metrics"]["mce"], rel=1e-12)
    # published block: present, labelled, with the paper's numbers
    assert f"## {PUBLISHED_TITLE}" in md
    published = {r["Method (ResNet-50, ImageNet)"]: r for r in parse_table(md, f"## {PUBLISHED_TITLE}")}
    assert published["Standard training"]["mCE"] == "76.7" and published["Standard training"]["Clean err."] == "23.9"
    assert published["APR-P"]["mCE"] == "70.5" and published["APR-S"]["mCE"] == "69.3"
    assert published["APR-SP"]["mCE"] == "65.0" and published["DeepAugment + APR-SP"]["mCE"] == "57.5"
    assert published["AugMix"]["mCE"] == "65.3" and published["DeepAugment + AugMix"]["mCE"] == "53.6"
    assert "Warnings" not in md


def test_plots_are_real_pngs(five_files, tmp_path):
    write_report(five_files, tmp_path / "out")
    for name in ("ce_per_corruption.png", "error_vs_severity.png"):
        path = tmp_path / "out" / name
        assert path.stat().st_size > 20_000, name
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert img.shape[0] > 400 and img.shape[1] > 800
        assert img.std() > 10  # not a blank canvas
        assert f"({name})" in (tmp_path / "out" / "report.md").read_text()


def test_partial_runs_are_marked(tmp_path):
    drop = {"glass_blur/5", "fog/1", "fog/2"}
    runs = [make_result("base", "none"), make_result("half-done", "apr_sp", scale=0.7, drop=drop)]
    md = write_report(runs, tmp_path / "out", plots=False).read_text()
    rows = {r["Run"]: r for r in parse_table(md, "## Results")}
    assert rows["half-done"]["mCE"].endswith(PARTIAL_MARK) and not rows["base"]["mCE"].endswith(PARTIAL_MARK)
    expected = compute_metrics(runs[1], allow_partial=True)
    assert expected["partial"] and sorted(expected["missing"]) == sorted(drop)
    assert rows["half-done"]["mCE"] == format_percent(expected["mce"]) + PARTIAL_MARK
    assert rows["half-done"]["Fog"] == format_percent(expected["ce"]["fog"])
    assert f"{PARTIAL_MARK} **Partial**: APR-SP is missing 3 of 75" in md
    assert rows["half-done"]["Rel. mCE"] == format_percent(expected["relative_mce"]) + PARTIAL_MARK and "glass_blur/5" in md


def test_published_table_only_for_imagenet_c_with_alexnet(tmp_path):
    cifar = [make_result(n, a, dataset="cifar10-c", seed=i) for i, n, a in ((0, "b", "none"), (1, "s", "apr_sp"))]
    md = write_report(cifar, tmp_path / "cifar", plots=False).read_text()
    assert f"## {PUBLISHED_TITLE}" in md  # the heading stays, with the reason
    assert "Published numbers omitted: these results are on cifar10-c" in md
    assert "76.7" not in md and "57.5" not in md
    assert "only compare the runs below with each other" in md
    imnet = [make_result(n, a, seed=i) for i, n, a in ((0, "b", "none"), (1, "s", "apr_sp"))]
    md = write_report(imnet, tmp_path / "base", baseline="b", plots=False).read_text()
    assert "Published numbers omitted: this report normalises by 'baseline:b'" in md
    assert "76.7" not in md
    assert summarize(imnet)["published"] is not None


def test_baseline_normalisation(five_files, tmp_path):
    for baseline in ("r50-base", "baseline", five_files[0]):
        md = write_report(five_files, tmp_path / "out", baseline=baseline, plots=False).read_text()
        rows = {r["Run"]: r for r in parse_table(md, "## Results")}
        assert rows["r50-base"]["mCE"] == "100.00" and rows["r50-base"]["Rel. mCE"] == "100.00"
        assert all(rows["r50-base"][SHORT_NAMES[c]] == "100.00" for c in CORRUPTIONS)
        base = json.loads(five_files[0].read_text())
        other = json.loads(five_files[3].read_text())
        assert rows["r50-aprsp"]["mCE"] == format_percent(compute_metrics(other, baseline_result=base)["mce"])
    with pytest.raises(ReportError, match="baseline 'nope' is neither a file nor a run.*'r50-aprp' \\(APR-P\\)"):
        write_report(five_files, tmp_path / "x", baseline="nope")


def test_duplicate_recipes_get_run_names(tmp_path):
    runs = [make_result("sp-seed0", "apr_sp", seed=0), make_result("sp-seed1", "apr_sp", seed=1)]
    md = write_report(runs, tmp_path / "out", plots=False).read_text()
    assert {r["Method"] for r in parse_table(md, "## Results")} == {"APR-SP (sp-seed0)", "APR-SP (sp-seed1)"}


def test_stored_metrics_mismatch_is_reported(tmp_path):
    run = make_result("stale", "none")
    run["metrics"]["mce"] += 1.0
    md = write_report([run], tmp_path / "out", plots=False).read_text()
    assert "## Warnings" in md and "stale: stored metrics.mce" in md


def test_bad_inputs(tmp_path, five_files):
    with pytest.raises(ReportError, match="does not exist"):
        write_report([tmp_path / "missing.json"], tmp_path / "out")
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(ReportError, match="not an evaluation results file"):
        write_report([foreign], tmp_path / "out")
    mixed = [make_result("a", "none"), make_result("b", "none", dataset="cifar10-c")]
    with pytest.raises(ReportError, match="results mix datasets \\(cifar10-c, imagenet-c\\)"):
        write_report(mixed, tmp_path / "out")
    with pytest.raises(ReportError, match="no results given"):
        write_report([], tmp_path / "out")


def test_cli(five_files, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "apr.report", str(five_files[0].parent), "--out", str(out),
                           "--baseline", "r50-base", "--no-plots"], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()
    assert not (out / "ce_per_corruption.png").exists()
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 5
    proc = subprocess.run([sys.executable, "-m", "apr.report", "--help"], capture_output=True, text=True,
                          cwd=REPO, env=env)
    assert proc.returncode == 0 and "--baseline" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "apr.report", str(tmp_path / "nothing.json"), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_impossible_counts_and_relabelled_dataset_are_refused(tmp_path):
    run = make_result("r", "none")
    run["corruptions"]["fog"]["3"]["count"] = -5
    with pytest.raises(ReportError, match=r"cell fog/3: count must be a positive number of images, got -5"):
        write_report([run], tmp_path / "out", plots=False)
    run["corruptions"]["fog"]["3"]["count"] = 0
    with pytest.raises(ReportError, match=r"cell fog/3: count must be a positive number of images, got 0"):
        write_report([run], tmp_path / "out", plots=False)
    run = make_result("r", "none")
    run["clean"].update(count=500, correct=600)
    with pytest.raises(ReportError, match=r"cell clean: correct = 600 is not between 0 and count = 500"):
        write_report([run], tmp_path / "out", plots=False)
    run = make_result("r", "none")
    run["eval"] = {"classes": 10}  # a 10-class tree relabelled as ImageNet-C would be normalised by AlexNet
    with pytest.raises(ReportError, match=r"dataset is 'imagenet-c' but the model has 10 classes.*--dataset folder-c"):
        write_report([run], tmp_path / "out", plots=False)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(run))
    proc = subprocess.run([sys.executable, "-m", "apr.report", str(path), "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "error: " in proc.stderr and "10 classes" in proc.stderr


def test_rms_calibration_and_notes(tmp_path):
    runs = [make_result("b", "none"), make_result("s", "apr_sp", scale=0.7, seed=1)]
    for run, rms in zip(runs, (0.05, 0.07)):
        run["clean"]["rms_calibration_error"] = rms
        for per in run["corruptions"].values():
            for cell in per.values():
                cell["rms_calibration_error"] = rms * 2
    md = write_report(runs, tmp_path / "out", plots=False).read_text()
    rows = {r["Method"]: r for r in parse_table(md, "## Calibration")}
    assert rows["APR-SP"]["RMS calib. err. clean"] == "7.00"
    assert rows["baseline"]["RMS calib. err. corrupted (mean over cells)"] == "10.00"
    assert "AlexNet clean error 43.45 % (hendrycks/robustness; torchvision's AlexNet: 43.478 %)" in md


def test_undefined_relative_mce_is_a_dash_with_its_reason_in_a_note_under_the_table(tmp_path):
    base = make_result("b", "none", clean=0.95)  # corrupted error below its clean error: relative CE undefined
    md = write_report([base, make_result("s", "apr_sp", seed=1)], tmp_path / "out", baseline="b",
                      plots=False).read_text()
    rows = {r["Run"]: r for r in parse_table(md, "## Results")}
    assert rows["s"]["Rel. mCE"] == "—"
    section = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    notes = [line for line in section.splitlines() if line.startswith("**Rel. mCE —**")]
    assert len(notes) == 1 and "APR-SP" in notes[0] and "undefined for gaussian_noise" in notes[0]


def test_resolve_baseline_in_a_results_folder(five_files, tmp_path):
    from apr.report import resolve_baseline

    found = resolve_baseline("r50-base", results_dir=five_files[0].parent)
    assert found["run_name"] == "r50-base" and found == json.loads(five_files[0].read_text())
    with pytest.raises(ReportError, match="is neither a file nor a run"):
        resolve_baseline("r50-nothing", results_dir=five_files[0].parent)


def test_registered_sections_render_their_schema_after_the_corruption_part(tmp_path, five_files):
    from apr.report import sections, write_report

    seen = []

    def render(results, out, plots):
        seen.append([r["value"] for r, _ in results])
        return "## Toy section\n\nvalue 42", {"values": seen[-1]}

    sections.register("toy", "apr.toy/1", render)
    try:
        folder = five_files[0].parent
        (folder / "x.toy.json").write_text(json.dumps({"schema": "apr.toy/1", "value": 42}))
        (folder / "unrelated.json").write_text(json.dumps({"some": "config"}))  # passed over in a folder
        report = write_report([folder], tmp_path / "out", plots=False).read_text()
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert seen == [[42]] and report.index("## Toy section") > report.index("mCE")
        assert summary["sections"] == {"toy": {"values": [42]}} and len(summary["runs"]) == 5
        only = write_report([folder / "x.toy.json"], tmp_path / "only", plots=False).read_text()
        assert only.startswith("## Toy section")  # no corruption results: no corruption part
    finally:
        sections.unregister("apr.toy/1")


@pytest.mark.parametrize("dataset, baseline, normalisation", [
    ("folder-c", None, "none"),  # a tree from another dataset: AlexNet's ImageNet-C errors mean nothing there
    ("folder-c", "b", "baseline:b"),
    ("imagenet-c", None, "alexnet"),
])
def test_folder_c_reports_raw_errors_unless_a_baseline_is_given(tmp_path, dataset, baseline, normalisation):
    from apr.report import metrics_for

    runs = [make_result("b", "none", dataset=dataset), make_result("s", "apr_sp", dataset=dataset, scale=0.7, seed=1)]
    assert metrics_for(runs[1], runs[0] if baseline else None)["normalisation"] == normalisation
    md = write_report(runs, tmp_path / "out", baseline=baseline).read_text()
    row = {r["Run"]: r for r in parse_table(md, "## Results")}["s"]
    if normalisation == "none":
        assert row["mCE"] == "—" and "Raw errors: no CE / mCE" in md and "Rel. mCE —" not in md
        fog = np.mean([c["error"] for c in runs[1]["corruptions"]["fog"].values()])
        assert row["Fog"] == format_percent(100 * fog)  # the mean error, not a CE
        assert not (tmp_path / "out" / "ce_per_corruption.png").exists()
    else:
        assert row["mCE"] != "—" and (tmp_path / "out" / "ce_per_corruption.png").is_file()
