"""Routing metrics: how experts divide the tokens, by domain, by token and over time.

Layer 1 (pure computation): numpy arrays in, numpy arrays out; no files, no printing.

Most metrics are functions of a *count table* ``table[..., D, E]`` (routing
assignments of domain d's tokens to expert e). Every table function accepts any
number of leading axes, so the bootstrap in :mod:`moescope.analysis.stats` can
evaluate 1000 resampled tables in one call. Entropies and mutual information are
in nats; the normalized versions are unit-free.

With top-k routing (k > 1) a token contributes k assignments to the table. Mutual
information of such a table is the MI between a token's domain and one of its k
experts picked uniformly at random, which reduces to the usual MI for k = 1.

References: OLMoE (Muennighoff et al. 2024, arXiv 2409.02060, section 5) for
domain specialization, vocabulary specialization and router saturation; Mixtral
(Jiang et al. 2024, arXiv 2401.04088, Table 5) for consecutive-token repetition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import comb
from scipy.stats import entropy

# --------------------------------------------------------------------------- tables


def _as_2d_index(expert_index: np.ndarray) -> np.ndarray:
    """[N] or [N, k] integer expert choices -> [N, k] int64."""
    idx = np.asarray(expert_index)
    if idx.ndim == 1:
        idx = idx[:, None]
    if idx.ndim != 2:
        raise ValueError(f"expert_index must be [N] or [N, k], got shape {idx.shape}")
    return idx.astype(np.int64, copy=False)


def count_domain_expert(
    expert_index: np.ndarray, domain: np.ndarray, n_experts: int, n_domains: int
) -> np.ndarray:
    """Count table [D, E]: how many of domain d's routing assignments went to expert e.

    expert_index is [N] (top-1) or [N, k]; each of a token's k choices counts once.
    """
    idx = _as_2d_index(expert_index)
    dom = np.asarray(domain, dtype=np.int64)
    if dom.shape != (idx.shape[0],):
        raise ValueError(f"domain must be [N]={idx.shape[0]}, got shape {dom.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_experts):
        raise ValueError(f"expert_index outside [0, {n_experts})")
    if dom.size and (dom.min() < 0 or dom.max() >= n_domains):
        raise ValueError(f"domain outside [0, {n_domains})")
    flat = (dom[:, None] * n_experts + idx).ravel()
    return np.bincount(flat, minlength=n_domains * n_experts).reshape(n_domains, n_experts).astype(float)


def count_experts(expert_index: np.ndarray, n_experts: int) -> np.ndarray:
    """Assignments per expert [E] (k per token under top-k)."""
    idx = _as_2d_index(expert_index)
    return np.bincount(idx.ravel(), minlength=n_experts).astype(float)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0/0 -> nan and no warnings (empty rows stay visible as nan)."""
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def expert_given_domain(table: np.ndarray) -> np.ndarray:
    """P(expert | domain) [..., D, E]: each domain's row normalized to 1 (nan for an empty domain)."""
    table = np.asarray(table, dtype=float)
    return _safe_divide(table, table.sum(axis=-1, keepdims=True))


def domain_given_expert(table: np.ndarray) -> np.ndarray:
    """P(domain | expert) [..., D, E]: each expert's column normalized to 1 (nan for an unused expert)."""
    table = np.asarray(table, dtype=float)
    return _safe_divide(table, table.sum(axis=-2, keepdims=True))


def joint_distribution(table: np.ndarray, *, equal_domain_weights: bool = False) -> np.ndarray:
    """P(domain, expert) [..., D, E] from a count table.

    Token-weighted: the counts normalized. With ``equal_domain_weights`` every
    non-empty domain gets mass 1/D' (D' = number of non-empty domains) and keeps
    its own P(expert | domain), so a large domain cannot dominate the number.
    """
    table = np.asarray(table, dtype=float)
    if not equal_domain_weights:
        return _safe_divide(table, table.sum(axis=(-2, -1), keepdims=True))
    rows = table.sum(axis=-1, keepdims=True)
    present = rows > 0
    n_present = present.sum(axis=-2, keepdims=True)
    cond = np.where(present, _safe_divide(table, np.where(present, rows, 1.0)), 0.0)
    return _safe_divide(cond, n_present)


