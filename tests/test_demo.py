"""The embedded demo, reduced (1 epoch, 4 corrupted images per class): the whole mission end to
end as a study run by apr.study's local launcher, its report consistent with its JSON, deterministic
per seed, resumed step by step.

The end-to-end runs use a copy of the ``apr`` package alone (as ``pip install .`` puts it in
site-packages) and run from another folder: a demo that reads a repo-root script or recipe fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import apr
from apr.metrics import CORRUPTIONS, SEVERITIES
from apr.report import format_percent

PACKAGE = Path(apr.__file__).resolve().parent


@pytest.fixture(scope="module")
def installed_copy(tmp_path_factory) -> Path:
    """Only the apr package (with its package data), as an install puts it: no repo around it."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(PACKAGE, site / "apr", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def run_demo(out: Path, site: Path) -> str:
    """``python -m apr.demo --quick`` with the copied package first on the path, from a folder of its own."""
    cwd = out.parent / f"{out.name}-cwd"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-m", "apr.demo", "--quick", "--out", str(out)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # the recipe came from the package copy (importlib.resources), not from a configs/ folder
    assert f"recipe: {site / 'apr' / 'configs' / 'demo.yaml'}" in proc.stdout, proc.stdout[:2000]
    assert not list(cwd.iterdir())  # nothing written outside --out
    return proc.stdout


def results_table(report_md: str) -> dict[str, list[str]]:
    """Rows of the '## Results' table keyed by run name."""
    section = report_md.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return {cells[1].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in rows[1:]}


def drop_seconds(node):
    """A results block without what differs between two output folders: timings and paths."""
    if isinstance(node, dict):
        return {k: drop_seconds(v) for k, v in node.items() if k not in ("seconds", "path", "fingerprint")}
    return node


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, installed_copy):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out, installed_copy)


STEPS = ["train:demo_none_s0", "train:demo_apr_sp_s0",
         "eval:demo_none_s0", "ood:demo_none_s0", "attack:demo_none_s0:2/255", "attack:demo_none_s0:4/255",
         "eval:demo_apr_sp_s0", "ood:demo_apr_sp_s0", "attack:demo_apr_sp_s0:2/255", "attack:demo_apr_sp_s0:4/255",
         "report"]


@pytest.mark.slow
def test_demo_is_a_study_run_by_the_local_launcher(demo_run, installed_copy):
    out, stdout = demo_run
    # the steps are the study's, in dependency order, each with its log, and the study says all are done
    started = re.findall(r"^    (\S+): running \((\S+)\)", stdout, re.M)
    assert [step for step, _ in started] == STEPS
    assert all(Path(log).is_file() and Path(log).parent == out / "logs" for _, log in started)
    env = {**os.environ, "PYTHONPATH": str(installed_copy)}
    status = subprocess.run([sys.executable, "-m", "apr.study", "status", str(out / "study.yaml")], env=env,
                            capture_output=True, text=True, timeout=300)
    lines = status.stdout.splitlines()
    assert status.returncode == 0 and len(lines) == 11, status.stdout + status.stderr
    assert all(line.split()[1] == "done" for line in lines), status.stdout


