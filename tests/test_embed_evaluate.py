"""Retrieval and domain metrics on tiny hand-made cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moescope.embed.evaluate import (
    EvalConfig,
    bootstrap_interval,
    build_ir_tasks,
    evaluate_encoder,
    knn_domain_accuracy,
    make_ir_evaluator,
    paired_difference_interval,
    per_query_metrics,
)
from moescope.embed.pairs import TextPair


def static_model():
    """A real SentenceTransformer whose embeddings are known: mean of hand-set word vectors."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    weights = np.array(
        [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0.9, 0, 0.1], [0, 0, 0, 1]], dtype=np.float32
    )
    return SentenceTransformer(modules=[StaticEmbedding(tok, embedding_weights=weights)], device="cpu")


# query "a" -> "a" at rank 1; "b c" -> "a c" at rank 2 (behind "b"); "d" -> "b" at rank 1
PAIRS = [
    TextPair("a", "a", "x", "x:0", "dataset"),
    TextPair("b c", "a c", "x", "x:1", "dataset"),
    TextPair("d", "b", "x", "x:2", "dataset"),
]


def test_build_ir_tasks_merges_equal_texts():
    pairs = PAIRS + [TextPair("a", "b", "x", "x:3", "dataset"), TextPair("e", "e", "y", "y:0", "dataset")]
    tasks = build_ir_tasks(pairs)
    assert set(tasks) == {"x", "y"}
    x = tasks["x"]
    qid = {t: i for i, t in x.queries.items()}
    did = {t: i for i, t in x.corpus.items()}
    assert len(x.queries) == 3 and len(x.corpus) == 3
    assert x.relevant_docs[qid["a"]] == {did["a"], did["b"]}
    assert x.relevant_docs[qid["d"]] == {did["b"]}


def test_evaluator_numbers_on_known_ranks_and_per_query_decomposition():
    model = static_model()
    evaluator = make_ir_evaluator(build_ir_tasks(PAIRS)["x"], EvalConfig())
    raw = evaluator(model)
    ranks = np.array([1, 2, 1])
    assert raw["x_cosine_mrr@10"] == pytest.approx(np.mean(1 / ranks))
    assert raw["x_cosine_recall@1"] == pytest.approx(2 / 3)
    assert raw["x_cosine_recall@5"] == pytest.approx(1.0)
    assert raw["x_cosine_ndcg@10"] == pytest.approx(np.mean(1 / np.log2(ranks + 1)))
    assert raw["x_cosine_map@100"] == pytest.approx(np.mean(1 / ranks))
    per_query = per_query_metrics(evaluator, evaluator.last_hits)
    np.testing.assert_allclose(per_query["mrr@10"], 1 / ranks)
    np.testing.assert_allclose(per_query["ndcg@10"], 1 / np.log2(ranks + 1))
    for key, values in per_query.items():  # the means reproduce the evaluator exactly
        assert values.mean() == pytest.approx(raw[f"x_cosine_{key}"], abs=1e-12)


def test_evaluate_encoder_report_and_knn():
    model = static_model()
    train = [TextPair("q", "a", "x", "x:t0", "dataset"), TextPair("q2", "a c", "x", "x:t1", "dataset"),
             TextPair("r", "e", "y", "y:t0", "dataset"), TextPair("r2", "e d", "y", "y:t1", "dataset")]
    evals = PAIRS + [TextPair("e", "e e", "y", "y:0", "dataset"), TextPair("e d", "d e", "y", "y:1", "dataset")]
    report = evaluate_encoder(model, evals, train, EvalConfig(knn_neighbors=1, n_bootstrap=200))
    assert report["retrieval"]["x"]["mrr@10"] == pytest.approx(5 / 6)
    lo, hi = report["retrieval"]["x"]["mrr@10_ci"]
    assert lo <= 5 / 6 <= hi
    assert report["retrieval"]["y"]["n_queries"] == 2
    n_all = len(report["per_query"]["x"]["mrr@10"]) + len(report["per_query"]["y"]["mrr@10"])
    assert n_all == 5
    assert 0.0 <= report["knn"]["accuracy"] <= 1.0 and report["knn"]["n_items"] == 9


