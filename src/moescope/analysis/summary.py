"""Every headline routing number of one MoE layer, with cluster-bootstrap intervals (pure computation).

This is what `moescope analyze` writes per arm and layer into metrics.json. The
keys follow the trainer's routing summary (token_fraction, max_fraction, load_cv,
router_entropy_token, ...) so one name means one thing across files and report.
Intervals are dicts {"estimate", "low", "high"}; the bootstrap settings are
stated once in the file's "statistics" header (see :func:`statistics_header`).

The resampling unit is given per block (``unit_of_block``: the source document of
each eval block's first token, moescope.data.units; None = every block its own unit).
Every statistic is a function of additive per-block sums; those are summed per unit
(exact) before any resample or permutation, so a unit's blocks always move together.
All intervals of one layer reuse the same seed, so they come from the same
resampled sets of units.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from moescope.analysis import metrics, stats
from moescope.analysis.table import RoutingTable
from moescope.data.units import UNIT_BLOCK
from moescope.io.config import bounded, check_fields

MAX_RESAMPLES = 10**6


@dataclass
class SummaryConfig:
    """Statistics settings for the analysis."""

    # resamples / permutations: each is a [units] weight vector kept until the interval is taken
    n_resamples: int = bounded(1000, low=2, high=MAX_RESAMPLES)  # bootstrap resamples of the units
    n_permutations: int = bounded(1000, low=1, high=MAX_RESAMPLES)  # unit domain-label permutations (NMI p)
    confidence_level: float = bounded(0.95, low=0.0, high=1.0, low_open=True, high_open=True)
    seed: int = bounded(0, low=0, high=2**32 - 1)  # numpy's seed range
    vocab_min_count: int = bounded(10, low=1)  # token ids seen fewer times are left out of vocabulary specialization
    vocab_null_shuffles: int = bounded(5, low=1, high=1000)  # token-id shuffles averaged for the vocabulary baseline
    expert_tokens_top_n: int = bounded(8, low=0, high=1000)  # ids listed per expert (those it takes the largest share of)

    def __post_init__(self) -> None:
        check_fields(self, "statistics")


def statistics_header(cfg: SummaryConfig, units: dict | None = None) -> dict:
    """How the intervals and p-values in a metrics file were made.

    units: what the resampling unit is and how many units each domain has ({"unit", "n_units"
    {DOMAIN: n}, maybe "unit_note"}: moescope.data.units.BlockUnits.describe); None: every eval block.
    """
    return {
        **asdict(cfg),
        **(units or {"unit": UNIT_BLOCK}),
        "interval": "percentile bootstrap over units (whole units resampled, all their blocks together), "
                    "within each domain (a domain of one unit is held fixed; null where only such domains "
                    "move a statistic; over all units together only when every domain has one)",
        "interval_bias": "a plug-in statistic (NMI, load CV) is biased upward in small samples, and so "
                         "are its resamples: near 0 its percentile interval can lie above the estimate; whether "
                         "routing depends on the domain at all is the permutation test's question (pvalue)",
        "pvalue": "permutation of domain labels between units, (1 + #{null >= observed}) / (1 + n_permutations)",
        "nmi": "I(domain; expert) / H(domain), equal domain weights unless noted",
        "nmi_assignments": "nmi counts each of a token's top-k experts once; nmi_first_choice only its first choice",
        "coactivation": "all pairs within a token's top-k, k(k-1)/2 per token, not only rank-adjacent pairs",
        "entropy_unit": "nats",
    }


def _interval_dict(iv: stats.Interval) -> dict[str, float]:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high}


def block_units(block_ids: np.ndarray, block_domain: np.ndarray, unit_of_block: np.ndarray | None) -> stats.Units:
    """The units of the blocks ``block_ids`` [B] (domain [B]): ``unit_of_block[block id]``, or each block alone."""
    block_ids = np.asarray(block_ids, dtype=np.int64)
    return stats.Units.of(block_ids if unit_of_block is None else np.asarray(unit_of_block)[block_ids], block_domain)


class _UnitBootstrap:
    """Bootstraps statistics of per-block sums, summed per unit, with one fixed design (units, strata, seed)."""

    def __init__(self, units: stats.Units, cfg: SummaryConfig) -> None:
        self.units = units
        # Stratify by domain when every present domain can be resampled (>= 2 units).
        self.strata = units.strata()
        self.cfg = cfg

    def __call__(self, block_sums: np.ndarray, statistic) -> dict[str, float]:
        iv = stats.bootstrap_interval(
            self.units.sums(block_sums),
            statistic,
            strata=self.strata,
            n_resamples=self.cfg.n_resamples,
            confidence_level=self.cfg.confidence_level,
            seed=self.cfg.seed,
        )
        return _interval_dict(iv)


def _rounded(matrix: np.ndarray) -> list:
    return np.round(np.asarray(matrix, dtype=float), 6).tolist()


def block_routing_counts(table: RoutingTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block ids [B], block domain [B], counts [B, E]) of the layer's routing: every top-k choice, or for
    expert choice every (token, expert) assignment the experts made."""
    if table.expert_choice:
        return stats.block_assignment_counts(*table.assignments(), table.block, table.domain, table.n_experts)
    return stats.block_expert_counts(table.expert_index, table.block, table.domain, table.n_experts)