@pytest.mark.slow
def test_demo_writes_a_complete_consistent_report(demo_run):
    out, stdout = demo_run
    eval_dir = out / "eval"
    results = {name: json.loads((eval_dir / f"{name}.json").read_text()) for name in ("demo_none_s0", "demo_apr_sp_s0")}
    for name, res in results.items():
        assert res["aug"] == name.split("_s0")[0].removeprefix("demo_")
        assert res["clean"]["count"] == 450  # the whole val split of the digits
        cells = [res["corruptions"][c][str(s)] for c in CORRUPTIONS for s in SEVERITIES]
        assert len(cells) == 75 and all(cell["count"] == 40 for cell in cells)  # 4 per class x 10 classes
        assert res["metrics"]["normalisation"] == "baseline:demo_none_s0"
    assert results["demo_none_s0"]["metrics"]["mce"] == pytest.approx(100.0)

    report_dir = out / "report"
    table = results_table((report_dir / "report.md").read_text())
    for name, res in results.items():
        row, m = table[name], res["metrics"]
        assert row["Clean err."] == format_percent(100 * res["clean"]["error"])
        assert row["mCE"] == format_percent(m["mce"])
        assert row["Mean corr. err."] == format_percent(m["mean_corruption_error"])
        from apr.report import SHORT_NAMES
        for c in CORRUPTIONS:
            assert row[SHORT_NAMES[c]] == format_percent(m["ce"][c]), c
        # the three-line summary printed at the end carries the same numbers
        assert f"clean error {100 * res['clean']['error']:5.2f}%" in stdout
        assert f"mean corruption error {m['mean_corruption_error']:5.2f}%" in stdout

    for png in ("ce_per_corruption.png", "error_vs_severity.png", "heatmaps/seed0/heatmaps_side_by_side.png"):
        assert (report_dir / png).stat().st_size > 5000, png
    # OOD and PGD: the summary carries what their JSONs hold
    rows = {r["run"]: r for r in json.loads((report_dir / "summary.json").read_text())["0"]}
    for name in results:
        ood = json.loads((eval_dir / f"{name}.ood.json").read_text())
        assert set(ood["ood_sets"]) == {"photos", "textures"} and ood["in_distribution"]["count"] == 450
        for set_name, record in ood["ood_sets"].items():
            assert record["count"] == 100
            for score in ("max_logit", "msp", "energy"):
                assert rows[name]["ood"][set_name][score]["auroc"] == pytest.approx(100 * record["metrics"][score]["auroc"])
        clean = None
        for eps in (2, 4):
            adv = json.loads((eval_dir / f"eps-{eps}_255" / f"{name}.adv.json").read_text())
            assert adv["clean"]["n"] == 50 and adv["finished"]
            assert clean is None or drop_seconds(clean) == drop_seconds(adv["clean"])  # both eps: the same images
            clean, attack = adv["clean"], adv["attacks"]["pgd"]
            assert attack["settings"]["eps"] == pytest.approx(eps / 255) and attack["settings"]["steps"] == 10
            assert attack["correct"] <= adv["clean"]["correct"]  # an attack never helps (same images)
            assert rows[name]["adversarial"][f"pgd_{eps}/255"] == pytest.approx(100 * attack["robust_accuracy"])
        assert f"PGD robust accuracy (50 images, clean {100 * clean['accuracy']:5.2f}%)" in stdout
    summary = (report_dir / "summary.md").read_text()
    assert "## Out-of-distribution detection" in summary and "## Adversarial robustness" in summary
    assert "| baseline | 1 |" in summary and "| APR-SP | 1 |" in summary
    assert f"report: {report_dir}" in stdout


def result_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "eval").rglob("*.json") if not p.name.startswith("."))


@pytest.mark.slow
def test_demo_is_deterministic_and_resumes_step_by_step(demo_run, installed_copy, tmp_path):
    out, _ = demo_run
    # a second run in a new folder: same dataset, same corruptions, same training -> same numbers
    second = tmp_path / "out"
    stdout = run_demo(second, installed_copy)
    assert [p.relative_to(second) for p in result_files(second)] == [p.relative_to(out) for p in result_files(out)]
    for a_path in result_files(out):
        a, b = json.loads(a_path.read_text()), json.loads((second / a_path.relative_to(out)).read_text())
        for key in ("clean", "corruptions", "in_distribution", "ood_sets", "attacks"):
            assert drop_seconds(a.get(key)) == drop_seconds(b.get(key)), (a_path.name, key)
    # rerunning in place: every step is done, nothing is regenerated, trained or evaluated again
    products = [p for p in second.rglob("*") if p.suffix in (".pt", ".JPEG")]
    stamps = {p: p.stat().st_mtime_ns for p in products}
    results = {p: p.read_text() for p in result_files(second)}
    again = run_demo(second, installed_copy)
    assert "demo finished" in again and "demo finished" in stdout
    assert re.findall(r"^    (\S+): done$", again, re.M) == STEPS and ": running" not in again
    assert len(products) > 3000 and {p: p.stat().st_mtime_ns for p in products} == stamps
    assert {p: p.read_text() for p in results} == results
    # a lost results file: only its step runs again, with the same numbers
    lost = second / "eval" / "demo_apr_sp_s0.ood.json"
    before = json.loads(lost.read_text())
    lost.unlink()
    third = run_demo(second, installed_copy)
    assert re.findall(r"^    (\S+): running", third, re.M) == ["ood:demo_apr_sp_s0", "report"]
    assert drop_seconds(json.loads(lost.read_text())["ood_sets"]) == drop_seconds(before["ood_sets"])


# ----------------------------------------------------------------------------- fast checks


def test_recipe_ships_in_the_package_and_is_the_only_copy():
    from apr.config import load_config
    from apr.demo import packaged_recipe

    with packaged_recipe() as recipe:
        assert recipe.resolve().parent == PACKAGE / "configs"
        cfg = load_config(recipe, ["aug.name=apr_sp", "train.epochs=2"])
    assert cfg.model.name == "cnn_small" and cfg.data.image_size == 32 and cfg.train.epochs == 2
    repo_copy = PACKAGE.parent / "configs" / "demo.yaml"
    if repo_copy.exists():  # a source checkout: configs/demo.yaml is a link to the packaged file, not a copy
        assert repo_copy.resolve() == recipe.resolve()


