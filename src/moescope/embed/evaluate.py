"""Retrieval and domain evaluation of a sentence encoder on held-out pairs.

Retrieval numbers come from sentence-transformers' own InformationRetrievalEvaluator
(precision/recall@k, MRR, MAP, NDCG), one evaluator per domain: the domain's held-out
anchors are the queries and its held-out positives the corpus, so every query competes
against same-domain distractors. For intervals the evaluator's metrics are split into
per-query contributions *by the evaluator's own code* (see `per_query_metrics`) and
bootstrapped over the queries' source documents (a module's docstring queries move together). k-NN domain classification fits scikit-learn's
KNeighborsClassifier on training-pair embeddings and predicts held-out texts' domains.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moescope.embed.pairs import TextPair, UserPairs, text_units
from moescope.embed.stats import embedding_stats
from moescope.io.config import bounded
from moescope.train.config import MAX_SEED

# What every interval here resamples (recorded beside the numbers).
INTERVAL_UNIT = "source document of each query / text (sources sharing a query joined), within its domain"
# Metric keys as the evaluator names them, with "@k" filled in ("mrr@10", "ndcg@10", ...).
EVALUATOR_METRIC_GROUPS = ("accuracy@k", "precision@k", "recall@k", "ndcg@k", "mrr@k", "map@k")


@dataclass
class EvalConfig:
    """What the held-out evaluation computes."""

    mrr_at_k: list[int] = bounded(default_factory=lambda: [10], low=1)
    ndcg_at_k: list[int] = bounded(default_factory=lambda: [10], low=1)
    accuracy_at_k: list[int] = bounded(default_factory=lambda: [1, 5], low=1)
    precision_recall_at_k: list[int] = bounded(default_factory=lambda: [1, 5, 10], low=1)
    map_at_k: list[int] = bounded(default_factory=lambda: [100], low=1)
    knn_neighbors: int = bounded(5, low=1)
    batch_size: int = bounded(64, low=1)
    confidence: float = bounded(0.95, low=0.0, high=1.0, low_open=True, high_open=True)
    n_bootstrap: int = bounded(2000, low=1)
    seed: int = bounded(0, low=0, high=MAX_SEED)


@dataclass
class IRTask:
    """Queries, corpus and relevance judgements of one domain, in the evaluator's format."""

    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    relevant_docs: dict[str, set[str]]


def build_ir_tasks(pairs: Sequence[TextPair]) -> dict[str, IRTask]:
    """One retrieval task per domain; equal texts share an id, so an anchor with several
    positives (or a positive reached from several anchors) is judged as such."""
    by_domain: dict[str, list[TextPair]] = defaultdict(list)
    for pair in pairs:
        by_domain[pair.domain].append(pair)
    tasks: dict[str, IRTask] = {}
    for domain in sorted(by_domain):
        query_ids: dict[str, str] = {}
        doc_ids: dict[str, str] = {}
        relevant: dict[str, set[str]] = defaultdict(set)
        for pair in by_domain[domain]:
            qid = query_ids.setdefault(pair.anchor, f"q{len(query_ids)}")
            did = doc_ids.setdefault(pair.positive, f"d{len(doc_ids)}")
            relevant[qid].add(did)
        tasks[domain] = IRTask(
            name=domain,
            queries={qid: text for text, qid in query_ids.items()},
            corpus={did: text for text, did in doc_ids.items()},
            relevant_docs=dict(relevant),
        )
    return tasks


class CachedInputs:
    """Mixin for sentence-transformers evaluators: texts already embedded (by the caller, in
    one pass shared by several evaluators and the statistics) are not encoded again."""

    embedding_cache: dict[str, Any] | None = None  # text -> embedding tensor

    def embed_inputs(self, model, sentences, *args, **kwargs):  # noqa: D102 - the evaluator's docstring applies
        cache = self.embedding_cache
        if cache is not None and all(s in cache for s in sentences):
            import torch

            return torch.stack([cache[s] for s in sentences])
        return super().embed_inputs(model, sentences, *args, **kwargs)