def best_layer_nmi_test(layers: dict[str, dict], nulls: list[np.ndarray]) -> dict:
    """The best layer's NMI against the largest NMI any layer reaches under the same label shuffles.

    Every layer's permutation test shuffles the same units' labels with the same seed, so permutation j
    is one relabelling of the units; its maximum over layers is the null of "the best of L layers"
    (the max-statistic test): unlike Bonferroni's p x L it keeps the 1 / (1 + n) floor of one test, so
    a model of 48 layers can still show significance with 1000 permutations. `layers` and `nulls`
    in the same order (summarize_layer's `nmi_nulls`).
    """
    if len(layers) != len(nulls) or len({n.size for n in nulls}) != 1:
        raise ValueError("one permutation null of equal length per layer expected")
    observed = {k: v["specialization"]["nmi_permutation"]["statistic"] for k, v in layers.items()}
    best = max(observed, key=observed.get)
    null_max = np.max(np.stack(nulls), axis=0)
    return {"layer": best, "statistic": observed[best], "n_layers": len(layers),
            "pvalue": float((1 + np.sum(null_max >= observed[best])) / (1 + null_max.size)),
            "n_permutations": int(null_max.size), "null_max_q95": float(np.quantile(null_max, 0.95)),
            "test": "max over layers of NMI under the same permutations of the units' domain labels"}


def summarize_start_nmi(start: RoutingTable, final: RoutingTable, domains: list[str],
                        cfg: SummaryConfig | None = None, *, unit_of_block: np.ndarray | None = None) -> dict:
    """NMI(domain; expert) of the model at the start of training (the upcycled model, before its router
    was trained) on the same eval tokens as the final model, and the change final - start.

    Both intervals come from the same resamples as the final model's ``nmi`` (same units, strata and
    seed, a generator of their own), and the change takes the same resampled units for both models, so
    the between-unit spread they share cancels. Nothing of the final model's summary is recomputed.
    """
    cfg = cfg or SummaryConfig()
    start_ids, start_domain, start_counts = block_routing_counts(start)
    final_ids, final_domain, final_counts = block_routing_counts(final)
    if (start.n_experts != final.n_experts or not np.array_equal(start_ids, final_ids)
            or not np.array_equal(start_domain, final_domain)):
        raise ValueError("the start and final routing tables cover different blocks or experts")
    n_dom = len(domains)
    nmi = stats.nmi_statistic(n_dom, final.n_experts, equal_domain_weights=True)
    start_tables = stats.domain_tables(start_counts, start_domain, n_dom)  # [B, D, E]
    both = np.stack([stats.domain_tables(final_counts, final_domain, n_dom), start_tables], axis=1)  # [B, 2, D, E]
    boot = _UnitBootstrap(block_units(final_ids, final_domain, unit_of_block), cfg)
    return {
        "nmi_start": boot(start_tables, nmi),
        "nmi_change": boot(both, lambda t: nmi(t[..., 0, :, :]) - nmi(t[..., 1, :, :])),
    }


