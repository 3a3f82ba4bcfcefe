"""`moescope demo`: the whole study in one command."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole study offline: data, dense base, dense/MoE/no-LB arms, analysis, report",
                       description="Build the built-in corpus, train a dense base and the dense / moe / moe-nolb arms "
                                   "at matched compute, analyse routing on held-out data and write an HTML report. "
                                   "`--scale gpt2` runs the same study on pretrained GPT-2 with Hugging Face data (GPU).")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--scale", default="demo", help="preset: demo (offline CPU) or gpt2 (pretrained GPT-2, HF data, GPU), "
                                                 "or a TOML/YAML file with [data], [experiment], [analysis] tables")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. --set experiment.train.steps=200 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --out and start over")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="run the study over N seeds (experiment.train.seed, +1, ...) and report the between-seed "
                        "spread (default 1: one run, the layout above)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="with --seeds > 1: seeds run at once in separate processes (torch threads = cores / N)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moescope.demo import format_summary_table, load_demo_config, run_demo
    from moescope.io.config import parse_overrides

    cfg = load_demo_config(args.scale, parse_overrides(args.overrides))
    if args.seeds != 1:
        from moescope.demo import format_seeds_table, run_demo_seeds

        result = run_demo_seeds(cfg, args.out, args.seeds, overwrite=args.overwrite, workers=args.workers)
        print()
        print(format_seeds_table(result["seeds_table"]))
        print(f"\ntime: {result['wall_s']:.0f} s wall for this invocation ({result['cell_seconds']:.0f} s summed over "
              f"seeds)")
        print("reports: " + ", ".join(result["reports"]))
        return 0
    result = run_demo(cfg, args.out, overwrite=args.overwrite)
    t = result["timings"]
    print()
    print(format_summary_table(result["rows"]))
    print(f"\ntime: data {t['data_s']:.0f} s, training {t['train_s']:.0f} s, analysis {t['analyze_s']:.0f} s, "
          f"clustering {t.get('cluster_s', 0):.0f} s, report {t['report_s']:.0f} s")
    print(f"report: {result['report']}")
    return 0
