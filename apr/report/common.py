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
           "markdown_table", "new_figure", "save_png", "colours"]

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
