"""Block bootstrap and block permutation test: coverage, determinism, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.analysis import metrics, stats


def clustered_routing(
    rng: np.random.Generator, n_blocks: int, block_len: int, n_experts: int, n_domains: int, strength: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens in blocks; each block has its own favourite expert (within-block dependence).

    With probability ``strength`` the favourite is the domain's expert, else random;
    strength 0 makes routing independent of the domain.
    """
    block_domain = rng.integers(0, n_domains, n_blocks)
    planted = rng.random(n_blocks) < strength
    favourite = np.where(planted, block_domain % n_experts, rng.integers(0, n_experts, n_blocks))
    block = np.repeat(np.arange(n_blocks), block_len)
    take_fav = rng.random(block.size) < 0.7
    expert = np.where(take_fav, favourite[block], rng.integers(0, n_experts, block.size))
    return expert, block, block_domain[block]


def test_sum_by_block_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    block = rng.choice([3, 7, 11, 20], size=50)
    values = rng.random((50, 2, 3))
    ids, sums = stats.sum_by_block(values, block)
    assert ids.tolist() == [3, 7, 11, 20]
    for b, s in zip(ids, sums):
        np.testing.assert_allclose(s, values[block == b].sum(axis=0))


def test_block_expert_counts() -> None:
    expert = np.array([[0, 1], [1, 2], [2, 0], [0, 0]])
    block = np.array([5, 5, 9, 9])
    ids, dom, counts = stats.block_expert_counts(expert, block, np.array([1, 1, 0, 0]), 3)
    assert ids.tolist() == [5, 9] and dom.tolist() == [1, 0]
    np.testing.assert_array_equal(counts, [[1, 2, 1], [3, 0, 1]])
    tables = stats.domain_tables(counts, dom, 2)
    np.testing.assert_array_equal(tables.sum(0), metrics.count_domain_expert(expert, np.array([1, 1, 0, 0]), 3, 2))
    with pytest.raises(ValueError, match="more than one domain"):
        stats.block_expert_counts(expert, block, np.array([1, 0, 0, 0]), 3)


def share_of_expert0(summed: np.ndarray) -> np.ndarray:
    return summed[..., 0] / summed.sum(axis=-1)


def test_bootstrap_moves_blocks_together() -> None:
    # 40 blocks of 100 tokens, each block entirely on expert 0 or 1: the effective
    # sample size is 40 blocks, not 4000 tokens.
    rng = np.random.default_rng(1)
    per_block = rng.integers(0, 2, 40)
    counts = np.stack([100.0 * (per_block == 0), 100.0 * (per_block == 1)], axis=1)
    ci = stats.bootstrap_interval(counts, share_of_expert0, n_resamples=2000, seed=3)
    p = counts[:, 0].sum() / counts.sum()
    assert ci.estimate == pytest.approx(p)
    assert ci.low < p < ci.high
    cluster_se = per_block.std() / np.sqrt(40)  # blocks are equal-sized: share = mean of block shares
    assert ci.high - ci.low == pytest.approx(2 * 1.96 * cluster_se, rel=0.2)
    # a token-level bootstrap would give a width about sqrt(100) = 10 times smaller
    assert ci.high - ci.low > 5 * 2 * 1.96 * np.sqrt(p * (1 - p) / 4000)


def test_bootstrap_is_deterministic_under_the_seed() -> None:
    rng = np.random.default_rng(2)
    expert, block, domain = clustered_routing(rng, 60, 32, 4, 3, strength=0.6)
    ids, dom, counts = stats.block_expert_counts(expert, block, domain, 4)
    tables = stats.domain_tables(counts, dom, 3)
    nmi = stats.nmi_statistic(3, 4)
    a = stats.bootstrap_interval(tables, nmi, strata=dom, n_resamples=500, seed=7)
    b = stats.bootstrap_interval(tables, nmi, strata=dom, n_resamples=500, seed=7)
    c = stats.bootstrap_interval(tables, nmi, strata=dom, n_resamples=500, seed=8)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)
    assert a.estimate == pytest.approx(
        float(metrics.normalized_mutual_information(metrics.count_domain_expert(expert, domain, 4, 3), equal_domain_weights=True))
    )
    assert a.low <= a.estimate <= a.high
    bca = stats.bootstrap_interval(tables, nmi, strata=dom, n_resamples=500, seed=7, method="BCa")
    assert bca.low <= bca.estimate <= bca.high
    assert a.to_dict()["method"] == "percentile"


