"""What every report section shares: labels of runs, percent formatting, Markdown tables, figures.

Sections (corruption, OOD, adversarial, distribution shift) render from results JSON alone: no
model, no GPU. Figures are drawn on matplotlib's Agg canvas (no display, no global backend switch)
and written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apr.errors import UserError

__all__ = ["AUG_LABELS", "LABEL_ORDER", "ReportError", "format_percent", "pct", "recipe", "run_label",
           "markdown_table", "new_figure", "save_png", "colours", "name_runs",
           "check_count", "check_fraction"]

AUG_LABELS = {"none": "baseline", "apr_p": "APR-P", "apr_s": "APR-S", "apr_sp": "APR-SP"}
LABEL_ORDER = ["baseline", "APR-P", "APR-S", "APR-SP", "DeepAugment", "DeepAugment + APR-P",
                "DeepAugment + APR-S", "DeepAugment + APR-SP"]


class ReportError(UserError, ValueError):
    """Results that cannot go into one report (unreadable file, foreign schema, mixed datasets...)."""


def format_percent(value: float | None) -> str:
    """The one formatting of every percentage in report.md: 2 decimals, an em dash for n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2f}"


def pct(fraction: Any) -> float | None:
    return None if fraction is None else 100.0 * float(fraction)


def recipe(result: Mapping[str, Any]) -> tuple[str, list[str]]:
    config = result.get("config") or {}
    aug = result.get("aug") or (config.get("aug") or {}).get("name") or "none"
    extra = result.get("extra_roots")
    if extra is None:
        extra = (config.get("data") or {}).get("extra_roots") or []
    return str(aug), [str(e) for e in extra]


def run_label(result: Mapping[str, Any]) -> str:
    """The method name of a run from its saved recipe: 'baseline', 'APR-SP', 'DeepAugment + APR-SP'..."""
    aug, extra = recipe(result)
    label = AUG_LABELS.get(aug, aug)
    if extra:
        label = "DeepAugment" if aug == "none" else f"DeepAugment + {label}"
    return label


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def new_figure(width: float, height: float):
    """A pyplot-free figure on the Agg canvas: no display, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> None:
    from apr.io import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


def colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def name_runs(runs: list[dict]) -> list[dict]:
    """Run summaries (with ``label``, ``run_name``, ``source``) in method order, each given its
    ``display_name``: the method label, plus the run name where two runs share a recipe (and the
    file name where they share that too). Every section names its runs this way."""
    order = {label: i for i, label in enumerate(LABEL_ORDER)}
    runs = [run for _, run in sorted(enumerate(runs), key=lambda t: (order.get(t[1]["label"], len(order)), t[0]))]
    counts: dict[str, int] = {}
    for run in runs:
        counts[run["label"]] = counts.get(run["label"], 0) + 1
    for run in runs:
        run["display_name"] = run["label"] if counts[run["label"]] == 1 else f"{run['label']} ({run['run_name']})"
    if len({run["display_name"] for run in runs}) != len(runs):
        for run in runs:
            run["display_name"] = f"{run['label']} ({run['run_name']}, {Path(run['source']).name})"
    return runs


def check_count(value: Any, where: str, *, positive: bool = True) -> int:
    """A number of images read from a results file: an int > 0 (>= 0 if not ``positive``), else ReportError."""
    low = 1 if positive else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ReportError(f"{where} must be a number of images >= {low}, got {value!r}; re-run the evaluation "
                          "(the file was edited or written by another tool)")
    return value


def check_fraction(value: Any, where: str) -> float:
    """A rate read from a results file: a finite number in [0, 1], else ReportError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ReportError(f"{where} must be a fraction in [0, 1], got {value!r}; re-run the evaluation "
                          "(the file was edited or written by another tool)")
    return float(value)
