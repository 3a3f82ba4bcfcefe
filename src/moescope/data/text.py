"""Texts as they travel through the pipeline, their hashes, and the filter/dedup/size-target pass.

Pure functions over strings and iterators: no files here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

RESERVED_KEYS = ("text", "id", "domain")


@dataclass
class SourceText:
    """One document. `meta` holds JSON-able provenance (title, module, family, ...)."""

    text: str
    domain: str
    id: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The JSONL record of the data directory: text, id, domain, then the meta fields."""
        rec: dict[str, Any] = {"text": self.text, "id": self.id, "domain": self.domain}
        for key, value in self.meta.items():
            rec[f"meta_{key}" if key in RESERVED_KEYS else key] = value
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "SourceText":
        meta = {k: v for k, v in rec.items() if k not in RESERVED_KEYS}
        return cls(text=rec["text"], domain=rec.get("domain", ""), id=str(rec.get("id", "")), meta=meta)


def hash_text(text: str) -> str:
    """sha256 of the exact UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize_whitespace(text: str) -> str:
    """Collapse every whitespace run to one space and strip the ends."""
    return " ".join(text.split())


def hash_normalized(text: str) -> str:
    """sha256 after whitespace normalization: catches copies that differ only in spacing."""
    return hash_text(normalize_whitespace(text))


def digest_hashes(hashes: Iterable[str]) -> str:
    """Order-independent fingerprint of a set of text hashes."""
    h = hashlib.sha256()
    for x in sorted(hashes):
        h.update(x.encode("ascii"))
    return h.hexdigest()


@dataclass
class CollectStats:
    """What the filter/dedup/size pass saw and dropped (goes into the manifest)."""

    seen: int = 0
    too_short: int = 0
    too_long: int = 0
    empty: int = 0
    duplicates_exact: int = 0
    duplicates_whitespace: int = 0
    kept: int = 0
    kept_chars: int = 0
    kept_bytes: int = 0
    stopped_by: str = "source exhausted"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def collect_texts(
    stream: Iterable[SourceText],
    *,
    min_chars: int = 0,
    max_chars: int | None = None,
    target_bytes: int | None = None,
    target_texts: int | None = None,
    stats: CollectStats | None = None,
) -> Iterator[SourceText]:
    """Length-filter and deduplicate `stream`, stopping at the size target.

    Duplicates are judged on the whitespace-normalized text (which covers exact copies
    too); both kinds are counted. The target is met when either the UTF-8 byte count
    or the number of kept texts reaches its limit; the stream is not read further, so
    streaming sources stop downloading there.
    """
    st = stats if stats is not None else CollectStats()
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    for item in stream:
        st.seen += 1
        n = len(item.text)
        if not item.text.strip():
            st.empty += 1
            continue
        if n < min_chars:
            st.too_short += 1
            continue
        if max_chars is not None and n > max_chars:
            st.too_long += 1
            continue
        exact = hash_text(item.text)
        if exact in seen_exact:
            st.duplicates_exact += 1
            continue
        norm = hash_normalized(item.text)
        if norm in seen_norm:
            st.duplicates_whitespace += 1
            continue
        seen_exact.add(exact)
        seen_norm.add(norm)
        st.kept += 1
        st.kept_chars += n
        st.kept_bytes += len(item.text.encode("utf-8"))
        yield item
        if target_texts is not None and st.kept >= target_texts:
            st.stopped_by = "target_texts"
            return
        if target_bytes is not None and st.kept_bytes >= target_bytes:
            st.stopped_by = "target_mb"
            return
