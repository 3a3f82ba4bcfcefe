"""The embedding comparison: untouched base, dense fine-tune, MoE top-1 / top-2 at matched steps.

Every trained arm starts from the same base model, sees the same training rows in the
same order (same seed, same sampler) for the same number of optimizer steps with the same
learning-rate schedule; only the FFN sublayers differ. All arms are evaluated on the same
held-out pairs (split by source text before training). Results: per-domain IR metrics
with bootstrap intervals, paired differences against the dense arm on the same queries,
k-NN domain accuracy, embedding statistics (mean pairwise cosine, effective rank), for MoE
arms the routing analysis of the LM (P(expert | domain), NMI, load) on the held-out texts,
and PCA / UMAP maps of each arm's held-out embeddings by domain and first-choice expert.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from moescope.embed.config import CompareConfig, moe_arm_top_k
from moescope.embed.encoder import build_encoder, default_base_model
from moescope.embed.evaluate import (
    capture_encoder_routing,
    evaluate_encoder,
    first_choice_experts,
    item_units,
    paired_difference_interval,
    without_arrays,
)
from moescope.embed.pairs import PairSplit, load_pairs, pair_stats
from moescope.embed.train import build_loss_dataset, train_encoder
from moescope.errors import MoescopeError
from moescope.embed.stats import project_2d
from moescope.io.atomic import atomic_directory, atomic_write_json, atomic_write_text
from moescope.io.figure import save_figure
from moescope.io.config import to_dict
from moescope.report.fmt import fmt_interval
from moescope.io.provenance import environment_info

logger = logging.getLogger(__name__)

HEADLINE = ("mrr@10", "ndcg@10", "recall@1")


def held_out_items(split: PairSplit) -> list[tuple[str, str]]:
    """(text, domain) of every held-out anchor and positive, sorted: the texts that the routing
    summary, the statistics and the pictures describe."""
    return sorted({(t, p.domain) for p in split.eval for t in (p.anchor, p.positive)})


def routing_summary(model, split: PairSplit, cfg: CompareConfig) -> tuple[dict[int, dict[str, Any]], np.ndarray]:
    """The LM's per-layer routing summary over the held-out texts (anchors and positives), and
    each text's first-choice expert in the last MoE layer."""
    from moescope.analysis.summary import SummaryConfig, summarize_layer

    domains = sorted({p.domain for p in split.eval})
    items = held_out_items(split)
    tables = capture_encoder_routing(
        model, [t for t, _ in items], [domains.index(d) for _, d in items], batch_size=cfg.eval.batch_size
    )
    summary_cfg = SummaryConfig(n_resamples=cfg.routing_resamples, n_permutations=cfg.routing_resamples, seed=cfg.eval.seed)
    # block = text index; a source document's texts move together in the intervals and the NMI test
    unit_of = item_units(split.eval)
    unit_of_text = np.array([unit_of[(d, t)] for t, d in items], dtype=np.int64)
    summary = {i: summarize_layer(table, domains, summary_cfg, unit_of_block=unit_of_text) for i, table in tables.items()}
    return summary, first_choice_experts(tables[max(tables)], len(items))


def run_arm(arm: str, split: PairSplit, cfg: CompareConfig, train_dataset, *, progress: bool = True):
    """Build (and, except for `base`, fine-tune) one arm's encoder; returns (model, train info)."""
    k = moe_arm_top_k(arm)
    moe = replace(cfg.encoder.moe, top_k=k) if k is not None else None
    model = build_encoder(
        cfg.encoder.base_model, moe, pooling=cfg.encoder.pooling,
        max_seq_length_tokens=cfg.encoder.max_seq_length_tokens, seed=cfg.train.seed,
    )
    info: dict[str, Any] = {"trained": arm != "base", "steps": 0}
    if arm != "base":
        result = train_encoder(model, train_dataset, cfg.train, show_progress_bar=progress)
        info.update(steps=cfg.train.steps, train_seconds=result.train_seconds, log_history=result.log_history,
                    routing_history=result.routing_history)
    n_params = sum(p.numel() for p in model.parameters())
    info["parameters"] = n_params
    return model, info


