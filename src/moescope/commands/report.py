"""`moescope report RUN`: the self-contained HTML report of an analysed run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write RUN/report/report.html (plots, tables, token viewer) from RUN/analysis",
                       description="Write the self-contained HTML report, its PNG figures and a Markdown summary "
                                   "from a run analysed with `moescope analyze`.")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="report directory (default: RUN/report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moescope.report.build import build_report

    print(f"report: {build_report(args.run, args.out)}")
    return 0