def make_ir_evaluator(task: IRTask, cfg: EvalConfig):
    """sentence-transformers' InformationRetrievalEvaluator for `task`, keeping the ranked hit
    lists of its last call so that per-query values can be derived from them."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    class _HitRecordingEvaluator(CachedInputs, InformationRetrievalEvaluator):
        def compute_metrics(self, queries_result_list):  # noqa: D102 - parent's docstring applies
            if not getattr(self, "_in_per_query", False):
                self.last_hits = queries_result_list
            return super().compute_metrics(queries_result_list)

    return _HitRecordingEvaluator(
        queries=task.queries,
        corpus=task.corpus,
        relevant_docs=task.relevant_docs,
        mrr_at_k=cfg.mrr_at_k,
        ndcg_at_k=cfg.ndcg_at_k,
        accuracy_at_k=cfg.accuracy_at_k,
        precision_recall_at_k=cfg.precision_recall_at_k,
        map_at_k=cfg.map_at_k,
        batch_size=cfg.batch_size,
        name=task.name,
        write_csv=False,
        score_functions={"cosine": cos_sim},
        main_score_function="cosine",
    )


def flatten_metrics(scores: dict[str, dict[int, float]]) -> dict[str, float]:
    """{"mrr@k": {10: x}} -> {"mrr@10": x}."""
    return {group.replace("@k", f"@{k}"): float(v) for group, by_k in scores.items() for k, v in by_k.items()}


def per_query_metrics(evaluator, hits: list[list[dict]]) -> dict[str, np.ndarray]:
    """Each query's contribution to every metric, computed by the evaluator's own code.

    All the evaluator's metrics are means over queries, so the metric of a result list in
    which only query i has hits, times the number of queries, is query i's value; their
    mean reproduces the evaluator's numbers exactly (checked in the tests). This avoids a
    second, hand-written copy of the metric definitions.
    """
    n = len(hits)
    values: dict[str, list[float]] = defaultdict(list)
    evaluator._in_per_query = True
    try:
        for i in range(n):
            only_i: list[list[dict]] = [[] for _ in range(n)]
            only_i[i] = hits[i]
            for key, v in flatten_metrics(evaluator.compute_metrics(only_i)).items():
                values[key].append(v * n)
    finally:
        evaluator._in_per_query = False
    return {key: np.asarray(v, dtype=np.float64) for key, v in values.items()}


def bootstrap_interval(
    values: np.ndarray, *, units: np.ndarray | None = None, strata: np.ndarray | None = None,
    confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over items, resampling whole `units` (each item's
    source document: :func:`moescope.embed.pairs.text_units`; None = each item alone) within `strata`
    (ints, e.g. the item's domain). Constant values get the value as both ends; fewer than two units,
    or no items, NaN (no interval)."""
    from moescope.analysis.stats import mean_interval

    values = np.asarray(values, dtype=np.float64).reshape(-1)
    unit = np.arange(values.size) if units is None else np.asarray(units)
    iv = mean_interval(values, unit, strata=strata, n_resamples=n_resamples, confidence_level=confidence, seed=seed)
    return iv.low, iv.high


def paired_difference_interval(
    a: np.ndarray, b: np.ndarray, *, units: np.ndarray | None = None, strata: np.ndarray | None = None,
    confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of a - b over the same items and its paired bootstrap interval (over `units`, see
    :func:`bootstrap_interval`)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_interval(diff, units=units, strata=strata, confidence=confidence, n_resamples=n_resamples,
                                seed=seed)
    return float(diff.mean()), lo, hi


def knn_domain_accuracy(
    train_embeddings: np.ndarray,
    train_domains: Sequence[str],
    test_embeddings: np.ndarray,
    test_domains: Sequence[str],
    *,
    n_neighbors: int = 5,
) -> dict[str, Any]:
    """Accuracy and macro-F1 of cosine k-NN domain classification, plus per-item correctness."""
    from sklearn.metrics import f1_score
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(train_domains)), metric="cosine")
    clf.fit(np.asarray(train_embeddings), np.asarray(train_domains))
    predicted = clf.predict(np.asarray(test_embeddings))
    truth = np.asarray(test_domains)
    correct = (predicted == truth).astype(np.float64)
    return {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1_score(truth, predicted, average="macro")),
        "correct": correct,
    }


