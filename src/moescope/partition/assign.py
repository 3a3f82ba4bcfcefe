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
    n_overlap_added: np.ndarray  # int64 [n_partitions]
    n_moved: int  # texts moved by rebalancing

    @property
    def n_partitions(self) -> int:
        return self.member.shape[1]

    def sizes(self) -> np.ndarray:
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


def deal_by_score(scores: np.ndarray, n_partitions: int) -> np.ndarray:
    """Sort by score (ties by index) and cut into contiguous chunks: partition 0 is the easiest."""
    order = np.argsort(scores, kind="stable")
    labels = np.empty(len(scores), dtype=np.int64)
    for p, chunk in enumerate(np.array_split(order, n_partitions)):
        labels[chunk] = p
    return labels


def cluster_embeddings(embeddings: np.ndarray, n_partitions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded KMeans (scikit-learn): labels [n] and centroids [n_partitions, dim]."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(embeddings, dtype=np.float64)
    with warnings.catch_warnings():
        # fewer distinct points than clusters (e.g. identical texts) is handled by rebalancing
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=n_partitions, random_state=seed, n_init=10).fit(x)
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


def add_overlap(member: np.ndarray, overlap_ratio: float, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Give each partition round(overlap_ratio x its size) extra texts from the others.

    The extra texts are the other partitions' texts with the lowest cost for the receiver
    (for `clustered`: the nearest ones, i.e. the border between clusters). Sizes are
    taken before any overlap is added, so the order of partitions does not matter.
    """
    member = member.copy()
    base = member.copy()
    n_texts, n_parts = member.shape
    added = np.zeros(n_parts, dtype=np.int64)
    for p in range(n_parts):
        want = int(round(overlap_ratio * base[:, p].sum()))
        candidates = np.flatnonzero(~base[:, p])
        if want <= 0 or candidates.size == 0:
            continue
        # stable sort: equal costs fall back to text order, so results are deterministic
        chosen = candidates[np.argsort(cost[candidates, p], kind="stable")[:want]]
        member[chosen, p] = True
        added[p] = chosen.size
    return member, added


def rebalance(
    member: np.ndarray, primary: np.ndarray, cost: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Move texts from oversized to undersized partitions until all sizes are in bounds.

    Each move takes, from the oversized partitions (or the largest one when none is
    over the bound), the text with the lowest cost for the smallest partition that the
    smallest partition does not hold yet. The donor always holds at least two texts more
    than the receiver, so the sum of squared sizes falls with every move and the loop ends.
    Written by hand: no library rebalances a hard clustering to a size band.
    """
    member = member.copy()
    primary = primary.copy()
    n_parts = member.shape[1]
    sizes = member.sum(axis=0).astype(np.int64)
    lo, hi = size_bounds(int(sizes.sum()), n_parts, tolerance)
    moved = 0
    while sizes.max() > hi or sizes.min() < lo:
        receiver = int(np.argmin(sizes))
        over = np.flatnonzero(sizes > hi)
        donors = over if over.size else np.flatnonzero(sizes == sizes.max())
        movable = member[:, donors].any(axis=1) & ~member[:, receiver]
        rows = np.flatnonzero(movable)
        text = int(rows[np.argmin(cost[rows, receiver])])
        holders = donors[member[text, donors]]
        donor = int(holders[np.argmax(sizes[holders])])
        member[text, donor] = False
        member[text, receiver] = True
        if primary[text] == donor:
            primary[text] = receiver
        sizes[donor] -= 1
        sizes[receiver] += 1
        moved += 1
    return member, primary, moved


def assign_partitions(
    n_texts: int,
    cfg: PartitionConfig,
    *,
    embeddings: np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> Assignment:
    """Deal, overlap and rebalance `n_texts` texts as `cfg` says.

    `clustered` needs `embeddings` [n_texts, dim]; `curriculum` needs `scores` [n_texts]
    (higher = harder, e.g. `mean_word_length` or perplexity); `random` needs neither.
    """
    n = cfg.n_partitions
    check_enough_texts(n_texts, n)
    centroids = None
    if cfg.strategy == "random":
        labels = deal_random(n_texts, n, cfg.seed)
        # random costs: overlap and rebalancing pick seeded random texts
        cost = np.random.default_rng([cfg.seed, 1]).random((n_texts, n))
    elif cfg.strategy == "clustered":
        if embeddings is None or len(embeddings) != n_texts:
            raise ValueError(f"clustered partitioning needs embeddings for all {n_texts} texts")
        labels, centroids = cluster_embeddings(embeddings, n, cfg.seed)
        cost = squared_distances(embeddings, centroids)
    elif cfg.strategy == "curriculum":
        if scores is None or len(scores) != n_texts:
            raise ValueError(f"curriculum partitioning needs a score for all {n_texts} texts")
        scores = np.asarray(scores, dtype=np.float64)
        labels = deal_by_score(scores, n)
        cost = score_cost(scores, labels, n)
    else:  # PartitionConfig validates; kept for direct callers
        raise ValueError(f"unknown strategy {cfg.strategy!r}")

    member = np.zeros((n_texts, n), dtype=bool)
    member[np.arange(n_texts), labels] = True
    member, added = add_overlap(member, cfg.overlap_ratio, cost)
    member, primary, moved = rebalance(member, labels, cost, cfg.balance_tolerance)
    return Assignment(
        member=member,
        primary=primary,
        base_labels=labels,
        cost=cost,
        centroids=centroids,
        n_overlap_added=added,
        n_moved=moved,
    )
