"""`moescope analyze RUN`: routing metrics with intervals and p-values for every arm of a run."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="capture routing on the eval split and write analysis/metrics.json and viewer.json",
        description=(
            "For every arm of a finished run: eval loss per domain, and per MoE layer NMI(domain; expert) with a "
            "block-bootstrap interval and a permutation p-value, P(expert | domain), load and router entropy, "
            "consecutive-token repetition, vocabulary and token-type specialization, router saturation over the "
            "saved snapshots and the Problem:/Solution: format test. Writes RUN/analysis/."
        ),
    )
    p.add_argument("run", metavar="RUN", help="run directory written by `moescope train`")
    p.add_argument("--data", metavar="DIR", help="data directory (default: the one the run recorded)")
    p.add_argument("--arms", help="comma-separated arms to analyse (default: all)")
    p.add_argument("--config", help="config file (.toml/.yaml/.json) mapping onto AnalyzeConfig")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. --set statistics.n_resamples=2000 (repeatable)")
    p.add_argument("--max-blocks-per-domain", type=int, help="eval blocks per domain to capture (default: all)")
    p.add_argument("--resamples", type=int, help="bootstrap resamples (default 1000)")
    p.add_argument("--permutations", type=int, help="permutations for the NMI p-value (default 1000)")
    p.add_argument("--seed", type=int, help="seed of bootstrap and permutations (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    """Config file, then --set overrides, then the dedicated flags (last wins)."""
    from moescope.analysis.pipeline import AnalyzeConfig
    from moescope.io.config import deep_merge, from_dict, load_config_file, parse_overrides

    raw = load_config_file(args.config) if args.config else {}
    flags = {
        "max_blocks_per_domain": args.max_blocks_per_domain,
        "statistics.n_resamples": args.resamples,
        "statistics.n_permutations": args.permutations,
        "statistics.seed": args.seed,
    }
    flag_overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    raw = deep_merge(raw, parse_overrides(list(args.overrides) + flag_overrides))
    return from_dict(AnalyzeConfig, raw)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moescope.analysis.pipeline import analyze_run

    cfg = build_config(args)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    result = analyze_run(Path(args.run), cfg, arms=arms, data_dir=args.data, progress=not args.no_progress)
    for name, arm in result["arms"].items():
        loss = arm["eval_loss"]["token_weighted"]
        line = f"{name:<12} eval loss {loss['estimate']:.3f} [{loss['low']:.3f}, {loss['high']:.3f}]"
        head = arm.get("headline")
        if head:
            nmi = head["nmi"]
            line += (f"  NMI {nmi['estimate']:.3f} [{nmi['low']:.3f}, {nmi['high']:.3f}] p={head['nmi_pvalue']:.4f}"
                     f" (layer {head['best_layer']})  max load CV {head['load_cv_max']:.2f}")
        print(line)
    print(f"wrote {Path(args.run) / 'analysis' / 'metrics.json'} and viewer.json")
    return 0
