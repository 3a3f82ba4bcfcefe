"""Embedding statistics on sets whose answers are known, and user pair files (STS / retrieval)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from moescope.embed.evaluate import EvalConfig, evaluate_user_pairs, spearman_interval
from moescope.embed.pairs import read_pair_file
from moescope.embed.stats import effective_rank, embedding_stats, mean_pairwise_cosine
from moescope.errors import MoescopeError
from test_embed_evaluate import static_model


def test_orthonormal_and_collapsed_sets():
    basis = np.eye(6)[:4] * 3.0  # norms do not matter
    assert mean_pairwise_cosine(basis) == pytest.approx(0.0)
    assert effective_rank(basis) == pytest.approx(4.0)
    same = np.tile([[1.0, 2.0, 0.5]], (5, 1))
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert effective_rank(same) == pytest.approx(1.0)
    antipodal = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine(antipodal) == pytest.approx(-1.0)


def test_mean_cosine_matches_the_pairwise_definition_and_rank_the_entropy_formula():
    x = np.random.default_rng(0).normal(size=(30, 8)) + 1.0  # a shifted cloud: positive anisotropy
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    g = u @ u.T
    brute = (g.sum() - np.trace(g)) / (30 * 29)
    assert mean_pairwise_cosine(x) == pytest.approx(brute, rel=1e-12) and brute > 0.3
    s = np.linalg.svd(u, compute_uv=False)
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert 1.0 < effective_rank(x) < 8.0
    stats = embedding_stats(x)
    assert stats["n_texts"] == 30 and stats["dim"] == 8


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_sts_file_spearman_equals_scipy_on_known_embeddings(tmp_path):
    # static model: a=(1,0,0,0) b=(0,1,0,0) c=(0,0,1,0) d=(0,.9,0,.1) e=(0,0,0,1)
    rows = [("a", "a", 5), ("b", "d", 4), ("a", "a c", 3), ("c", "e", 0.5), ("a", "e", 0)]
    path = _write(tmp_path / "sts.csv", "sentence1,sentence2,score\n" + "".join(f"{a},{b},{s}\n" for a, b, s in rows))
    pairs = read_pair_file(path)
    assert pairs.kind == "sts" and len(pairs) == 5
    report = evaluate_user_pairs(static_model(), pairs, EvalConfig(n_bootstrap=300))
    cos = report["cosine"]
    np.testing.assert_allclose(cos[:3], [1.0, 0.9 / np.sqrt(0.82), 1 / np.sqrt(2)], rtol=1e-6)
    assert report["spearman"] == pytest.approx(spearmanr(cos, [r[2] for r in rows]).statistic)
    lo, hi = report["spearman_ci"]
    assert lo <= report["spearman"] <= hi <= 1.0
    reversed_ = read_pair_file(_write(tmp_path / "rev.jsonl", "".join(
        json.dumps({"sentence1": a, "sentence2": b, "score": -s}) + "\n" for a, b, s in rows[:3])))
    assert evaluate_user_pairs(static_model(), reversed_, EvalConfig(n_bootstrap=50))["spearman"] == pytest.approx(-1.0)


def test_spearman_interval_brackets_and_is_seeded():
    rng = np.random.default_rng(1)
    gold = rng.normal(size=200)
    pred = gold + rng.normal(size=200)
    rho = spearmanr(pred, gold).statistic
    lo, hi = spearman_interval(pred, gold, n_resamples=500)
    assert lo < rho < hi and hi - lo < 0.3
    assert spearman_interval(pred, gold, n_resamples=500) == (lo, hi)


def test_retrieval_file(tmp_path):
    path = _write(tmp_path / "ir.tsv", "query\tpositive\na\ta\nb c\ta c\nd\tb\n")
    pairs = read_pair_file(path)
    assert pairs.kind == "retrieval"
    report = evaluate_user_pairs(static_model(), pairs, EvalConfig(n_bootstrap=50), name="ir")
    assert report["retrieval"]["ir"]["mrr@10"] == pytest.approx(5 / 6)  # ranks 1, 2, 1 (see test_embed_evaluate)
    assert report["embedding_stats"]["n_texts"] == 5


@pytest.mark.parametrize("name,text,match", [
    ("x.csv", "sentence1,sentence2,score\na,b,1\nc,d,high\n", r"x.csv:3: score must be a number, got 'high'"),
    ("x.csv", "sentence1,sentence2,score\na,b,1\nc,d\n", r"x.csv:3: 2 fields, the header has 3"),
    ("x.csv", "sentence1,sentence2,score\na,b,1\nc,d,nan\ne,f,2\n", r"x.csv:3: score must be finite"),
    ("x.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", oops\n', r"x.jsonl:2: invalid JSON"),
    ("x.jsonl", '{"query": "a", "positive": ""}\n', r"x.jsonl:1: 'positive' must be a non-empty text"),
    ("x.jsonl", '[1, 2]\n', r"x.jsonl:1: expected a JSON object"),
    ("x.csv", "left,right\na,b\n", r"x.csv:2: need columns sentence1, sentence2, score"),
    ("x.csv", "sentence1,sentence2,score\na,b,1\nc,d,1\ne,f,1\n", r"every score is 1.0"),
    ("x.csv", "sentence1,sentence2,score\na,b,1\nc,d,2\n", r"at least 3 scored pairs"),
    ("x.txt", "a b\n", r"unknown pairs format"),
    ("x.csv", "", r"x.csv: no pairs"),
])
def test_bad_pair_files_name_file_and_line(tmp_path, name, text, match):
    with pytest.raises(MoescopeError, match=match):
        read_pair_file(_write(tmp_path / name, text))


def test_non_utf8_pair_file(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b"sentence1,sentence2,score\n\xff\xfe,b,1\n")
    with pytest.raises(MoescopeError, match="x.csv: not UTF-8"):
        read_pair_file(path)
