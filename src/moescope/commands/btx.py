"""`moescope btx`: branches trained apart from one dense base, merged (BTX) or ensembled (c-BTM)."""

from __future__ import annotations

import argparse
from typing import Any

STAGES = ("run", "branch", "merge", "compare")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "btx",
        help="branch-train-mix: one dense branch per partition, merged into an MoE or ensembled (c-BTM)",
        description="Stages: branch (base + partitions + one dense model per partition), merge (BTX MoE + brief "
        "fine-tune), compare (per-domain held-out loss of dense / merged / c-BTM at matched compute); "
        "run = all of them. Every stage resumes where a previous call stopped.",
    )
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--data", help="built data directory (overrides data_dir of the config)")
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--config", help="BTXConfig file (.toml/.yaml/.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set branch_steps=200 (repeatable)")
    p.add_argument("--embedding-cache", help="embedding cache directory (default ~/.cache/moescope/embeddings)")
    p.set_defaults(func=run_btx)


def load_btx_config(args: argparse.Namespace):
    from moescope.btx.config import BTXConfig
    from moescope.io.config import layered_config

    return layered_config(BTXConfig, args.config, args.overrides, {"data_dir": args.data or None})


def run_btx(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moescope.btx import pipeline
    from moescope.partition.embedding import default_cache_dir

    cfg = load_btx_config(args)
    out = Path(args.out)
    cache = Path(args.embedding_cache) if args.embedding_cache else default_cache_dir()
    if args.stage == "run":
        result = pipeline.run_study(cfg, out, embedding_cache=cache)
    else:
        pipeline.prepare_study(cfg, out)
        base = pipeline.run_base(cfg, out)
        result = None
        for strategy in cfg.strategies:
            if args.stage == "branch":
                pipeline.run_partitions(cfg, out, strategy, embedding_cache=cache)
                pipeline.run_branches(cfg, out, strategy, base)
            elif args.stage == "merge":
                branches = pipeline.branch_dirs(cfg, out, strategy)
                pipeline.run_merge(cfg, out, strategy, branches)
        if args.stage == "merge":
            pipeline.run_dense_baseline(cfg, out, base)
        if args.stage == "compare":
            result = pipeline.compare(cfg, out, embedding_cache=cache)
    if result is not None:
        print((out / "comparison.md").read_text())
    else:
        print(json.dumps({"stage": args.stage, "out": str(out)}))
    return 0
