"""`moescope cluster RUN_OR_MODEL [--data DIR] ...`: cluster experts by co-activation
(experts that fire together on the same tokens merge into one cluster)."""

from __future__ import annotations

import argparse
import json
from typing import Any



def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cluster",
        help="cluster (layer, expert) components by co-activation: MDL merges per batch, stability across batches",
        description=(
            "Capture per-token gate weights of every (layer, expert) of a saved MoE model on N data batches, "
            "merge components greedily by description length in each batch (one process per batch, spawn "
            "start method), and compare the merge histories across batches and against token-shuffled "
            "nulls. Writes histories, ensemble.npz/json, cluster_summary.json and PNG plots."
        ),
    )
    p.add_argument("run_or_model", metavar="RUN_OR_MODEL",
                   help="a saved model directory, a training stage (final/) or an experiment run (arms/ARM/)")
    p.add_argument("--data", metavar="DIR", help="data directory (default: the one the run recorded)")
    p.add_argument("--arm", default="moe", help="arm of an experiment run to cluster (default: moe)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: RUN_OR_MODEL/cluster)")
    p.add_argument("--config", help="config file (.toml/.yaml/.json) mapping onto ClusterRunConfig")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. --set merge.alpha=0.5 --set capture.weight=router_prob (repeatable)")
    p.add_argument("--workers", type=int, help="merge processes (1 = inline, for debugging; default 1)")
    p.add_argument("--batches", type=int, help="number of batches when splitting by seed (default 4)")
    p.add_argument("--batch-by", choices=["seed", "domain"], help="disjoint random batches or one per domain")
    p.add_argument("--tokens-per-batch", type=int, help="tokens per batch (default 16384)")
    p.add_argument("--components", choices=["experts", "neurons"],
                   help="(layer, expert) pairs, or the FFN units of one expert (--set capture.neuron_layer=..)")
    p.add_argument("--alpha", type=float, help="MDL group-size weight (default 1.0)")
    p.add_argument("--selection", choices=["range", "mcmc"], help="pair choice rule (default range)")
    p.add_argument("--target-k", type=int, help="merge down to this many groups (default 1)")
    p.add_argument("--seed", type=int, help="seed of batch sampling and merges (default 0)")
    p.add_argument("--no-null", action="store_true", help="skip the token-shuffled null model")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> Any:
    """Config file, then --set overrides, then the dedicated flags (last wins)."""
    from moescope.cluster.pipeline import ClusterRunConfig
    from moescope.io.config import layered_config

    flags = {
        "workers": args.workers,
        "capture.n_batches": args.batches,
        "capture.batch_by": args.batch_by,
        "capture.tokens_per_batch": args.tokens_per_batch,
        "capture.components": args.components,
        "capture.seed": args.seed,
        "merge.seed": args.seed,
        "merge.alpha": args.alpha,
        "merge.pair_selection": args.selection,
        "merge.target_k": args.target_k,
        "null_model": False if args.no_null else None,
    }
    return layered_config(ClusterRunConfig, args.config, args.overrides, flags, flag_names=FLAG_NAMES)


FLAG_NAMES = {"merge.alpha": "--alpha", "workers": "--workers", "capture.n_batches": "--batches",
              "capture.tokens_per_batch": "--tokens-per-batch", "capture.seed": "--seed", "merge.seed": "--seed",
              "merge.target_k": "--target-k"}


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moescope.cluster.pipeline import cluster_analysis_pipeline
    from moescope.errors import MoescopeError

    cfg = build_config(args)
    out = Path(args.out) if args.out else Path(args.run_or_model) / "cluster"
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise MoescopeError(f"output directory {out} is not empty; pass --overwrite or choose another --out")
    res = cluster_analysis_pipeline(args.run_or_model, args.data, out, cfg, arm=args.arm)
    method = cfg.distance_methods[0]
    stab = res.summary["stability"][method]
    null_k = res.summary.get("null_mdl_optimal_k", {})
    print(f"{'batch':<12} {'tokens':>8} {'kept':>5} {'MDL-optimal k':>14} {'null':>5}")
    for name in res.members:
        h = res.histories[name]
        print(f"{name:<12} {h.n_tokens:>8} {len(h.labels):>5} {res.summary['mdl_optimal_k'][name]:>14} "
              f"{null_k.get(name, '-'):>5}")
    if len(res.members) > 1:
        print(f"\n{method} between batches (fraction of {len(res.normalized.labels)} components):")
        print(f"{'k':>6} {'batches':>9} {'null':>9}")
        n = len(res.normalized.labels)
        null = stab.get("null_mean_distance")
        for i in range(0, len(stab["n_groups"]), max(1, len(stab["n_groups"]) // 12)):
            nd = f"{null[i] / n:.3f}" if null and i < len(null) and null[i] is not None else "-"
            print(f"{stab['n_groups'][i]:>6.1f} {stab['mean_distance'][i] / n:>9.3f} {nd:>9}")
    first = res.summary["final_clusters"][res.members[0]]
    print(f"\nMDL-optimal clusters of batch {res.members[0]} (k = {first['n_groups']}), share of each domain served:")
    for g in first["groups"]:
        doms = " ".join(f"{d}={v:.2f}" for d, v in g["domains"].items() if v is not None)
        print(f"  [{', '.join(g['components'])}]  together {g['cohesion']:.2f}  {doms}")
    print_evidence(res.summary)
    print(json.dumps({"out_dir": str(out), "plots": [str(p) for p in res.plots]}))
    return 0


def print_evidence(summary: dict) -> None:
    """The measured-against-the-null numbers, the alpha table and the one sentence a report may quote."""
    ev = summary.get("evidence")
    if not ev:
        return
    def pct(x):
        return "-" if x is None else f"{x:.3f}"
    print(f"\nagainst the token-shuffled null (k = {ev['k']}):   batches   null")
    print(f"  components changing group      {pct(ev['stability_changed_fraction']):>8} {pct(ev['null_stability_changed_fraction']):>6}"
          f"   (claim needs a gap >= {ev['stability_margin']})")
    print(f"  co-firing of grouped components {pct(ev['cofiring']):>7} {pct(ev['null_cofiring']):>6}")
    print(f"  description length saved        {pct(ev['mdl_saving']):>7} {pct(ev['null_mdl_saving']):>6}")
    print(f"  groups identical in all batches {len(ev['recurring_groups']):>7} {ev['null_recurring_groups']:>6}")
    rows = summary.get("alpha_sensitivity") or []
    if rows:
        print(f"\n{'alpha':>6} {'k per batch':>16} {'null k':>16} {'changed':>8} {'null':>6} claim")
        for r in rows:
            print(f"{r['alpha']:>6} {','.join(map(str, r['k'])):>16} {','.join(map(str, r['null_k'])):>16} "
                  f"{pct(r['stability_changed_fraction']):>8} {pct(r['null_stability_changed_fraction']):>6} "
                  f"{'yes' if r['pathway_claim'] else 'no'}")
    print("\n" + ev["sentence"])
