"""The embedded demo, reduced (1 epoch, 4 corrupted images per class): the whole mission end to
end through the real entry scripts, its report consistent with its JSON, deterministic per seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apr.metrics import CORRUPTIONS, SEVERITIES
from apr.report import format_percent

pytestmark = pytest.mark.slow


def run_demo(out: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "apr.demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def results_table(report_md: str) -> dict[str, list[str]]:
    """Rows of the '## Results' table keyed by run name."""
    section = report_md.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return {cells[1].strip(): dict(zip(header, (c.strip() for c in cells))) for cells in rows[1:]}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out)


def test_demo_writes_a_complete_consistent_report(demo_run):
    out, stdout = demo_run
    seed_dir = out / "report" / "seed0"
    results = {name: json.loads((seed_dir / f"{name}.json").read_text()) for name in ("demo_none_s0", "demo_apr_sp_s0")}
    for name, res in results.items():
        assert res["aug"] == name.split("_s0")[0].removeprefix("demo_")
        assert res["clean"]["count"] == 450  # the whole val split of the digits
        cells = [res["corruptions"][c][str(s)] for c in CORRUPTIONS for s in SEVERITIES]
        assert len(cells) == 75 and all(cell["count"] == 40 for cell in cells)  # 4 per class x 10 classes
        assert res["metrics"]["normalisation"] == "baseline:demo_none_s0"
    assert results["demo_none_s0"]["metrics"]["mce"] == pytest.approx(100.0)

    table = results_table((seed_dir / "report.md").read_text())
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

    for png in ("ce_per_corruption.png", "error_vs_severity.png", "heatmap/heatmaps_side_by_side.png"):
        assert (seed_dir / png).stat().st_size > 5000, png
    summary = (out / "report" / "summary.md").read_text()
    assert "| baseline | 1 |" in summary and "| APR-SP | 1 |" in summary
    assert f"report: {out / 'report'}" in stdout


def test_demo_is_deterministic_and_reuses_its_cache(demo_run, tmp_path):
    out, _ = demo_run
    # a second run in a new folder: same dataset, same corruptions, same training -> same numbers
    stdout = run_demo(tmp_path)
    for name in ("demo_none_s0", "demo_apr_sp_s0"):
        a = json.loads((out / "report" / "seed0" / f"{name}.json").read_text())
        b = json.loads((tmp_path / "report" / "seed0" / f"{name}.json").read_text())
        assert a["clean"] == b["clean"] and a["corruptions"] == b["corruptions"], name
    # rerunning in place resumes: nothing is regenerated, trained or evaluated again
    products = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".JPEG")]
    stamps = {p: p.stat().st_mtime_ns for p in products}
    results = {p: json.loads(p.read_text())["corruptions"] for p in tmp_path.rglob("demo_*_s0.json")}
    again = run_demo(tmp_path)
    assert "demo finished" in again and "demo finished" in stdout
    assert len(products) > 3000 and {p: p.stat().st_mtime_ns for p in products} == stamps
    assert {p: json.loads(p.read_text())["corruptions"] for p in results} == results
