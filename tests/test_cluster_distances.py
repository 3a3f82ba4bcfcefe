"""Layer-1 tests of ensemble normalization and distances, against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moescope.cluster.distances import compute_distances, pair_matching_distance, perm_invariant_hamming
from moescope.cluster.ensemble import normalize_ensemble
from moescope.cluster.merge import MergeConfig, merge_iteration


def brute_hamming(x, y):
    """min over all one-to-one relabelings of x's groups (into y's groups or fresh ids) of mismatches."""
    xs, ys = sorted(set(x)), sorted(set(y))
    targets = ys + [f"fresh{i}" for i in range(len(xs))]
    best = len(x)
    for image in itertools.permutations(targets, len(xs)):
        mapping = dict(zip(xs, image))
        best = min(best, sum(mapping[a] != b for a, b in zip(x, y)))
    return best


def brute_pairs(x, y):
    return sum((x[i] == x[j]) != (y[i] == y[j]) for i, j in itertools.combinations(range(len(x)), 2))


def test_perm_invariant_hamming_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 9))
        x = rng.integers(0, int(rng.integers(1, 5)), size=n)
        y = rng.integers(0, int(rng.integers(1, 5)), size=n)
        assert perm_invariant_hamming(x, y) == brute_hamming(list(x), list(y)), (x, y)


def test_hamming_uses_hungarian_on_entangled_tables():
    # a contingency graph with no star component: needs the assignment solver
    x = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    y = np.array([0, 1, 1, 1, 2, 2, 2, 0, 0, 0])
    assert perm_invariant_hamming(x, y) == brute_hamming(list(x), list(y))
    assert perm_invariant_hamming(x, (x + 1) % 3) == 0


def test_pair_matching_equals_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        x, y = rng.integers(0, 4, size=n), rng.integers(0, 3, size=n)
        assert pair_matching_distance(x, y) == brute_pairs(x, y)


def test_normalize_ensemble_missing_labels_are_singletons():
    rng = np.random.default_rng(2)
    acts = (rng.random((300, 6)) < 0.3).astype(float)
    a = acts.copy()
    a[:, 1] = 0  # dead in member a
    b = acts.copy()
    b[:, 4] = 0  # dead in member b
    labels = [f"L0.e{i}" for i in range(6)]
    ha = merge_iteration(a, MergeConfig(alpha=0.5), labels=labels)
    hb = merge_iteration(b, MergeConfig(alpha=0.5), labels=labels)
    norm = normalize_ensemble([ha, hb])
    assert sorted(norm.labels) == sorted(labels)
    assert norm.assignments.shape == (2, 5, 6)  # 5 kept -> 4 merges -> 5 rows each
    col_a, col_b = norm.labels.index("L0.e1"), norm.labels.index("L0.e4")
    for step in range(norm.n_steps + 1):
        row = norm.assignments[0, step]
        assert (row == row[col_a]).sum() == 1  # the missing component stays alone
        assert sorted(np.unique(row)) == list(range(row.max() + 1))
        assert (norm.assignments[1, step] == norm.assignments[1, step][col_b]).sum() == 1
    assert list(norm.n_groups[0]) == [6, 5, 4, 3, 2]


def test_compute_distances_pairwise_symmetric_and_zero_for_identical_members():
    rng = np.random.default_rng(3)
    acts = (rng.random((400, 10)) < 0.25).astype(float)
    cfg = MergeConfig(alpha=0.5, pair_selection="range", range_threshold_bits=0.02)
    hists = [merge_iteration(acts, MergeConfig(**{**cfg.__dict__, "seed": s})) for s in (0, 0, 1)]
    norm = normalize_ensemble(hists)
    for method, fn in (("perm_invariant_hamming", perm_invariant_hamming), ("pair_matching", pair_matching_distance)):
        d = compute_distances(norm, method)
        assert d.shape == (norm.n_steps + 1, 3, 3)
        assert np.array_equal(d, d.transpose(0, 2, 1)) and np.all(d[:, 0, 1] == 0)
        for step in range(norm.n_steps + 1):
            rows = norm.assignments[:, step]
            assert d[step, 0, 2] == fn(rows[0], rows[2])
    sub = compute_distances(norm, steps=[0, 3])
    assert sub.shape == (2, 3, 3) and np.all(sub[0] == 0)  # all singletons at step 0
    with pytest.raises(ValueError, match="unknown distance method"):
        compute_distances(norm, "euclid")