def summarize_layer(
    table: RoutingTable, domains: list[str], cfg: SummaryConfig | None = None, *, n_shared_experts: int = 0,
    nmi_nulls: list[np.ndarray] | None = None, unit_of_block: np.ndarray | None = None,
) -> dict:
    """All routing metrics of one layer: specialization, load, entropy, repetition, vocabulary.

    unit_of_block: the resampling unit of every block id of ``table.block`` (indexed by block id;
    None = every block its own unit): intervals resample, and the NMI test relabels, whole units.

    n_shared_experts: experts every token passes through besides its routed top-k
    (DeepSeek, Qwen-MoE). They are not in the table, so NMI, load and entropy are
    over the routed experts only; the count is recorded so reports can say so.

    Expert choice (``table.expert_mask`` kept): the domain x expert table, NMI with its
    interval and permutation null, P(expert | domain), domain specialization and load
    count every (token, expert) assignment the experts made (a token taken by two
    experts counts once for each, an unrouted token in no cell; its share is
    load.unrouted_fraction), so the load is each expert's capacity summed over passes.
    Such a token has no ranked first choice: nmi_first_choice = nmi.
    """
    cfg = cfg or SummaryConfig()
    n_dom, n_exp, k = len(domains), table.n_experts, table.top_k
    ec = table.expert_choice
    block_ids, block_domain, block_counts = block_routing_counts(table)
    units = block_units(block_ids, block_domain, unit_of_block)
    if units.n < 2:
        raise ValueError("need at least two resampling units (source documents or eval blocks) for intervals")
    tables = stats.domain_tables(block_counts, block_domain, n_dom)  # [B, D, E]
    boot = _UnitBootstrap(units, cfg)
    total = tables.sum(axis=0)
    present = total.sum(axis=1) > 0

    # --- specialization ---
    nmi_equal = stats.nmi_statistic(n_dom, n_exp, equal_domain_weights=True)
    nmi_tokens = stats.nmi_statistic(n_dom, n_exp, equal_domain_weights=False)
    perm = stats.permutation_test_nmi(
        units.sums(block_counts), units.domain, n_dom, n_permutations=cfg.n_permutations, seed=cfg.seed
    )
    if nmi_nulls is not None:  # for the test of the best of several layers (best_layer_nmi_test)
        nmi_nulls.append(perm.null_distribution)
    if k > 1 and not ec:
        # The first choice alone: the expert with the largest gate, what top-1 analyses report.
        _, _, first_counts = stats.block_expert_counts(table.expert_index[:, :1], table.block, table.domain, n_exp)
        first_nmi = boot(stats.domain_tables(first_counts, block_domain, n_dom), nmi_equal)
        first_perm = stats.permutation_test_nmi(
            units.sums(first_counts), units.domain, n_dom, n_permutations=cfg.n_permutations, seed=cfg.seed
        )
    else:
        first_nmi, first_perm = None, perm  # identical to the top-k numbers; filled in below
    if ec:
        # OLMoE's N_D (a domain's tokens) cannot be read off an assignment table: carry it as a last column
        _, block_tokens = stats.sum_by_block(np.ones(table.n_tokens), table.block, block_ids)
        spec_tables = np.concatenate([tables, stats.domain_tables(block_tokens[:, None], block_domain, n_dom)], -1)
        spec_baseline = float(total.sum() / (table.n_tokens * n_exp))  # mean experts per token / E
        spec_of = lambda t, experts=None: metrics.top_domain_specialization(  # noqa: E731
            t[..., :n_exp], k, experts=experts, domain_tokens=t[..., n_exp])
        spec_matrix = metrics.domain_specialization(total, k, spec_tables.sum(0)[..., n_exp])
    else:
        spec_tables, spec_baseline = tables, metrics.specialization_baseline(n_exp, k)
        spec_of = lambda t, experts=None: metrics.top_domain_specialization(t, k, experts=experts)  # noqa: E731
        spec_matrix = metrics.domain_specialization(total, k)
    entropy_by_domain = {
        domains[d]: boot(tables, lambda t, d=d: metrics.normalized_domain_entropy(t)[..., d])
        for d in range(n_dom)
        if present[d]
    }
    specialization = {
        "nmi": boot(tables, nmi_equal),
        "nmi_token_weighted": boot(tables, nmi_tokens),
        "nmi_pvalue": perm.pvalue,
        "nmi_permutation": perm.to_dict(),
        "mutual_information": float(metrics.mutual_information(total, equal_domain_weights=True)),
        "expert_given_domain": _rounded(metrics.expert_given_domain(total)),
        "domain_given_expert": _rounded(metrics.domain_given_expert(total)),
        "max_expert_given_domain": boot(tables, lambda t: np.nanmax(metrics.expert_given_domain(t), axis=(-2, -1))),
        "normalized_domain_entropy": entropy_by_domain,
        "domain_specialization": _rounded(spec_matrix),
        "domain_specialization_baseline": spec_baseline,
        # One number per layer for curves: each domain's most specialized expert (chosen once, on all
        # eval blocks, so the resamples do not re-pick the maximum), averaged over domains.
        "domain_specialization_top": boot(spec_tables, lambda t: spec_of(t, experts=total.argmax(axis=-1))),
    }
    specialization["nmi_first_choice"] = first_nmi if first_nmi is not None else specialization["nmi"]
    specialization["nmi_first_choice_pvalue"] = first_perm.pvalue

    # --- load ---
    expert_totals = block_counts  # [B, E]
    # expert choice drops nothing (a gate of 0 there only pads a token with fewer than k experts)
    dropped = (np.asarray(table.gate_weight) == 0).sum(axis=1).astype(float) * (not ec)
    _, block_dropped = stats.sum_by_block(dropped, table.block, block_ids)
    busiest = int(expert_totals.sum(axis=0).argmax())
    load = {
        "token_fraction": _rounded(metrics.load_fractions(expert_totals.sum(axis=0))),
        # the busiest expert is picked once, on the whole eval set: a resample's own maximum is biased
        # upward (noise lifts some expert above the rest), which put the interval above the estimate
        "max_fraction": boot(expert_totals, lambda c, e=busiest: metrics.load_fractions(c)[..., e]),
        "load_cv": boot(expert_totals, metrics.load_cv),
        "effective_experts": boot(expert_totals, metrics.effective_experts),
        "dropped_fraction": float(metrics.dropped_fraction(block_dropped.sum(), expert_totals.sum())),
    }
    unrouted = table.unrouted()
    if unrouted is not None:
        # expert choice: the tokens no expert took (the layer's own RoutingRecord.unrouted, per token)
        _, block_unrouted = stats.sum_by_block(np.column_stack([unrouted, np.ones(unrouted.size)]).astype(float),
                                               table.block, block_ids)
        load["unrouted_fraction"] = boot(block_unrouted, lambda s: s[..., 0] / s[..., 1])
        load["experts_per_token_counts"] = np.bincount(
            np.asarray(table.experts_per_token, dtype=np.int64), minlength=n_exp + 1).tolist()
    if ec:  # equal by construction: every expert takes its capacity in every forward pass
        load["tokens_per_expert"] = expert_totals.sum(axis=0).astype(int).tolist()

    # --- router entropy ---
    tok_entropy = table.token_entropy()
    columns = [tok_entropy, np.ones_like(tok_entropy)]
    if table.router_probs is not None:
        columns.append(np.asarray(table.router_probs, dtype=np.float64))
    _, ent_sums = stats.sum_by_block(np.column_stack(columns), table.block, block_ids)  # [B, 2 (+ E)]
    entropy = {
        "router_entropy_token": boot(ent_sums, lambda s: s[..., 0] / s[..., 1]),
        # Needs every token's full distribution: absent for tables that keep only the top-k.
        "router_entropy_of_mean": (
            boot(ent_sums, lambda s: metrics.mean_distribution_entropy(s[..., 2:]))
            if table.router_probs is not None else None
        ),
        "router_entropy_max": math.log(n_exp),
    }

    # --- consecutive tokens (Mixtral Table 5) ---
    i, j = metrics.consecutive_pairs(table.block, table.position)
    pair_values = [np.ones(i.size), metrics.same_first_choice(table.expert_index, i, j)]
    if k > 1:
        pair_values.append(metrics.shared_topk_expert(table.expert_index, i, j))
    if ec:
        pair_values.append(metrics.shared_assignment(table.expert_mask, i, j))
    _, pair_sums = stats.sum_by_block(np.column_stack(pair_values), table.block[i], block_ids)
    repetition = {
        "n_pairs": int(i.size),
        "same_first_choice": boot(pair_sums, lambda s: s[..., 1] / s[..., 0]) if i.size else None,
        "baseline_uniform": metrics.repetition_baseline_uniform(n_exp, 1),
        "baseline_load": float(
            metrics.repetition_baseline_load(metrics.count_experts(table.expert_index[:, 0], n_exp))
        ),
    }
    if ec:
        # consecutive tokens over the experts' own selection: did one expert take both?
        repetition["shared_assignment"] = boot(pair_sums, lambda s: s[..., -1] / s[..., 0]) if i.size else None
        repetition["shared_assignment_baseline"] = metrics.shared_assignment_baseline(table.expert_mask)
        # pairs of experts that took the same token, over the layer's own selection
        mask = np.asarray(table.expert_mask, dtype=np.float64)
        pairs = mask.T @ mask
        np.fill_diagonal(pairs, 0.0)
        specialization["coactivation"] = _rounded(pairs / np.maximum(mask.sum(axis=0), 1.0)[:, None])
    if k > 1:
        if not ec:
            specialization["coactivation"] = _rounded(np.nan_to_num(metrics.coactivation(table.expert_index, n_exp)))
        repetition["shared_topk"] = boot(pair_sums, lambda s: s[..., 2] / s[..., 0]) if i.size else None
        repetition["shared_topk_baseline_uniform"] = metrics.repetition_baseline_uniform(n_exp, k)

    shared = {"n_shared_experts": int(n_shared_experts)} if n_shared_experts else {}
    routing = {"routing": "expert_choice", "n_assignments": int(total.sum())} if ec else {}
    return {
        "n_tokens": table.n_tokens,
        "n_blocks": int(block_ids.size),
        "n_units": units.n,
        "n_experts": n_exp,
        "top_k": k,
        **shared,
        **routing,
        "domains": list(domains),
        "specialization": specialization,
        "load": load,
        "entropy": entropy,
        "repetition": repetition,
        "vocabulary": summarize_vocabulary(table, cfg),
    }


