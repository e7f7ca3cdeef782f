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
import warnings
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
    "sort_by_schema", "check_item", "write_report", "main",
]


def _schema_of(path: Path) -> str | None:
    """The ``schema`` of a JSON file (None for JSON without one); ReportError for a file that is not JSON."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a readable JSON file ({exc})") from None
    return data.get("schema") if isinstance(data, dict) else None


# what a section raises on a hand-edited file of its schema whose values have the wrong type or shape
_CONTENT_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError)


def check_item(item: Any, schema: str, out: Path | None = None) -> None:
    """Read ``item`` as its section reads it (tables only), so that a broken or hand-edited file is one
    ReportError naming it instead of a traceback (or a silently empty column) in the middle of a report."""
    source = "<dict>" if isinstance(item, Mapping) else str(item)
    try:
        if schema == RESULTS_SCHEMA:
            summarize([item])
        else:
            registered()[schema].render([(load_any(item, schema), source)], out or Path("."), False)
    except ReportError:
        raise
    except _CONTENT_ERRORS as exc:
        raise ReportError(f"{source}: a {schema} results file with values of the wrong type or shape "
                          f"({type(exc).__name__}: {exc}); re-run the evaluation that wrote it "
                          "(the file was edited or written by another tool)") from None


def _broken(exc: ReportError, skip_broken: bool) -> None:
    """A results file that cannot be read: the report stops naming it, or it is left out with a warning."""
    if not skip_broken:
        raise ReportError(f"{exc} (or pass --skip-broken to report the other files)") from None
    warnings.warn(f"left out of the report: {exc}", stacklevel=3)


def _render_checked(render, items: list, schema: str, skip_broken: bool):
    """``render(items)``; when it fails, the files it cannot read are found one by one (:func:`check_item`)
    and named, or left out with ``skip_broken``. A failure no single file explains is raised as it is."""
    try:
        return render(items)
    except (ReportError, *_CONTENT_ERRORS) as exc:
        broken = []
        for item in items:
            try:
                check_item(item, schema)
            except ReportError as why:
                broken.append((item, why))
        if not broken:
            raise exc from None
        for _, why in broken:
            _broken(why, skip_broken)
        rest = [item for item in items if item not in [b for b, _ in broken]]
        if not rest:
            raise ReportError(f"every {schema} results file given is broken: nothing to report") from None
        return render(rest)


def sort_by_schema(items: Sequence[Any], skip_broken: bool = False) -> dict[str, list[Any]]:
    """Results dicts, JSON paths and folders (every ``*.json`` in them) grouped by their ``schema``.

    A file named explicitly must be of a known schema; JSON files in a folder that have no known schema
    (configs, summaries) are passed over. A file that is not JSON stops the report naming it, or with
    ``skip_broken`` is left out with a warning that names it."""
    known = {RESULTS_SCHEMA, *registered()}
    groups: dict[str, list[Any]] = {}

    def keep(path: Path, in_folder: bool) -> None:
        try:
            schema = _schema_of(path) if path.is_file() else RESULTS_SCHEMA  # a missing file: its loader says so
        except ReportError as exc:
            _broken(exc, skip_broken)
            return
        if schema in known or not in_folder:
            groups.setdefault(schema, []).append(path)

    for item in items:
        if isinstance(item, Mapping):
            groups.setdefault(str(item.get("schema")), []).append(item)
        elif Path(item).is_dir():
            for found in sorted(Path(item).glob("*.json")):
                keep(found, in_folder=True)
        else:
            keep(Path(item), in_folder=False)
    unknown = sorted(set(groups) - known)
    if unknown:
        raise ReportError(f"{groups[unknown[0]][0]}: not an evaluation results file this report knows (schema {unknown[0]!r}; "
                          f"known: {', '.join(sorted(known))})")
    if not groups:
        raise ReportError("no results given" if not items else f"no results files in {', '.join(map(str, items))}")
    return groups


def write_report(results: Sequence[Any], out_dir: str | Path, baseline: Any = None, plots: bool = True,
                 skip_broken: bool = False) -> Path:
    """Write ``report.md``, its PNGs and ``summary.json`` into ``out_dir``; returns the path of report.md.

    ``baseline`` (corruptions only): None (AlexNet), a run name, a method label, a results path or dict.
    ``plots=False`` skips the PNGs (tables only). ``skip_broken``: leave out (with a warning) results
    files that cannot be read instead of stopping."""
    from apr.results import check_output_folder

    out = check_output_folder(out_dir)
    groups = sort_by_schema(results, skip_broken)
    parts, summary = [], {"schema": SUMMARY_SCHEMA}
    if RESULTS_SCHEMA in groups:
        markdown, corruption = _render_checked(lambda items: corruption_report(items, out, baseline, plots),
                                               groups[RESULTS_SCHEMA], RESULTS_SCHEMA, skip_broken)
        parts.append(markdown)
        summary.update(corruption)
    summary["sections"] = {}
    for schema, section in registered().items():
        if schema in groups:
            markdown, block = _render_checked(
                lambda items: section.render([(load_any(item, schema), "<dict>" if isinstance(item, Mapping)
                                               else str(item)) for item in items], out, plots),
                groups[schema], schema, skip_broken)
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
    p.add_argument("--skip-broken", action="store_true",
                   help="leave out results files that cannot be read (each named in a warning) instead of stopping")
    args = p.parse_args(argv)
    report = write_report(args.results, args.out, baseline=args.baseline, plots=not args.no_plots,
                          skip_broken=args.skip_broken)
    print(report)
    return 0
