"""Routing metrics against numbers worked out by hand on tiny routing tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from moescope.analysis import metrics as m

# Domain A: 30 tokens to expert 0, 10 to expert 1; domain B: 5 to expert 0, 15 to expert 1.
UNBALANCED = np.array([[30.0, 10.0], [5.0, 15.0]])
# The same conditionals with equal domain sizes.
BALANCED = np.array([[30.0, 10.0], [10.0, 30.0]])


def routing_from_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token-level (expert, domain) arrays realizing a count table, shuffled."""
    dom, exp = [], []
    for d in range(table.shape[0]):
        for e in range(table.shape[1]):
            dom += [d] * int(table[d, e])
            exp += [e] * int(table[d, e])
    order = np.random.default_rng(0).permutation(len(dom))
    return np.array(exp)[order], np.array(dom)[order]


def test_count_table_from_tokens() -> None:
    expert, domain = routing_from_table(UNBALANCED)
    np.testing.assert_array_equal(m.count_domain_expert(expert, domain, 2, 2), UNBALANCED)
    # top-2: every choice counts once
    idx = np.array([[0, 1], [0, 2], [0, 1]])
    np.testing.assert_array_equal(m.count_domain_expert(idx, np.zeros(3, int), 3, 1), [[3, 2, 1]])
    np.testing.assert_array_equal(m.count_experts(idx, 4), [3, 2, 1, 0])
    with pytest.raises(ValueError):
        m.count_domain_expert(np.array([0, 3]), np.array([0, 0]), 3, 1)


def test_conditionals() -> None:
    np.testing.assert_allclose(m.expert_given_domain(UNBALANCED), [[0.75, 0.25], [0.25, 0.75]])
    np.testing.assert_allclose(m.domain_given_expert(UNBALANCED), [[30 / 35, 10 / 25], [5 / 35, 15 / 25]])


def test_mutual_information_by_hand() -> None:
    # Balanced: P(d) = P(e) = 1/2, joint (3/8, 1/8, 1/8, 3/8):
    # I = 2 ln 2 - H(joint) = 0.75 ln 3 - ln 2; NMI = 1 - H2(1/4) in bits.
    mi = 0.75 * math.log(3) - math.log(2)
    assert m.mutual_information(BALANCED) == pytest.approx(mi, abs=1e-12)
    h2 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert m.normalized_mutual_information(BALANCED) == pytest.approx(1 - h2, abs=1e-12)
    assert 1 - h2 == pytest.approx(0.188722, abs=1e-6)

    # Unbalanced, token-weighted: joint (1/2, 1/6, 1/12, 1/4), P(D) = (2/3, 1/3), P(E) = (7/12, 5/12).
    mi_tok = 0.5 * math.log(9 / 7) + math.log(0.6) / 6 + math.log(3 / 7) / 12 + 0.25 * math.log(9 / 5)
    h_d = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert m.mutual_information(UNBALANCED) == pytest.approx(mi_tok, abs=1e-12)
    assert m.normalized_mutual_information(UNBALANCED) == pytest.approx(mi_tok / h_d, abs=1e-12)
    assert mi_tok / h_d == pytest.approx(0.18359, abs=1e-5)
    # Reference implementation (sklearn works in nats from a contingency table).
    assert m.mutual_information(UNBALANCED) == pytest.approx(mutual_info_score(None, None, contingency=UNBALANCED))

    # Equal domain weights: the unbalanced table has the balanced table's conditionals.
    assert m.mutual_information(UNBALANCED, equal_domain_weights=True) == pytest.approx(mi, abs=1e-12)
    assert m.normalized_mutual_information(UNBALANCED, equal_domain_weights=True) == pytest.approx(1 - h2)
    assert m.domain_entropy(UNBALANCED, equal_domain_weights=True) == pytest.approx(math.log(2))


