"""Pure partition assignment: deal, cluster, curriculum, overlap, rebalance (no files, no models)."""

import numpy as np
import pytest

from moescope.partition.assign import (
    add_overlap,
    assign_partitions,
    deal_by_score,
    deal_random,
    mean_word_length,
    rebalance,
    size_bounds,
    squared_distances,
)
from moescope.partition.config import PartitionConfig
from moescope.partition.quality import adjusted_rand_index, contingency, overlap_counts, purity, top_terms


def blobs(sizes, dim=8, spread=0.05, seed=0):
    """Well-separated Gaussian blobs: the ground truth clustering is the blob id."""
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[: len(sizes)] * 5.0
    x = np.concatenate([c + spread * rng.standard_normal((n, dim)) for c, n in zip(centers, sizes)])
    y = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return x, y


def check_invariants(a, n_texts, tolerance=0.2):
    sizes = a.sizes()
    lo, hi = size_bounds(int(sizes.sum()), a.n_partitions, tolerance)
    assert sizes.min() >= lo and sizes.max() <= hi
    # every text keeps its own copy somewhere, and exactly that partition is its primary
    assert a.member[np.arange(n_texts), a.primary].all()
    assert set(np.unique(a.primary)) <= set(range(a.n_partitions))


@pytest.mark.parametrize("strategy", ["random", "clustered", "curriculum"])
def test_fewer_texts_than_partitions_is_a_clear_value_error(strategy):
    x, _ = blobs([1, 1])
    with pytest.raises(ValueError, match="cannot split 2 text"):
        assign_partitions(2, PartitionConfig(n_partitions=3, strategy=strategy), embeddings=x, scores=np.zeros(2))


@pytest.mark.parametrize("strategy", ["random", "clustered", "curriculum"])
def test_same_seed_gives_identical_partitions_and_a_new_seed_changes_random(strategy):
    x, _ = blobs([30, 25, 20])
    scores = np.random.default_rng(3).random(len(x))
    cfg = PartitionConfig(n_partitions=3, strategy=strategy, seed=7)
    a = assign_partitions(len(x), cfg, embeddings=x, scores=scores)
    b = assign_partitions(len(x), cfg, embeddings=x, scores=scores)
    assert np.array_equal(a.member, b.member) and np.array_equal(a.primary, b.primary)
    check_invariants(a, len(x))
    if strategy == "random":
        c = assign_partitions(len(x), PartitionConfig(n_partitions=3, strategy=strategy, seed=8))
        assert not np.array_equal(a.member, c.member)


def test_random_deal_is_a_permutation_dealt_round_robin():
    labels = deal_random(10, 3, seed=0)
    assert sorted(np.bincount(labels).tolist()) == [3, 3, 4]
    assert not np.array_equal(labels, np.arange(10) % 3)  # shuffled, not the identity deal


def test_clustered_recovers_separated_blobs_exactly():
    x, y = blobs([40, 40, 40])
    a = assign_partitions(len(x), PartitionConfig(n_partitions=3, strategy="clustered", overlap_ratio=0.0), embeddings=x)
    assert adjusted_rand_index(a.primary, y) == pytest.approx(1.0)
    assert a.member.sum() == len(x) and a.n_moved == 0
    # centroids sit on the blob centres
    assert np.abs(np.sort(a.centroids.max(axis=1)) - 5.0).max() < 0.1


def test_curriculum_deals_from_easy_to_hard():
    texts = ["a bb"] * 5 + ["extraordinary circumstances"] * 5 + ["cat sat on mat today"] * 5
    scores = mean_word_length(texts)
    assert scores[0] == pytest.approx(1.5) and scores[5] == pytest.approx(13.0)
    a = assign_partitions(15, PartitionConfig(n_partitions=3, strategy="curriculum", overlap_ratio=0.0), scores=scores)
    means = [scores[a.primary == p].mean() for p in range(3)]
    assert means[0] < means[1] < means[2]
    assert deal_by_score(np.array([3.0, 1.0, 2.0, 0.0]), 2).tolist() == [1, 0, 1, 0]


def test_overlap_adds_ratio_times_size_nearest_texts_from_other_partitions():
    x, y = blobs([50, 30, 20])
    member = np.zeros((100, 3), dtype=bool)
    member[np.arange(100), y] = True
    centroids = np.stack([x[y == p].mean(0) for p in range(3)])
    cost = squared_distances(x, centroids)
    out, added = add_overlap(member, 0.1, cost)
    assert added.tolist() == [5, 3, 2]
    for p in range(3):
        extra = np.flatnonzero(out[:, p] & ~member[:, p])
        assert len(extra) == added[p]
        assert (y[extra] != p).all()  # drawn from the other partitions only
        others = np.flatnonzero(~out[:, p])
        assert cost[extra, p].max() <= cost[others, p].min()  # the nearest ones
    assert (out.sum(1) >= 1).all() and np.array_equal(out[member], np.ones(100, bool))


def test_rebalance_moves_the_texts_nearest_the_receiving_centroid_first():
    x, y = blobs([90, 10])
    member = np.zeros((100, 2), dtype=bool)
    member[np.arange(100), y] = True
    centroids = np.stack([x[y == p].mean(0) for p in range(2)])
    cost = squared_distances(x, centroids)
    out, primary, moved, within = rebalance(member, y.copy(), cost, 0.2)
    assert within
    # mean 50, band [40, 60]: exactly 30 texts move from partition 0 to 1
    assert moved == 30 and out.sum(0).tolist() == [60, 40]
    moved_rows = np.flatnonzero(out[:, 1] & (y == 0))
    expected = np.argsort(np.where(y == 0, cost[:, 1], np.inf), kind="stable")[:30]
    assert set(moved_rows) == set(expected)
    assert (primary[moved_rows] == 1).all() and (primary[y == 1] == 1).all()


