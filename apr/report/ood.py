"""The OOD-detection section of the report (``python -m apr.ood`` results, schema ``apr.ood/1``).

Per run (one ``<run_name>.ood.json`` each): AUROC and FPR at 95 % TPR per OOD set and score, their
mean over the sets, the reference's five numbers for the max logit, and the in-distribution top-1
error with its calibration (ECE and RMS calibration error over 15 bins, AugMix's adaptive RMS).
One figure: the stored max-logit histograms, in vs out, per run side by side. Every number in
the Markdown is ``format_percent`` of the matching value in the section's summary block.
Nothing here loads a model or torch: the stored metrics and histograms are all it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from apr.metrics import OOD_METRICS
from apr.report.common import (ReportError, check_count, check_fraction, colours, format_percent, markdown_table,
                               name_runs, new_figure, pct, recipe, run_label, save_png)
from apr.report.sections import register

__all__ = ["SCHEMA", "SCORE_ORDER", "SCORE_TITLES", "FIGURE", "check_ood_result", "summarize_ood", "render_ood"]

SCHEMA = "apr.ood/1"  # apr.ood.SCHEMA, not imported: apr.ood loads torch and the data stack
#: Table order: the reference's score first.
SCORE_ORDER = ("max_logit", "msp", "energy")
SCORE_TITLES = {"max_logit": "Max logit (the reference's score)", "msp": "Maximum softmax probability (MSP)",
                "energy": "Energy (logsumexp of the logits, T = 1)"}
FIGURE = "ood_histograms.png"
PARTIAL_MARK = "†"
_ID_RATES = ("top1_error", "ece", "rms_calibration_error", "adaptive_rms_calibration_error")


# --------------------------------------------------------------------------- checks

def _check_histogram(hist: Any, in_count: int, out_count: int, where: str) -> None:
    if not isinstance(hist, Mapping) or not all(isinstance(hist.get(k), list) for k in ("edges", "in", "out")):
        raise ReportError(f"{where}: a histogram needs the lists 'edges', 'in' and 'out'")
    if not len(hist["edges"]) == len(hist["in"]) + 1 == len(hist["out"]) + 1:
        raise ReportError(f"{where}: {len(hist['edges'])} edges for {len(hist['in'])} in / {len(hist['out'])} out "
                          "bins (edges must be one more than bins)")
    for side, count in (("in", in_count), ("out", out_count)):
        bins = [check_count(c, f"{where}: a histogram count", positive=False) for c in hist[side]]
        if sum(bins) != count:
            raise ReportError(f"{where}: the {side!r} histogram holds {sum(bins)} scores but its set has {count} "
                              "images; re-run python -m apr.ood")


def _check_set(name: str, record: Any, scores: list[str], in_count: int, where: str) -> None:
    where = f"{where}: OOD set {name!r}"
    if not isinstance(record, Mapping) or not isinstance(record.get("metrics"), Mapping):
        raise ReportError(f"{where} lacks its 'metrics' block")
    count = check_count(record.get("count"), f"{where}: count")
    check_count(record.get("skipped_count", 0), f"{where}: skipped_count", positive=False)
    for score in scores:
        metrics = record["metrics"].get(score)
        if not isinstance(metrics, Mapping):
            raise ReportError(f"{where} has no metrics for the score {score!r}")
        for key in OOD_METRICS:
            check_fraction(metrics.get(key), f"{where}: {score} {key}")
    for score, hist in (record.get("histograms") or {}).items():
        _check_histogram(hist, in_count, count, f"{where}: {score} histogram")


def check_ood_result(result: Any, source: str) -> dict:
    """An ``apr.ood/1`` results dict with its in-distribution block, at least one finished OOD set, every
    score's metrics in [0, 1] and counts that are possible (ReportError naming the fix otherwise)."""
    if not isinstance(result, Mapping) or result.get("schema") != SCHEMA:
        raise ReportError(f"{source}: not an OOD results file (expected schema {SCHEMA!r})")
    ind = result.get("in_distribution")
    if not isinstance(ind, Mapping):
        raise ReportError(f"{source}: no in-distribution block (the run stopped before its first pass); "
                          "re-run python -m apr.ood, it resumes")
    in_count = check_count(ind.get("count"), f"{source}: in_distribution.count")
    for key in _ID_RATES:
        if key == "top1_error" or ind.get(key) is not None:
            check_fraction(ind.get(key), f"{source}: in_distribution.{key}")
    sets = result.get("ood_sets")
    if not isinstance(sets, Mapping) or not sets:
        raise ReportError(f"{source}: no finished OOD set; re-run python -m apr.ood, it resumes")
    scores = result.get("scores") or list(SCORE_ORDER)
    if not isinstance(scores, list) or not set(scores) <= set(SCORE_ORDER):
        raise ReportError(f"{source}: scores {scores!r} are not among {', '.join(SCORE_ORDER)}")
    for name, record in sets.items():
        _check_set(name, record, scores, in_count, source)
    return dict(result)