def evaluate_encoder(
    model,
    eval_pairs: Sequence[TextPair],
    train_pairs: Sequence[TextPair],
    cfg: EvalConfig | None = None,
    *,
    knn_train_per_domain: int = 100,
    show_progress_bar: bool = False,
) -> dict[str, Any]:
    """IR metrics per domain (with bootstrap intervals) and k-NN domain accuracy for `model`.

    Returns {"retrieval": {domain: {metric: value, metric+"_ci": [lo, hi]}}, "retrieval_all":
    pooled over domains' queries, "knn": {...}, "embedding_stats": mean cosine and effective
    rank of the held-out texts, "per_query": {domain: {metric: array}}}.
    """
    cfg = cfg or EvalConfig()
    tasks = build_ir_tasks(eval_pairs)
    unit_of = item_units(eval_pairs)
    domain_id = {d: i for i, d in enumerate(sorted(tasks))}
    knn_train = select_knn_neighbours(train_pairs, per_domain=knn_train_per_domain, seed=cfg.seed)
    texts = sorted({t for p in eval_pairs for t in (p.anchor, p.positive)} | {t for t, _ in knn_train})
    embeddings = model.encode(
        texts, batch_size=cfg.batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=show_progress_bar
    )
    cache = dict(zip(texts, embeddings.cpu()))
    retrieval: dict[str, dict[str, Any]] = {}
    per_query: dict[str, dict[str, np.ndarray]] = {}
    query_units: dict[str, np.ndarray] = {}
    for domain, task in tasks.items():
        evaluator = make_ir_evaluator(task, cfg)
        evaluator.embedding_cache = cache
        raw = evaluator(model)
        prefix = f"{domain}_cosine_"
        metrics = {k[len(prefix):]: float(v) for k, v in raw.items() if k.startswith(prefix)}
        pq = per_query_metrics(evaluator, evaluator.last_hits)
        per_query[domain] = pq
        # the evaluator's per-query order is its own `queries` list (queries with judgements)
        query_units[domain] = np.array([unit_of[(domain, q)] for q in evaluator.queries], dtype=np.int64)
        row: dict[str, Any] = {"n_queries": len(evaluator.queries), "n_corpus": len(evaluator.corpus),
                               "n_units": int(np.unique(query_units[domain]).size)}
        for key, value in metrics.items():
            row[key] = value
            row[f"{key}_ci"] = list(bootstrap_interval(
                pq[key], units=query_units[domain], confidence=cfg.confidence, n_resamples=cfg.n_bootstrap,
                seed=cfg.seed))
        retrieval[domain] = row

    pooled: dict[str, Any] = {}
    if per_query:
        units_all = np.concatenate(list(query_units.values()))
        strata_all = np.concatenate([np.full(u.size, domain_id[d]) for d, u in query_units.items()])
        for key in next(iter(per_query.values())):
            allv = np.concatenate([pq[key] for pq in per_query.values()])
            pooled[key] = float(allv.mean())
            pooled[f"{key}_ci"] = list(bootstrap_interval(
                allv, units=units_all, strata=strata_all, confidence=cfg.confidence, n_resamples=cfg.n_bootstrap,
                seed=cfg.seed))

    test = sorted({(t, p.domain) for p in eval_pairs for t in (p.anchor, p.positive)})
    knn: dict[str, Any] = {"n_items": len(test), "n_neighbours_pool": len(knn_train)}
    if test and len({d for _, d in knn_train}) >= 2:
        out = knn_domain_accuracy(
            np.stack([cache[t].numpy() for t, _ in knn_train]), [d for _, d in knn_train],
            np.stack([cache[t].numpy() for t, _ in test]), [d for _, d in test],
            n_neighbors=cfg.knn_neighbors,
        )
        correct = out.pop("correct")
        knn.update(out)
        knn["accuracy_ci"] = list(bootstrap_interval(
            correct, units=np.array([unit_of[(d, t)] for t, d in test]),
            strata=np.array([domain_id[d] for _, d in test]), confidence=cfg.confidence,
            n_resamples=cfg.n_bootstrap, seed=cfg.seed))
    held_out = sorted({t for p in eval_pairs for t in (p.anchor, p.positive)})
    stats = embedding_stats(np.stack([cache[t].float().numpy() for t in held_out])) if len(held_out) >= 2 else {}
    return {"retrieval": retrieval, "retrieval_all": pooled, "knn": knn, "embedding_stats": stats,
            "interval_unit": INTERVAL_UNIT, "per_query": per_query, "per_query_units": query_units}