def summarize_vocabulary(table: RoutingTable, cfg: SummaryConfig) -> dict:
    """OLMoE vocabulary specialization against a null that shuffles token ids across tokens.

    The shuffle keeps every id's frequency and every expert's load but cuts the link
    between id and expert, so the baseline includes the small-count upward bias.
    Expert choice counts the experts that took each occurrence (none for an unrouted one).
    """
    chosen = {"assignments": table.assignments()} if table.expert_choice else {}
    observed = metrics.vocabulary_specialization(
        table.token_id, table.expert_index, table.n_experts, min_count=cfg.vocab_min_count, **chosen
    )
    rng = np.random.default_rng(cfg.seed)
    null_means = [
        metrics.vocabulary_specialization(
            rng.permutation(table.token_id), table.expert_index, table.n_experts, min_count=cfg.vocab_min_count,
            **chosen,
        ).mean
        for _ in range(cfg.vocab_null_shuffles)
    ]
    # most concentrated ids first, frequent before rare among equals
    order = np.lexsort((-observed.occurrences, -observed.top_fraction))[:20]
    by_expert = metrics.expert_tokens(table.token_id, table.expert_index, table.n_experts,
                                      min_count=cfg.vocab_min_count, top_n=cfg.expert_tokens_top_n, **chosen)
    return {
        "min_count": cfg.vocab_min_count,
        "n_token_ids": int(observed.token_ids.size),
        "mean": observed.mean,
        "weighted_mean": observed.weighted_mean,
        "baseline_shuffled": float(np.mean(null_means)) if null_means else None,
        "most_specialized": [
            {
                "token_id": int(observed.token_ids[t]),
                "occurrences": int(observed.occurrences[t]),
                "top_expert": int(observed.top_expert[t]),
                "top_fraction": float(observed.top_fraction[t]),
            }
            for t in order
        ],
        # per expert: the ids whose occurrences it takes the largest share of (chance: its load share)
        "by_expert": [
            [{"token_id": int(t), "count": int(c), "occurrences": int(n)}
             for t, c, n in zip(by_expert.token_ids[e], by_expert.counts[e], by_expert.occurrences[e]) if t >= 0]
            for e in range(table.n_experts)
        ],
    }


