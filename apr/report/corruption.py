"""The corruption section of the report (ImageNet-C / CIFAR-C / folder-C results, schema ``apr.eval/1``).

Every number is recomputed from the per-cell errors in the results files with ``apr.metrics``
(so a report can be rebuilt after the fact, e.g. against another baseline), and every number
in ``report.md`` is ``format_percent`` of the matching value in ``summary.json``. Runs are named
after their training recipe (``aug`` and ``extra_roots`` of the saved config): baseline, APR-P,
APR-S, APR-SP, DeepAugment + APR-SP, with the run name added where two runs share a recipe.

    python -m apr.report runs/*/eval/*.json --out report/ [--baseline NAME_OR_PATH]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apr.metrics import (ALEXNET_CLEAN_ERROR_SOURCE, CORRUPTION_FAMILIES, CORRUPTIONS, EXTRA_CORRUPTIONS,
                         SEVERITIES, MetricsError, compute_metrics, normalize_errors)
from apr.report.common import (AUG_LABELS, ReportError, colours, format_percent, markdown_table, name_runs,
                               new_figure, pct, recipe, run_label, save_png)

__all__ = [
    "RESULTS_SCHEMA",
    "SUMMARY_SCHEMA",
    "SHORT_NAMES",
    "AUG_LABELS",
    "PUBLISHED_TITLE",
    "PUBLISHED_MCE",
    "ReportError",
    "format_percent",
    "run_label",
    "load_result",
    "check_result",
    "load_results",
    "resolve_baseline",
    "metrics_for",
    "summarize",
    "corruption_report",
]

RESULTS_SCHEMA = "apr.eval/1"
SUMMARY_SCHEMA = "apr.report/1"

#: Column headers of the per-corruption CE columns (the short names used in the papers).
SHORT_NAMES: dict[str, str] = {
    "gaussian_noise": "Gauss", "shot_noise": "Shot", "impulse_noise": "Impulse",
    "defocus_blur": "Defocus", "glass_blur": "Glass", "motion_blur": "Motion", "zoom_blur": "Zoom",
    "snow": "Snow", "frost": "Frost", "fog": "Fog", "brightness": "Bright",
    "contrast": "Contrast", "elastic_transform": "Elastic", "pixelate": "Pixel", "jpeg_compression": "JPEG",
    "speckle_noise": "Speckle", "gaussian_blur": "G.Blur", "spatter": "Spatter", "saturate": "Saturate",
}
PUBLISHED_TITLE = "Published numbers (Chen et al., ICCV 2021, ResNet-50 ImageNet-C mCE; not measured here)"
#: (method, mCE %, clean error % or None, note) as printed in the APR paper (AugMix rows for context).
PUBLISHED_MCE: list[tuple[str, float, float | None, str]] = [
    ("Standard training", 76.7, 23.9, ""),
    ("APR-P", 70.5, None, ""),
    ("APR-S", 69.3, None, ""),
    ("APR-SP", 65.0, None, ""),
    ("DeepAugment + APR-SP", 57.5, None, ""),
    ("AugMix", 65.3, None, "for context"),
    ("DeepAugment + AugMix", 53.6, None, "for context"),
]
PARTIAL_MARK = "†"  # after a mean that covers only some cells (not "*": markdown emphasis)


# --------------------------------------------------------------------------- loading

def load_result(path: str | Path) -> dict:
    """The one reader of a results JSON: the file, its schema and its cells checked (ReportError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"results file {path} does not exist")
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a readable JSON file ({exc})") from None
    return check_result(result, str(path))


def check_result(result: Any, source: str) -> dict:
    """A results dict of our schema whose counts are possible and whose dataset fits its class count."""
    if not isinstance(result, dict) or result.get("schema") != RESULTS_SCHEMA:
        got = result.get("schema") if isinstance(result, dict) else type(result).__name__
        raise ReportError(f"{source}: not an evaluation results file (schema {got!r}, expected {RESULTS_SCHEMA!r})")
    for key in ("clean", "corruptions"):
        if key not in result:
            raise ReportError(f"{source}: results lack the {key!r} block")
    classes = (result.get("eval") or {}).get("classes")
    if result.get("dataset") == "imagenet-c" and classes not in (None, 1000):
        raise ReportError(f"{source}: dataset is 'imagenet-c' but the model has {classes} classes; ImageNet-C "
                          "(and its AlexNet normalisation) needs 1000. Evaluate it as 'folder-c' (--dataset folder-c)")
    cells = [("clean", result["clean"])] if isinstance(result["clean"], Mapping) else []
    cells += [(f"{c}/{s}", cell) for c, per in (result["corruptions"] or {}).items() if isinstance(per, Mapping)
              for s, cell in per.items() if isinstance(cell, Mapping)]
    for name, cell in cells:
        _check_counts(cell, f"{source}: cell {name}")
    return result