def without_arrays(report: dict[str, Any]) -> dict[str, Any]:
    """An `evaluate_encoder` report without its per-query arrays (what is written to JSON and printed)."""
    return {k: v for k, v in report.items() if k not in ("per_query", "per_query_units")}


def item_units(pairs: Sequence[TextPair]) -> dict[tuple[str, str], int]:
    """(domain, text) of every anchor and positive -> an int id of its resampling unit
    (:func:`moescope.embed.pairs.text_units`)."""
    units = text_units(pairs)
    ids = {u: i for i, u in enumerate(sorted(set(units.values())))}
    return {item: ids[u] for item, u in units.items()}


def select_knn_neighbours(train_pairs: Sequence[TextPair], *, per_domain: int, seed: int) -> list[tuple[str, str]]:
    """(text, domain) neighbours for k-NN: up to `per_domain` distinct training positives per domain."""
    rng = np.random.default_rng(seed)
    by_domain: dict[str, set[str]] = defaultdict(set)
    for p in train_pairs:
        by_domain[p.domain].add(p.positive)
    out: list[tuple[str, str]] = []
    for domain in sorted(by_domain):
        texts = sorted(by_domain[domain])
        take = sorted(rng.permutation(len(texts))[:per_domain])
        out += [(texts[i], domain) for i in take]
    return out


def first_choice_experts(table, n_texts: int) -> np.ndarray:
    """Per text, the expert that is most often its tokens' first choice in `table` (a RoutingTable
    from `capture_encoder_routing`, `block` = text index); ties go to the lower index, -1 = no tokens."""
    first = np.asarray(table.expert_index).reshape(len(table.block), -1)[:, 0]
    n_experts = int(first.max()) + 1 if first.size else 1
    counts = np.zeros((n_texts, n_experts), dtype=np.int64)
    np.add.at(counts, (np.asarray(table.block), first), 1)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1)


def capture_encoder_routing(model, texts: Sequence[str], domain_ids: Sequence[int], *, batch_size: int = 64):
    """{layer: RoutingTable} of an MoE encoder over `texts` (real tokens only).

    `block` is the text's index and `position` the token's index in it, so the LM's
    analysis code (moescope.analysis.summary.summarize_layer) applies unchanged: its
    block bootstrap resamples texts.
    """
    import torch

    from moescope.analysis.table import RoutingTable
    from moescope.embed.encoder import encoder_moe_layers
    from moescope.moe.capture import record_routing

    layers = encoder_moe_layers(model)
    if not layers:
        return {}
    cols: dict[int, dict[str, list]] = {i: {"expert_index": [], "gate_weight": [], "router_probs": []} for i in layers}
    shared: dict[str, list] = {"token_id": [], "block": [], "position": [], "domain": []}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_routing(layers):
            for start in range(0, len(texts), batch_size):
                batch = list(texts[start : start + batch_size])
                features = model.preprocess(batch)
                features = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
                model(features)
                mask = features["attention_mask"].bool().cpu()
                b, t = mask.shape
                text_idx = torch.arange(start, start + b).unsqueeze(1).expand(b, t)[mask]
                shared["token_id"].append(features["input_ids"].cpu()[mask].numpy())
                shared["block"].append(text_idx.numpy())
                shared["position"].append(torch.arange(t).expand(b, t)[mask].numpy())
                shared["domain"].append(np.asarray(domain_ids)[text_idx.numpy()])
                for i, layer in layers.items():
                    rec = layer.last_record
                    cols[i]["expert_index"].append(rec.expert_index.cpu().numpy())
                    cols[i]["gate_weight"].append(rec.gate_weight.float().cpu().numpy())
                    cols[i]["router_probs"].append(rec.router_probs.float().cpu().numpy())
    finally:
        model.train(was_training)
    base = {k: np.concatenate(v) for k, v in shared.items()}
    return {i: RoutingTable(**base, **{k: np.concatenate(v) for k, v in c.items()}) for i, c in cols.items()}