def test_nmi_invariants() -> None:
    independent = np.outer([1.0, 3.0, 2.0], [2.0, 4.0, 6.0, 0.0])
    assert m.normalized_mutual_information(independent) == pytest.approx(0.0, abs=1e-12)
    assert m.normalized_mutual_information(independent, equal_domain_weights=True) == pytest.approx(0.0, abs=1e-12)
    one_to_one = np.diag([5.0, 50.0, 7.0])
    assert m.normalized_mutual_information(one_to_one) == pytest.approx(1.0)
    assert m.normalized_mutual_information(one_to_one, equal_domain_weights=True) == pytest.approx(1.0)
    # Every expert serves one domain (domains may use several experts): still 1.
    many_to_one = np.array([[4.0, 6.0, 0.0, 0.0], [0.0, 0.0, 1.0, 9.0]])
    assert m.normalized_mutual_information(many_to_one) == pytest.approx(1.0)
    # An empty domain is ignored by the equal weighting; a single domain has no NMI.
    with_empty = np.vstack([BALANCED, np.zeros((1, 2))])
    assert m.normalized_mutual_information(with_empty, equal_domain_weights=True) == pytest.approx(
        m.normalized_mutual_information(BALANCED)
    )
    assert np.isnan(m.normalized_mutual_information(np.array([[3.0, 4.0]])))


def test_table_functions_are_batched() -> None:
    stack = np.stack([UNBALANCED, BALANCED, np.diag([1.0, 2.0])])
    for weights in (False, True):
        batched = m.normalized_mutual_information(stack, equal_domain_weights=weights)
        single = [m.normalized_mutual_information(t, equal_domain_weights=weights) for t in stack]
        np.testing.assert_allclose(batched, single)
    np.testing.assert_allclose(m.normalized_domain_entropy(stack)[0], m.normalized_domain_entropy(UNBALANCED))


def test_normalized_domain_entropy_and_specialization() -> None:
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    np.testing.assert_allclose(m.normalized_domain_entropy(UNBALANCED), [h, h])
    assert h == pytest.approx(0.811278, abs=1e-6)
    np.testing.assert_allclose(m.normalized_domain_entropy(np.array([[1.0, 1.0, 1.0, 1.0], [0, 0, 8, 0]])), [1, 0])
    # top-1: specialization is P(expert | domain)
    np.testing.assert_allclose(m.domain_specialization(UNBALANCED, 1), m.expert_given_domain(UNBALANCED))
    # top-2 over 3 experts: tokens {0,1}, {0,2}, {0,1} -> N_2(E_i, D) = (3, 2, 1), N_D = 3
    table = m.count_domain_expert(np.array([[0, 1], [0, 2], [0, 1]]), np.zeros(3, int), 3, 1)
    np.testing.assert_allclose(m.domain_specialization(table, 2), [[1.0, 2 / 3, 1 / 3]])
    assert m.specialization_baseline(3, 2) == pytest.approx(2 / 3)


def test_load_metrics() -> None:
    counts = np.array([6.0, 2.0, 0.0, 0.0])  # shares .75 .25 0 0, mean .25
    np.testing.assert_allclose(m.load_fractions(counts), [0.75, 0.25, 0, 0])
    assert m.max_load_fraction(counts) == pytest.approx(0.75)
    # population std = sqrt((0.5^2 + 0 + 0.25^2 + 0.25^2) / 4) = sqrt(0.09375); CV = std / 0.25 = sqrt(1.5)
    assert m.load_cv(counts) == pytest.approx(math.sqrt(1.5))
    assert m.effective_experts(counts) == pytest.approx(0.75**-0.75 * 0.25**-0.25)
    assert m.load_cv(np.full(8, 3.0)) == pytest.approx(0.0)
    assert m.effective_experts(np.full(8, 3.0)) == pytest.approx(8.0)
    assert m.load_cv(np.eye(8)[2] * 10) == pytest.approx(math.sqrt(7))
    assert m.effective_experts(np.eye(8)[2] * 10) == pytest.approx(1.0)
    assert m.dropped_fraction(3, 12) == pytest.approx(0.25)


def test_router_entropy() -> None:
    probs = np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float16)
    np.testing.assert_allclose(m.token_router_entropy(probs), [0.0, math.log(2)], atol=1e-12)
    # mean distribution (0.75, 0.25)
    assert m.mean_distribution_entropy(probs.astype(float).sum(0)) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )


def test_consecutive_pairs_stay_inside_blocks() -> None:
    # block 0: positions 0,1,2 (two pairs); block 1: positions 0 and 2 (no pair); block 2: one token
    block = np.array([1, 0, 2, 0, 0, 1])
    position = np.array([2, 1, 0, 0, 2, 0])
    expert = np.array([3, 5, 3, 5, 4, 3])
    i, j = m.consecutive_pairs(block, position)
    assert sorted(zip(position[i].tolist(), position[j].tolist())) == [(0, 1), (1, 2)]
    assert set(block[i]) == {0} and set(block[j]) == {0}
    # (p0 -> p1): 5 -> 5 same; (p1 -> p2): 5 -> 4 different
    assert m.same_first_choice(expert, i, j).mean() == pytest.approx(0.5)
    top2 = np.array([[0, 1], [2, 3], [9, 9], [1, 2], [4, 5], [9, 9]])
    # p0 {1,2}, p1 {2,3} share 2; p1 {2,3}, p2 {4,5} share none
    assert m.shared_topk_expert(top2, i, j).tolist() in ([True, False], [False, True])
    assert m.shared_topk_expert(top2, i, j).sum() == 1