def label_expert_tokens(layer_summary: dict, tokenizer) -> None:
    """Add each by_expert entry's text (the token decoded alone) in place, for the report."""
    for entries in layer_summary.get("vocabulary", {}).get("by_expert", []):
        for entry in entries:
            entry["token"] = tokenizer.decode([entry["token_id"]])


def summarize_eval_loss(
    block_loss_sum: np.ndarray,
    block_tokens: np.ndarray,
    block_domain: np.ndarray,
    domains: list[str],
    cfg: SummaryConfig | None = None,
    *,
    block_unit: np.ndarray | None = None,
) -> dict:
    """Eval loss (nats/token) per domain, token-weighted and domain-weighted, with cluster-bootstrap intervals
    over units (block_unit [B]: each block's unit; None = every block its own)."""
    cfg = cfg or SummaryConfig()
    block_domain = np.asarray(block_domain, dtype=np.int64)
    n_dom = len(domains)
    sums = np.zeros((block_domain.size, n_dom, 2))
    sums[np.arange(block_domain.size), block_domain, 0] = block_loss_sum
    sums[np.arange(block_domain.size), block_domain, 1] = block_tokens
    units = stats.Units.of(np.arange(block_domain.size) if block_unit is None else block_unit, block_domain)
    boot = _UnitBootstrap(units, cfg)
    present = [d for d in range(n_dom) if (block_domain == d).any()]
    out = {
        "domains": {
            domains[d]: boot(sums, lambda s, d=d: s[..., d, 0] / s[..., d, 1]) for d in present
        },
        "token_weighted": boot(sums, lambda s: s[..., 0].sum(-1) / s[..., 1].sum(-1)),
        "domain_weighted": boot(
            sums, lambda s: (s[..., present, 0] / s[..., present, 1]).mean(-1)
        ),
    }
    return out


