"""The distribution-shift section of the report, from hand-written apr.shift/1 results: every number in
the table is checked against a value computed here from the cells' counts."""

from __future__ import annotations

import json

import pytest

from apr.data.suites import C_BAR_SEVERITIES
from apr.report import write_report
from apr.report.shift import PUBLISHED_SHIFT, SHIFT_SCHEMA


def cell(count: int, correct: int, **extra) -> dict:
    return {"count": count, "correct": correct, "error": 1 - correct / count, **extra}


def shift_result(run_name: str, aug: str, *, r=(200, 150), a=(100, 5), sketch=(500, 200), v2=(100, 70),
                 c_bar: dict | None = None, clean=(1000, 760), corruption=None) -> dict:
    suites = {
        "imagenet-r": {"cells": {"imagenet-r": cell(*r, scored_classes=200)}},
        "imagenet-a": {"cells": {"imagenet-a": cell(*a, scored_classes=200)}},
        "imagenet-sketch": {"cells": {"imagenet-sketch": cell(*sketch)}},
        "imagenet-v2": {"cells": {"imagenet-v2": cell(*v2)}},
    }
    if c_bar is not None:
        suites["imagenet-c-bar"] = {"cells": c_bar}
    return {"schema": SHIFT_SCHEMA, "run_name": run_name, "aug": aug, "config": None, "checkpoint_sha256": "ab" * 32,
            "clean": None if clean is None else cell(*clean), "suites": suites, "skipped": {},
            **({"corruption": corruption} if corruption else {})}


def c_bar_cells(correct_of) -> dict:
    return {f"{c}/{s}": cell(10, correct_of(i, s)) for i, c in enumerate(C_BAR_SEVERITIES) for s in range(1, 6)}


def row_of(report: str, name: str) -> list[str]:
    line = next(l for l in report.splitlines() if l.startswith(f"| {name} |"))
    return [part.strip() for part in line.strip("|").split("|")]


def test_shift_table_shows_the_json_numbers(tmp_path):
    apr = shift_result("apr_sp", "apr_sp", c_bar=c_bar_cells(lambda i, s: 10 - s - i % 2), clean=None,
                       corruption={"clean_error": 0.2372, "mce": 64.89, "normalisation": "alexnet",
                                   "dataset": "imagenet-c", "partial": False})
    released = shift_result("augmix", "resnet50 weights", r=(200, 80), a=(100, 2))
    paths = []
    for result in (apr, released):
        path = tmp_path / f"{result['run_name']}.shift.json"
        path.write_text(json.dumps(result))
        paths.append(path)
    report = write_report(paths, tmp_path / "report", plots=False).read_text()
    assert "## Distribution shift" in report
    header = row_of(report, "Model")
    assert header == ["Model", "Clean err.", "ImageNet-C mCE", "ImageNet-R", "ImageNet-A", "Sketch", "ImageNet-V2",
                      "C-bar"]
    # C-bar: cell (i, s) has 10 - s - i%2 of 10 right -> error (s + i%2)/10; mean over 50 cells = (3 + 0.5)/10
    assert row_of(report, "APR-SP") == ["APR-SP", "23.72", "64.89", "25.00", "95.00", "60.00", "30.00", "35.00"]
    assert row_of(report, "resnet50 weights") == ["resnet50 weights", "24.00", "—", "60.00", "98.00", "60.00",
                                                  "30.00", "—"]
    # per-corruption C-bar table: even corruptions 30 %, odd ones 40 %
    first, second = list(C_BAR_SEVERITIES)[:2]
    c_bar_header = next(l for l in report.splitlines() if l.startswith("| Model | blue_noise_sample"))
    columns = [p.strip() for p in c_bar_header.strip("|").split("|")]
    values = row_of(report.split("ImageNet-C-bar: mean top-1 error per corruption")[1], "APR-SP")
    assert values[columns.index(first)] == "30.00" and values[columns.index(second)] == "40.00"
    assert values[-1] == "35.00"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["sections"]["shift"]
    run = next(r for r in summary["runs"] if r["run_name"] == "apr_sp")
    assert run["suites"]["imagenet-c-bar"]["error"] == pytest.approx(35.0)
    assert run["suites"]["imagenet-r"]["error"] == pytest.approx(25.0)


def test_published_numbers_are_kept_apart(tmp_path):
    report = write_report([shift_result("m", "none")], tmp_path, plots=False).read_text()
    measured, published = report.split("Published distribution-shift numbers")
    assert "easyrobust" not in measured
    p = PUBLISHED_SHIFT[0]
    row = row_of(published, p["method"])
    assert row[1:6] == ["23.72", "64.89", "57.83", "95.82", "71.10"]


def test_partial_c_bar_and_subset_counts_are_marked(tmp_path):
    cells = c_bar_cells(lambda i, s: 5)
    cells.pop("sparkles/5")
    result = shift_result("m", "none", c_bar=cells)
    result["suites"]["imagenet-r"]["cells"]["imagenet-r"]["scored_classes"] = 150
    report = write_report([result], tmp_path, plots=False).read_text()
    assert row_of(report, "baseline")[-1] == "50.00†"
    assert "C-bar covers 49 of 50 cells" in report
    assert "ImageNet-R scored on 150 classes" in report