def _check_counts(cell: Mapping[str, Any], where: str) -> None:
    count, correct = cell.get("count"), cell.get("correct")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count <= 0):
        raise ReportError(f"{where}: count must be a positive number of images, got {count!r}; "
                          "re-evaluate this cell (the file was edited or written by another tool)")
    if correct is not None and (not isinstance(correct, int) or not 0 <= correct <= (count or 0)):
        raise ReportError(f"{where}: correct = {correct!r} is not between 0 and count = {count!r}; re-evaluate it")
    if count and correct is not None and isinstance(cell.get("error"), (int, float)):
        if not math.isclose(cell["error"], 1 - correct / count, abs_tol=1e-9):
            raise ReportError(f"{where}: error {cell['error']} does not match 1 - correct/count = "
                              f"{1 - correct / count}; re-evaluate it")
    unreadable = cell.get("unreadable", 0)
    if isinstance(unreadable, bool) or not isinstance(unreadable, int) or unreadable < 0:
        raise ReportError(f"{where}: unreadable must be a count >= 0, got {unreadable!r}")


def _load_one(item: Any) -> tuple[dict, str]:
    if isinstance(item, Mapping):
        return check_result(dict(item), "<dict>"), "<dict>"
    return load_result(item), str(item)


def load_results(items: Iterable[Any]) -> list[tuple[dict, str]]:
    """Results dicts or JSON paths (a folder means every ``*.json`` in it with our schema) ->
    ``[(result, source)]``."""
    out: list[tuple[dict, str]] = []
    for item in items:
        if not isinstance(item, Mapping) and Path(item).is_dir():
            found = []
            for path in sorted(Path(item).glob("*.json")):
                try:
                    found.append(_load_one(path))
                except ReportError:
                    continue  # other JSON files (configs, summaries) may live there too
            if not found:
                raise ReportError(f"folder {item} holds no {RESULTS_SCHEMA} results JSON files")
            out += found
        else:
            out.append(_load_one(item))
    if not out:
        raise ReportError("no results given")
    return out


# --------------------------------------------------------------------------- numbers