def test_repetition_baselines() -> None:
    assert m.repetition_baseline_uniform(8, 1) == pytest.approx(1 / 8)
    assert m.repetition_baseline_uniform(8, 2) == pytest.approx(13 / 28)  # Mixtral's 46%
    assert m.repetition_baseline_load(np.array([6.0, 2.0, 0, 0])) == pytest.approx(0.75**2 + 0.25**2)
    # Random routing reproduces the uniform baseline.
    rng = np.random.default_rng(1)
    expert = rng.integers(0, 8, size=(40_000, 2))
    block, position = np.repeat(np.arange(400), 100), np.tile(np.arange(100), 400)
    i, j = m.consecutive_pairs(block, position)
    assert m.same_first_choice(expert, i, j).mean() == pytest.approx(1 / 8, abs=0.01)
    distinct = rng.permuted(np.tile(np.arange(8), (40_000, 1)), axis=1)[:, :2]
    assert m.shared_topk_expert(distinct, i, j).mean() == pytest.approx(13 / 28, abs=0.015)


def test_vocabulary_specialization() -> None:
    token = np.array([5, 5, 5, 5, 7, 7, 7, 9])
    expert = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    vs = m.vocabulary_specialization(token, expert, 3, min_count=3)
    assert vs.token_ids.tolist() == [5, 7]  # id 9 occurs once: below min_count
    assert vs.top_expert.tolist() == [0, 1]
    np.testing.assert_allclose(vs.top_fraction, [0.75, 2 / 3])
    assert vs.mean == pytest.approx((0.75 + 2 / 3) / 2)
    assert vs.weighted_mean == pytest.approx(5 / 7)
    # top-2: id 5 always has expert 0 among its two
    vs2 = m.vocabulary_specialization(
        np.array([5, 5, 5]), np.array([[0, 1], [2, 0], [0, 3]]), 4, min_count=1
    )
    assert vs2.top_expert.tolist() == [0] and vs2.top_fraction.tolist() == [1.0]


def test_router_saturation() -> None:
    final = np.array([[0, 1], [2, 3]])
    same_sets = np.array([[1, 0], [2, 4]])  # overlaps 2/2 and 1/2
    disjoint = np.array([[4, 5], [6, 7]])
    np.testing.assert_allclose(m.topk_overlap(same_sets, final), [1.0, 0.5])
    np.testing.assert_allclose(m.router_saturation([disjoint, same_sets, final], final), [0.0, 0.75, 1.0])
    np.testing.assert_allclose(m.router_saturation([np.array([1, 2, 3, 3])], np.array([1, 2, 0, 3])), [0.75])