# --------------------------------------------------------------------------- numbers

def _percent_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {key: pct(metrics[key]) for key in OOD_METRICS}
    out["tnr95"] = 100.0 - out["fpr95"]  # the reference's "TNR at 95 % TPR"
    return out


def _run_summary(result: dict, source: str, all_sets: list[str]) -> dict[str, Any]:
    ind = result["in_distribution"]
    scores = [s for s in SCORE_ORDER if s in (result.get("scores") or SCORE_ORDER)]
    sets = {name: {"kind": record.get("kind"), "count": record["count"],
                   "skipped_count": record.get("skipped_count", 0),
                   "metrics": {s: _percent_metrics(record["metrics"][s]) for s in scores}}
            for name, record in result["ood_sets"].items()}
    mean = {s: {key: float(np.mean([sets[n]["metrics"][s][key] for n in sets])) for key in (*OOD_METRICS, "tnr95")}
            for s in scores}
    missing = [n for n in all_sets if n not in sets]
    aug, extra = recipe(result)
    return {"run_name": result.get("run_name") or Path(source).stem, "label": run_label(result), "aug": aug,
            "extra_roots": extra, "source": source, "checkpoint": result.get("checkpoint"),
            "checkpoint_sha256": result.get("checkpoint_sha256"), "epoch": result.get("epoch"),
            "complete": bool(result.get("complete")), "scores": scores,
            "in_distribution": {"kind": ind.get("kind"), "path": ind.get("path"), "count": ind["count"],
                                "skipped_count": ind.get("skipped_count", 0),
                                **{key: pct(ind.get(key)) for key in _ID_RATES}},
            "sets": sets, "mean_over_sets": mean, "missing_sets": missing,
            "max_logit_histograms": {n: (r.get("histograms") or {}).get("max_logit")
                                     for n, r in result["ood_sets"].items()},
            "partial": bool(missing) or not result.get("complete", True)}


def summarize_ood(results: list[tuple[dict, str]]) -> dict[str, Any]:
    """Every number of the OOD section (percent, unrounded): the section's block in summary.json."""
    checked = [(check_ood_result(r, src), src) for r, src in results]
    kinds = sorted({str(r["in_distribution"].get("kind")) for r, _ in checked})
    if len(kinds) > 1:
        raise ReportError(f"OOD results mix in-distribution sets ({', '.join(kinds)}); AUROC against different "
                          "in-distribution sets does not compare: make one report per in-distribution set")
    all_sets = list(dict.fromkeys(n for r, _ in checked for n in r["ood_sets"]))
    runs = name_runs([_run_summary(r, src, all_sets) for r, src in checked])
    scores = [s for s in SCORE_ORDER if any(s in run["scores"] for run in runs)]
    return {"schema": SCHEMA, "units": "percent", "in_distribution": kinds[0], "sets": all_sets, "scores": scores,
            "runs": runs}


# --------------------------------------------------------------------------- markdown

def _mean_cell(run: dict, score: str, key: str) -> str:
    value = run["mean_over_sets"].get(score, {}).get(key)
    return format_percent(value) + (PARTIAL_MARK if run["partial"] and value is not None else "")


def _score_table(summary: dict, score: str) -> list[str]:
    header = ["Method"] + [f"{n} {m}" for n in summary["sets"] for m in ("AUROC", "FPR95")] + \
        ["Mean AUROC", "Mean FPR95"]
    rows = []
    for run in summary["runs"]:
        cells = [run["display_name"]]
        for name in summary["sets"]:
            metrics = run["sets"].get(name, {}).get("metrics", {}).get(score, {})
            cells += [format_percent(metrics.get("auroc")), format_percent(metrics.get("fpr95"))]
        rows.append(cells + [_mean_cell(run, score, "auroc"), _mean_cell(run, score, "fpr95")])
    return ["", f"### {SCORE_TITLES[score]}: AUROC / FPR95", ""] + markdown_table(header, rows)


def _reference_table(summary: dict) -> list[str]:
    """The reference's metric_ood numbers, in its order, for the max logit: TNR, AUROC, DTACC, AUIN, AUOUT."""
    if "max_logit" not in summary["scores"]:
        return []
    rows = [[run["display_name"], name] + [format_percent(metrics[k]) for k in
                                           ("tnr95", "auroc", "detection_accuracy", "aupr_in", "aupr_out")]
            for run in summary["runs"] for name, record in run["sets"].items()
            for metrics in [record["metrics"]["max_logit"]]]
    header = ["Method", "OOD set", "TNR at 95% TPR", "AUROC", "Detection acc.", "AUPR-in", "AUPR-out"]
    return ["", "### Max logit: the reference's five numbers per OOD set", ""] + markdown_table(header, rows)