def test_rebalance_meets_the_band_on_random_imbalanced_memberships():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n_parts = int(rng.integers(2, 7))
        n = int(rng.integers(n_parts, 200))
        weights = rng.dirichlet(np.full(n_parts, 0.3))
        labels = rng.choice(n_parts, size=n, p=weights)
        member = np.zeros((n, n_parts), dtype=bool)
        member[np.arange(n), labels] = True
        member |= rng.random((n, n_parts)) < 0.05  # some overlap copies
        member[np.arange(n), labels] = True
        total = member.sum()
        out, primary, _, within = rebalance(member, labels, rng.random((n, n_parts)), 0.2)
        assert within
        lo, hi = size_bounds(int(total), n_parts, 0.2)
        assert out.sum() == total
        assert out.sum(0).min() >= lo and out.sum(0).max() <= hi, trial
        assert out[np.arange(n), primary].all()


def test_weighted_rebalance_balances_characters_not_texts():
    rng = np.random.default_rng(1)
    x, y = blobs([300, 60, 40])
    weights = np.where(y == 0, 100.0, 500.0) * rng.uniform(0.5, 1.5, size=len(y))  # few long texts elsewhere
    member = np.zeros((len(y), 3), dtype=bool)
    member[np.arange(len(y)), y] = True
    out, primary, moved, within = rebalance(member, y.copy(), rng.random((len(y), 3)), 0.2, weights)
    sizes = weights @ out
    assert within and np.abs(sizes / sizes.mean() - 1).max() <= 0.2
    assert np.isclose(sizes.sum(), weights.sum())
    # a single text heavier than the band: the band is unreachable, the loop still ends and says so
    member = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=bool)
    out, _, _, within = rebalance(member, np.array([0, 1, 1, 1]), np.zeros((4, 2)), 0.2, np.array([100.0, 1, 1, 1]))
    assert not within and out.sum() == 4


def test_weighted_overlap_adds_about_ratio_times_the_weight():
    y = np.array([0] * 10 + [1] * 10)
    member = np.zeros((20, 2), dtype=bool)
    member[np.arange(20), y] = True
    weights = np.arange(1, 21, dtype=float)
    cost = np.tile(np.arange(20, dtype=float)[:, None], (1, 2))  # lower index = nearer
    out, added = add_overlap(member, 0.5, cost, weights)
    # partition 1 holds weight 155 -> wants 78, but the others hold only 55: it gets all 10
    assert added[1] == 10 and weights[out[:, 1] & (y == 0)].sum() == 55
    # partition 0 holds 55 -> wants 28 from texts 11, 12 (weights 11+12=23; +13 would be 36)
    assert added[0] == 2 and np.flatnonzero(out[:, 0] & (y == 1)).tolist() == [10, 11]


def test_weighted_curriculum_deal_splits_the_characters_evenly():
    scores = np.arange(12, dtype=float)
    weights = np.array([10.0] * 6 + [30.0] * 6)  # hard texts are long
    labels = deal_by_score(scores, 2, weights)
    assert labels.tolist() == [0] * 8 + [1] * 4  # 6x10 + 2x30 = 120 = 4x30
    assert np.all(np.diff(labels) >= 0)


def test_size_bounds_are_twenty_percent_or_the_nearest_integers():
    assert size_bounds(100, 4, 0.2) == (20, 30)
    assert size_bounds(3, 2, 0.2) == (1, 2)  # mean 1.5: no integer within +-20%
    assert size_bounds(12, 3, 0.2) == (4, 4)  # 3.2..4.8 holds only 4


@pytest.mark.parametrize("strategy", ["random", "clustered", "curriculum"])
def test_all_identical_texts_end_balanced(strategy):
    n = 31
    x = np.ones((n, 16))
    scores = np.full(n, 4.0)
    a = assign_partitions(n, PartitionConfig(n_partitions=4, strategy=strategy, seed=1), embeddings=x, scores=scores)
    check_invariants(a, n)
    assert a.member.any(axis=0).all()


def test_quality_metrics_known_values():
    labels = np.array([0, 0, 0, 1, 1, 1])
    classes = ["a", "a", "b", "b", "b", "b"]
    assert purity(labels, classes) == pytest.approx(5 / 6)
    assert contingency(labels, np.array([0, 0, 1, 1, 1, 1])).tolist() == [[2, 1], [0, 3]]
    assert adjusted_rand_index(labels, ["x", "x", "x", "y", "y", "y"]) == pytest.approx(1.0)
    member = np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)
    assert overlap_counts(member).tolist() == [[2, 1], [1, 2]]


def test_top_terms_are_distinctive_per_partition():
    code = ["def function return value import module"] * 3
    prose = ["the river valley kingdom history"] * 3
    terms = top_terms([code + ["shared words"], prose + ["shared words"]], n_terms=3)
    assert set(terms[0]) <= {"def", "function", "return", "value", "import", "module"}
    assert set(terms[1]) <= {"river", "valley", "kingdom", "history"}
