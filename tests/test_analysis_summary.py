"""The per-layer summary agrees with the metric functions and carries sensible intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moescope.analysis import metrics, stats
from moescope.analysis.summary import (
    SummaryConfig, best_layer_nmi_test, statistics_header, summarize_eval_loss, summarize_layer, summarize_start_nmi,
    summarize_token_types,
)
from moescope.analysis.table import RoutingTable


def synthetic_table(rng: np.random.Generator, n_blocks: int = 30, block_len: int = 64, n_exp: int = 4, k: int = 1):
    """3 domains, 10 blocks each; domain d prefers expert d; token id 5 always goes to expert 3."""
    block_domain = np.repeat(np.arange(3), n_blocks // 3)
    block = np.repeat(np.arange(n_blocks), block_len)
    domain = block_domain[block]
    position = np.tile(np.arange(block_len), n_blocks)
    token_id = rng.integers(10, 40, block.size)
    token_id[::7] = 5
    logits = rng.normal(size=(block.size, n_exp))
    logits[np.arange(block.size), domain] += 2.0
    logits[token_id == 5, 3] += 20.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :k]
    gate = np.ones_like(top, dtype=float)
    gate[:5] = 0.0  # five dropped assignments
    return RoutingTable(token_id, block, position, domain, top, gate, probs.astype(np.float16))


CFG = SummaryConfig(n_resamples=300, n_permutations=199, vocab_min_count=5)


def test_summary_matches_metric_functions() -> None:
    table = synthetic_table(np.random.default_rng(0))
    s = summarize_layer(table, ["code", "math", "prose"], CFG)
    counts = metrics.count_domain_expert(table.expert_index, table.domain, 4, 3)
    spec = s["specialization"]
    assert spec["nmi"]["estimate"] == pytest.approx(
        float(metrics.normalized_mutual_information(counts, equal_domain_weights=True))
    )
    assert spec["nmi_token_weighted"]["estimate"] == pytest.approx(float(metrics.normalized_mutual_information(counts)))
    np.testing.assert_allclose(spec["expert_given_domain"], metrics.expert_given_domain(counts), atol=1e-6)
    assert spec["nmi_pvalue"] == pytest.approx(1 / 200)  # strong planted dependence
    for key in ("nmi", "max_expert_given_domain"):
        assert spec[key]["low"] <= spec[key]["estimate"] <= spec[key]["high"]
    assert set(spec["normalized_domain_entropy"]) == {"code", "math", "prose"}

    load = s["load"]
    assert load["load_cv"]["estimate"] == pytest.approx(float(metrics.load_cv(counts.sum(0))))
    assert load["dropped_fraction"] == pytest.approx(5 / table.n_tokens)
    assert sum(load["token_fraction"]) == pytest.approx(1.0)

    ent = s["entropy"]
    assert ent["router_entropy_token"]["estimate"] == pytest.approx(
        float(metrics.token_router_entropy(table.router_probs).mean())
    )
    assert ent["router_entropy_max"] == pytest.approx(math.log(4))
    assert ent["router_entropy_token"]["estimate"] < ent["router_entropy_of_mean"]["estimate"] <= math.log(4)

    rep = s["repetition"]
    assert rep["n_pairs"] == 30 * 63
    i, j = metrics.consecutive_pairs(table.block, table.position)
    assert rep["same_first_choice"]["estimate"] == pytest.approx(metrics.same_first_choice(table.expert_index, i, j).mean())
    assert rep["baseline_uniform"] == pytest.approx(0.25)

    voc = s["vocabulary"]
    assert voc["most_specialized"][0]["token_id"] == 5 and voc["most_specialized"][0]["top_expert"] == 3
    assert voc["mean"] > voc["baseline_shuffled"]
    # deterministic under the seed
    assert summarize_layer(table, ["code", "math", "prose"], CFG) == s
    assert statistics_header(CFG)["n_resamples"] == 300


def test_summary_top2_reports_shared_experts() -> None:
    table = synthetic_table(np.random.default_rng(1), k=2)
    s = summarize_layer(table, ["a", "b", "c"], CFG)
    assert s["top_k"] == 2
    assert s["repetition"]["shared_topk_baseline_uniform"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert s["repetition"]["shared_topk"]["estimate"] >= s["repetition"]["same_first_choice"]["estimate"]
    np.testing.assert_allclose(np.sum(s["specialization"]["domain_specialization"], axis=1), 2.0)
    np.testing.assert_allclose(np.sum(s["specialization"]["coactivation"], axis=1), 1.0, atol=1e-5)  # k - 1
    assert "coactivation" not in summarize_layer(synthetic_table(np.random.default_rng(1)), ["a", "b", "c"], CFG)[
        "specialization"]


def test_eval_loss_summary() -> None:
    block_domain = np.array([0, 0, 0, 1, 1, 1])
    tokens = np.full(6, 10.0)
    loss = np.array([10.0, 20.0, 30.0, 40.0, 40.0, 40.0])  # domain 0: 2.0 nats/token, domain 1: 4.0
    out = summarize_eval_loss(loss, tokens, block_domain, ["a", "b"], CFG)
    assert out["domains"]["a"]["estimate"] == pytest.approx(2.0)
    assert out["domains"]["b"] == {"estimate": 4.0, "low": 4.0, "high": 4.0}
    assert out["domains"]["a"]["low"] < 2.0 < out["domains"]["a"]["high"]
    assert out["token_weighted"]["estimate"] == pytest.approx(3.0)
    assert out["domain_weighted"]["estimate"] == pytest.approx(3.0)


def test_token_type_summary() -> None:
    rng = np.random.default_rng(2)
    table = synthetic_table(rng)
    # type 0 always on expert 3 by construction below; type 1 random; -1 rows ignored
    types = rng.integers(0, 2, table.n_tokens)
    types[:10] = -1
    expert = table.expert_index.copy()
    expert[types == 0, 0] = 3
    table = RoutingTable(table.token_id, table.block, table.position, table.domain, expert,
                         table.gate_weight, table.router_probs)
    out = summarize_token_types(types, table, ["keyword", "name", "number"], CFG)
    assert out["n_tokens"] == table.n_tokens - 10
    assert out["top_expert"]["keyword"] == {"expert": 3, "share": 1.0, "n_tokens": int((types == 0).sum())}
    assert "number" not in out["top_expert"]
    counts = np.array(out["counts"])
    assert counts.shape == (3, 4) and counts.sum() == table.n_tokens - 10
    assert counts[0, :3].sum() == 0
    assert out["nmi"]["estimate"] == pytest.approx(float(metrics.normalized_mutual_information(counts[:2])))
    assert out["nmi"]["low"] <= out["nmi"]["estimate"] <= out["nmi"]["high"]


def test_table_without_router_probs_keeps_top_k_statistics() -> None:
    """A released-model table (top-k + entropy, no [N, E] probabilities) gives the same
    specialization, load and token entropy as the full table, and no entropy of the mean."""
    full = synthetic_table(np.random.default_rng(0))
    compact = RoutingTable(
        full.token_id, full.block, full.position, full.domain, full.expert_index, full.gate_weight,
        router_probs=None, router_entropy=full.token_entropy(), expert_count=full.n_experts,
    )
    a = summarize_layer(full, ["code", "math", "prose"], CFG)
    b = summarize_layer(compact, ["code", "math", "prose"], CFG)
    assert b["specialization"]["nmi"] == a["specialization"]["nmi"]
    assert b["load"] == a["load"]
    assert b["entropy"]["router_entropy_token"] == pytest.approx(a["entropy"]["router_entropy_token"], rel=1e-12)
    assert b["entropy"]["router_entropy_of_mean"] is None
    np.testing.assert_array_equal(compact.chosen_probability(), full.gate_weight[:, 0].astype(np.float32))
    with pytest.raises(ValueError, match="router_entropy and expert_count"):
        RoutingTable(full.token_id, full.block, full.position, full.domain, full.expert_index, full.gate_weight, None)


def test_first_choice_nmi_differs_from_topk_nmi_when_only_the_first_choice_knows_the_domain() -> None:
    """Domain d's first choice is always expert d; the other 3 of the top-4 are random. The
    first-choice NMI is then 1 while the top-k NMI (all 4 assignments) is diluted."""
    rng = np.random.default_rng(3)
    n_blocks, block_len, n_exp, k = 12, 32, 16, 4
    block = np.repeat(np.arange(n_blocks), block_len)
    domain = block % 3
    n = block.size
    rest = np.argsort(rng.random((n, n_exp - 3)), axis=1)[:, : k - 1] + 3  # experts 3..15
    idx = np.column_stack([domain, rest])
    table = RoutingTable(rng.integers(0, 50, n), block, np.tile(np.arange(block_len), n_blocks), domain, idx,
                         np.full((n, k), 0.25), None, np.ones(n), n_exp)
    s = summarize_layer(table, ["a", "b", "c"], CFG)["specialization"]
    assert s["nmi_first_choice"]["estimate"] == pytest.approx(1.0)
    first = metrics.count_domain_expert(idx[:, 0], domain, n_exp, 3)
    assert s["nmi_first_choice"]["estimate"] == pytest.approx(
        float(metrics.normalized_mutual_information(first, equal_domain_weights=True)))
    assert s["nmi"]["estimate"] < 0.6
    assert s["nmi_first_choice_pvalue"] == pytest.approx(1 / 200)
    # each domain's top expert (its first choice) is chosen by all its tokens
    assert s["domain_specialization_top"]["estimate"] == pytest.approx(1.0)
    # top-1: the first-choice numbers are the top-k numbers
    s1 = summarize_layer(synthetic_table(np.random.default_rng(0)), ["a", "b", "c"], CFG)["specialization"]
    assert s1["nmi_first_choice"] == s1["nmi"] and s1["nmi_first_choice_pvalue"] == s1["nmi_pvalue"]


def test_start_nmi_of_an_unchanged_router_equals_the_final_nmi_with_a_change_of_zero() -> None:
    table = synthetic_table(np.random.default_rng(0))
    final = summarize_layer(table, ["code", "math", "prose"], CFG)["specialization"]
    same = summarize_start_nmi(table, table, ["code", "math", "prose"], CFG)
    assert same["nmi_start"] == final["nmi"]  # the same resampled blocks: the same interval, bit for bit
    assert same["nmi_change"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}


def test_start_nmi_of_a_router_blind_to_the_domain_shows_a_paired_increase() -> None:
    table = synthetic_table(np.random.default_rng(0))
    blind = RoutingTable(table.token_id, table.block, table.position, table.domain,
                         np.random.default_rng(1).integers(0, 4, (table.n_tokens, 1)), table.gate_weight,
                         table.router_probs)
    out = summarize_start_nmi(blind, table, ["code", "math", "prose"], CFG)
    final = summarize_layer(table, ["code", "math", "prose"], CFG)["specialization"]["nmi"]
    assert out["nmi_start"]["estimate"] < 0.01 < final["estimate"]
    assert out["nmi_change"]["estimate"] == pytest.approx(final["estimate"] - out["nmi_start"]["estimate"])
    assert 0 < out["nmi_change"]["low"] <= out["nmi_change"]["estimate"] <= out["nmi_change"]["high"]
    with pytest.raises(ValueError, match="different blocks"):
        summarize_start_nmi(blind.select(table.block < 29), table, ["code", "math", "prose"], CFG)


def test_the_best_of_several_layers_is_tested_against_the_max_over_layers_null() -> None:
    """Layers share their label shuffles, so the max over layers per shuffle is the null of the best layer:
    with one informative layer among blind ones its p keeps the floor of one test, 1 / (1 + n); a best
    picked among blind layers only is judged against the blind layers' largest values."""
    domains = ["code", "math", "prose"]
    table = synthetic_table(np.random.default_rng(0))
    blind = [RoutingTable(table.token_id, table.block, table.position, table.domain,
                          np.random.default_rng(s).integers(0, 4, (table.n_tokens, 1)), table.gate_weight,
                          table.router_probs) for s in range(1, 6)]
    nulls: list[np.ndarray] = []
    layers = {str(i): summarize_layer(t, domains, CFG, nmi_nulls=nulls) for i, t in enumerate([*blind, table])}
    assert len(nulls) == 6 and all(n.size == 199 for n in nulls)
    test = best_layer_nmi_test(layers, nulls)
    assert test["layer"] == "5" and test["n_layers"] == 6 and test["pvalue"] == 1 / 200
    # the same table twice gets the same shuffles: identical nulls
    again: list[np.ndarray] = []
    summarize_layer(table, domains, CFG, nmi_nulls=again)
    np.testing.assert_array_equal(again[0], nulls[5])
    blind_only = {k: layers[k] for k in list(layers)[:5]}
    test = best_layer_nmi_test(blind_only, nulls[:5])
    own = layers[test["layer"]]["specialization"]["nmi_pvalue"]
    assert own < test["pvalue"]  # picking the best of five costs: its own p understates the chance
    with pytest.raises(ValueError, match="one permutation null"):
        best_layer_nmi_test(layers, nulls[:5])


