"""Text sources behind one interface: builtin (offline), hf (Hugging Face / local stand-ins), files.

`load_domain_texts(domain_cfg)` is what other stages call: the domain's texts after
length filters, deduplication and the size target, in the seeded order of the source.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from moescope.data.config import DomainConfig, SourceConfig
from moescope.data.text import CollectStats, SourceText, collect_texts, hash_normalized
from moescope.errors import MoescopeError

log = logging.getLogger(__name__)

__all__ = ["DomainTexts", "SourceText", "collect_domain", "iter_source", "load_domain_texts", "describe_source"]


def iter_source(domain: DomainConfig, seed: int, src: SourceConfig | None = None) -> Iterator[SourceText]:
    """Raw texts of one of a domain's sources (default: its first), no filtering, seeded order."""
    src = src or domain.source
    if src.backend == "builtin":
        from moescope.data.sources.builtin import iter_builtin

        return iter_builtin(src.name or domain.name, domain.name, seed)
    if src.backend == "hf":
        from moescope.data.sources.hf import iter_hf

        if not src.name and not src.path:
            raise MoescopeError(f"domain {domain.name!r}: hf source needs source.name (hub id) or source.path")
        return iter_hf(src, domain.name, seed)
    if src.backend == "files":
        from moescope.data.sources.files import iter_files

        return iter_files(src, domain.name, seed)
    raise MoescopeError(f"domain {domain.name!r}: unknown source backend {src.backend!r} (choose from builtin, hf, files)")


def describe_source(domain: DomainConfig, seed: int, src: SourceConfig | None = None) -> dict[str, Any]:
    """Provenance of one of a domain's sources (default: its first) for the manifest."""
    src = src or domain.source
    if src.backend == "builtin":
        from moescope.data.sources.builtin import builtin_source_info

        info = builtin_source_info(src.name or domain.name)
    elif src.backend == "hf":
        from moescope.data.sources.hf import source_info

        info = source_info(src, seed)
    else:
        from moescope.data.sources.files import source_info as files_info

        info = files_info(src)
    info["filters"] = {"min_chars": domain.resolved_min_chars, "max_chars": domain.resolved_max_chars,
                       "dedup": "sha256 of exact text and of whitespace-normalized text"}
    info["target"] = {"target_mb": domain.target_mb, "target_texts": domain.target_texts}
    info["seed"] = seed
    return info


@dataclass
class DomainTexts:
    """A domain's kept texts plus what the filters dropped and where the texts came from."""

    domain: str
    texts: list[SourceText]
    stats: CollectStats
    source: dict[str, Any] = field(default_factory=dict)


def _is_infinite(domain: DomainConfig, src: SourceConfig) -> bool:
    return src.backend == "builtin" and (src.name or domain.name) == "math"


def _shares(sources: list[SourceConfig]) -> list[float]:
    weights = [s.weight if s.weight is not None else 1.0 for s in sources]
    return [w / sum(weights) for w in weights]


def collect_domain(domain: DomainConfig, seed: int) -> DomainTexts:
    """Read, filter, deduplicate and cut a domain to its size target; fails on an empty result.

    A domain with several sources reads each up to its weighted share of the target, drops
    texts an earlier source already gave (whitespace-normalized), and interleaves them in a
    seeded order; every source must contribute, so none is silently lost.
    """
    sources = domain.all_sources
    if domain.target_mb is None and domain.target_texts is None and any(_is_infinite(domain, s) for s in sources):
        raise MoescopeError(f"domain {domain.name!r}: the generated math corpus needs target_mb or target_texts")
    target_bytes = int(domain.target_mb * 1_000_000) if domain.target_mb is not None else None
    if len(sources) == 1:
        stats = CollectStats()
        texts = _collect_one(domain, sources[0], seed, target_bytes, domain.target_texts, stats)
        return DomainTexts(domain=domain.name, texts=texts, stats=stats, source=describe_source(domain, seed))
    total = CollectStats()
    seen: set[str] = set()
    texts, infos = [], []
    for i, (src, share) in enumerate(zip(sources, _shares(sources))):
        stats = CollectStats()
        part = _collect_one(domain, src, seed, None if target_bytes is None else max(1, int(target_bytes * share)),
                            None if domain.target_texts is None else max(1, round(domain.target_texts * share)),
                            stats)
        fresh = [t for t in part if hash_normalized(t.text) not in seen]
        seen.update(hash_normalized(t.text) for t in part)
        for key, value in stats.as_dict().items():
            if isinstance(value, int):
                setattr(total, key, getattr(total, key) + value)
        total.duplicates_whitespace += len(part) - len(fresh)
        total.kept -= len(part) - len(fresh)
        info = describe_source(domain, seed, src)
        info.update(share=round(share, 6), kept_texts=len(fresh), stopped_by=stats.stopped_by)
        infos.append(info)
        if not fresh:
            raise MoescopeError(f"domain {domain.name!r}: source {describe_where(domain, src)} adds no texts "
                                "(all duplicates of an earlier source)")
        for t in fresh:
            t.meta.setdefault("source_index", i)
        texts += fresh
    random.Random(seed).shuffle(texts)  # interleave, so a later cut or shuffle-free reader sees a mix
    total.kept_chars = sum(len(t.text) for t in texts)
    total.kept_bytes = sum(len(t.text.encode("utf-8")) for t in texts)
    total.stopped_by = "; ".join(i["stopped_by"] for i in infos)
    return DomainTexts(domain=domain.name, texts=texts, stats=total,
                       source={"backend": "mix", "sources": infos, "seed": seed})


def _collect_one(domain: DomainConfig, src: SourceConfig, seed: int, target_bytes: int | None,
                 target_texts: int | None, stats: CollectStats) -> list[SourceText]:
    texts = list(collect_texts(
        iter_source(domain, seed, src), min_chars=domain.resolved_min_chars, max_chars=domain.resolved_max_chars,
        target_bytes=target_bytes, target_texts=target_texts, stats=stats,
    ))
    if not texts:
        raise MoescopeError(
            f"domain {domain.name!r}: empty source ({describe_where(domain, src)}: {stats.seen} texts read, "
            f"{stats.too_short} too short, {stats.too_long} too long, {stats.empty} empty)"
        )
    if stats.stopped_by == "source exhausted" and (target_bytes or target_texts):
        log.warning("domain %r: source %s exhausted at %d texts / %.2f MB, before the size target", domain.name,
                    describe_where(domain, src), stats.kept, stats.kept_bytes / 1e6)
    return texts


def describe_where(domain: DomainConfig, src: SourceConfig | None = None) -> str:
    src = src or domain.source
    if src.backend == "files":
        return f"files {', '.join(src.paths)}"
    if src.backend == "hf":
        return f"hf {src.path or src.name}"
    return f"builtin {src.name or domain.name}"


def load_domain_texts(domain_cfg: DomainConfig, seed: int = 42) -> list[SourceText]:
    """The domain's texts after filters, dedup and size target (seeded order, not yet split)."""
    return collect_domain(domain_cfg, seed).texts
