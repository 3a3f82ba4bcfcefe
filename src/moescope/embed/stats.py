"""Geometry of an embedding set (pure computation: arrays in, numbers out).

- mean pairwise cosine (anisotropy; Ethayarajh 2019): the mean of cos(e_i, e_j) over all
  ordered pairs i != j. Near 1 means every text points the same way (a narrow cone);
  near 0 means directions are spread out.
- effective rank (Roy & Vetterli 2007): exp of the Shannon entropy of the singular values
  normalized to sum 1, of the row-normalized embedding matrix (not centred, so the common
  direction that anisotropy measures counts as one dimension). It lies in [1, min(n, d)].
"""

from __future__ import annotations

import numpy as np


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need a 2-D array of at least 2 embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def mean_pairwise_cosine(embeddings: np.ndarray) -> float:
    """Mean cosine over pairs i != j, in O(n d): for unit rows, sum_{i != j} u_i.u_j = |sum u|^2 - n."""
    u = _unit_rows(embeddings)
    n = u.shape[0]
    total = float(np.square(u.sum(axis=0)).sum())
    n_zero = int((np.linalg.norm(u, axis=1) == 0).sum())  # zero rows have no direction; they add 0
    return (total - (n - n_zero)) / (n * (n - 1))


def effective_rank(embeddings: np.ndarray) -> float:
    """exp(entropy of normalized singular values) of the row-normalized matrix."""
    s = np.linalg.svd(_unit_rows(embeddings), compute_uv=False)
    s = s[s > s.max() * 1e-12] if s.size and s.max() > 0 else s[:0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def embedding_stats(embeddings: np.ndarray) -> dict[str, float | int]:
    """{"n_texts", "dim", "mean_cosine", "effective_rank"} of one embedding set."""
    x = np.asarray(embeddings)
    return {
        "n_texts": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "mean_cosine": mean_pairwise_cosine(x),
        "effective_rank": effective_rank(x),
    }


PROJECTIONS = ("pca", "umap")


def project_2d(embeddings: np.ndarray, method: str, *, seed: int = 0) -> np.ndarray:
    """[n, 2] coordinates of `embeddings` by scikit-learn's PCA or umap-learn's UMAP (cosine metric).

    UMAP gets a fixed random_state (deterministic, single-threaded) and, for the few points
    of a tiny held-out set, n_neighbors below n and a random initialization (its spectral
    initialization needs more points than neighbours).
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"need at least 3 embeddings to project, got shape {x.shape}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "umap":
        import umap

        n = x.shape[0]
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), metric="cosine", random_state=seed, n_jobs=1,
                            init="spectral" if n > 50 else "random")
        return np.asarray(reducer.fit_transform(x))
    raise ValueError(f"unknown projection {method!r} (use {', '.join(PROJECTIONS)})")
