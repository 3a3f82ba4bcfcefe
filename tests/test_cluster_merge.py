"""Layer-1 tests of the MDL merge: exact costs, incremental C, determinism, planted pathways."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moescope.cluster.distances import perm_invariant_hamming
from moescope.cluster.merge import (
    MergeConfig,
    choose_pair,
    compute_coactivation,
    compute_mdl,
    compute_merge_costs,
    merge_iteration,
    pack_masks,
    shuffle_tokens,
    unpack_masks,
)


def random_masks(rng, n_tokens=300, n=8, density=0.3):
    return rng.random((n_tokens, n)) < rng.uniform(0.05, density, size=n)


def group_coactivation(masks, groups):
    ids = np.unique(groups)
    gm = np.stack([masks[:, groups == g].any(axis=1) for g in ids], axis=1)
    return gm.T.astype(np.int64) @ gm.astype(np.int64), np.array([(groups == g).sum() for g in ids])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 5.0])
def test_delta_mdl_equals_brute_force_difference(alpha):
    rng = np.random.default_rng(1)
    for trial in range(5):
        masks = random_masks(rng, n=9)
        groups = rng.integers(0, 6, size=9)
        groups = np.unique(groups, return_inverse=True)[1]
        coact, sizes = group_coactivation(masks, groups)
        costs = compute_merge_costs(coact, sizes, masks.shape[0], alpha)
        before = compute_mdl(masks, groups, alpha)
        k = coact.shape[0]
        for a, b in itertools.combinations(range(k), 2):
            merged = np.where(groups == b, a, groups)
            expected = compute_mdl(masks, merged, alpha) - before
            assert costs[a, b] == pytest.approx(expected, abs=1e-12)
            assert costs[b, a] == costs[a, b]
        assert np.all(np.isinf(np.diagonal(costs)))


def test_merged_group_rate_is_inclusion_exclusion():
    # s_ab = (C_aa + C_bb - C_ab) / N, checked against the OR of the two masks
    rng = np.random.default_rng(2)
    masks = random_masks(rng, n=2)
    c = compute_coactivation(masks)
    assert (masks[:, 0] | masks[:, 1]).sum() == c[0, 0] + c[1, 1] - c[0, 1]


def test_history_mdl_matches_brute_force_at_every_step():
    rng = np.random.default_rng(3)
    masks = random_masks(rng, n_tokens=400, n=10)
    cfg = MergeConfig(alpha=0.7, target_k=1)
    hist = merge_iteration(masks, cfg)
    assert hist.n_steps == 9
    for i in range(hist.n_steps + 1):
        row = hist.assignments[i]
        assert sorted(np.unique(row)) == list(range(10 - i))
        assert hist.mdl[i] == pytest.approx(compute_mdl(masks, row, cfg.alpha), abs=1e-9)
    # each step merges exactly the recorded pair, and the last id moves to b
    for i, (a, b) in enumerate(hist.merges):
        prev, nxt = hist.assignments[i], hist.assignments[i + 1]
        k = 10 - i
        expected = np.where(prev == b, a, prev)
        expected = np.where(expected == k - 1, b, expected) if b != k - 1 else expected
        assert np.array_equal(nxt, expected)


def test_greedy_argmin_takes_the_cheapest_merge_each_step():
    rng = np.random.default_rng(4)
    masks = random_masks(rng, n=8)
    cfg = MergeConfig(alpha=1.0)
    hist = merge_iteration(masks, cfg)
    for i in range(hist.n_steps):
        row = hist.assignments[i]
        coact, sizes = group_coactivation(masks, row)
        costs = compute_merge_costs(coact, sizes, masks.shape[0], cfg.alpha)
        assert hist.costs[i] == pytest.approx(costs.min(), abs=1e-12)


def test_incremental_update_equals_recomputing_c():
    rng = np.random.default_rng(5)
    masks = random_masks(rng, n_tokens=500, n=16)
    for sel in ("range", "mcmc"):
        common = dict(alpha=0.5, pair_selection=sel, range_threshold_bits=0.01, temperature_bits=0.01, seed=7)
        inc = merge_iteration(masks, MergeConfig(**common))
        ref = merge_iteration(masks, MergeConfig(**common, recompute_coactivation=True))
        assert np.array_equal(inc.assignments, ref.assignments)
        assert np.array_equal(inc.merges, ref.merges)
        np.testing.assert_allclose(inc.costs, ref.costs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sel", ["range", "mcmc"])
def test_same_seed_same_history_other_seed_differs(sel):
    rng = np.random.default_rng(6)
    masks = random_masks(rng, n_tokens=300, n=20)
    cfg = dict(alpha=0.5, pair_selection=sel, range_threshold_bits=0.05, temperature_bits=0.05)
    h1 = merge_iteration(masks, MergeConfig(**cfg, seed=11))
    h2 = merge_iteration(masks, MergeConfig(**cfg, seed=11))
    h3 = merge_iteration(masks, MergeConfig(**cfg, seed=12))
    assert np.array_equal(h1.assignments, h2.assignments) and np.array_equal(h1.costs, h2.costs)
    assert not np.array_equal(h1.merges, h3.merges)


def test_mcmc_samples_pairs_by_boltzmann_weights():
    costs = np.array([[np.inf, 0.0, 0.1], [0.0, np.inf, 0.3], [0.1, 0.3, np.inf]])
    upper = np.triu(np.ones((3, 3), bool), 1)
    cfg = MergeConfig(pair_selection="mcmc", temperature_bits=0.1)
    rng = np.random.default_rng(0)
    draws = [choose_pair(costs, upper, cfg, rng) for _ in range(6000)]
    freq = {p: draws.count(p) / len(draws) for p in [(0, 1), (0, 2), (1, 2)]}
    w = np.exp(-np.array([0.0, 0.1, 0.3]) / 0.1)
    w /= w.sum()
    for p, expected in zip([(0, 1), (0, 2), (1, 2)], w):
        assert freq[p] == pytest.approx(expected, abs=0.02)


def test_range_selection_stays_within_threshold_and_is_uniform():
    costs = np.array([[np.inf, 0.0, 0.04, 0.5], [0, np.inf, 0.05, 0.06], [0.04, 0.05, np.inf, 0.2], [0.5, 0.06, 0.2, np.inf]])
    costs = np.minimum(costs, costs.T)
    upper = np.triu(np.ones((4, 4), bool), 1)
    cfg = MergeConfig(range_threshold_bits=0.05)
    rng = np.random.default_rng(0)
    draws = [choose_pair(costs, upper, cfg, rng) for _ in range(3000)]
    assert set(draws) == {(0, 1), (0, 2), (1, 2)}
    for p in set(draws):
        assert draws.count(p) / len(draws) == pytest.approx(1 / 3, abs=0.04)
    assert choose_pair(costs, upper, MergeConfig(), rng) == (0, 1)


def test_pack_and_coactivation_roundtrip():
    rng = np.random.default_rng(7)
    masks = random_masks(rng, n_tokens=1000, n=13)  # N not a multiple of 64
    packed = pack_masks(masks)
    assert packed.dtype == np.uint64 and packed.shape == (13, 16)
    assert np.array_equal(unpack_masks(packed, 1000), masks)
    c = compute_coactivation(masks, chunk_tokens=128)
    assert np.array_equal(c, masks.T.astype(np.int64) @ masks.astype(np.int64))
    assert np.array_equal(np.bitwise_count(packed).sum(axis=1), masks.sum(axis=0))


def test_dead_components_dropped_and_labelled():
    rng = np.random.default_rng(8)
    acts = rng.random((200, 5)) * (rng.random((200, 5)) < 0.3)
    acts[:, 2] = 0.0
    acts[:, 4] = 0.01
    hist = merge_iteration(acts, MergeConfig(dead_threshold=0.05, target_k=2), labels=list("abcde"))
    assert hist.labels == ["a", "b", "d"] and hist.dropped == ["c", "e"]
    assert hist.n_steps == 1 and hist.assignments.shape == (2, 3)


def planted_routing(rng, n_tokens=4000, n_layers=3, n_experts=6, n_paths=3, noise=0.1):
    """A top-1 routing table where token type p takes expert path[l][p] in every layer.

    Returns gate-weight activations [N, layers*experts] and the planted group of
    each component (the path it belongs to; experts on no path are dead).
    """
    paths = np.stack([rng.permutation(n_experts)[:n_paths] for _ in range(n_layers)])  # [L, P]
    kind = rng.integers(0, n_paths, size=n_tokens)
    acts = np.zeros((n_tokens, n_layers * n_experts))
    truth = np.full(n_layers * n_experts, -1)
    for layer in range(n_layers):
        expert = paths[layer][kind].copy()
        flip = rng.random(n_tokens) < noise
        expert[flip] = paths[layer][rng.integers(0, n_paths, size=flip.sum())]
        acts[np.arange(n_tokens), layer * n_experts + expert] = rng.uniform(0.3, 1.0, size=n_tokens)
        truth[layer * n_experts + paths[layer]] = np.arange(n_paths)
    return acts, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_expert_pathways_recovered_exactly(seed):
    rng = np.random.default_rng(seed)
    acts, truth = planted_routing(rng)
    hist = merge_iteration(acts, MergeConfig(alpha=1.0, target_k=3))
    kept = np.array([int(lab[1:]) for lab in hist.labels])
    assert np.array_equal(np.sort(kept), np.flatnonzero(truth >= 0))  # off-path experts are dead
    assert perm_invariant_hamming(hist.assignments[-1], truth[kept]) == 0


def test_token_shuffle_keeps_rates_and_breaks_pathways():
    rng = np.random.default_rng(3)
    acts, truth = planted_routing(rng, noise=0.0)
    null = shuffle_tokens(acts, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(null, axis=0), np.sort(acts, axis=0))
    hist = merge_iteration(null, MergeConfig(alpha=1.0, target_k=3))
    kept = np.array([int(lab[1:]) for lab in hist.labels])
    assert perm_invariant_hamming(hist.assignments[-1], truth[kept]) > 0


def test_expert_activations_from_routing_table():
    from moescope.cluster.components import expert_activations

    idx = {2: np.array([[0, 1], [2, 0], [1, 2]]), 3: np.array([[1, 0], [1, 0], [0, 1]])}
    w = {2: np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]]), 3: np.ones((3, 2))}
    acts, labels = expert_activations(idx, w, n_experts=3)
    assert labels == ["L2.e0", "L2.e1", "L2.e2", "L3.e0", "L3.e1", "L3.e2"]
    expected = np.array([[0.7, 0.3, 0, 1, 1, 0], [0.4, 0, 0.6, 1, 1, 0], [0, 0.5, 0.5, 1, 1, 0]], dtype=np.float32)
    np.testing.assert_allclose(acts, expected)


def test_group_service_and_token_types():
    from moescope.cluster.components import TOKEN_TYPES, classify_tokens, group_masks, served_fraction

    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=bool)
    served = group_masks(masks, np.array([0, 0, 1]))
    assert served.tolist() == [[True, False], [True, False], [False, True], [True, False]]
    frac = served_fraction(served, np.array([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(frac, [[1.0, 0.5], [0.0, 0.5]])
    types = [TOKEN_TYPES[i] for i in classify_tokens([" the", "The", "42", ");", "\n", "x2"])]
    assert types == ["word", "capitalized", "number", "punctuation", "whitespace", "mixed"]
