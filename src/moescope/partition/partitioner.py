"""Partition a list of texts: filter, embed or score, assign, measure. The Python API of the stage.

Composes the embedding I/O (`embedding`) with the pure assignment (`assign`) and
metrics (`quality`); `moescope partition` and the BTX pipeline call `partition_texts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moescope.partition import quality
from moescope.partition.assign import Assignment, assign_partitions, check_enough_texts, mean_word_length, select_long_texts
from moescope.partition.config import PartitionConfig
from moescope.partition.embedding import DEFAULT_MAX_TOKENS, EmbeddingRun, embed_corpus


@dataclass
class EmbeddingOptions:
    """Where `clustered` gets its vectors (model None = all-MiniLM-L6-v2)."""

    model: str | None = None
    cache_dir: Path | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    show_progress: bool = True


@dataclass
class PartitionOutcome:
    """Partitions of the kept texts plus everything the report needs."""

    cfg: PartitionConfig
    texts: list[str]  # texts kept after the length filter, in input order
    kept_index: np.ndarray  # their positions in the input list
    domains: list[str] | None  # domain label of each kept text, when given
    assignment: Assignment
    embedding: EmbeddingRun | None = None
    scores: np.ndarray | None = None  # curriculum scores of the kept texts
    extra: dict = field(default_factory=dict)

    @property
    def n_dropped_short(self) -> int:
        return self.extra.get("n_input", len(self.texts)) - len(self.texts)

    def partition_texts(self, p: int) -> list[str]:
        return [self.texts[i] for i in np.flatnonzero(self.assignment.member[:, p])]


def partition_texts(
    texts: Sequence[str],
    cfg: PartitionConfig,
    *,
    domains: Sequence[str] | None = None,
    scores: np.ndarray | Callable[[list[str]], np.ndarray] | None = None,
    embedding: EmbeddingOptions | None = None,
) -> PartitionOutcome:
    """Split `texts` into `cfg.n_partitions` partitions.

    `domains` (one label per text) only feeds the report's purity / ARI. `scores` gives
    the curriculum's difficulty for every input text (or a callable computing it on the
    kept texts, e.g. a model's perplexity); by default it is the mean word length.
    Raises ValueError when fewer texts than partitions survive the length filter.
    """
    if domains is not None and len(domains) != len(texts):
        raise ValueError(f"got {len(domains)} domain labels for {len(texts)} texts")
    kept = select_long_texts(texts, cfg.min_article_length_chars)
    check_enough_texts(len(kept), cfg.n_partitions)
    kept_texts = [texts[i] for i in kept]
    kept_domains = [domains[i] for i in kept] if domains is not None else None

    run = None
    kept_scores = None
    vectors = None
    if cfg.strategy == "clustered":
        opts = embedding or EmbeddingOptions()
        run = embed_corpus(
            kept_texts,
            model=opts.model,
            cache_dir=opts.cache_dir,
            max_tokens=opts.max_tokens,
            show_progress=opts.show_progress,
            seed=cfg.seed,
            backend=cfg.embedding_backend,
        )
        vectors = run.vectors
    elif cfg.strategy == "curriculum":
        if scores is None:
            kept_scores = mean_word_length(kept_texts)
        elif callable(scores):
            kept_scores = np.asarray(scores(kept_texts), dtype=np.float64)
        else:
            kept_scores = np.asarray(scores, dtype=np.float64)[kept]
    chars = np.array([len(t) for t in kept_texts], dtype=np.float64)
    extra: dict = {"n_input": len(texts)}
    if cfg.balance_unit == "auto" and cfg.strategy == "clustered":
        candidates = {
            unit: assign_partitions(len(kept_texts), cfg, embeddings=vectors, weights=chars if unit == "chars" else None)
            for unit in ("texts", "chars")
        }
        silhouettes = {
            unit: quality.separation(vectors, a.base_labels, seed=cfg.seed) for unit, a in candidates.items()
        }
        unit = max(silhouettes, key=lambda u: (silhouettes[u], u == "chars"))
        assignment = candidates[unit]
        extra["balance_unit_chosen"] = unit
        extra["silhouette_by_unit"] = {u: round(v, 4) for u, v in silhouettes.items()}
    else:
        unit = "texts" if cfg.balance_unit == "texts" else "chars"
        weights = chars if unit == "chars" else None
        assignment = assign_partitions(len(kept_texts), cfg, embeddings=vectors, scores=kept_scores, weights=weights)
        extra["balance_unit_chosen"] = unit
    return PartitionOutcome(
        cfg=cfg,
        texts=kept_texts,
        kept_index=kept,
        domains=kept_domains,
        assignment=assignment,
        embedding=run,
        scores=kept_scores,
        extra=extra,
    )


def summarize_outcome(outcome: PartitionOutcome, *, n_terms: int = 10) -> dict:
    """The report's numbers: sizes, overlaps, top terms and, with domains, purity and ARI."""
    a = outcome.assignment
    n = a.n_partitions
    summary: dict = {
        "config": {
            "n_partitions": outcome.cfg.n_partitions,
            "strategy": outcome.cfg.strategy,
            "overlap_ratio": outcome.cfg.overlap_ratio,
            "seed": outcome.cfg.seed,
            "min_article_length_chars": outcome.cfg.min_article_length_chars,
            "balance_tolerance": outcome.cfg.balance_tolerance,
            "balance_unit": outcome.cfg.balance_unit,
            "curriculum_score": outcome.cfg.curriculum_score,
            "embedding_backend": outcome.cfg.embedding_backend,
        },
        "n_texts_input": outcome.extra.get("n_input", len(outcome.texts)),
        "n_texts_kept": len(outcome.texts),
        "n_dropped_short": outcome.n_dropped_short,
        "sizes": a.sizes().tolist(),
        "sizes_chars": [int(sum(len(t) for t in outcome.partition_texts(p))) for p in range(n)],
        "own_sizes": np.bincount(a.primary, minlength=n).tolist(),
        "within_band": a.within_band,
        "overlap_added": a.n_overlap_added.tolist(),
        "n_moved_by_rebalance": a.n_moved,
        "overlap_counts": quality.overlap_counts(a.member).tolist(),
        "balance_unit_chosen": outcome.extra.get("balance_unit_chosen"),
        "top_terms": quality.top_terms([outcome.partition_texts(p) for p in range(n)], n_terms=n_terms),
    }
    if "silhouette_by_unit" in outcome.extra:
        summary["silhouette_by_unit"] = outcome.extra["silhouette_by_unit"]
    if outcome.embedding is not None:
        run = outcome.embedding
        summary["embedding"] = {
            **run.encoder.describe(),
            "seconds": round(run.seconds, 3),
            "n_cached": run.n_cached,
            "n_computed": run.n_computed,
            "fallback_reason": run.fallback_reason,
        }
    if outcome.domains is not None:
        labels = sorted(set(outcome.domains))
        ids = np.array([labels.index(d) for d in outcome.domains])
        summary["domains"] = labels
        summary["domain_counts"] = quality.contingency_members(a.member, ids, len(labels)).tolist()
        summary["purity"] = quality.purity(a.primary, outcome.domains)
        summary["adjusted_rand_index"] = quality.adjusted_rand_index(a.primary, outcome.domains)
        summary["adjusted_rand_index_before_rebalance"] = quality.adjusted_rand_index(a.base_labels, outcome.domains)
    return summary
