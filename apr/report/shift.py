"""The distribution-shift section of the report (results schema ``apr.shift/1``, ``<run>.shift.json``).

One row per model: clean error, ImageNet-C mCE (taken from the same model's corruption results,
normalised there by ``apr.report.metrics_for``, the one place), and the top-1 error on each suite
evaluated: ImageNet-R, -A (over their 200 classes), -Sketch, -V2, ImageNet-C-bar (mean over its
cells; no AlexNet normalisation exists for it) and CIFAR-10.1. Published numbers stay in their own
table. Every number in the Markdown is ``format_percent`` of the matching summary value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from apr.report.common import ReportError, format_percent, markdown_table, pct, run_label
from apr.report.sections import register

__all__ = ["SHIFT_SCHEMA", "SUITE_TITLES", "PUBLISHED_SHIFT", "summarize_shift", "render_shift"]

SHIFT_SCHEMA = "apr.shift/1"
SUITE_TITLES = {"imagenet-r": "ImageNet-R", "imagenet-a": "ImageNet-A", "imagenet-sketch": "Sketch",
                "imagenet-v2": "ImageNet-V2", "imagenet-c-bar": "C-bar", "cifar10.1": "CIFAR-10.1"}
C_BAR_CELLS = 50  # 10 corruptions x 5 severities
PARTIAL_MARK = "†"
PUBLISHED_TITLE = "Published distribution-shift numbers (not measured here)"
#: Top-1 errors (%) = 100 - the reported accuracy; mCE as reported (AlexNet-normalised).
PUBLISHED_SHIFT: list[dict[str, Any]] = [
    {"method": "APR-SP ResNet-50 (easyrobust reproduction)", "clean_error": 100 - 76.28, "mce": 64.89,
     "imagenet-r": 100 - 42.17, "imagenet-a": 100 - 4.18, "imagenet-sketch": 100 - 28.90,
     "note": "easyrobust model zoo; accuracies 76.28 / 42.17 / 4.18 / 28.90 %"},
]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _suite_summary(name: str, block: dict) -> dict[str, Any]:
    """Error (percent) of one suite; C-bar: the mean over its cells and per corruption."""
    cells = {k: v for k, v in (block.get("cells") or {}).items() if isinstance(v, dict) and v.get("count")}
    errors = {k: 1.0 - v["correct"] / v["count"] for k, v in cells.items()}
    out: dict[str, Any] = {"cells": len(cells), "images": sum(v["count"] for v in cells.values())}
    if name == "imagenet-c-bar":
        per: dict[str, list[float]] = {}
        for key, err in errors.items():
            per.setdefault(key.split("/")[0], []).append(err)
        out["error"] = pct(_mean(list(errors.values())))
        out["per_corruption"] = {c: pct(_mean(v)) for c, v in sorted(per.items())}
        out["partial"] = len(cells) < C_BAR_CELLS
    else:
        cell = next(iter(cells.values()), None)
        out["error"] = pct(errors[next(iter(cells))]) if cell else None
        out["top5_error"] = pct(cell.get("top5_error")) if cell else None
        out["scored_classes"] = cell.get("scored_classes") if cell else None
        out["missing_classes"] = len(cell.get("missing_classes") or []) if cell else 0
        # marked: R/A scored on other than their 200 classes, or a set without some of the model's classes
        out["partial"] = bool(cell) and (out["scored_classes"] not in (None, 200) or out["missing_classes"] > 0)
    return out


def _run_summary(result: dict, source: str) -> dict[str, Any]:
    suites, clean = result.get("suites"), result.get("clean")
    if not isinstance(suites, dict) or not (suites or isinstance(clean, dict)):  # no suites: clean-only is fine
        raise ReportError(f"{source}: 'suites' is {suites!r}, not the suites' results: no "
                          "distribution-shift number to report; re-run apr-eval --suite ...")
    linked = result.get("corruption") or {}
    clean_error = clean["error"] if isinstance(clean, dict) else linked.get("clean_error")
    clean_missing = len(clean.get("missing_classes") or []) if isinstance(clean, dict) else 0
    return {"run_name": result.get("run_name") or Path(source).stem, "label": run_label(result), "source": source,
            "checkpoint_sha256": result.get("checkpoint_sha256"), "clean_error": pct(clean_error),
            "clean_missing_classes": clean_missing,
            "mce": linked.get("mce"), "mce_partial": bool(linked.get("partial")),
            "mce_normalisation": linked.get("normalisation"), "mce_dataset": linked.get("dataset"),
            "suites": {name: _suite_summary(name, block) for name, block in (result.get("suites") or {}).items()},
            "skipped": dict(result.get("skipped") or {})}


def summarize_shift(results: list[tuple[dict, str]]) -> dict[str, Any]:
    """Every number of the section (percent, unrounded): what summary.json["sections"]["shift"] holds."""
    runs = [_run_summary(r, src) for r, src in results]
    labels = [r["label"] for r in runs]
    for run in runs:
        run["display_name"] = run["label"] if labels.count(run["label"]) == 1 else f"{run['label']} ({run['run_name']})"
    suites = [s for s in SUITE_TITLES if any(s in r["suites"] for r in runs)]
    return {"schema": SHIFT_SCHEMA, "units": "percent", "suites": suites, "runs": runs,
            "published": PUBLISHED_SHIFT}


def _cell(value: float | None, partial: bool = False) -> str:
    text = format_percent(value)
    return text + PARTIAL_MARK if partial and value is not None else text


def _markdown(summary: dict[str, Any]) -> str:
    suites, runs = summary["suites"], summary["runs"]
    out = ["## Distribution shift", "",
           "Top-1 error (%) per suite, lower is better. ImageNet-R and ImageNet-A are scored on the logits of "
           "their 200 classes only (as their authors evaluate); C-bar is the mean error over its 10 corruptions x "
           "5 severities (no AlexNet normalisation exists for it). ImageNet-C mCE comes from the same model's "
           "corruption results.", ""]
    header = ["Model", "Clean err.", "ImageNet-C mCE"] + [SUITE_TITLES[s] for s in suites]
    rows = [[r["display_name"], _cell(r["clean_error"], r.get("clean_missing_classes", 0) > 0),
             _cell(r["mce"], r["mce_partial"])]
            + [_cell(r["suites"].get(s, {}).get("error"), r["suites"].get(s, {}).get("partial", False))
               for s in suites] for r in runs]
    out += markdown_table(header, rows)
    notes = []
    for r in runs:
        if r["mce"] is not None and (r["mce_normalisation"] != "alexnet" or r["mce_dataset"] != "imagenet-c"):
            notes.append(f"{r['display_name']}: mCE on {r['mce_dataset']}, normalised by {r['mce_normalisation']}.")
        if r.get("clean_missing_classes"):
            notes.append(f"{PARTIAL_MARK} {r['display_name']}: the clean set has no image of "
                         f"{r['clean_missing_classes']} of the model's classes.")
        for s, block in r["suites"].items():
            if block.get("scored_classes") and block["scored_classes"] != 200:
                notes.append(f"{PARTIAL_MARK} {r['display_name']}: {SUITE_TITLES.get(s, s)} scored on "
                             f"{block['scored_classes']} classes (not the published 200).")
            if block.get("missing_classes"):
                notes.append(f"{PARTIAL_MARK} {r['display_name']}: {SUITE_TITLES.get(s, s)} has no image of "
                             f"{block['missing_classes']} of the model's classes.")
            if block.get("partial") and s == "imagenet-c-bar":
                notes.append(f"{PARTIAL_MARK} {r['display_name']}: C-bar covers {block['cells']} of {C_BAR_CELLS} cells.")
        if r["skipped"]:
            notes.append(f"**Skipped** ({r['display_name']}): "
                         + "; ".join(f"{cell}: {why}" for cell, why in r["skipped"].items()) + ".")
    out += ([""] + notes) if notes else []
    if "imagenet-c-bar" in suites:
        corruptions = sorted({c for r in runs for c in r["suites"].get("imagenet-c-bar", {}).get("per_corruption", {})})
        out += ["", "### ImageNet-C-bar: mean top-1 error per corruption", ""]
        out += markdown_table(["Model"] + corruptions + ["Mean"],
                              [[r["display_name"]] + [format_percent(r["suites"].get("imagenet-c-bar", {})
                                                                     .get("per_corruption", {}).get(c))
                                                      for c in corruptions]
                               + [format_percent(r["suites"].get("imagenet-c-bar", {}).get("error"))] for r in runs])
    out += ["", f"### {PUBLISHED_TITLE}", "",
            "Copied for orientation; no number in this table comes from the models above.", ""]
    columns = ["imagenet-r", "imagenet-a", "imagenet-sketch"]
    out += markdown_table(["Method", "Clean err.", "ImageNet-C mCE"] + [SUITE_TITLES[c] for c in columns] + ["Source"],
                          [[p["method"], f"{p['clean_error']:.2f}", f"{p['mce']:.2f}"]
                           + [f"{p[c]:.2f}" for c in columns] + [p["note"]] for p in summary["published"]])
    return "\n".join(out + [""])


def render_shift(results: list[tuple[dict, str]], out: Path, plots: bool) -> tuple[str, dict[str, Any]]:
    """The section's Markdown and summary block (no plots: one table says it)."""
    summary = summarize_shift(results)
    return _markdown(summary), summary


register("shift", SHIFT_SCHEMA, render_shift)
