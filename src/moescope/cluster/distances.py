"""Distances between two groupings of the same items, and between ensemble members (layer 1).

Permutation-invariant Hamming distance: the fewest items that must change group
so that one labeling equals the other under the best one-to-one matching of
group ids; equals n minus the maximum-weight matching on the contingency table
(scipy's Hungarian solver).  Pair-matching distance: the number of item pairs
grouped together in one labeling and apart in the other (unnormalized Rand
distance).  The contingency graph splits into connected components whose best
matchings are independent; components with a single group on one side (almost
all of them early in a merge) are solved in closed form and only the rest goes
to the Hungarian solver, so full ensembles of long histories stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from moescope.cluster.ensemble import NormalizedHistories

DistanceMethod = Literal["perm_invariant_hamming", "pair_matching"]
DISTANCE_METHODS: tuple[str, ...] = ("perm_invariant_hamming", "pair_matching")


def _check_labelings(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"labelings must be 1-D and the same length, got {x.shape} and {y.shape}")
    return x, y


def _contingency(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Sparse contingency table: (x group, y group, count) for every non-empty cell, compact ids."""
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    kx, ky = int(xi.max()) + 1, int(yi.max()) + 1
    cells, counts = np.unique(xi.astype(np.int64) * ky + yi, return_counts=True)
    return cells // ky, cells % ky, counts, kx, ky


def perm_invariant_hamming(x: np.ndarray, y: np.ndarray) -> int:
    """n - (maximum matching of x's groups to y's groups on the contingency table)."""
    x, y = _check_labelings(x, y)
    if x.size == 0:
        return 0
    ex, ey, counts, kx, ky = _contingency(x, y)
    graph = coo_matrix((np.ones(len(ex)), (ex, kx + ey)), shape=(kx + ky, kx + ky))
    n_comp, comp_of = connected_components(graph, directed=False)
    edge_comp = comp_of[ex]
    nx = np.bincount(comp_of[:kx], minlength=n_comp)
    ny = np.bincount(comp_of[kx:], minlength=n_comp)
    star = (nx == 1) | (ny == 1)
    # a star matches exactly one of its edges: the heaviest
    best = np.zeros(n_comp, dtype=np.int64)
    np.maximum.at(best, edge_comp, counts)
    matched = int(best[star].sum())
    # the rest in one solve: the table restricted to non-star components is block-diagonal,
    # and the best matching of a block-diagonal table is the sum of its blocks' best
    rest = ~star[edge_comp]
    if rest.any():
        rows, ri = np.unique(ex[rest], return_inverse=True)
        cols, ci = np.unique(ey[rest], return_inverse=True)
        table = np.zeros((len(rows), len(cols)), dtype=np.int64)
        table[ri, ci] = counts[rest]
        r, c = linear_sum_assignment(table, maximize=True)
        matched += int(table[r, c].sum())
    return int(x.size - matched)


def pair_matching_distance(x: np.ndarray, y: np.ndarray) -> int:
    """Item pairs together in one labeling and apart in the other."""
    x, y = _check_labelings(x, y)
    if x.size == 0:
        return 0
    ex, ey, counts, kx, ky = _contingency(x, y)

    def pairs(c: np.ndarray) -> int:
        return int((c * (c - 1) // 2).sum())

    both = pairs(counts)
    in_x = pairs(np.bincount(ex, weights=counts, minlength=kx).astype(np.int64))
    in_y = pairs(np.bincount(ey, weights=counts, minlength=ky).astype(np.int64))
    return in_x + in_y - 2 * both


_METHODS = {"perm_invariant_hamming": perm_invariant_hamming, "pair_matching": pair_matching_distance}


def compute_distances(
    normalized: NormalizedHistories,
    method: DistanceMethod = "perm_invariant_hamming",
    steps: Sequence[int] | None = None,
) -> np.ndarray:
    """Distance between every pair of members at each step: float64 [n_steps_selected, M, M], symmetric.

    Units: items (perm_invariant_hamming) or item pairs (pair_matching).
    steps: which merge steps (default: all, 0..n_steps).
    """
    if method not in _METHODS:
        raise ValueError(f"unknown distance method {method!r}; choose one of {list(_METHODS)}")
    fn = _METHODS[method]
    steps = list(range(normalized.n_steps + 1)) if steps is None else list(steps)
    m = normalized.n_members
    out = np.zeros((len(steps), m, m), dtype=np.float64)
    for si, step in enumerate(steps):
        rows = normalized.assignments[:, step, :]
        for i in range(m):
            for j in range(i + 1, m):
                out[si, i, j] = out[si, j, i] = fn(rows[i], rows[j])
    return out