def _entropy_nats(p: np.ndarray, axis) -> np.ndarray:
    """Shannon entropy (nats) of an already-normalized distribution; 0 log 0 = 0."""
    p = np.asarray(p, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    out = terms.sum(axis=axis)
    # A distribution that is nan anywhere (empty table) has undefined entropy.
    return np.where(np.isnan(p).any(axis=axis), np.nan, out)


def mutual_information(table: np.ndarray, *, equal_domain_weights: bool = False) -> np.ndarray:
    """I(domain; expert) in nats, [...] = H(D) + H(E) - H(D, E)."""
    joint = joint_distribution(table, equal_domain_weights=equal_domain_weights)
    h_d = _entropy_nats(joint.sum(axis=-1), axis=-1)
    h_e = _entropy_nats(joint.sum(axis=-2), axis=-1)
    h_de = _entropy_nats(joint, axis=(-2, -1))
    # Clip tiny negative rounding error; MI is non-negative.
    return np.maximum(h_d + h_e - h_de, 0.0)


def domain_entropy(table: np.ndarray, *, equal_domain_weights: bool = False) -> np.ndarray:
    """H(domain) in nats [...] under the same weighting as :func:`mutual_information`."""
    joint = joint_distribution(table, equal_domain_weights=equal_domain_weights)
    return _entropy_nats(joint.sum(axis=-1), axis=-1)


def normalized_mutual_information(table: np.ndarray, *, equal_domain_weights: bool = False) -> np.ndarray:
    """NMI = I(domain; expert) / H(domain) in [0, 1]: the share of domain uncertainty the expert removes.

    0 when routing is independent of the domain, 1 when the expert determines the
    domain. nan when there is only one domain (H(domain) = 0).
    """
    mi = mutual_information(table, equal_domain_weights=equal_domain_weights)
    h_d = domain_entropy(table, equal_domain_weights=equal_domain_weights)
    return np.where(h_d > 0, _safe_divide(mi, np.where(h_d > 0, h_d, 1.0)), np.nan)


def normalized_domain_entropy(table: np.ndarray) -> np.ndarray:
    """H(P(expert | domain)) / ln E per domain [..., D]: 1 = spread evenly, 0 = one expert."""
    table = np.asarray(table, dtype=float)
    n_experts = table.shape[-1]
    return _entropy_nats(expert_given_domain(table), axis=-1) / math.log(n_experts)


def domain_specialization(table: np.ndarray, top_k: int, domain_tokens: np.ndarray | None = None) -> np.ndarray:
    """OLMoE domain specialization N_k(E_i, D) / N_D, [..., D, E].

    N_k(E_i, D): tokens of domain D that have E_i among their top-k experts;
    N_D: tokens of domain D. Each row sums to k; the uniform baseline is k / E
    (see :func:`specialization_baseline`). Under expert choice a token has 0..E experts,
    so N_D cannot be read off the table: pass it as ``domain_tokens`` [..., D].
    """
    table = np.asarray(table, dtype=float)
    if domain_tokens is None:
        tokens = table.sum(axis=-1, keepdims=True) / top_k
    else:
        tokens = np.asarray(domain_tokens, dtype=float)[..., None]
    return _safe_divide(table, tokens)


def top_domain_specialization(table: np.ndarray, top_k: int, experts: np.ndarray | None = None,
                              domain_tokens: np.ndarray | None = None) -> np.ndarray:
    """Each domain's most specialized expert, N_k(E, D) / N_D, averaged over non-empty domains [...].

    One number per layer for curves; k / E under uniform routing, 1 when every domain
    has one expert that all its tokens choose. ``experts`` [D] fixes which expert counts
    for each domain (e.g. the one chosen on the full sample, so that bootstrap resamples
    do not re-pick the maximum and inflate the interval); default: the maximum of ``table``.
    """
    spec = domain_specialization(table, top_k, domain_tokens)
    present = ~np.isnan(spec).any(axis=-1)
    if experts is None:
        best = np.where(np.isnan(spec), -np.inf, spec).max(axis=-1)
    else:
        best = np.take_along_axis(spec, np.broadcast_to(np.asarray(experts)[:, None], spec.shape[:-1] + (1,)),
                                  axis=-1)[..., 0]
    best = np.where(present, best, 0.0)
    return _safe_divide(best.sum(axis=-1), present.sum(axis=-1))


def specialization_baseline(n_experts: int, top_k: int) -> float:
    """k / E: what every expert gets of every domain under uniform routing."""
    return top_k / n_experts


# --------------------------------------------------------------------------- load


def load_fractions(expert_counts: np.ndarray) -> np.ndarray:
    """Share of assignments per expert [..., E] (sums to 1)."""
    counts = np.asarray(expert_counts, dtype=float)
    return _safe_divide(counts, counts.sum(axis=-1, keepdims=True))


def max_load_fraction(expert_counts: np.ndarray) -> np.ndarray:
    """Largest expert's share [...]; 1/E when perfectly balanced."""
    return load_fractions(expert_counts).max(axis=-1)


def load_cv(expert_counts: np.ndarray) -> np.ndarray:
    """Coefficient of variation of the load [...]: std / mean of the per-expert shares (population std).

    0 when balanced, sqrt(E - 1) when one expert takes everything.
    """
    f = load_fractions(expert_counts)
    return f.std(axis=-1) / f.mean(axis=-1)


def effective_experts(expert_counts: np.ndarray) -> np.ndarray:
    """exp(H(load)) [...]: E when balanced, 1 when one expert takes everything."""
    return np.exp(_entropy_nats(load_fractions(expert_counts), axis=-1))


def dropped_fraction(n_dropped: int | np.ndarray, n_assignments: int | np.ndarray) -> np.ndarray:
    """Share of routing assignments dropped by a capacity limit (0 for a dropless layer)."""
    return _safe_divide(n_dropped, n_assignments)


def token_router_entropy(router_probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each token's router distribution [N]; ln E = the router has no preference."""
    probs = np.asarray(router_probs, dtype=np.float64)
    return entropy(probs, axis=-1)


def mean_distribution_entropy(prob_sum: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the router distribution averaged over tokens, from its sum [..., E].

    High with low per-token entropy means confident routers that still spread the
    load; both near ln E means the router has not learned anything yet.
    """
    return _entropy_nats(load_fractions(prob_sum), axis=-1)


# --------------------------------------------------------------------------- sequences


def consecutive_pairs(block: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of tokens at positions p and p + 1 of the same block.

    Tokens may come in any order; only truly adjacent positions of one block
    pair up (never across a block boundary).
    """
    block = np.asarray(block, dtype=np.int64)
    position = np.asarray(position, dtype=np.int64)
    order = np.lexsort((position, block))
    b, p = block[order], position[order]
    adjacent = (b[1:] == b[:-1]) & (p[1:] == p[:-1] + 1)
    return order[:-1][adjacent], order[1:][adjacent]


def same_first_choice(expert_index: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Per pair: did tokens i and j get the same first-choice expert? (Mixtral Table 5, "first choice")."""
    idx = _as_2d_index(expert_index)
    return idx[i, 0] == idx[j, 0]


def shared_topk_expert(expert_index: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Per pair: do the top-k sets of tokens i and j share an expert? (Mixtral, "first or second choice")."""
    idx = _as_2d_index(expert_index)
    a, b = idx[i], idx[j]
    return (a[:, :, None] == b[:, None, :]).any(axis=(-2, -1))


def shared_assignment(expert_mask: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Per pair: did some expert take both token i and token j? (expert choice: a token is taken by 0..E experts)."""
    mask = np.asarray(expert_mask, dtype=bool)
    return (mask[i] & mask[j]).any(axis=-1)


def shared_assignment_baseline(expert_mask: np.ndarray) -> float:
    """Chance that two independent tokens share an expert when expert e takes each token with its own rate
    q_e (the share of tokens it took): 1 - prod_e (1 - q_e^2)."""
    q = np.asarray(expert_mask, dtype=np.float64).mean(axis=0)
    return float(1.0 - np.prod(1.0 - q * q))


def repetition_baseline_uniform(n_experts: int, top_k: int = 1) -> float:
    """Chance that two uniformly random top-k sets share an expert: 1 - C(E-k, k) / C(E, k).

    1/E for k = 1; 0.464 for E = 8, k = 2 (Mixtral's "first or second choice" baseline).
    """
    return float(1.0 - comb(n_experts - top_k, top_k, exact=True) / comb(n_experts, top_k, exact=True))


def repetition_baseline_load(expert_counts: np.ndarray) -> np.ndarray:
    """Chance that two independent tokens share a first choice given the actual load: sum_e f_e^2.

    Fairer than 1/E when the load is unbalanced (two tokens meet on a busy expert
    more often by chance).
    """
    f = load_fractions(expert_counts)
    return (f * f).sum(axis=-1)


# --------------------------------------------------------------------------- vocabulary

# Largest count array (cells) built at once by the token-level counters below: keeps a
# million tokens x 256 experts in bounded memory (no [N, E] or [V, E] arrays).
_COUNT_CELLS = 1 << 22


@dataclass(frozen=True)
class VocabularySpecialization:
    """Per token id (seen at least min_count times): how concentrated its routing is."""

    token_ids: np.ndarray  # [V'] ids that passed the threshold
    occurrences: np.ndarray  # [V'] times each id occurred
    top_expert: np.ndarray  # [V'] the expert most often among its top-k
    top_fraction: np.ndarray  # [V'] N_k(x, top expert) / N(x)
    mean: float  # unweighted mean of top_fraction over ids
    weighted_mean: float  # occurrence-weighted mean of top_fraction


def _id_expert_counts(token_id, expert_index, n_experts: int, min_count: int, assignments):
    """(ids seen >= min_count times, their occurrences, chunks): the chunks yield (lo, hi, counts) with
    counts[i, e] = occurrences of ids[lo + i] routed to expert e, a few ids at a time so memory stays
    bounded by _COUNT_CELLS cells however large the vocabulary and E are."""
    tok = np.asarray(token_id, dtype=np.int64)
    if assignments is not None:
        a_row, a_expert = (np.asarray(a, dtype=np.int64) for a in assignments)
    else:
        idx = _as_2d_index(expert_index)
        if tok.shape != (idx.shape[0],):
            raise ValueError(f"token_id must be [N]={idx.shape[0]}, got shape {tok.shape}")
    ids, inverse, occurrences = np.unique(tok, return_inverse=True, return_counts=True)
    keep = occurrences >= min_count
    slot = np.full(ids.size, -1, dtype=np.int64)
    slot[keep] = np.arange(int(keep.sum()))
    ids, occurrences = ids[keep], occurrences[keep]
    row = slot[inverse]

    def chunks():
        step = max(1, _COUNT_CELLS // max(1, n_experts))
        for lo in range(0, ids.size, step):
            hi = min(ids.size, lo + step)
            if assignments is not None:
                mine = (row[a_row] >= lo) & (row[a_row] < hi)
                flat = (row[a_row][mine] - lo) * n_experts + a_expert[mine]
            else:
                mine = (row >= lo) & (row < hi)
                flat = ((row[mine] - lo)[:, None] * n_experts + idx[mine]).ravel()
            yield lo, hi, np.bincount(flat, minlength=(hi - lo) * n_experts).reshape(hi - lo, n_experts)

    return ids, occurrences, chunks()


def vocabulary_specialization(
    token_id: np.ndarray, expert_index: np.ndarray | None, n_experts: int, *, min_count: int = 10,
    assignments: tuple[np.ndarray, np.ndarray] | None = None,
) -> VocabularySpecialization:
    """OLMoE vocabulary specialization, summarized per token id.

    For token id x, OLMoE's N_k(x, E_i) / N(x) is the share of x's occurrences that
    have E_i among their top-k; here each id keeps its top expert's share. 1 means
    the id always goes to the same expert; with k = 1 and random routing it tends
    to 1/E (higher for rare ids, hence ``min_count``). Expert choice: pass
    ``assignments`` (token row [M], expert [M]: every token an expert took) instead of
    ``expert_index``; N(x) still counts every occurrence, unrouted ones included.
    """
    ids, occurrences, chunks = _id_expert_counts(token_id, expert_index, n_experts, min_count, assignments)
    top = np.zeros(ids.size, dtype=np.int64)
    top_count = np.zeros(ids.size)
    for lo, hi, counts in chunks:
        top[lo:hi] = counts.argmax(axis=1)
        top_count[lo:hi] = counts[np.arange(hi - lo), top[lo:hi]]
    frac = top_count / occurrences if ids.size else np.zeros(0)
    mean = float(frac.mean()) if ids.size else float("nan")
    weighted = float((frac * occurrences).sum() / occurrences.sum()) if ids.size else float("nan")
    return VocabularySpecialization(ids, occurrences, top, frac, mean, weighted)


@dataclass(frozen=True)
class ExpertTokens:
    """Per expert, the token ids (seen at least min_count times) whose occurrences it takes the largest share of."""

    token_ids: np.ndarray  # [E, n] (-1 where an expert has fewer candidates)
    counts: np.ndarray  # [E, n] occurrences of the id routed to the expert (among its top-k)
    occurrences: np.ndarray  # [E, n] occurrences of the id overall


def expert_tokens(
    token_id: np.ndarray, expert_index: np.ndarray | None, n_experts: int, *, min_count: int = 10, top_n: int = 8,
    assignments: tuple[np.ndarray, np.ndarray] | None = None,
) -> ExpertTokens:
    """For every expert, the `top_n` ids with the largest share N_k(x, e) / N(x) of their occurrences
    routed to it (ties: the more frequent id first). Under routing independent of the id, that share is
    the expert's share of all assignments. Same inputs and memory bound as vocabulary_specialization."""
    ids, occurrences, chunks = _id_expert_counts(token_id, expert_index, n_experts, min_count, assignments)
    best_ids = np.full((n_experts, 0), -1, dtype=np.int64)
    best_counts = np.zeros((n_experts, 0), dtype=np.int64)
    for lo, hi, counts in chunks:
        best_ids = np.concatenate([best_ids, np.broadcast_to(np.arange(lo, hi), (n_experts, hi - lo))], axis=1)
        best_counts = np.concatenate([best_counts, counts.T], axis=1)
        best_ids, best_counts = _top_shares(best_ids, best_counts, occurrences, top_n)
    occ = np.where(best_ids >= 0, occurrences[np.maximum(best_ids, 0)], 0) if ids.size else best_counts
    return ExpertTokens(np.where(best_ids >= 0, ids[np.maximum(best_ids, 0)], -1) if ids.size else best_ids,
                        best_counts, occ)


def _top_shares(slots: np.ndarray, counts: np.ndarray, occurrences: np.ndarray, top_n: int):
    """Each row's `top_n` (slot, count) by count / occurrences[slot], then count; rows padded with -1 / 0."""
    share = np.where((slots >= 0) & (counts > 0), counts / np.maximum(occurrences[np.maximum(slots, 0)], 1), -1.0)
    order = np.lexsort((-counts, -share), axis=-1)[:, :top_n] if slots.shape[1] else slots[:, :0]
    picked = np.take_along_axis(share, order, 1) > 0
    return (np.where(picked, np.take_along_axis(slots, order, 1), -1),
            np.where(picked, np.take_along_axis(counts, order, 1), 0))


def coactivation_counts(expert_index: np.ndarray, n_experts: int) -> np.ndarray:
    """Co-activation counts [E, E]: tokens that have both E_i and E_j among their top-k (i != j).

    Every unordered pair of a token's k choices counts once (k(k-1)/2 pairs per token),
    whatever their ranks. A count of only the pairs adjacent in the ranked list
    ((1st, 2nd), (2nd, 3rd), ...: k - 1 pairs per token) would miss e.g. (1st, 3rd) and
    weight ranks unevenly. Memory is O(N + E^2): one pass per pair of ranks, no [N, E] array.
    """
    idx = _as_2d_index(expert_index)
    k = idx.shape[1]
    pairs = np.zeros(n_experts * n_experts)
    for a in range(k):
        for b in range(a + 1, k):
            pairs += np.bincount(idx[:, a] * n_experts + idx[:, b], minlength=n_experts * n_experts)
    pairs = pairs.reshape(n_experts, n_experts)
    pairs = pairs + pairs.T
    np.fill_diagonal(pairs, 0.0)  # a repeated expert in one token's top-k is not a pair
    return pairs


def coactivation(expert_index: np.ndarray, n_experts: int) -> np.ndarray:
    """OLMoE expert co-activation [E, E]: N(E_i, E_j) / N(E_i) for top-k routing (k > 1).

    Row i: of the tokens that chose E_i, the share that also chose E_j (the
    diagonal is 0; nan for an unused expert). Rows sum to k - 1. Pairs are all
    pairs within a token's top-k (see :func:`coactivation_counts`).
    """
    idx = _as_2d_index(expert_index)
    return _safe_divide(coactivation_counts(idx, n_experts), count_experts(idx, n_experts)[:, None])


# --------------------------------------------------------------------------- training dynamics


def topk_overlap(expert_index: np.ndarray, reference_index: np.ndarray) -> np.ndarray:
    """Per token: |top-k set ∩ reference top-k set| / k, in [0, 1]."""
    a, b = _as_2d_index(expert_index), _as_2d_index(reference_index)
    if a.shape != b.shape:
        raise ValueError(f"expert choices of shape {a.shape} and {b.shape} are not the same tokens")
    return (a[:, :, None] == b[:, None, :]).any(axis=-1).sum(axis=-1) / a.shape[1]


def assignment_saturation(checkpoint_mask: np.ndarray, final_mask: np.ndarray) -> float:
    """Router saturation for expert choice: the share of the final model's (token, expert) assignments
    that the checkpoint also made. For top-k token choice (k assignments per token) this equals
    `router_saturation`; here a token may have 0..E assignments."""
    a, b = np.asarray(checkpoint_mask, dtype=bool), np.asarray(final_mask, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"selection masks of shape {a.shape} and {b.shape} are not the same tokens")
    return float((a & b).sum() / max(int(b.sum()), 1))


def assignment_saturation_baseline(final_mask: np.ndarray) -> float:
    """What `assignment_saturation` gives for a checkpoint whose experts take the final model's shares of
    tokens independently of it: sum_e q_e^2 / sum_e q_e (k/E for k assignments per token spread evenly)."""
    q = np.asarray(final_mask, dtype=np.float64).mean(axis=0)
    return float((q * q).sum() / max(q.sum(), 1e-12))


def router_saturation(checkpoint_indices: list[np.ndarray], final_index: np.ndarray) -> np.ndarray:
    """OLMoE router saturation per checkpoint [T]: mean over tokens of the top-k overlap with the final model.

    1 at the final checkpoint by definition; k/E expected for unrelated routers.
    """
    return np.array([topk_overlap(idx, final_index).mean() for idx in checkpoint_indices])