def _in_distribution_table(summary: dict) -> list[str]:
    header = ["Method", "Run", "Images", "Top-1 err.", "ECE (15 bins)", "RMS calib. err. (15 bins)",
              "RMS calib. err. (AugMix adaptive)"]
    rows = [[run["display_name"], run["run_name"], str(ind["count"]), format_percent(ind["top1_error"]),
             format_percent(ind["ece"]), format_percent(ind["rms_calibration_error"]),
             format_percent(ind["adaptive_rms_calibration_error"])]
            for run in summary["runs"] for ind in [run["in_distribution"]]]
    return ["", f"### In-distribution set ({summary['in_distribution']}): top-1 error and calibration", ""] + \
        markdown_table(header, rows)


def _notes(summary: dict) -> list[str]:
    notes = []
    for run in summary["runs"]:
        why = []
        if run["missing_sets"]:
            why.append(f"lacks the OOD set(s) {', '.join(run['missing_sets'])}")
        if not run["complete"]:
            why.append("is an unfinished run (re-run python -m apr.ood to finish it)")
        if why:
            notes.append(f"{PARTIAL_MARK} {run['display_name']} {' and '.join(why)}: its means cover only "
                         "the sets it has and do not compare with the other rows.")
        skipped = {n: s["skipped_count"] for n, s in run["sets"].items() if s["skipped_count"]}
        if run["in_distribution"]["skipped_count"]:
            skipped = {"in-distribution": run["in_distribution"]["skipped_count"], **skipped}
        if skipped:
            notes.append(f"Unreadable images skipped ({run['display_name']}): "
                         + ", ".join(f"{n}: {k}" for n, k in skipped.items()) + ".")
    return ["", *notes] if notes else []


def _intro() -> list[str]:
    return ["## Out-of-distribution detection", "",
            "Can the model tell images of its classes from images of classes it never saw? Each image gets a "
            "score (higher = more in-distribution); in-distribution images are the positive class. AUROC: higher "
            "is better; FPR95: the share of OOD images accepted when 95% of in-distribution images are, lower is "
            "better. All numbers are percentages. The reference's protocol (the APR authors' code) is CIFAR-10 "
            "test set in, CIFAR-100 test set out, score = max logit; its \"TNR at 95% TPR\" is 100 − FPR95. "
            "Calibration: ECE and RMS calibration error over 15 equal-width confidence bins (as in the corruption "
            "section); AugMix's RMS calibration error uses adaptive bins of 100 confidence-sorted images, so its "
            "values differ."]


def _markdown(summary: dict, figure: str | None) -> str:
    out = _intro()
    for score in summary["scores"]:
        out += _score_table(summary, score)
    out += _notes(summary) + _reference_table(summary) + _in_distribution_table(summary)
    if figure:
        out += ["", f"![Max-logit histograms, in vs out]({figure})"]
    return "\n".join(out + [""])


# --------------------------------------------------------------------------- figure

def _plot_histograms(summary: dict, path: Path) -> None:
    """Max-logit density of in- vs out-of-distribution images: one row per OOD set, one column per run."""
    runs, sets = summary["runs"], summary["sets"]
    fig = new_figure(3.4 * len(runs) + 0.5, 2.6 * len(sets) + 0.6)
    in_colour, out_colour = colours(2)
    for row, name in enumerate(sets):
        for col, run in enumerate(runs):
            ax = fig.add_subplot(len(sets), len(runs), row * len(runs) + col + 1)
            hist = run["max_logit_histograms"].get(name)
            if hist is None:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            edges = np.asarray(hist["edges"], dtype=float)
            for side, colour in (("in", in_colour), ("out", out_colour)):
                counts = np.asarray(hist[side], dtype=float)
                density = counts / max(counts.sum(), 1.0) / np.diff(edges)
                ax.stairs(density, edges, fill=True, alpha=0.45, color=colour,
                          label="in-distribution" if side == "in" else "OOD")
            auroc = run["sets"][name]["metrics"]["max_logit"]["auroc"]
            ax.set_title(f"{run['display_name']} | {name}\nAUROC {format_percent(auroc)}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("max logit", fontsize=7)
    drawn = [ax.get_legend_handles_labels() for ax in fig.axes if ax.get_legend_handles_labels()[0]]
    if drawn:
        handles, labels = drawn[0]
        fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("Max-logit score, in-distribution vs OOD (density)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_png(fig, path)


# --------------------------------------------------------------------------- the section

def render_ood(results: list[tuple[dict, str]], out: Path, plots: bool) -> tuple[str, dict[str, Any]]:
    """The OOD section: its Markdown and its summary block; the histogram figure goes into ``out``."""
    summary = summarize_ood(results)
    figure = None
    if plots and "max_logit" in summary["scores"]:
        figure = FIGURE
        _plot_histograms(summary, out / figure)
    summary["figures"] = [figure] if figure else []
    return _markdown(summary, figure), summary


register("ood", SCHEMA, render_ood)
