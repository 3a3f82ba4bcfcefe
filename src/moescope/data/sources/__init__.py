"""Text sources behind one interface: builtin (offline), hf (Hugging Face / local stand-ins), files.

`load_domain_texts(domain_cfg)` is what other stages call: the domain's texts after
length filters, deduplication and the size target, in the seeded order of the source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from moescope.data.config import DomainConfig
from moescope.data.text import CollectStats, SourceText, collect_texts
from moescope.errors import MoescopeError

log = logging.getLogger(__name__)

__all__ = ["DomainTexts", "SourceText", "collect_domain", "iter_source", "load_domain_texts", "describe_source"]


def iter_source(domain: DomainConfig, seed: int) -> Iterator[SourceText]:
    """Raw texts of a domain's source (no filtering), seeded order."""
    src = domain.source
    if src.backend == "builtin":
        from moescope.data.sources.builtin import iter_builtin

        return iter_builtin(domain.builtin_name, domain.name, seed)
    if src.backend == "hf":
        from moescope.data.sources.hf import iter_hf

        if not src.name and not src.path:
            raise MoescopeError(f"domain {domain.name!r}: hf source needs source.name (hub id) or source.path")
        return iter_hf(src, domain.name, seed)
    if src.backend == "files":
        from moescope.data.sources.files import iter_files

        return iter_files(src, domain.name, seed)
    raise MoescopeError(f"domain {domain.name!r}: unknown source backend {src.backend!r} (choose from builtin, hf, files)")


def describe_source(domain: DomainConfig, seed: int) -> dict[str, Any]:
    """Provenance of a domain's source for the manifest."""
    src = domain.source
    if src.backend == "builtin":
        from moescope.data.sources.builtin import builtin_source_info

        info = builtin_source_info(domain.builtin_name)
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


def collect_domain(domain: DomainConfig, seed: int) -> DomainTexts:
    """Read, filter, deduplicate and cut a domain to its size target; fails on an empty result."""
    infinite = domain.source.backend == "builtin" and domain.builtin_name == "math"
    if infinite and domain.target_mb is None and domain.target_texts is None:
        raise MoescopeError(f"domain {domain.name!r}: the generated math corpus needs target_mb or target_texts")
    stats = CollectStats()
    target_bytes = int(domain.target_mb * 1_000_000) if domain.target_mb is not None else None
    texts = list(collect_texts(
        iter_source(domain, seed), min_chars=domain.resolved_min_chars, max_chars=domain.resolved_max_chars,
        target_bytes=target_bytes, target_texts=domain.target_texts, stats=stats,
    ))
    if not texts:
        raise MoescopeError(
            f"domain {domain.name!r}: empty source ({describe_where(domain)}: {stats.seen} texts read, "
            f"{stats.too_short} too short, {stats.too_long} too long, {stats.empty} empty)"
        )
    if stats.stopped_by == "source exhausted" and (target_bytes or domain.target_texts):
        log.warning("domain %r: source exhausted at %d texts / %.2f MB, before the size target", domain.name,
                    stats.kept, stats.kept_bytes / 1e6)
    return DomainTexts(domain=domain.name, texts=texts, stats=stats, source=describe_source(domain, seed))


def describe_where(domain: DomainConfig) -> str:
    src = domain.source
    if src.backend == "files":
        return f"files {', '.join(src.paths)}"
    if src.backend == "hf":
        return f"hf {src.path or src.name}"
    return f"builtin {domain.builtin_name}"


def load_domain_texts(domain_cfg: DomainConfig, seed: int = 42) -> list[SourceText]:
    """The domain's texts after filters, dedup and size target (seeded order, not yet split)."""
    return collect_domain(domain_cfg, seed).texts
