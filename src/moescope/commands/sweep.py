"""`moescope sweep CONFIG --grid key=v1,v2 ... --seeds 0,1,2 --out DIR [--workers N] [--executor slurm]`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="run a study over a grid of settings and several seeds (resumable), then one summary",
        description="Every cell (one combination of --grid values, one seed) is the study of `moescope demo` "
                    "without the report: dense base, arms at matched compute, analysis with the paired loss "
                    "difference. Finished cells are never re-run; rerun the same command to continue a killed "
                    "sweep. Writes OUT/summary.md, OUT/summary.json and OUT/figures/ (means over seeds with "
                    "t-intervals).")
    p.add_argument("config", help="a preset (demo, gpt2) or a sweep file: study tables ([data], [experiment], "
                                  "[analysis]) plus an optional [sweep] table (study, grid, seeds)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis, e.g. --grid experiment.moe.upcycle_noise_rel=0,0.5,1.0 (repeatable; "
                        "replaces the file's axis of the same key)")
    p.add_argument("--seeds", default=None, metavar="S1,S2", help="experiment.train.seed values, e.g. 0,1,2")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a study setting in every cell, e.g. --set experiment.train.steps=50")
    p.add_argument("--out", required=True, help="sweep directory (reused: finished cells are kept)")
    p.add_argument("--workers", type=int, default=1,
                   help="cells run at once in separate processes on this machine (torch threads = cores / N)")
    p.add_argument("--executor", default="local", choices=["local", "submitit-local", "slurm"],
                   help="local (default; --workers), slurm (submitit, needs the sweep extra) or submitit-local "
                        "(submitit's LocalExecutor: the slurm code path on this machine)")
    p.add_argument("--executor-param", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit parameter, e.g. timeout_min=120, slurm_partition=gpu, cpus_per_task=8")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moescope.errors import MoescopeError
    from moescope.io.config import parse_overrides
    from moescope.sweep.runner import format_markdown, load_sweep, run_sweep

    seeds = None
    if args.seeds is not None:
        items = [s.strip() for s in args.seeds.split(",")]
        if not all(s.lstrip("+").isdigit() for s in items):  # no empty item, no sign, no word
            raise MoescopeError(f"--seeds {args.seeds!r}: expected integers >= 0 separated by commas")
        seeds = [int(s) for s in items]
    study, scfg = load_sweep(args.config, args.grid, seeds, parse_overrides(args.overrides))
    params = parse_overrides(args.executor_param)
    summary = run_sweep(study, scfg, args.out, workers=args.workers, executor=args.executor, executor_params=params)
    print()
    print(format_markdown(summary["rows"], scfg, summary.get("contrasts", [])))
    print(f"\n{summary['n_cells_finished']} cells finished; this invocation {summary['wall_s_this_invocation']:.0f} s; "
          f"cells' own time {summary['cell_seconds']:.0f} s in total")
    print(f"summary: {args.out}/summary.md")
    return 0