def test_pyproject_ships_the_recipe():
    pyproject = PACKAGE.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    data = tomllib.loads(pyproject.read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["apr"]
    assert any(Path("configs/demo.yaml").match(p) for p in patterns)
    assert data["project"]["scripts"]["apr-demo"] == "apr.demo:main"


def _row(run, aug, clean, mean_ce, mce, auroc, fpr, robust):
    return {"run": run, "aug": aug, "clean_error": clean, "mean_corruption_error": mean_ce, "mce_vs_baseline": mce,
            "ood": {"photos": {s: {"auroc": auroc, "fpr95": fpr} for s in ("max_logit", "msp", "energy")}},
            "adversarial": {"n": 40, "clean_accuracy": 100 - clean, "pgd_2/255": robust, "pgd_4/255": robust / 2}}


def test_summary_tables_mean_and_std_over_seeds(tmp_path):
    from apr.demo import adversarial_table, corruption_table, ood_table, summary_markdown

    per_seed = {0: [_row("b0", "none", 10.0, 50.0, 100.0, 60.0, 80.0, 30.0),
                    _row("a0", "apr_sp", 12.0, 40.0, 80.0, 70.0, 60.0, 40.0)],
                1: [_row("b1", "none", 14.0, 54.0, 100.0, 64.0, 84.0, 34.0),
                    _row("a1", "apr_sp", 12.0, 44.0, 90.0, 74.0, 70.0, 50.0)]}
    # hand-computed: mean and sample std of two values x, y are (x+y)/2 and |x-y|/sqrt(2)
    corr = corruption_table(per_seed, ["none", "apr_sp"])
    assert "| baseline | 2 | 12.00 ± 2.83 | 52.00 ± 2.83 | 100.00 ± 0.00 |" in corr
    assert "| APR-SP | 2 | 12.00 ± 0.00 | 42.00 ± 2.83 | 85.00 ± 7.07 |" in corr
    ood = ood_table(per_seed, ["none", "apr_sp"])
    assert "| APR-SP | max logit | 2 | 72.00 ± 2.83 | 65.00 ± 7.07 |" in ood
    assert "| baseline | energy | 2 | 62.00 ± 2.83 | 82.00 ± 2.83 |" in ood
    adv = adversarial_table(per_seed, ["none", "apr_sp"])
    assert "| APR-SP | 2 | 40 | 88.00 ± 0.00 | 45.00 ± 7.07 | 22.50 ± 3.54 |" in adv
    text = summary_markdown(per_seed, ["none", "apr_sp"], tmp_path)
    assert corr in text and ood in text and adv in text
    # runs without OOD / PGD: those sections are left out, not filled with zeros
    bare = {0: [{k: v for k, v in r.items() if k not in ("ood", "adversarial")} for r in per_seed[0]]}
    assert ood_table(bare, ["none"]) is None and adversarial_table(bare, ["none"]) is None
    assert "Out-of-distribution" not in summary_markdown(bare, ["none", "apr_sp"], tmp_path)


def test_one_seed_shows_no_spread(tmp_path):
    from apr.demo import corruption_table, mean_std, summary_markdown

    assert mean_std([12.0]) == "12.00" and mean_std([10.0, 14.0]) == "12.00 ± 2.83" and mean_std([None]) == "n/a"
    one = {0: [_row("b0", "none", 10.0, 50.0, 100.0, 60.0, 80.0, 30.0),
               _row("a0", "apr_sp", 12.0, 40.0, 80.0, 70.0, 60.0, 40.0)]}
    assert "| APR-SP | 1 | 12.00 | 40.00 | 80.00 |" in corruption_table(one, ["none", "apr_sp"])
    text = summary_markdown(one, ["none", "apr_sp"], tmp_path)
    assert "±" not in text and "One seed" in text


def test_demo_says_cached_only_when_the_data_was_reused(tmp_path, capsys):
    from apr.data.demo import MARKER, build_demo_dataset
    from apr.demo import built_once

    def build():
        return build_demo_dataset(tmp_path / "data", image_size=8, seed=0)

    built_once("digits", tmp_path / "data" / MARKER, build)
    built_once("digits", tmp_path / "data" / MARKER, build)
    assert capsys.readouterr().out.splitlines() == ["digits", "digits (cached)"]