def test_stratified_bootstrap_keeps_domain_sizes() -> None:
    # equal-sized blocks resampled within their domain: every resample has the same
    # number of tokens per domain, so the domain-0 token count has a zero-width interval
    rng = np.random.default_rng(4)
    expert, block, domain = clustered_routing(rng, 30, 16, 3, 2, strength=0.5)
    _, dom, counts = stats.block_expert_counts(expert, block, domain, 3)
    tables = stats.domain_tables(counts, dom, 2)
    ci = stats.bootstrap_interval(tables, lambda t: t[..., 0, :].sum(-1), strata=dom, n_resamples=200)
    assert ci.low == ci.high == ci.estimate == 16 * (dom == 0).sum()
    unstratified = stats.bootstrap_interval(tables, lambda t: t[..., 0, :].sum(-1), n_resamples=200)
    assert unstratified.high > unstratified.low
    # a stratum of one unit is held fixed: in every resample once, so what only it moves has no interval
    three = np.array([[1.0, 0.0], [5.0, 0.0], [0.0, 10.0]])  # columns: stratum 0's sum, stratum 1's
    strata = np.array([0, 0, 1])
    total = stats.bootstrap_interval(three, lambda t: t.sum(-1), strata=strata, n_resamples=200)
    assert total.estimate == 16 and (total.low, total.high) == (10 + 2 * 1, 10 + 2 * 5)  # unit 2 once, always
    lone = stats.bootstrap_interval(three, lambda t: t[..., 1], strata=strata, n_resamples=200)
    assert lone.estimate == 10 and np.isnan(lone.low) and np.isnan(lone.high)


def test_permutation_test_detects_planted_dependence() -> None:
    rng = np.random.default_rng(5)
    expert, block, domain = clustered_routing(rng, 60, 32, 4, 3, strength=0.9)
    _, dom, counts = stats.block_expert_counts(expert, block, domain, 4)
    res = stats.permutation_test_nmi(counts, dom, 3, n_permutations=999, seed=0)
    assert res.pvalue == pytest.approx(1 / 1000)  # nothing in the null reaches the observed NMI
    assert res.statistic > 0.2 > res.null_q95
    null = res.null_distribution
    assert null.size == 999
    assert res.pvalue == pytest.approx((1 + (null >= res.statistic).sum()) / (1 + null.size))
    again = stats.permutation_test_nmi(counts, dom, 3, n_permutations=999, seed=0)
    np.testing.assert_array_equal(again.null_distribution, null)
    assert set(res.to_dict()) == {"statistic", "pvalue", "n_permutations", "null_mean", "null_q95"}


def test_an_undefined_statistic_has_no_pvalue() -> None:
    """NMI over one domain is undefined (H(domain) = 0): no evidence, so p is NaN, not the smallest p."""
    counts = np.array([[3.0, 1.0], [0.0, 4.0], [2.0, 2.0]])
    res = stats.permutation_test_nmi(counts, np.zeros(3, dtype=int), 1, n_permutations=99)
    assert np.isnan(res.statistic) and np.isnan(res.pvalue)


def test_permutation_pvalues_are_uniform_without_dependence() -> None:
    # Routing clustered by block but independent of the domain: block-level shuffling
    # must give calibrated p-values (a token-level shuffle would not).
    rng = np.random.default_rng(6)
    pvalues = []
    for trial in range(150):
        expert, block, domain = clustered_routing(rng, 24, 20, 4, 3, strength=0.0)
        _, dom, counts = stats.block_expert_counts(expert, block, domain, 4)
        pvalues.append(stats.permutation_test_nmi(counts, dom, 3, n_permutations=199, seed=trial).pvalue)
    pvalues = np.array(pvalues)
    assert 0.4 < pvalues.mean() < 0.6
    assert np.mean(pvalues <= 0.05) < 0.12
    assert 0.35 < np.mean(pvalues <= 0.5) < 0.65

