"""What a report says, independent of how it is rendered (HTML or Markdown)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    title: str
    png_path: Path
    caption: str = ""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    anchor: str = ""


@dataclass
class ReportContent:
    title: str
    subtitle: str = ""
    headline: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    # viewer.json content (see analysis `moescope analyze`): {"arms": {arm: {...}}}
    viewer: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
