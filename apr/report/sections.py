"""The registry of report sections beyond corruptions: each renders the results of one schema.

A section module (``apr/report/ood.py``, ``adversarial.py``, ``shift.py``, ...) calls :func:`register`
at import with the schema it reads; ``apr.report.write_report`` sends it every results file of that
schema and appends what it returns. A section never needs a model or a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["Section", "register", "unregister", "registered"]

# (results as [(result dict, source path)], output folder, draw plots?) -> (Markdown, summary block)
Render = Callable[[list[tuple[dict, str]], Path, bool], tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Section:
    name: str  # key of its block in summary.json["sections"]
    schema: str  # the results schema it renders, e.g. "apr.ood/1"
    render: Render


_SECTIONS: dict[str, Section] = {}


def register(name: str, schema: str, render: Render) -> Section:
    if schema in _SECTIONS and _SECTIONS[schema].name != name:
        raise ValueError(f"schema {schema!r} already has the report section {_SECTIONS[schema].name!r}")
    _SECTIONS[schema] = Section(name, schema, render)
    return _SECTIONS[schema]


def unregister(schema: str) -> None:
    _SECTIONS.pop(schema, None)


def registered() -> dict[str, Section]:
    """Schema -> section, in registration order (the order of the sections in report.md)."""
    return dict(_SECTIONS)
