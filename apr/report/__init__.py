"""Results JSON files -> ``report.md`` + PNG plots + ``summary.json``, with no model and no GPU.

One report, several sections, each rendered from the results files of its schema alone:
corruptions (``apr.eval/1``, :mod:`apr.report.corruption`: CE / mCE normalised here and only here)
and every section in :mod:`apr.report.sections`' registry (OOD, adversarial, distribution shift).
Every number in ``report.md`` is ``format_percent`` of the matching value in ``summary.json``.

    python -m apr.report report/*.json --out report/ [--baseline NAME_OR_PATH]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from apr.io import atomic_write_json, atomic_write_text
from apr.report.common import (AUG_LABELS, ReportError, format_percent, markdown_table, new_figure, run_label,
                               save_png)
from apr.report.corruption import (PARTIAL_MARK, PUBLISHED_MCE, PUBLISHED_TITLE, RESULTS_SCHEMA, SHORT_NAMES,
                                   SUMMARY_SCHEMA, check_result, corruption_report, load_result, load_results,
                                   metrics_for, resolve_baseline, summarize)
from apr.report.sections import registered
# importing a section registers it; the order here is the order of the sections in report.md
from apr.report import shift as _shift_section  # noqa: E402,F401
from apr.report import ood as _ood_section  # noqa: E402,F401
from apr.report import adversarial as _adversarial_section  # noqa: E402,F401

__all__ = [
    "RESULTS_SCHEMA", "SUMMARY_SCHEMA", "SHORT_NAMES", "AUG_LABELS", "PUBLISHED_TITLE", "PUBLISHED_MCE",
    "PARTIAL_MARK", "ReportError", "format_percent", "markdown_table", "new_figure", "save_png", "run_label",
    "load_result", "check_result", "load_results", "resolve_baseline", "metrics_for", "summarize",
    "sort_by_schema", "write_report", "main",
]


def _schema_of(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("schema") if isinstance(data, dict) else None


def sort_by_schema(items: Sequence[Any]) -> dict[str, list[Any]]:
    """Results dicts, JSON paths and folders (every ``*.json`` in them) grouped by their ``schema``.

    A file named explicitly must be of a known schema; files in a folder that are not (configs,
    summaries) are passed over."""
    known = {RESULTS_SCHEMA, *registered()}
    groups: dict[str, list[Any]] = {}
    for item in items:
        if isinstance(item, Mapping):
            groups.setdefault(str(item.get("schema")), []).append(item)
            continue
        path = Path(item)
        if path.is_dir():
            for found in sorted(path.glob("*.json")):
                schema = _schema_of(found)
                if schema in known:
                    groups.setdefault(schema, []).append(found)
            continue
        groups.setdefault(_schema_of(path) if path.is_file() else RESULTS_SCHEMA, []).append(path)
    unknown = sorted(set(groups) - known)
    if unknown:
        raise ReportError(f"{groups[unknown[0]][0]}: not an evaluation results file this report knows (schema {unknown[0]!r}; "
                          f"known: {', '.join(sorted(known))})")
    if not groups:
        raise ReportError("no results given" if not items else f"no results files in {', '.join(map(str, items))}")
    return groups


def write_report(results: Sequence[Any], out_dir: str | Path, baseline: Any = None, plots: bool = True) -> Path:
    """Write ``report.md``, its PNGs and ``summary.json`` into ``out_dir``; returns the path of report.md.

    ``baseline`` (corruptions only): None (AlexNet), a run name, a method label, a results path or dict.
    ``plots=False`` skips the PNGs (tables only)."""
    groups = sort_by_schema(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts, summary = [], {"schema": SUMMARY_SCHEMA}
    if RESULTS_SCHEMA in groups:
        markdown, corruption = corruption_report(groups[RESULTS_SCHEMA], out, baseline, plots)
        parts.append(markdown)
        summary.update(corruption)
    summary["sections"] = {}
    for schema, section in registered().items():
        if schema in groups:
            markdown, block = section.render([(load_any(item, schema), "<dict>" if isinstance(item, Mapping)
                                               else str(item)) for item in groups[schema]], out, plots)
            parts.append(markdown)
            summary["sections"][section.name] = block
    atomic_write_json(out / "summary.json", summary, indent=1)
    report = out / "report.md"
    atomic_write_text(report, "\n".join(parts))
    return report


def load_any(item: Any, schema: str) -> dict:
    """A results dict of ``schema`` from a dict or a JSON path (ReportError when unreadable)."""
    if isinstance(item, Mapping):
        return dict(item)
    try:
        data = json.loads(Path(item).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{item}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != schema:
        raise ReportError(f"{item}: expected a {schema} results file")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    from apr.cli import add_common

    p = argparse.ArgumentParser(
        prog="python -m apr.report",
        description="Build report.md, plots and summary.json from results JSON files: corruption evaluation "
                    "(eval_imagenet_c.py), OOD detection (python -m apr.ood), adversarial evaluation "
                    "(python -m apr.adversarial). No model or GPU needed.")
    p.add_argument("results", nargs="+", help="results JSON files, or folders holding them")
    add_common(p, "out", required=["out"])  # report.md, the PNGs and summary.json
    p.add_argument("--no-plots", action="store_true", help="tables only, no PNGs")
    p.add_argument("--baseline", default=None, metavar="NAME_OR_PATH",
                   help="normalise CE by this run instead of AlexNet: a run name, a method label "
                        "(e.g. 'baseline') or a results JSON path")
    args = p.parse_args(argv)
    report = write_report(args.results, args.out, baseline=args.baseline, plots=not args.no_plots)
    print(report)
    return 0