# --------------------------------------------------------------------------- user pairs (STS / retrieval)


def spearman_interval(
    predicted: np.ndarray, gold: np.ndarray, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's rho, resampling pairs.

    Vectorized over resamples (ranks by scipy.stats.rankdata, then Pearson on ranks, which
    is Spearman's definition with average ranks for ties); a resample whose scores are all
    equal has no rho and is left out of the percentiles.
    """
    from scipy.stats import rankdata

    x, y = np.asarray(predicted, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x)))
    rx, ry = rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denom > 0, (rx * ry).sum(1) / denom, np.nan)
    if np.isnan(rho).all():  # every resample constant: no interval
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2
    lo, hi = np.nanquantile(rho, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def make_sts_evaluator(pairs: UserPairs, name: str, cfg: EvalConfig):
    """sentence-transformers' EmbeddingSimilarityEvaluator (cosine) over STS pairs."""
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    class _CachedSTSEvaluator(CachedInputs, EmbeddingSimilarityEvaluator):
        pass

    return _CachedSTSEvaluator(
        pairs.first, pairs.second, pairs.scores, batch_size=cfg.batch_size, name=name,
        similarity_fn_names=["cosine"], write_csv=False,
    )


def evaluate_user_pairs(model, pairs: UserPairs, cfg: EvalConfig | None = None, *, name: str = "pairs",
                        show_progress_bar: bool = False) -> dict[str, Any]:
    """A user's pairs through sentence-transformers' evaluators, with bootstrap intervals.

    STS: Spearman (and Pearson) between cosine similarity and the given scores, from
    EmbeddingSimilarityEvaluator, with a pair-bootstrap interval for Spearman. Retrieval:
    the queries against all positives (InformationRetrievalEvaluator, as in
    `evaluate_encoder`). Both report the embedding statistics of the file's texts.
    """
    cfg = cfg or EvalConfig()
    if pairs.kind == "retrieval":
        report = evaluate_encoder(model, pairs.as_text_pairs(name), [], cfg, show_progress_bar=show_progress_bar)
        report.pop("knn")
        return {"kind": "retrieval", "n_pairs": len(pairs), **report}
    texts = sorted(set(pairs.first) | set(pairs.second))
    embeddings = model.encode(texts, batch_size=cfg.batch_size, convert_to_tensor=True, normalize_embeddings=True,
                              show_progress_bar=show_progress_bar).cpu()
    cache = dict(zip(texts, embeddings))
    evaluator = make_sts_evaluator(pairs, name, cfg)
    evaluator.embedding_cache = cache
    raw = evaluator(model)
    a = np.stack([cache[t].float().numpy() for t in pairs.first])
    b = np.stack([cache[t].float().numpy() for t in pairs.second])
    cosine = (a * b).sum(1)
    return {
        "kind": "sts",
        "n_pairs": len(pairs),
        "spearman": float(raw[f"{name}_spearman_cosine"]),
        "spearman_ci": list(spearman_interval(cosine, np.asarray(pairs.scores), confidence=cfg.confidence,
                                              n_resamples=cfg.n_bootstrap, seed=cfg.seed)),
        "pearson": float(raw[f"{name}_pearson_cosine"]),
        "cosine": cosine,
        "embedding_stats": embedding_stats(embeddings.float().numpy()),
    }