def run_comparison(cfg: CompareConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run every arm, write results.json, table.md and comparison.png into `out_dir`."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if Path(out_dir).exists() and not overwrite:
        raise MoescopeError(f"{out_dir} already exists (pass overwrite to replace it)")
    split = load_pairs(cfg.pairs)
    logger.info("pairs: %s", pair_stats(split))
    miner = None
    if cfg.train.loss != "mnrl":  # negatives mined once with the untouched base, shared by all arms
        miner = build_encoder(cfg.encoder.base_model, None, pooling=cfg.encoder.pooling,
                              max_seq_length_tokens=cfg.encoder.max_seq_length_tokens)
    train_dataset = build_loss_dataset(split.train, cfg.train.loss, miner, cfg.train)
    results: dict[str, Any] = {}
    maps: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # arm -> held-out embeddings, first-choice experts
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for arm in cfg.arms:
            t0 = time.perf_counter()
            logger.info("arm %s", arm)
            model, info = run_arm(arm, split, cfg, train_dataset, progress=progress)
            report = evaluate_encoder(model, split.eval, split.train, cfg.eval, show_progress_bar=progress)
            entry: dict[str, Any] = {"train": info, **report}
            experts = None
            if moe_arm_top_k(arm) is not None:
                entry["routing"], experts = routing_summary(model, split, cfg)
            texts = [t for t, _ in held_out_items(split)]
            maps[arm] = (model.encode(texts, batch_size=cfg.eval.batch_size, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=False), experts)
            if cfg.save_models:
                model.save(str(tmp / "models" / arm))
            entry["seconds"] = time.perf_counter() - t0
            results[arm] = entry
            del model
        differences = paired_differences(results, cfg)
        doc = {
            "config": to_dict(cfg),
            "base_model": cfg.encoder.base_model or default_base_model(),
            "pairs": pair_stats(split),
            "arms": {arm: _jsonable(entry) for arm, entry in results.items()},
            "differences": differences,
            "seconds_total": time.perf_counter() - t_start,
            # CPU time of this process (all its threads): wall time on an otherwise idle
            # machine is about this divided by the thread count
            "cpu_seconds_total": time.process_time() - cpu_start,
            "torch_threads": _torch_threads(),
            "environment": environment_info(),
        }
        atomic_write_json(tmp / "results.json", doc)
        atomic_write_text(tmp / "table.md", format_table(doc))
        plot_comparison(doc, tmp / "comparison.png")
        domains = [d for _, d in held_out_items(split)]
        for method in cfg.projections:
            plot_embedding_map(maps, domains, method, tmp / f"embedding_{method}.png", seed=cfg.eval.seed)
    return doc


def paired_differences(results: dict[str, Any], cfg: CompareConfig) -> dict[str, Any]:
    """Each arm minus `dense` (and minus `base`) on the same held-out queries, pooled over domains."""
    out: dict[str, Any] = {}
    for ref in ("dense", "base"):
        if ref not in results:
            continue
        for arm, entry in results.items():
            # MoE arms against dense; every trained arm against the untouched base
            if arm == ref or arm == "base" or (ref == "dense" and moe_arm_top_k(arm) is None):
                continue
            row = {}
            domains = sorted(entry["per_query"])
            units = np.concatenate([entry["per_query_units"][d] for d in domains])  # the same queries in every arm
            strata = np.concatenate([np.full(entry["per_query_units"][d].size, i) for i, d in enumerate(domains)])
            for metric in HEADLINE:
                a = np.concatenate([entry["per_query"][d][metric] for d in domains])
                b = np.concatenate([results[ref]["per_query"][d][metric] for d in domains])
                mean, lo, hi = paired_difference_interval(
                    a, b, units=units, strata=strata, confidence=cfg.eval.confidence,
                    n_resamples=cfg.eval.n_bootstrap, seed=cfg.eval.seed,
                )
                row[metric] = {"estimate": mean, "low": lo, "high": hi}
            out[f"{arm}-{ref}"] = row
    return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _jsonable(entry: dict[str, Any]) -> dict[str, Any]:
    return without_arrays(entry)  # the paired differences already used the per-query arrays


# --------------------------------------------------------------------------- presentation


def _ci(value: float, ci: list[float]) -> str:
    return fmt_interval({"estimate": value, "low": ci[0], "high": ci[1]})


def format_table(doc: dict[str, Any]) -> str:
    """Markdown: IR metrics per domain with 95% intervals, k-NN accuracy, routing per layer."""
    arms = doc["arms"]
    domains = sorted(next(iter(arms.values()))["retrieval"])
    first = next(iter(arms.values()))
    units = ", ".join(f"{d} {first['retrieval'][d]['n_queries']} queries / {first['retrieval'][d].get('n_units', '?')} sources"
                      for d in domains)
    lines = [f"MRR@10 per domain and pooled (95% bootstrap CI resampling the queries' source documents: {units}); "
             f"steps {doc['config']['train']['steps']} x {doc['config']['train']['batch_size_pairs']} pairs, "
             f"loss {doc['config']['train']['loss']}", ""]
    header = ["arm", *domains, "all: MRR@10", "all: nDCG@10", "all: R@1", "kNN domain acc", "mean cosine",
              "effective rank"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, e in arms.items():
        cells = [arm]
        cells += [_ci(e["retrieval"][d]["mrr@10"], e["retrieval"][d]["mrr@10_ci"]) for d in domains]
        pooled = e["retrieval_all"]
        cells += [_ci(pooled[m], pooled[f"{m}_ci"]) for m in HEADLINE]
        knn = e["knn"]
        cells.append(_ci(knn["accuracy"], knn["accuracy_ci"]) if "accuracy_ci" in knn else "n/a")
        stats = e.get("embedding_stats") or {}
        cells += [f"{stats['mean_cosine']:.3f}", f"{stats['effective_rank']:.1f}"] if stats else ["n/a", "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    if doc.get("differences"):
        lines += ["", "Paired differences on the same queries (estimate [95% CI])", "",
                  "| comparison | MRR@10 | nDCG@10 | R@1 |", "|---|---|---|---|"]
        for name, row in doc["differences"].items():
            cells = [fmt_interval(row[m], signed=True) for m in HEADLINE]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    routing_rows = []
    for arm, e in arms.items():
        for layer, s in (e.get("routing") or {}).items():
            spec, load = s["specialization"], s["load"]
            nmi = spec["nmi"]
            routing_rows.append(
                f"| {arm} | {layer} | {fmt_interval(nmi)} "
                f"(p={spec['nmi_pvalue']:.3g}) | {load['load_cv']['estimate']:.3f} | "
                f"{load['max_fraction']['estimate']:.3f} | {spec['max_expert_given_domain']['estimate']:.3f} |"
            )
    if routing_rows:
        lines += ["", "Routing on held-out texts (NMI = I(domain; expert) / H(domain), equal domain weights)", "",
                  "| arm | layer | NMI [95% CI] | load CV | max load fraction | max P(expert given domain) |",
                  "|---|---|---|---|---|---|", *routing_rows]
    lines += ["", f"pairs: {doc['pairs']}", f"total time: {doc['seconds_total']:.0f} s"]
    return "\n".join(lines) + "\n"


def plot_comparison(doc: dict[str, Any], path: Path) -> Path:
    """Grouped bars: MRR@10 per domain and pooled, one bar per arm, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = doc["arms"]
    domains = sorted(next(iter(arms.values()))["retrieval"])
    groups = [*domains, "all"]
    x = np.arange(len(groups))
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 3.6))
    for j, (arm, e) in enumerate(arms.items()):
        rows = [e["retrieval"][d] for d in domains] + [e["retrieval_all"]]
        vals = np.array([r["mrr@10"] for r in rows])
        lo = vals - np.array([r["mrr@10_ci"][0] for r in rows])
        hi = np.array([r["mrr@10_ci"][1] for r in rows]) - vals
        ax.bar(x + (j - (len(arms) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=2, label=arm)
    ax.set_xticks(x, groups)
    ax.set_ylabel("MRR@10 (held-out pairs)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=len(arms), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.set_title(f"{doc['config']['train']['steps']} steps each; bars: 95% bootstrap CI")
    return save_figure(fig, path, dpi=120)


def plot_embedding_map(
    maps: dict[str, tuple[np.ndarray, np.ndarray | None]], domains: list[str], method: str, path: Path, *, seed: int = 0
) -> Path:
    """One row per arm: its held-out embeddings projected to 2-D (`method`: pca or umap), coloured
    by domain (left) and, for MoE arms, by each text's first-choice expert (right). Written
    atomically (temporary path, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(domains))
    domain_index = np.array([names.index(d) for d in domains])
    fig, axes = plt.subplots(len(maps), 2, figsize=(8.5, 3.6 * len(maps)), squeeze=False)
    for row, (arm, (emb, experts)) in zip(axes, maps.items()):
        xy = project_2d(emb, method, seed=seed)
        for j, name in enumerate(names):
            sel = domain_index == j
            row[0].scatter(xy[sel, 0], xy[sel, 1], s=8, color=plt.cm.tab10(j % 10), label=name)
        row[0].set_title(f"{arm}: by domain ({method.upper()})", fontsize=9)
        row[0].legend(fontsize=7, markerscale=1.5, loc="best")
        if experts is None:
            row[1].text(0.5, 0.5, "dense encoder: no experts", ha="center", va="center", transform=row[1].transAxes)
            row[1].set_axis_off()
            continue
        # a palette unlike the domains' (tab10), so a colour never reads as both a domain and an expert
        palette = plt.cm.Dark2 if experts.max() < 8 else plt.cm.tab20
        for e in sorted(set(experts.tolist())):
            sel = experts == e
            row[1].scatter(xy[sel, 0], xy[sel, 1], s=8, color=palette(e % palette.N) if e >= 0 else "grey",
                           label=f"expert {e}" if e >= 0 else "no tokens")
        row[1].set_title(f"{arm}: by first-choice expert (last MoE layer)", fontsize=9)
        row[1].legend(fontsize=7, markerscale=1.5, loc="best", ncol=2)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"held-out texts ({len(domains)}), {method.upper()} of each arm's own embeddings", fontsize=10)
    return save_figure(fig, path, dpi=110, format="png")