def test_coactivation_by_hand() -> None:
    # tokens {0,1}, {0,2}, {0,1}, {1,2}: expert 0 chosen 3 times, with 1 twice and with 2 once
    idx = np.array([[0, 1], [0, 2], [1, 0], [1, 2]])
    co = m.coactivation(idx, 4)
    np.testing.assert_allclose(co[0], [0, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(co[1], [2 / 3, 0, 1 / 3, 0])
    np.testing.assert_allclose(co[2], [1 / 2, 1 / 2, 0, 0])
    assert np.isnan(co[3]).all()  # expert 3 never chosen
    np.testing.assert_allclose(np.nansum(co, axis=1)[:3], 1.0)  # k - 1


def test_coactivation_counts_all_pairs_not_only_adjacent_ranks() -> None:
    # one token with top-3 (0, 1, 2): pairs (0,1), (1,2) AND (0,2) count; an adjacent-rank
    # count would leave (0,2) at zero.
    counts = m.coactivation_counts(np.array([[0, 1, 2], [3, 0, 1]]), 4)
    expected = np.zeros((4, 4))
    for a, b in [(0, 1), (1, 2), (0, 2), (3, 0), (0, 1), (3, 1)]:
        expected[a, b] += 1
        expected[b, a] += 1
    np.testing.assert_array_equal(counts, expected)
    # parity with the dense [N, E] indicator product on random top-8 of 64
    rng = np.random.default_rng(0)
    idx = np.argsort(rng.random((500, 64)), axis=1)[:, :8]
    chosen = np.zeros((500, 64))
    chosen[np.arange(500)[:, None], idx] = 1.0
    dense = chosen.T @ chosen
    np.fill_diagonal(dense, 0.0)
    np.testing.assert_array_equal(m.coactivation_counts(idx, 64), dense)


def test_vocabulary_specialization_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    idx = np.argsort(rng.random((3000, 16)), axis=1)[:, :4]
    tok = rng.integers(0, 300, 3000)
    whole = m.vocabulary_specialization(tok, idx, 16, min_count=5)
    monkeypatch.setattr(m, "_COUNT_CELLS", 40)  # a few ids per chunk
    chunked = m.vocabulary_specialization(tok, idx, 16, min_count=5)
    for a, b in zip((whole.token_ids, whole.top_expert, whole.top_fraction, whole.occurrences),
                    (chunked.token_ids, chunked.top_expert, chunked.top_fraction, chunked.occurrences)):
        np.testing.assert_array_equal(a, b)
    # brute force for one id
    t = int(whole.token_ids[0])
    counts = np.bincount(idx[tok == t].ravel(), minlength=16)
    assert whole.top_expert[0] == counts.argmax() and whole.top_fraction[0] == counts.max() / (tok == t).sum()


def test_top_domain_specialization() -> None:
    # top-2 over 4 experts: domain 0 puts all tokens on expert 0 (N_k/N_D = 1), domain 1 splits evenly,
    # domain 2 is empty (left out of the mean)
    table = np.array([[10, 5, 5, 0], [5, 5, 5, 5], [0, 0, 0, 0]], dtype=float)
    assert m.top_domain_specialization(table, 2) == pytest.approx((1.0 + 0.5) / 2)
    batched = m.top_domain_specialization(np.stack([table, table]), 2)
    np.testing.assert_allclose(batched, [0.75, 0.75])
    # fixed experts: domain 0 judged on expert 1 (5 of 10 tokens), domain 1 on expert 3 (5 of 10)
    fixed = m.top_domain_specialization(np.stack([table, table]), 2, experts=np.array([1, 3, 0]))
    np.testing.assert_allclose(fixed, [0.5, 0.5])


def _brute_expert_tokens(tok, idx, n_experts, min_count, top_n):
    out = []
    ids = [t for t in np.unique(tok) if (tok == t).sum() >= min_count]
    for e in range(n_experts):
        rows = []
        for t in ids:
            n = int((tok == t).sum())
            c = int((idx[tok == t] == e).any(axis=1).sum())
            if c:
                rows.append((-c / n, -c, int(t), c, n))
        out.append([(t, c, n) for *_, t, c, n in sorted(rows)[:top_n]])
    return out


def test_expert_tokens_equal_a_brute_force_count_with_planted_tokens() -> None:
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 40, 4000)
    idx = np.stack([rng.integers(0, 5, 4000), rng.integers(0, 5, 4000)], axis=1)
    idx[tok == 7, 0] = 3  # id 7 always among expert 3's tokens
    same = idx[:, 0] == idx[:, 1]
    idx[same, 1] = (idx[same, 0] + 1) % 5  # a token's top-2 experts are distinct
    got = m.expert_tokens(tok, idx, 5, min_count=10, top_n=4)
    want = _brute_expert_tokens(tok, idx, 5, 10, 4)
    for e in range(5):
        assert list(zip(got.token_ids[e].tolist(), got.counts[e].tolist(), got.occurrences[e].tolist())) == want[e]
    assert got.token_ids[3, 0] == 7 and got.counts[3, 0] == got.occurrences[3, 0]


def test_expert_tokens_from_assignments_equal_those_from_the_index() -> None:
    rng = np.random.default_rng(1)
    tok = rng.integers(0, 25, 3000)
    idx = rng.integers(0, 4, (3000, 1))
    from_index = m.expert_tokens(tok, idx, 4, min_count=5, top_n=3)
    from_pairs = m.expert_tokens(tok, None, 4, min_count=5, top_n=3, assignments=(np.arange(3000), idx[:, 0]))
    for field in ("token_ids", "counts", "occurrences"):
        np.testing.assert_array_equal(getattr(from_index, field), getattr(from_pairs, field))