def test_busiest_expert_share_interval_holds_its_estimate() -> None:
    """An even load (each expert takes every block of its own, once per domain): any resample's own
    maximum share lies above the whole set's 1/E, so an interval of the resampled maxima lies above the
    estimate; the share of the expert busiest on the whole set has an interval around it."""
    rng = np.random.default_rng(0)
    n_exp, block_len = 16, 64
    n_blocks = 3 * n_exp
    block = np.repeat(np.arange(n_blocks), block_len)
    domain = (block // n_exp)
    top = (block % n_exp)[:, None]
    probs = np.full((block.size, n_exp), 1.0 / n_exp, dtype=np.float16)
    table = RoutingTable(rng.integers(10, 40, block.size), block, np.tile(np.arange(block_len), n_blocks), domain,
                         top, np.ones_like(top, dtype=float), probs)
    share = summarize_layer(table, ["code", "math", "prose"], CFG)["load"]["max_fraction"]
    assert share["estimate"] == pytest.approx(1 / n_exp)
    assert share["low"] < share["estimate"] < share["high"]
    block_ids, block_domain, counts = stats.block_expert_counts(top, block, domain, n_exp)
    resampled_max = stats.bootstrap_interval(counts, metrics.max_load_fraction, strata=block_domain, n_resamples=300)
    assert resampled_max.low > share["estimate"]  # what the interval of the resampled maxima did
