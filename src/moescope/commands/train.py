"""`moescope train CONFIG [--set key=value ...] [--experiment] [--arm NAME] [--resume] [--base gpt2|DIR] --out RUN`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the base stage and the dense / MoE / no-LB arms at matched compute",
        description=(
            "Train from a TOML/YAML config. Without --experiment one arm (--arm, default 'moe') is "
            "trained; with --experiment every arm in the config's `arms` list. All arms share data order, "
            "steps, tokens, schedule and seeds. Under `accelerate launch -m moescope.cli train ...` the "
            "same command runs data-parallel."
        ),
    )
    p.add_argument("config", help="experiment config (.toml, .yaml or .json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 --set moe.top_k=2")
    p.add_argument("--experiment", action="store_true", help="run every arm listed in the config")
    p.add_argument("--arm", action="append", default=None, metavar="NAME",
                   help="arm(s) to run (default: moe; ignored with --experiment)")
    p.add_argument("--resume", action="store_true", help="continue RUN from its latest checkpoints")
    p.add_argument("--base", default=None, metavar="gpt2|DIR",
                   help="start the arms from pretrained weights instead of a dense base stage from scratch")
    p.add_argument("--data", default=None, metavar="DIR", help="data directory (overrides data_dir)")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moescope.train.config import load_experiment_config
    from moescope.train.experiment import run_experiment
    from moescope.train.trainer import TrainingInterrupted

    overrides = list(args.overrides)
    if args.base is not None:
        overrides.append(f"base.init={args.base}")
    if args.data is not None:
        overrides.append(f"data_dir={args.data}")
    cfg = load_experiment_config(args.config, overrides)
    arms = None if args.experiment else (args.arm or ["moe"])
    try:
        summary = run_experiment(cfg, Path(args.out), resume=args.resume, arms=arms)
    except TrainingInterrupted as exc:
        print(f"moescope: {exc}", file=sys.stderr)
        return 130
    rows = [(name, s["final_eval"]["loss"]["token_weighted"], s["final_eval"]["loss"]["domain_weighted"],
             s.get("train_tokens_per_s")) for name, s in summary.items()]
    print(f"{'run':<12} {'eval loss (tok)':>16} {'eval loss (dom)':>16} {'tokens/s':>10}")
    for name, a, b, tps in rows:
        # tps is None when no step was timed (e.g. a run resumed from its final checkpoint by an older moescope)
        print(f"{name:<12} {a:>16.4f} {b:>16.4f} {'-' if tps is None else f'{tps:,.0f}':>10}")
    print(json.dumps({"run_dir": args.out}))
    return 0