def summarize_token_types(
    types: np.ndarray, table: RoutingTable, type_names: list[str], cfg: SummaryConfig | None = None,
    *, unit_of_block: np.ndarray | None = None,
) -> dict:
    """Routing by Python token type inside code: P(expert | type) and NMI(type; expert) with a CI over units
    (``unit_of_block`` as for :func:`summarize_layer`; not stratified).

    types: [N] type id per row of ``table`` (-1 = untyped, left out). Token-weighted
    NMI: the types' natural frequencies are part of what is measured. Token choice
    counts each token's first choice; expert choice every (token, expert) assignment
    the experts made (none for an unrouted token; n_tokens still counts it).
    """
    cfg = cfg or SummaryConfig()
    types = np.asarray(types, dtype=np.int64)
    keep = types >= 0
    n_types, n_exp = len(type_names), table.n_experts
    # Per-block (type, expert) counts by bincount: no [N, types x E] one-hot array.
    block_ids, inverse = np.unique(table.block[keep], return_inverse=True)
    cells = n_types * n_exp
    if table.expert_choice:
        rows, expert = table.select(keep).assignments()
        flat = inverse[rows] * cells + types[keep][rows] * n_exp + expert
    else:
        first = table.expert_index[keep, 0].astype(np.int64)
        flat = inverse * cells + types[keep] * n_exp + first
    tables = np.bincount(flat, minlength=block_ids.size * cells).reshape(block_ids.size, n_types, n_exp).astype(float)
    total = tables.sum(axis=0)
    given_type = metrics.expert_given_domain(total)
    out: dict = {
        "type_names": list(type_names),
        "n_tokens": int(keep.sum()),
        "counts": total.astype(int).tolist(),
        "expert_given_type": _rounded(np.nan_to_num(given_type)),
        "top_expert": {},
    }
    type_tokens = np.bincount(types[keep], minlength=n_types)
    for t, name in enumerate(type_names):
        n = int(type_tokens[t])
        if total[t].sum():
            e = int(total[t].argmax())
            out["top_expert"][name] = {"expert": e, "share": float(given_type[t, e]), "n_tokens": n}
    units = block_units(block_ids, np.zeros(block_ids.size, dtype=np.int64), unit_of_block)
    if units.n >= 2:
        out["nmi"] = _UnitBootstrap(units, cfg)(tables, lambda t: metrics.normalized_mutual_information(t))
    else:
        out["nmi"] = {"estimate": float(metrics.normalized_mutual_information(total)), "low": None, "high": None}
    return out
