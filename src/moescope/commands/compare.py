"""`moescope compare OUT1 OUT2 ... --out DIR`: several analyses on one page."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="put several analysed runs or models side by side on one page",
                       description="Per-layer NMI, specialization, load and entropy of several analyses (two models, "
                                   "or checkpoints of one model) on one self-contained page; with --saturation, "
                                   "router saturation against a reference analysis from the saved routing tables.")
    p.add_argument("outs", nargs="+", metavar="OUT", help="analysed directories (holding analysis/metrics.json)")
    p.add_argument("--out", required=True, help="directory for comparison.html, summary.md, comparison.json")
    p.add_argument("--label", action="append", default=None,
                   help="name of each analysis on the page, once per OUT in order (default: directory names)")
    p.add_argument("--saturation", action="store_true",
                   help="router saturation |TopK ∩ TopK_ref| / k per layer (needs the same tokens in every analysis)")
    p.add_argument("--reference", default=None, help="label of the reference analysis for saturation (default: last)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moescope.report.compare import build_comparison

    path = build_comparison(args.outs, args.out, labels=args.label, saturation=args.saturation,
                            reference=args.reference)
    print(f"compare: {path}")
    return 0