def test_token_level_shuffle_would_be_anticonservative() -> None:
    # The reason the block is the unit: treating each token as its own block, the same
    # domain-independent routing looks "significant" almost every time.
    rng = np.random.default_rng(6)
    small = 0
    for trial in range(20):
        expert, block, domain = clustered_routing(rng, 24, 20, 4, 3, strength=0.0)
        _, dom, counts = stats.block_expert_counts(expert, np.arange(expert.size), domain, 4)
        small += stats.permutation_test_nmi(counts, dom, 3, n_permutations=199, seed=trial).pvalue <= 0.05
    assert small >= 15


def test_sum_by_block_aligns_to_given_ids() -> None:
    ids, sums = stats.sum_by_block(np.array([1.0, 2.0, 4.0]), np.array([7, 3, 7]), np.array([1, 3, 7]))
    assert ids.tolist() == [1, 3, 7]
    np.testing.assert_allclose(sums, [0.0, 2.0, 5.0])
    with pytest.raises(ValueError):
        stats.sum_by_block(np.ones(2), np.array([3, 5]), np.array([1, 3]))


# --------------------------------------------------------------------------- paired loss difference


def test_paired_loss_difference_hand_computed() -> None:
    # domain 0: (10-9 + 12-12) / (5+5) = 0.1; domain 1: (0 + 2 - 1) / 12 = 1/12
    a = np.array([10.0, 12.0, 8.0, 8.0, 8.0])
    b = np.array([9.0, 12.0, 8.0, 6.0, 9.0])
    tokens = np.array([5, 5, 4, 4, 4])
    domain = np.array([0, 0, 1, 1, 1])
    res = stats.paired_loss_difference(a, b, tokens, domain, 2, n_resamples=200, n_permutations=200)
    assert res.domain_weighted.estimate == pytest.approx((0.1 + 1 / 12) / 2)
    assert res.domains[0].estimate == pytest.approx(0.1) and res.domains[1].estimate == pytest.approx(1 / 12)
    assert res.n_blocks == 5
    d = res.to_dict(["math", "prose"])
    assert set(d["domains"]) == {"math", "prose"} and 0 < d["pvalue"] <= 1


def test_paired_loss_difference_finds_a_planted_difference_that_unpaired_intervals_miss() -> None:
    rng = np.random.default_rng(0)
    n, tokens = 120, 100
    domain = np.repeat([0, 1, 2], n // 3)
    # Blocks differ a lot in difficulty (shared by both arms); arm A is 0.02 nats/token worse.
    difficulty = rng.normal(3.5, 0.5, n) * tokens
    b = difficulty + rng.normal(0, 0.05, n) * tokens
    a = difficulty + 0.02 * tokens + rng.normal(0, 0.05, n) * tokens
    res = stats.paired_loss_difference(a, b, np.full(n, tokens), domain, 3, n_resamples=500, n_permutations=500)
    iv = res.domain_weighted
    assert iv.low > 0 and iv.low < 0.02 < iv.high
    assert res.pvalue < 0.01
    # Unpaired, the two losses' own intervals overlap: the pairing is what resolves the difference.
    sums = lambda x: np.stack([np.eye(3)[domain] * x[:, None], np.eye(3)[domain] * tokens], axis=-1)  # noqa: E731
    stat = lambda t: (t[..., 0] / t[..., 1]).mean(-1)  # noqa: E731
    ia = stats.bootstrap_interval(sums(a), stat, strata=domain, n_resamples=500)
    ib = stats.bootstrap_interval(sums(b), stat, strata=domain, n_resamples=500)
    assert ia.low < ib.high
    # Same arms swapped: the sign flips, the p-value is the same test.
    swapped = stats.paired_loss_difference(b, a, np.full(n, tokens), domain, 3, n_resamples=500, n_permutations=500)
    assert swapped.domain_weighted.estimate == pytest.approx(-iv.estimate)
    # No planted difference: not significant.
    null = stats.paired_loss_difference(b + rng.normal(0, 0.05, n) * tokens, b, np.full(n, tokens), domain, 3,
                                        n_resamples=200, n_permutations=500)
    assert null.domain_weighted.low < 0 < null.domain_weighted.high and null.pvalue > 0.05
