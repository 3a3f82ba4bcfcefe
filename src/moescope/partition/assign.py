"""Which text goes to which partition: pure computation on arrays (no files, no models).

A partitioning is held as a boolean membership matrix ``member[n_texts, n_partitions]``
(a text may sit in several partitions once overlap is added) plus ``primary[n_texts]``,
the partition that holds each text's own copy (the others hold overlap copies).

Every step that has to choose texts (overlap, rebalancing) ranks them by a cost matrix
``cost[n_texts, n_partitions]``, lower = a better fit for that partition:
squared distance to the KMeans centroid for ``clustered``, distance to the partition's
mean score for ``curriculum``, seeded random numbers for ``random``. So "move the texts
nearest the receiving centroid first" is one rule for all three strategies.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moescope.partition.config import PartitionConfig

_WORD = re.compile(r"\w+")


@dataclass
class Assignment:
    """The result of `assign_partitions` (indices refer to the texts given to it)."""

    member: np.ndarray  # bool [n_texts, n_partitions]
    primary: np.ndarray  # int64 [n_texts]: partition holding the text's own copy
    base_labels: np.ndarray  # int64 [n_texts]: the deal / cluster before overlap and rebalancing
    cost: np.ndarray  # float64 [n_texts, n_partitions] used to rank candidates
    centroids: np.ndarray | None  # float [n_partitions, dim] for `clustered`, else None
    weights: np.ndarray  # float64 [n_texts]: each text's size (characters or 1)
    n_overlap_added: np.ndarray  # int64 [n_partitions]: overlap copies received
    n_moved: int  # texts moved by rebalancing
    within_band: bool  # every partition's size ended within the tolerance band

    @property
    def n_partitions(self) -> int:
        return self.member.shape[1]

    def sizes(self) -> np.ndarray:
        """Texts per partition (overlap copies included)."""
        return self.member.sum(axis=0).astype(np.int64)

    def indices(self) -> list[np.ndarray]:
        """Per partition, the (sorted) indices of its texts, overlap copies included."""
        return [np.flatnonzero(self.member[:, p]) for p in range(self.n_partitions)]


def check_enough_texts(n_texts: int, n_partitions: int) -> None:
    """Every partition needs at least one text of its own."""
    if n_texts < n_partitions:
        raise ValueError(
            f"cannot split {n_texts} text(s) into {n_partitions} partitions: "
            f"need at least one text per partition (lower n_partitions or min_article_length)"
        )


def select_long_texts(texts: Sequence[str], min_length_chars: int) -> np.ndarray:
    """Indices of the texts at least `min_length_chars` characters long (stripped)."""
    return np.array([i for i, t in enumerate(texts) if len(t.strip()) >= min_length_chars], dtype=np.int64)


def deal_random(n_texts: int, n_partitions: int, seed: int) -> np.ndarray:
    """Seeded shuffle, then deal round-robin: sizes differ by at most one."""
    order = np.random.default_rng(seed).permutation(n_texts)
    labels = np.empty(n_texts, dtype=np.int64)
    labels[order] = np.arange(n_texts) % n_partitions
    return labels


def mean_word_length(texts: Sequence[str]) -> np.ndarray:
    """The seed's complexity proxy: average characters per word (0 for a text without words)."""
    out = np.zeros(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        words = _WORD.findall(text)
        if words:
            out[i] = sum(len(w) for w in words) / len(words)
    return out


def deal_by_score(scores: np.ndarray, n_partitions: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Sort by score (ties by index), cut into contiguous chunks of equal weight: partition 0 is the easiest."""
    order = np.argsort(scores, kind="stable")
    if weights is None:
        labels = np.empty(len(scores), dtype=np.int64)
        for p, chunk in enumerate(np.array_split(order, n_partitions)):
            labels[chunk] = p
        return labels
    w = np.asarray(weights, dtype=np.float64)[order]
    # chunk p holds the texts whose cumulative weight midpoint falls in [p, p+1) x total / n
    mid = (np.cumsum(w) - w / 2) / max(w.sum(), 1e-12)
    rank_labels = np.minimum((mid * n_partitions).astype(np.int64), n_partitions - 1)
    # every partition gets at least one text: the deal by count decides where weight cannot
    fallback = np.repeat(np.arange(n_partitions), [len(c) for c in np.array_split(order, n_partitions)])
    if len(np.unique(rank_labels)) < n_partitions:
        rank_labels = fallback
    labels = np.empty(len(scores), dtype=np.int64)
    labels[order] = rank_labels
    return labels


def cluster_embeddings(
    embeddings: np.ndarray, n_partitions: int, seed: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded KMeans (scikit-learn), points weighted by `weights`: labels [n], centroids [n_partitions, dim]."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(embeddings, dtype=np.float64)
    with warnings.catch_warnings():
        # fewer distinct points than clusters (e.g. identical texts) is handled by rebalancing
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=n_partitions, random_state=seed, n_init=10).fit(x, sample_weight=weights)
    return km.labels_.astype(np.int64), km.cluster_centers_


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances, clipped at 0 against rounding."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def score_cost(scores: np.ndarray, labels: np.ndarray, n_partitions: int) -> np.ndarray:
    """Curriculum cost: distance of a text's score to each partition's mean score."""
    means = np.array(
        [scores[labels == p].mean() if np.any(labels == p) else np.inf for p in range(n_partitions)]
    )
    return np.abs(scores[:, None] - means[None, :])


def size_bounds(total: int, n_partitions: int, tolerance: float) -> tuple[int, int]:
    """Smallest and largest allowed partition size: +-tolerance around the mean.

    Sizes are integers, so when the band holds no integer (tiny partitions) it is widened
    to floor/ceil of the mean, the best any partitioning can do.
    """
    mean = total / n_partitions
    eps = 1e-9
    lo = min(math.floor(mean), math.ceil((1.0 - tolerance) * mean - eps))
    hi = max(math.ceil(mean), math.floor((1.0 + tolerance) * mean + eps))
    return lo, hi


def add_overlap(
    member: np.ndarray, overlap_ratio: float, cost: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Give each partition about overlap_ratio x its size of extra texts from the others.

    Size is the sum of `weights` (default: 1 per text, so round(ratio x n_texts) texts).
    The extra texts are the other partitions' texts with the lowest cost for the receiver
    (for `clustered`: the nearest ones, i.e. the border between clusters). Sizes are
    taken before any overlap is added, so the order of partitions does not matter.
    """
    n_texts, n_parts = member.shape
    w = np.ones(n_texts) if weights is None else np.asarray(weights, dtype=np.float64)
    base = member.copy()
    member = member.copy()
    added = np.zeros(n_parts, dtype=np.int64)
    for p in range(n_parts):
        want = round(overlap_ratio * float(w[base[:, p]].sum()))
        candidates = np.flatnonzero(~base[:, p])
        if want <= 0 or candidates.size == 0:
            continue
        # stable sort: equal costs fall back to text order, so results are deterministic
        ranked = candidates[np.argsort(cost[candidates, p], kind="stable")]
        take = int(np.searchsorted(np.cumsum(w[ranked]), want + 1e-9, side="right"))
        member[ranked[:take], p] = True
        added[p] = take
    return member, added


def rebalance(
    member: np.ndarray,
    primary: np.ndarray,
    cost: np.ndarray,
    tolerance: float,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Move texts from oversized to undersized partitions until all sizes are in bounds.

    A partition's size is the sum of its texts' `weights` (default 1 per text). Each move
    gives the smallest partition the text with the lowest cost for it, taken from the
    oversized partitions (or the largest one when none is over the bound), among the texts
    it does not hold yet and that are lighter than the donor's lead over it. So every move
    lowers the sum of squared sizes and the loop ends. With unit weights the band is always
    reached; with weights a text heavier than the band may make it unreachable, and the
    last value returned (within_band) says so.
    Written by hand: no library rebalances a hard clustering to a size band.
    Returns (member, primary, n_moved, within_band).
    """
    member = member.copy()
    primary = primary.copy()
    n_texts, n_parts = member.shape
    w = np.ones(n_texts) if weights is None else np.asarray(weights, dtype=np.float64)
    sizes = w @ member
    lo, hi = size_bounds(float(sizes.sum()), n_parts, tolerance)
    moved = 0
    while sizes.max() > hi or sizes.min() < lo:
        receiver = int(np.argmin(sizes))
        over = np.flatnonzero(sizes > hi)
        donors = over if over.size else np.flatnonzero(sizes == sizes.max())
        lead = sizes[donors] - sizes[receiver]
        movable = member[:, donors] & (w[:, None] < lead[None, :] - 1e-9) & ~member[:, [receiver]]
        rows = np.flatnonzero(movable.any(axis=1))
        if rows.size == 0:
            return member, primary, moved, False
        text = int(rows[np.argmin(cost[rows, receiver])])
        holders = donors[movable[text]]
        donor = int(holders[np.argmax(sizes[holders])])
        member[text, donor] = False
        member[text, receiver] = True
        if primary[text] == donor:
            primary[text] = receiver
        sizes[donor] -= w[text]
        sizes[receiver] += w[text]
        moved += 1
    return member, primary, moved, True


def assign_partitions(
    n_texts: int,
    cfg: PartitionConfig,
    *,
    embeddings: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> Assignment:
    """Deal, overlap and rebalance `n_texts` texts as `cfg` says.

    `clustered` needs `embeddings` [n_texts, dim]; `curriculum` needs `scores` [n_texts]
    (higher = harder, e.g. `mean_word_length` or perplexity); `random` needs neither.
    `weights` [n_texts] is each text's size for overlap and balance (e.g. its length in
    characters); default 1 per text. KMeans weighs points by it too, so a cluster is
    judged by how much text it holds, not by how many texts.
    """
    n = cfg.n_partitions
    check_enough_texts(n_texts, n)
    if weights is not None and len(weights) != n_texts:
        raise ValueError(f"got {len(weights)} weights for {n_texts} texts")
    centroids = None
    if cfg.strategy == "random":
        labels = deal_random(n_texts, n, cfg.seed)
        # random costs: overlap and rebalancing pick seeded random texts
        cost = np.random.default_rng([cfg.seed, 1]).random((n_texts, n))
    elif cfg.strategy == "clustered":
        if embeddings is None or len(embeddings) != n_texts:
            raise ValueError(f"clustered partitioning needs embeddings for all {n_texts} texts")
        labels, centroids = cluster_embeddings(embeddings, n, cfg.seed, weights=weights)
        cost = squared_distances(embeddings, centroids)
    elif cfg.strategy == "curriculum":
        if scores is None or len(scores) != n_texts:
            raise ValueError(f"curriculum partitioning needs a score for all {n_texts} texts")
        scores = np.asarray(scores, dtype=np.float64)
        labels = deal_by_score(scores, n, weights=weights)
        cost = score_cost(scores, labels, n)
    else:  # PartitionConfig validates; kept for direct callers
        raise ValueError(f"unknown strategy {cfg.strategy!r}")

    member = np.zeros((n_texts, n), dtype=bool)
    member[np.arange(n_texts), labels] = True
    member, added = add_overlap(member, cfg.overlap_ratio, cost, weights)
    member, primary, moved, within = rebalance(member, labels, cost, cfg.balance_tolerance, weights)
    return Assignment(
        member=member,
        primary=primary,
        base_labels=labels,
        cost=cost,
        centroids=centroids,
        weights=np.ones(n_texts) if weights is None else np.asarray(weights, dtype=np.float64),
        n_overlap_added=added,
        n_moved=moved,
        within_band=within,
    )
