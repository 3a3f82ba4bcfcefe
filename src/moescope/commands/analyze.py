"""`moescope analyze RUN` (every arm of a moescope run) or `moescope analyze --model ID_OR_DIR` (a released
MoE model on held-out texts): routing metrics with intervals and p-values, the viewer and the report."""

from __future__ import annotations

import argparse
from typing import Any



def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="capture routing on the eval split and write analysis/metrics.json and viewer.json",
        description=(
            "For every arm of a finished run: eval loss per domain, and per MoE layer NMI(domain; expert) with a "
            "bootstrap interval and a permutation p-value (both over source documents: the blocks of one document move "
            "together), P(expert | domain), load and router entropy, "
            "consecutive-token repetition, vocabulary and token-type specialization, router saturation over the "
            "saved snapshots and the Problem:/Solution: format test. Writes RUN/analysis/. "
            "With --model ID_OR_DIR instead of RUN: any transformers MoE causal LM (Mixtral, OLMoE, Qwen-MoE, "
            "DeepSeek, GPT-OSS, Granite-MoE, PhiMoE, DBRX, Jamba, ...) on the held-out texts of --data (or --texts), "
            "re-tokenized by the model's tokenizer; writes OUT/analysis/ and OUT/report/report.html."
        ),
    )
    p.add_argument("run", metavar="RUN", nargs="?", help="run directory written by `moescope train`")
    p.add_argument("--data", metavar="DIR",
                   help="data directory (default: the one the run recorded; with --model: its held-out texts)")
    released = p.add_argument_group("released models (--model)")
    released.add_argument("--model", metavar="ID_OR_DIR", help="hub id or local directory of an MoE causal LM")
    released.add_argument("--out", metavar="DIR", help="output directory (with --model)")
    released.add_argument("--name", help="name of the model in metrics and report (default: last path part)")
    released.add_argument("--texts", metavar="FILE.jsonl", help='held-out texts as {"text", "domain"} rows; an optional "document" field names the '
                          'source document (rows of one document move together in the intervals)')
    released.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="weights dtype (default auto)")
    released.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto (cuda: all visible GPUs)")
    released.add_argument("--context", type=int, metavar="N", help="tokens per block (default min(512, model's))")
    released.add_argument("--batch-blocks", type=int, metavar="N", help="blocks per forward pass (default 4)")
    released.add_argument("--force", action="store_true", help="load even when the memory estimate says no")
    released.add_argument("--revision", metavar="REV",
                          help="hub branch, tag or commit of --model (e.g. an OLMoE pretraining checkpoint)")
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


def build_config(args: argparse.Namespace, released: bool = False) -> Any:
    """Config file, then --set overrides, then the dedicated flags (last wins)."""
    from moescope.analysis.pipeline import AnalyzeConfig
    from moescope.analysis.released import ReleasedConfig
    from moescope.io.config import layered_config

    flags = {
        "max_blocks_per_domain": args.max_blocks_per_domain,
        "statistics.n_resamples": args.resamples,
        "statistics.n_permutations": args.permutations,
        "statistics.seed": args.seed,
    }
    if released:
        flags.update({"context_tokens": args.context, "dtype": args.dtype, "device": args.device,
                      "batch_blocks": args.batch_blocks, "revision": args.revision})
    return layered_config(ReleasedConfig if released else AnalyzeConfig, args.config, args.overrides, flags,
                          flag_names=FLAG_NAMES)


FLAG_NAMES = {"max_blocks_per_domain": "--max-blocks-per-domain", "statistics.n_resamples": "--resamples",
              "statistics.n_permutations": "--permutations", "statistics.seed": "--seed",
              "context_tokens": "--context", "batch_blocks": "--batch-blocks"}


def run_released(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moescope.analysis.released import analyze_released
    from moescope.errors import MoescopeError

    if args.run is not None or args.arms:
        raise MoescopeError("--model analyses one released model: drop RUN and --arms")
    if not args.out:
        raise MoescopeError("--model needs --out DIR")
    cfg = build_config(args, released=True)
    result = analyze_released(args.model, args.out, data_dir=args.data, texts_file=args.texts, name=args.name,
                              cfg=cfg, force=args.force, progress=not args.no_progress)
    _print_summary(result)
    print(f"wrote {Path(args.out) / 'analysis' / 'metrics.json'} and {Path(args.out) / 'report' / 'report.html'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moescope.analysis.pipeline import analyze_run
    from moescope.errors import MoescopeError

    if args.model:
        return run_released(args)
    if args.run is None:
        raise MoescopeError("pass a run directory RUN, or --model ID_OR_DIR --data DIR --out DIR")
    released_only = [flag for flag, value in (("--out", args.out), ("--name", args.name), ("--texts", args.texts),
                                              ("--dtype", args.dtype), ("--device", args.device),
                                              ("--context", args.context), ("--force", args.force),
                                              ("--revision", args.revision)) if value]
    if released_only:
        verb = "applies" if len(released_only) == 1 else "apply"
        raise MoescopeError(f"{', '.join(released_only)} only {verb} with --model (a released model), not with RUN")
    cfg = build_config(args)
    arms = [a.strip() for a in args.arms.split(",")] if args.arms is not None else None  # empty items refused there
    result = analyze_run(Path(args.run), cfg, arms=arms, data_dir=args.data, progress=not args.no_progress)
    _print_summary(result)
    print(f"wrote {Path(args.run) / 'analysis' / 'metrics.json'} and viewer.json")
    return 0


def _print_summary(result: dict) -> None:
    from moescope.report.fmt import fmt_interval, fmt_p

    for name, arm in result["arms"].items():
        loss = arm["eval_loss"]["token_weighted"]
        line = f"{name:<12} eval loss {fmt_interval(loss)}"
        head = arm.get("headline")
        if head:
            nmi = head["nmi"]
            line += (f"  NMI {fmt_interval(nmi)} p={fmt_p(head['nmi_pvalue'], '.4f')}"
                     f" (layer {head['best_layer']})")
            unrouted = {k: v["load"]["unrouted_fraction"] for k, v in arm.get("layers", {}).items()
                        if "unrouted_fraction" in v["load"]}
            if unrouted:  # expert choice: every expert takes its capacity per pass, so the load CV says nothing
                line += "  load balanced by construction (expert choice), unrouted share " + ", ".join(
                    f"layer {k} {100 * iv['estimate']:.1f}%" for k, iv in sorted(unrouted.items(), key=lambda kv: int(kv[0])))
            else:
                line += f"  max load CV {head['load_cv_max']:.2f}"
        print(line)