def test_knn_domain_accuracy_known_answer():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]])
    labels = ["code", "code", "prose", "prose"]
    test = np.array([[1, 0.05], [0.05, 1], [0.6, 0.4]])
    out = knn_domain_accuracy(train, labels, test, ["code", "prose", "prose"], n_neighbors=1)
    assert out["accuracy"] == pytest.approx(2 / 3)  # the third point sits nearer the code cluster
    np.testing.assert_array_equal(out["correct"], [1.0, 1.0, 0.0])


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    values = rng.random(200)
    lo, hi = bootstrap_interval(values, n_resamples=500)
    assert lo < values.mean() < hi and hi - lo < 0.2
    assert bootstrap_interval(np.ones(5)) == (1.0, 1.0)
    mean, lo, hi = paired_difference_interval(values + 0.1, values, n_resamples=200)
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    assert math.isnan(bootstrap_interval(np.array([]))[0])


def test_text_units_join_sources_that_share_a_query():
    from moescope.embed.pairs import text_units

    pairs = [TextPair("q1", "p1", "x", "x:b", "dataset"), TextPair("q2", "p2", "x", "x:c", "dataset"),
             TextPair("q1", "p3", "x", "x:d", "dataset"),  # the query of x:b again: one unit, named by x:b
             TextPair("q3", "p6", "x", "x:e", "dataset"), TextPair("q3", "p7", "x", "x:d", "dataset"),  # and x:e
             TextPair("q4", "p2", "x", "x:a", "dataset"),  # shares only a positive with x:c: stays apart
             TextPair("q1", "p5", "y", "x:b", "dataset")]  # the same text and source id in another domain
    units = text_units(pairs)
    assert {units[("x", t)] for t in ("q1", "p1", "p3", "q3", "p6", "p7")} == {("x", "x:b")}
    assert units[("x", "q2")] == ("x", "x:c") and units[("x", "q4")] == ("x", "x:a")
    assert units[("x", "p2")] == ("x", "x:a")  # a positive of two units takes the smaller
    assert units[("y", "q1")] == ("y", "x:b") != units[("x", "q1")]


def test_intervals_resample_source_documents():
    """Queries of one source move together: each source's queries doubled in the same source gives the
    interval of the sources alone; the copies counted as independent sources give a narrower one."""
    rng = np.random.default_rng(3)
    values = rng.random(30)
    once = bootstrap_interval(values, n_resamples=500)
    doubled = np.repeat(values, 2)
    same = bootstrap_interval(doubled, units=np.repeat(np.arange(30), 2), n_resamples=500)
    assert same == pytest.approx(once)
    lo, hi = bootstrap_interval(doubled, n_resamples=500)
    assert hi - lo < 0.85 * (once[1] - once[0])
    # all queries from one source: nothing to resample, no interval
    assert all(math.isnan(v) for v in bootstrap_interval(values, units=np.zeros(30, dtype=int)))
    mean, lo, hi = paired_difference_interval(doubled + rng.normal(0, 0.1, 60), doubled,
                                              units=np.repeat(np.arange(30), 2), n_resamples=300)
    assert lo < mean < hi


def test_evaluate_encoder_counts_and_resamples_sources():
    model = static_model()
    # x's three queries come from two sources (x:0 holds two of them)
    evals = [TextPair("a", "a", "x", "x:0", "dataset"), TextPair("b c", "a c", "x", "x:0", "dataset"),
             TextPair("d", "b", "x", "x:2", "dataset")]
    report = evaluate_encoder(model, evals, [], EvalConfig(n_bootstrap=200))
    assert report["retrieval"]["x"]["n_queries"] == 3 and report["retrieval"]["x"]["n_units"] == 2
    assert "source document" in report["interval_unit"]
    # two units: the resamples are {x:0}, {x:2} or both, so the interval's ends are those means
    lo, hi = report["retrieval"]["x"]["mrr@10_ci"]
    assert lo == pytest.approx(np.mean([1.0, 0.5])) and hi == pytest.approx(1.0)
    np.testing.assert_array_equal(np.unique(report["per_query_units"]["x"], return_counts=True)[1], [2, 1])