def resolve_baseline(baseline: Any, runs: list[tuple[dict, str]] = (), results_dir: str | Path | None = None
                     ) -> dict | None:
    """The baseline results dict: None (AlexNet), a results dict or path, ``<results_dir>/<name>.json``,
    or the run name / method label of one of ``runs`` (the one baseline lookup of the project)."""
    if baseline is None:
        return None
    if isinstance(baseline, Mapping):
        return _load_one(baseline)[0]
    if Path(baseline).is_file():
        return _load_one(baseline)[0]
    name = str(baseline)
    if results_dir is not None and (Path(results_dir) / f"{name}.json").is_file():
        return load_result(Path(results_dir) / f"{name}.json")
    by_name = [r for r, _ in runs if r.get("run_name") == name]
    if len(by_name) == 1:
        return by_name[0]
    by_label = [r for r, _ in runs if run_label(r) == name]
    if len(by_label) == 1 and not by_name:
        return by_label[0]
    names = ", ".join(f"{r.get('run_name')!r} ({run_label(r)})" for r, _ in runs)
    why = "matches several runs" if (len(by_name) > 1 or len(by_label) > 1) else "is neither a file nor a run"
    raise ReportError(f"baseline {name!r} {why}; give a results file or one of the run names: {names}")


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def metrics_for(result: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CE, mCE, relative mCE, mean corruption error of a raw result: the one place where results are
    normalised, by ``baseline`` (a results dict) when given, else by AlexNet's ImageNet-C errors
    (``apr.metrics.ALEXNET_ERRORS``, clean error ``ALEXNET_CLEAN_ERROR``), except a ``folder-c`` tree
    (any other dataset): raw errors, no CE/mCE. Missing cells mark it partial."""
    name = result.get("run_name", "?")
    # AlexNet's errors are ImageNet-C's: a tree made from another dataset (folder-c) stays raw without a baseline
    raw = baseline is None and result.get("dataset") == "folder-c"
    try:
        return compute_metrics(result, baseline_result=baseline, allow_partial=True,
                               normalisation="none" if raw else None)
    except MetricsError as exc:
        raise ReportError(f"run {name!r}: {exc}") from None


def _run_summary(result: dict, source: str, baseline: dict | None, warnings: list[str]) -> dict[str, Any]:
    name = result.get("run_name") or Path(source).stem
    metrics = metrics_for({**result, "run_name": name}, baseline)
    cells = normalize_errors(result["corruptions"])
    stored = result.get("metrics")
    if isinstance(stored, Mapping) and stored.get("normalisation") == metrics["normalisation"]:
        for key in ("mce", "relative_mce", "mean_corruption_error"):
            a, b = stored.get(key), metrics[key]
            if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)):
                warnings.append(f"{name}: stored metrics.{key} = {a} differs from the value recomputed from its "
                                f"cells ({b}); the report shows the recomputed value")
    for w in metrics["warnings"]:
        warnings.append(f"{name}: {w}")
    corrupted = [cell for c in CORRUPTIONS for cell in (result["corruptions"].get(c) or {}).values()
                 if isinstance(cell, Mapping)]
    corrupted_ece = [float(cell["ece"]) for cell in corrupted if cell.get("ece") is not None]
    corrupted_rms = [float(cell["rms_calibration_error"]) for cell in corrupted
                     if cell.get("rms_calibration_error") is not None]
    unreadable = {f"{c}/{s}": int(cell.get("unreadable") or 0) for c, per in result["corruptions"].items()
                  for s, cell in (per or {}).items() if isinstance(cell, Mapping) and cell.get("unreadable")}
    if result["clean"].get("unreadable"):
        unreadable["clean"] = int(result["clean"]["unreadable"])
    severity = {}
    for s in SEVERITIES:
        vals = [cells[c][s] for c in CORRUPTIONS if s in cells.get(c, {})]
        severity[str(s)] = pct(_mean_or_none(vals))
    aug, extra = recipe(result)
    clean = result["clean"]
    return {
        "run_name": name,
        "label": run_label(result),
        "aug": aug,
        "extra_roots": extra,
        "dataset": result.get("dataset"),
        "source": source,
        "checkpoint": result.get("checkpoint"),
        "checkpoint_sha256": result.get("checkpoint_sha256"),
        "created": result.get("created"),
        "throughput_images_per_s": result.get("throughput_images_per_s"),
        "clean_error": pct(clean.get("error")),
        "top5_error": pct(clean.get("top5_error")),
        "ece_clean": pct(clean.get("ece")),
        "ece_corrupted_mean": pct(_mean_or_none(corrupted_ece)),
        "rms_calibration_error_clean": pct(clean.get("rms_calibration_error")),
        "rms_calibration_error_corrupted_mean": pct(_mean_or_none(corrupted_rms)),
        "unreadable": unreadable,
        "skipped": dict(result.get("skipped") or {}),
        "normalisation": metrics["normalisation"],
        "mce": metrics["mce"],
        "relative_mce": metrics["relative_mce"],
        "relative_mce_reason": metrics.get("relative_mce_reason"),
        "mean_corruption_error": metrics["mean_corruption_error"],
        "ce": metrics["ce"],
        "relative_ce": metrics["relative_ce"],
        "extra_errors": {c: pct(np.mean(list(cells[c].values()))) for c in EXTRA_CORRUPTIONS if c in cells},
        "extra_mean_error": metrics["extra_mean_error"],
        "severity_errors": severity,
        "errors": {c: {str(s): pct(e) for s, e in sorted(cells[c].items())} for c in CORRUPTIONS + EXTRA_CORRUPTIONS
                   if c in cells},
        "partial": metrics["partial"],
        "missing": metrics["missing"],
    }


def summarize(results: Iterable[Any], baseline: Any = None) -> dict[str, Any]:
    """All numbers of a report (percent, unrounded) as one JSON-able dict: what summary.json holds."""
    loaded = load_results(results)
    datasets = sorted({str(r.get("dataset")) for r, _ in loaded})
    if len(datasets) > 1:
        raise ReportError(f"results mix datasets ({', '.join(datasets)}); make one report per dataset")
    base = resolve_baseline(baseline, loaded)
    warnings: list[str] = []
    runs = [_run_summary(r, src, base, warnings) for r, src in loaded]
    runs = name_runs(runs)

    dataset = datasets[0]
    normalisation = runs[0]["normalisation"]
    if dataset != "imagenet-c":
        reason = (f"Published numbers omitted: these results are on {dataset}, and the published figures are "
                  "ImageNet-C mCE of ResNet-50 normalised by AlexNet.")
    elif normalisation != "alexnet":
        reason = (f"Published numbers omitted: this report normalises by {normalisation!r}, and the published "
                  "figures are normalised by AlexNet (run without --baseline to compare).")
    else:
        reason = None
    published = None if reason else [
        {"method": m, "mce": v, "clean_error": ce, "note": note} for m, v, ce, note in PUBLISHED_MCE]
    return {"schema": SUMMARY_SCHEMA, "dataset": dataset, "normalisation": normalisation,
            "units": "percent", "runs": runs, "published": published, "published_omitted_reason": reason,
            "warnings": warnings}


# --------------------------------------------------------------------------- markdown

def _partial(value: float | None, partial: bool) -> str:
    text = format_percent(value)
    return text + PARTIAL_MARK if partial and value is not None else text


def _relative(r: dict) -> str:
    """Relative mCE, or a dash whose reason is a note under the table (a sentence would swamp the cell)."""
    if r["relative_mce"] is None and r.get("relative_mce_reason"):
        return "—"
    return _partial(r["relative_mce"], r["partial"])


def _relative_notes(runs: list[dict]) -> list[str]:
    """One note per reason why relative mCE is undefined, naming the runs it applies to."""
    by_reason: dict[str, list[str]] = {}
    for r in runs:
        if r["relative_mce"] is None and r.get("relative_mce_reason") and r["normalisation"] != "none":
            by_reason.setdefault(r["relative_mce_reason"], []).append(r["display_name"])
    return [f"**Rel. mCE —** ({', '.join(names)}): {reason}." for reason, names in by_reason.items()]


def _intro(summary: dict[str, Any]) -> list[str]:
    norm = summary["normalisation"]
    norm_text = {"alexnet": "CE and mCE normalised by AlexNet (CE = 100 is AlexNet's error)",
                 "none": "Raw errors: no CE / mCE, since AlexNet's ImageNet-C errors mean nothing on this tree "
                         "(pass --baseline RUN to normalise by one of the runs); the Results table's corruption "
                         "columns hold each corruption's mean top-1 error over its severities"}.get(
        norm, f"CE and mCE normalised by run {norm.split(':', 1)[-1]!r} (CE = 100 is that run's error)")
    out = ["# Robustness report", "",
           f"Dataset: **{summary['dataset']}**. {norm_text}. "
           "All numbers are percentages; error = top-1 error. Relative mCE compares the error *increase* over "
           "clean with the reference's increase. Mean corr. err. is the unnormalised mean top-1 error over the "
           "15 corruptions and 5 severities. ECE: 15 equal-width confidence bins, clean test set. RMS calib. "
           "err.: sqrt(sum_b (n_b/N)(acc_b - conf_b)^2) over the same 15 equal-width bins (AugMix's calib_err(p='2') "
           "uses adaptive bins of 100 confidence-sorted samples instead, so its values are not the same).", ""]
    if norm == "alexnet":
        out += [f"AlexNet references: its ImageNet-C errors from hendrycks/robustness; for relative mCE the "
                f"{ALEXNET_CLEAN_ERROR_SOURCE}.", ""]
    if summary["dataset"] != "imagenet-c" and norm == "alexnet":
        out += [f"Note: the AlexNet normalisers are ImageNet-C numbers; on {summary['dataset']} the CE/mCE "
                "columns only compare the runs below with each other (pass --baseline to normalise by one of them).",
                ""]
    return out


def _per_corruption(r: dict) -> list[float | None]:
    """CE per corruption, or (raw errors: nothing to normalise by) its mean top-1 error over the severities."""
    if r["normalisation"] != "none":
        return [r["ce"].get(c) for c in CORRUPTIONS]
    return [float(np.mean(list(r["errors"][c].values()))) if r["errors"].get(c) else None for c in CORRUPTIONS]


def _results_table(runs: list[dict]) -> list[str]:
    header = ["Method", "Run", "Clean err.", "mCE", "Rel. mCE", "Mean corr. err.", "ECE"] + \
        [SHORT_NAMES[c] for c in CORRUPTIONS]
    rows = []
    for r in runs:
        p = r["partial"]
        rows.append([r["display_name"], r["run_name"], format_percent(r["clean_error"]), _partial(r["mce"], p),
                     _relative(r), _partial(r["mean_corruption_error"], p),
                     format_percent(r["ece_clean"])] + [format_percent(v) for v in _per_corruption(r)])
    out = ["## Results", ""] + markdown_table(header, rows)
    notes = _relative_notes(runs)
    for r in runs:
        if r["partial"]:
            n = len(CORRUPTIONS) * len(SEVERITIES)
            notes.append(f"{PARTIAL_MARK} **Partial**: {r['display_name']} is missing {len(r['missing'])} of {n} "
                         f"(corruption/severity) cells ({', '.join(r['missing'])}); its means cover the cells "
                         "present and are not comparable with complete runs.")
        if r.get("skipped"):
            notes.append(f"**Skipped** ({r['display_name']}): "
                         + "; ".join(f"{cell}: {why}" for cell, why in r["skipped"].items()) + ".")
        if r.get("unreadable"):
            notes.append(f"**Unreadable files** ({r['display_name']}, skipped; each cell scored on the rest): "
                         + ", ".join(f"{cell}: {n}" for cell, n in r["unreadable"].items()) + ".")
    return out + ([""] + notes if notes else [])


def _error_tables(runs: list[dict]) -> list[str]:
    out = ["", "## Error by severity (mean top-1 error over the 15 corruptions)", ""]
    out += markdown_table(["Method", "Clean"] + [f"Severity {s}" for s in SEVERITIES],
                  [[r["display_name"], format_percent(r["clean_error"])]
                   + [format_percent(r["severity_errors"][str(s)]) for s in SEVERITIES] for r in runs])
    if any(r["extra_errors"] for r in runs):
        out += ["", "## Extra corruptions (held out; not part of mCE)", "",
                "Mean top-1 error over the 5 severities."]
        out += [""] + markdown_table(["Method"] + [SHORT_NAMES[c] for c in EXTRA_CORRUPTIONS] + ["Mean"],
                             [[r["display_name"]] + [format_percent(r["extra_errors"].get(c)) for c in EXTRA_CORRUPTIONS]
                              + [format_percent(r["extra_mean_error"])] for r in runs])
    out += ["", "## Calibration", ""]
    out += markdown_table(["Method", "ECE clean", "ECE corrupted (mean over cells)", "RMS calib. err. clean",
                   "RMS calib. err. corrupted (mean over cells)"],
                  [[r["display_name"], format_percent(r["ece_clean"]), format_percent(r["ece_corrupted_mean"]),
                    format_percent(r.get("rms_calibration_error_clean")),
                    format_percent(r.get("rms_calibration_error_corrupted_mean"))] for r in runs])
    return out


def _published(summary: dict[str, Any]) -> list[str]:
    out = ["", f"## {PUBLISHED_TITLE}", ""]
    if not summary["published"]:
        return out + [summary["published_omitted_reason"]]
    out += ["These rows are copied from the papers for orientation; no number in this block comes from "
            "the runs above.", ""]
    return out + markdown_table(["Method (ResNet-50, ImageNet)", "mCE", "Clean err.", "Note"],
                        [[p["method"], f"{p['mce']:.1f}", "—" if p["clean_error"] is None else f"{p['clean_error']:.1f}",
                          p["note"]] for p in summary["published"]])


def _markdown(summary: dict[str, Any], figures: dict[str, str]) -> str:
    runs = summary["runs"]
    out = _intro(summary) + _results_table(runs) + _error_tables(runs) + _published(summary)
    out += ["", "## Figures", ""] + ([] if figures else ["(not drawn: plots=False)", ""])
    for title, name in figures.items():
        out += [f"![{title}]({name})", ""]
    out += ["## Runs", ""]
    out += markdown_table(["Method", "Run", "Recipe (aug, extra roots)", "Checkpoint", "SHA-256", "Created", "Images/s"],
                  [[r["display_name"], r["run_name"], f"{r['aug']}, {', '.join(r['extra_roots']) or '—'}",
                    f"`{r['checkpoint']}`" if r["checkpoint"] else "—", (r["checkpoint_sha256"] or "—")[:12],
                    r["created"] or "—",
                    f"{r['throughput_images_per_s']:.1f}" if r["throughput_images_per_s"] else "—"] for r in runs])
    if summary["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in summary["warnings"]]
    out += ["", "Regenerate with `python -m apr.report <results.json ...> --out <dir>`; all numbers are in "
            "summary.json (percent, unrounded).", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots

def _plot_ce(runs: list[dict], path: Path, normalisation: str) -> None:
    fig = new_figure(max(9.0, 0.75 * len(CORRUPTIONS) + 0.3 * len(runs)), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    n = len(runs)
    width = 0.8 / n
    x = np.arange(len(CORRUPTIONS))
    cmap = colours(n)
    for i, r in enumerate(runs):
        values = [r["ce"].get(c, np.nan) for c in CORRUPTIONS]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, color=cmap[i],
               label=f"{r['display_name']} (mCE {_partial(r['mce'], r['partial'])})")
    ax.axhline(100.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([SHORT_NAMES[c] for c in CORRUPTIONS], rotation=45, ha="right")
    ref = "AlexNet" if normalisation == "alexnet" else normalisation.split(":", 1)[-1]
    ax.set_ylabel(f"CE (%), {ref} = 100")
    ax.set_title("Corruption error per corruption (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=8, ncol=min(3, n), frameon=False)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(n / 3), 1, 1))
    save_png(fig, path)


def _plot_severity(runs: list[dict], path: Path) -> None:
    ncols = max(len(v) for v in CORRUPTION_FAMILIES.values())
    fig = new_figure(3.2 * ncols, 2.7 * len(CORRUPTION_FAMILIES))
    palette = colours(len(runs))
    legend_ax = None
    for row, (family, names) in enumerate(CORRUPTION_FAMILIES.items()):
        for col in range(ncols):
            ax = fig.add_subplot(len(CORRUPTION_FAMILIES), ncols, row * ncols + col + 1)
            if col >= len(names):
                ax.axis("off")
                legend_ax = legend_ax or ax
                continue
            c = names[col]
            for i, r in enumerate(runs):
                sev = [0] + list(SEVERITIES)
                errs = [r["clean_error"]] + [r["errors"].get(c, {}).get(str(s), np.nan) for s in SEVERITIES]
                ax.plot(sev, [np.nan if e is None else e for e in errs], marker="o", ms=3, color=palette[i],
                        label=r["display_name"])
            ax.set_title(f"{family}: {c}", fontsize=9)
            ax.set_xticks([0] + list(SEVERITIES))
            ax.set_xticklabels(["clean"] + [str(s) for s in SEVERITIES], fontsize=7)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("top-1 error (%)", fontsize=8)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    (legend_ax or fig).legend(handles, labels, loc="center", fontsize=8)
    fig.suptitle("Top-1 error vs severity", fontsize=11)
    fig.tight_layout()
    save_png(fig, path)


# --------------------------------------------------------------------------- entry points

def corruption_report(results: Sequence[Any], out: Path, baseline: Any = None, plots: bool = True
                      ) -> tuple[str, dict[str, Any]]:
    """The corruption part of the report: its Markdown and summary, with its PNGs written into ``out``.
    ``baseline``: None (AlexNet), a run name, a method label, a results path or dict."""
    summary = summarize(results, baseline)
    figures = {"CE per corruption": "ce_per_corruption.png", "Error vs severity": "error_vs_severity.png"}
    if summary["normalisation"] == "none":
        del figures["CE per corruption"]  # raw errors: no CE to draw
    if plots:
        if "CE per corruption" in figures:
            _plot_ce(summary["runs"], out / figures["CE per corruption"], summary["normalisation"])
        _plot_severity(summary["runs"], out / figures["Error vs severity"])
    else:
        figures = {}
    summary["figures"] = list(figures.values())
    return _markdown(summary, figures), summary
