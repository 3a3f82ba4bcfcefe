"""Write a report directory: report.html (self-contained), summary.md and figures/*.png."""

from __future__ import annotations

import shutil
from pathlib import Path

from moescope.io.atomic import atomic_write_text
from moescope.report.content import ReportContent
from moescope.report.html import render_html, render_markdown


def write_report(content: ReportContent, out_dir: str | Path) -> Path:
    """Write the report files into `out_dir`; returns the path of report.html."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for sec in content.sections:
        for fig in sec.figures:
            src = Path(fig.png_path)
            dst = fig_dir / src.name
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
    atomic_write_text(out_dir / "summary.md", render_markdown(content))
    return atomic_write_text(out_dir / "report.html", render_html(content))
