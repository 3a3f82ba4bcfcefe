"""How good a partitioning is: agreement with domain labels, overlaps, distinctive terms.

Pure computation on arrays and strings (scikit-learn for the metrics and term counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def purity(labels: np.ndarray, classes: Sequence) -> float:
    """Share of texts whose partition's majority class is their own class (1.0 = pure)."""
    labels = np.asarray(labels)
    _, class_ids = np.unique(np.asarray(classes), return_inverse=True)
    if labels.size == 0:
        return float("nan")
    table = contingency(labels, class_ids)
    return float(table.max(axis=1).sum() / labels.size)


def contingency(labels: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Counts [n_labels, n_classes] of (label, class) pairs; both are 0-based ints."""
    labels = np.asarray(labels, dtype=np.int64)
    class_ids = np.asarray(class_ids, dtype=np.int64)
    n_rows = int(labels.max()) + 1 if labels.size else 0
    n_cols = int(class_ids.max()) + 1 if class_ids.size else 0
    out = np.zeros((n_rows, n_cols), dtype=np.int64)
    np.add.at(out, (labels, class_ids), 1)
    return out


def contingency_members(member: np.ndarray, class_ids: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [n_partitions, n_classes] over every copy (overlap copies included)."""
    onehot = np.zeros((member.shape[0], n_classes), dtype=np.int64)
    onehot[np.arange(member.shape[0]), np.asarray(class_ids, dtype=np.int64)] = 1
    return member.astype(np.int64).T @ onehot


def adjusted_rand_index(labels: np.ndarray, classes: Sequence) -> float:
    """Adjusted Rand index of the partition labels against the classes (1 = identical, ~0 = chance)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(classes), np.asarray(labels)))


def overlap_counts(member: np.ndarray) -> np.ndarray:
    """[n_partitions, n_partitions] texts shared by each pair; the diagonal holds the sizes."""
    m = member.astype(np.int64)
    return m.T @ m


def top_terms(texts_by_partition: Sequence[Sequence[str]], n_terms: int = 10) -> list[list[str]]:
    """The most distinctive words of each partition (class-based tf-idf).

    Each partition's texts are counted as one document and weighted by tf-idf across
    partitions, so words common to all partitions rank below words typical of one.
    """
    from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

    docs = [" ".join(texts) for texts in texts_by_partition]
    try:
        vec = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[^\W\d_]{2,}\b", lowercase=True)
        counts = vec.fit_transform(docs)
    except ValueError:  # empty vocabulary: no words at all
        return [[] for _ in docs]
    weights = TfidfTransformer(sublinear_tf=True).fit_transform(counts).toarray()
    vocab = vec.get_feature_names_out()
    out: list[list[str]] = []
    for row, raw in zip(weights, counts.toarray()):
        order = np.lexsort((vocab, -row))  # by weight, ties alphabetical
        out.append([str(vocab[j]) for j in order[:n_terms] if raw[j] > 0])
    return out


def separation(vectors: np.ndarray, labels: np.ndarray, *, max_points: int = 3000, seed: int = 0) -> float:
    """Cosine silhouette of a hard clustering (-1..1, higher = better separated), on a seeded
    sample of at most max_points texts (the exact score is quadratic in the number of texts)."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return -1.0
    n = len(labels)
    return float(silhouette_score(vectors, labels, metric="cosine", sample_size=min(n, max_points), random_state=seed))
