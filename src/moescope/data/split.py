"""Text-level train/eval split (before tokenization and packing) and the leakage check.

Splitting whole texts before packing is what keeps eval honest: packed blocks cut
documents at arbitrary points, so splitting blocks would put halves of one
document on both sides.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moescope.data.text import SourceText, hash_normalized, hash_text
from moescope.errors import MoescopeError


def eval_count(n_texts: int, eval_fraction: float, eval_min_texts: int) -> int:
    """max(eval_min_texts, floor(eval_fraction * n)) eval texts."""
    return max(eval_min_texts, int(n_texts * eval_fraction))


def domain_seed(seed: int, domain: str) -> list[int]:
    """Per-domain RNG seed material, so adding a domain never reshuffles the others."""
    return [seed, zlib.crc32(domain.encode("utf-8"))]


def split_texts(
    texts: Sequence[SourceText], *, domain: str, seed: int, eval_fraction: float, eval_min_texts: int
) -> tuple[list[SourceText], list[SourceText]]:
    """Seeded random split; both sides keep the source order of their texts."""
    n = len(texts)
    n_eval = eval_count(n, eval_fraction, eval_min_texts)
    if n_eval >= n:
        raise MoescopeError(
            f"domain {domain!r}: too few texts for the split ({n} texts, {n_eval} needed for eval "
            f"= max({eval_min_texts}, {eval_fraction:g} x {n}) plus at least one for train)"
        )
    perm = np.random.default_rng(domain_seed(seed, domain)).permutation(n)
    is_eval = np.zeros(n, dtype=bool)
    is_eval[perm[:n_eval]] = True
    train = [t for t, e in zip(texts, is_eval) if not e]
    evals = [t for t, e in zip(texts, is_eval) if e]
    return train, evals


@dataclass
class LeakageReport:
    raw_overlap: int
    normalized_overlap: int
    examples: list[str]

    @property
    def clean(self) -> bool:
        return self.raw_overlap == 0 and self.normalized_overlap == 0


def find_leakage(train: Sequence[SourceText], evals: Sequence[SourceText]) -> LeakageReport:
    """Eval texts whose exact or whitespace-normalized hash also occurs in train."""
    train_raw = {hash_text(t.text) for t in train}
    train_norm = {hash_normalized(t.text) for t in train}
    raw = [t for t in evals if hash_text(t.text) in train_raw]
    norm = [t for t in evals if hash_normalized(t.text) in train_norm]
    return LeakageReport(raw_overlap=len(raw), normalized_overlap=len(norm), examples=[t.id for t in norm[:5]])


def check_leakage(train: Sequence[SourceText], evals: Sequence[SourceText]) -> LeakageReport:
    """Raise (failing the build) when any eval text also appears in train, even re-spaced."""
    report = find_leakage(train, evals)
    if not report.clean:
        raise MoescopeError(
            f"train/eval leakage: {report.raw_overlap} eval texts identical to train texts, "
            f"{report.normalized_overlap} identical after whitespace normalization (e.g. {', '.join(report.examples)})"
        )
    return report
