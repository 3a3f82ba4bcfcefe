"""Uncertainty for routing metrics: cluster bootstrap intervals and permutation tests over resampling units.

Layer 1 (pure computation). Tokens of one eval block are not independent (one
document, one domain, shared context), and neither are the blocks cut from one
source document, so the unit of resampling is a group of blocks (the source
document of each block's first token, moescope.data.units; the block itself where
that is not known): a unit's tokens always move together. Every statistic is
computed from additive sums (count tables, entropy sums, pair counts), summed per
block and then per unit (:class:`Units`, exact): a resample is then a weighted sum
of unit rows, so 1000 resamples cost one matrix product.

The resampling and the interval/p-value arithmetic are scipy's
(``scipy.stats.bootstrap``, ``scipy.stats.permutation_test``); this module only
turns unit indices into summed tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse
import scipy.stats

from moescope.analysis import metrics

# statistic(summed [..., *feature_shape]) -> [...]: vectorized over any leading axes.
TableStatistic = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    confidence_level: float
    n_resamples: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PermutationResult:
    """Observed statistic, its permutation p-value and a summary of the null distribution."""

    statistic: float
    pvalue: float  # (1 + #{null >= observed}) / (1 + n_permutations)
    n_permutations: int
    null_mean: float
    null_q95: float  # 95th percentile of the null: the value chance alone reaches 5% of the time
    null_distribution: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        """JSON-ready summary (the null distribution itself is left out)."""
        out = asdict(self)
        out.pop("null_distribution")
        return out


# --------------------------------------------------------------------------- per-block sums


def sum_by_block(
    values: np.ndarray, block: np.ndarray, block_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sum token-level values [N, ...] within each block -> (block ids [B] sorted, sums [B, ...]).

    With ``block_ids`` (sorted, a superset of ``block``) the rows follow that list and
    blocks without values get zeros, so sums of different quantities line up.
    """
    values = np.asarray(values, dtype=float)
    block = np.asarray(block)
    if block_ids is None:
        block_ids, inverse = np.unique(block, return_inverse=True)
    else:
        block_ids = np.asarray(block_ids)
        inverse = np.searchsorted(block_ids, block)
        if block.size and (inverse.max() >= block_ids.size or not np.array_equal(block_ids[inverse], block)):
            raise ValueError("block holds ids that are not in block_ids")
    n = values.shape[0]
    # A sparse [B, N] indicator times the values: one pass, any number of feature columns.
    indicator = scipy.sparse.csr_matrix((np.ones(n), (inverse, np.arange(n))), shape=(block_ids.size, n))
    sums = np.asarray(indicator @ values.reshape(n, -1)).reshape((block_ids.size,) + values.shape[1:])
    return block_ids, sums


def block_expert_counts(
    expert_index: np.ndarray, block: np.ndarray, domain: np.ndarray, n_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-block routing counts: (block ids [B], block domain [B], counts [B, E]).

    Each of a token's k choices counts once. Raises ValueError if a block mixes domains.
    """
    idx = np.asarray(expert_index, dtype=np.int64)
    idx = idx[:, None] if idx.ndim == 1 else idx
    block_ids, inverse, block_domain = groups_of(block, domain, "block")
    flat = (inverse[:, None] * n_experts + idx).ravel()
    counts = np.bincount(flat, minlength=block_ids.size * n_experts).reshape(block_ids.size, n_experts)
    return block_ids, block_domain, counts.astype(float)


def groups_of(group: np.ndarray, domain: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids [G] sorted, each member's row in them [N], each group's domain [G]): tokens grouped into
    blocks, or blocks into units. ValueError if a group (a `what`) mixes domains."""
    group_ids, inverse = np.unique(np.asarray(group), return_inverse=True)
    inverse = inverse.reshape(-1)
    domain = np.asarray(domain, dtype=np.int64)
    group_domain = np.empty(group_ids.size, dtype=np.int64)
    group_domain[inverse] = domain
    if not np.array_equal(group_domain[inverse], domain):
        raise ValueError(f"a {what} holds tokens of more than one domain")
    return group_ids, inverse, group_domain


@dataclass(frozen=True)
class Units:
    """The resampling units of a set of blocks: each block's unit and each unit's domain.

    Sums of additive per-block statistics become per-unit sums (:meth:`sums`, exact), which
    the bootstrap and the permutation tests then resample or relabel whole. With every block
    its own unit (ids rising with the blocks) the unit rows are the block rows, unchanged.
    """

    inverse: np.ndarray  # [B] each block's row in the unit arrays
    domain: np.ndarray  # [U] each unit's domain

    @classmethod
    def of(cls, block_unit: np.ndarray, block_domain: np.ndarray) -> "Units":
        """From each block's unit id [B] and domain [B]; ValueError if a unit spans domains."""
        _, inverse, unit_domain = groups_of(block_unit, block_domain, "unit")
        return cls(inverse, unit_domain)

    @property
    def n(self) -> int:
        return int(self.domain.size)

    def sums(self, block_sums: np.ndarray) -> np.ndarray:
        """Per-unit sums [U, ...] of per-block sums [B, ...]."""
        values = np.asarray(block_sums, dtype=float)
        if values.shape[0] != self.inverse.size:
            raise ValueError(f"{values.shape[0]} block rows for {self.inverse.size} blocks")
        out = np.zeros((self.n,) + values.shape[1:])
        np.add.at(out, self.inverse, values)
        return out

    def strata(self) -> np.ndarray:
        """Each unit's domain: the bootstrap resamples units within their domain (a domain of one unit is
        held fixed, see :func:`bootstrap_interval`)."""
        return self.domain


def block_assignment_counts(
    token_row: np.ndarray, expert: np.ndarray, block: np.ndarray, domain: np.ndarray, n_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-block counts of (token, expert) assignments: (block ids [B], block domain [B], counts [B, E]).

    token_row, expert [M]: one entry per assignment (a token may have none, one or several:
    expert-choice routing). block, domain [N] are per token, so a block whose tokens no
    expert took still gets a row (of zeros) and the blocks line up with :func:`sum_by_block`.
    """
    block_ids, inverse, block_domain = groups_of(block, domain, "block")
    flat = inverse[np.asarray(token_row, dtype=np.int64)] * n_experts + np.asarray(expert, dtype=np.int64)
    counts = np.bincount(flat, minlength=block_ids.size * n_experts).reshape(block_ids.size, n_experts)
    return block_ids, block_domain, counts.astype(float)


def domain_tables(block_counts: np.ndarray, block_domain: np.ndarray, n_domains: int) -> np.ndarray:
    """Per-block count tables [B, D, E]: each block's counts in its domain's row."""
    one_hot = np.eye(n_domains)[np.asarray(block_domain, dtype=np.int64)]
    return one_hot[:, :, None] * np.asarray(block_counts, dtype=float)[:, None, :]


# --------------------------------------------------------------------------- bootstrap


def _resample_weights(index_samples: tuple[np.ndarray, ...], n_units: int) -> np.ndarray:
    """How often each unit was drawn, [..., U], from resampled unit-index arrays [..., n_s]."""
    total = None
    for sample in index_samples:
        sample = np.asarray(sample, dtype=np.int64)
        lead = sample.shape[:-1]
        rows = sample.reshape(-1, sample.shape[-1])
        offsets = (np.arange(rows.shape[0]) * n_units)[:, None]
        w = np.bincount((rows + offsets).ravel(), minlength=rows.shape[0] * n_units)
        w = w.reshape(lead + (n_units,)).astype(float)
        # Strata are resampled independently; their (broadcast) draws add up.
        total = w if total is None else total + w
    return total


def bootstrap_interval(
    unit_sums: np.ndarray,
    statistic: TableStatistic,
    *,
    strata: np.ndarray | None = None,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    method: str = "percentile",
    seed: int = 0,
    batch: int | None = 250,
) -> Interval:
    """Cluster bootstrap CI of ``statistic(sum of unit_sums)``, resampling whole units.

    unit_sums: [U, ...] additive statistics per resampling unit (a block, or the blocks of one
    source document summed: :meth:`Units.sums`; e.g. tables from :func:`domain_tables`).
    strata: optional [U] labels (e.g. each unit's domain); units are then resampled
    within their stratum, keeping the eval set's design (units per domain) fixed. A stratum of
    one unit cannot be resampled: it is held fixed (in every resample once), not pooled with the
    others, which would leave it out of a third of the resamples. A statistic that only such
    strata move has no interval: low and high are NaN (written as null). Only when every stratum
    is a single unit are the units resampled together.
    method: "percentile" or "BCa" (scipy's names). Deterministic for a given seed.
    """
    sums = np.asarray(unit_sums, dtype=float)
    n_units = sums.shape[0]
    flat = sums.reshape(n_units, -1)
    feature_shape = sums.shape[1:]
    labels = np.zeros(n_units, dtype=np.int64) if strata is None else np.asarray(strata)
    strata_units = [np.flatnonzero(labels == s) for s in np.unique(labels)]
    samples = tuple(u for u in strata_units if u.size >= 2)
    fixed = np.zeros(n_units)
    for u in strata_units:
        if u.size == 1:
            fixed[u] = 1.0
    if not samples:  # every stratum a single unit: resample them together (nothing else varies)
        if n_units < 2:
            raise ValueError("need at least two units to resample")
        samples, fixed = (np.arange(n_units),), np.zeros(n_units)

    def resampled_statistic(*index_samples: np.ndarray, axis: int = -1) -> np.ndarray:
        weights = _resample_weights(index_samples, n_units) + fixed
        summed = (weights @ flat).reshape(weights.shape[:-1] + feature_shape)
        return np.asarray(statistic(summed), dtype=float)

    estimate = float(statistic(sums.sum(axis=0)))
    result = scipy.stats.bootstrap(
        samples,
        resampled_statistic,
        n_resamples=n_resamples,
        batch=batch,
        vectorized=True,
        paired=False,
        confidence_level=confidence_level,
        method=method,
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    low, high = float(ci.low), float(ci.high)
    if fixed.any() and np.ptp(result.bootstrap_distribution) == 0:
        low = high = float("nan")  # only units held fixed move it: no interval to give
    return Interval(estimate, low, high, confidence_level, n_resamples, method)


def mean_interval(
    values: np.ndarray,
    unit: np.ndarray,
    *,
    strata: np.ndarray | None = None,
    n_resamples: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Cluster bootstrap CI of the mean of per-item ``values`` [N], resampling whole units.

    unit [N]: each item's resampling unit (the queries cut from one source document move
    together); strata [N] (ints, e.g. each item's domain): units are resampled within their
    stratum, as :func:`bootstrap_interval`. The mean is over items (a unit weighs as many items
    as it holds). Constant values have the value as both ends; a sample that cannot be
    resampled (fewer than two units) has no interval: NaN ends. No items: NaN throughout.
    """
    values = np.asarray(values, dtype=float).reshape(-1)
    if values.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), confidence_level, n_resamples, "percentile")
    mean = float(values.mean())
    if np.all(values == values[0]):
        return Interval(mean, mean, mean, confidence_level, n_resamples, "percentile")
    labels = np.zeros(values.size, dtype=np.int64) if strata is None else np.asarray(strata, dtype=np.int64)
    units = Units.of(np.asarray(unit), labels)
    if units.n < 2:
        return Interval(mean, float("nan"), float("nan"), confidence_level, n_resamples, "percentile")
    sums = units.sums(np.stack([values, np.ones_like(values)], axis=1))
    iv = bootstrap_interval(sums, lambda s: s[..., 0] / s[..., 1], strata=units.strata(), n_resamples=n_resamples,
                            confidence_level=confidence_level, seed=seed)
    return Interval(mean, iv.low, iv.high, confidence_level, n_resamples, iv.method)


# --------------------------------------------------------------------------- permutation test


def permutation_test_units(
    unit_counts: np.ndarray,
    unit_label: np.ndarray,
    n_labels: int,
    statistic: TableStatistic,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    batch: int | None = 250,
) -> PermutationResult:
    """One-sided permutation test of ``statistic(label x expert table)`` shuffling labels between units.

    unit_counts [U, E]: counts summed per resampling unit (a block or a source document's blocks).
    A permutation gives each unit another unit's label (label totals in units stay fixed), so
    the null keeps the dependence of the tokens and blocks inside a unit.
    p = (1 + #{null >= observed}) / (1 + n_permutations)
    (scipy's randomized p-value; exact enumeration when n_permutations >= U!).
    """
    counts = np.asarray(unit_counts, dtype=float)
    labels = np.asarray(unit_label, dtype=np.int64)
    one_hot = np.eye(n_labels)

    def label_statistic(permuted_labels: np.ndarray, axis: int = -1) -> np.ndarray:
        # [..., U] labels -> [..., L, E] tables in one product
        table = np.einsum("...ul,ue->...le", one_hot[permuted_labels], counts)
        return np.asarray(statistic(table), dtype=float)

    result = scipy.stats.permutation_test(
        (labels,),
        label_statistic,
        permutation_type="pairings",
        vectorized=True,
        n_resamples=n_permutations,
        batch=batch,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    null = np.asarray(result.null_distribution, dtype=float)
    observed = float(result.statistic)
    return PermutationResult(
        statistic=observed,
        # an undefined statistic (NMI of one domain) is no evidence of anything: scipy would count
        # NaN >= NaN as never and report the smallest p
        pvalue=float(result.pvalue) if np.isfinite(observed) else float("nan"),
        n_permutations=int(null.size),
        null_mean=float(null.mean()),
        null_q95=float(np.quantile(null, 0.95)),
        null_distribution=null,
    )


def nmi_statistic(n_domains: int, n_experts: int, *, equal_domain_weights: bool = True) -> TableStatistic:
    """NMI(domain; expert) of summed tables shaped [..., D, E]."""

    def statistic(table: np.ndarray) -> np.ndarray:
        if np.shape(table)[-2:] != (n_domains, n_experts):
            raise ValueError(f"expected tables [..., {n_domains}, {n_experts}], got {np.shape(table)}")
        return metrics.normalized_mutual_information(table, equal_domain_weights=equal_domain_weights)

    return statistic


def permutation_test_nmi(
    unit_counts: np.ndarray,
    unit_domain: np.ndarray,
    n_domains: int,
    *,
    equal_domain_weights: bool = True,
    n_permutations: int = 1000,
    seed: int = 0,
) -> PermutationResult:
    """p-value for NMI(domain; expert) > chance, shuffling domain labels between resampling units
    (unit_counts [U, E], unit_domain [U]: per block, or per source document summed by :meth:`Units.sums`)."""
    counts = np.asarray(unit_counts, dtype=float)
    stat = nmi_statistic(n_domains, counts.shape[1], equal_domain_weights=equal_domain_weights)
    return permutation_test_units(
        counts, unit_domain, n_domains, stat, n_permutations=n_permutations, seed=seed
    )


# --------------------------------------------------------------------------- paired arms


@dataclass(frozen=True)
class PairedDifference:
    """Held-out loss of arm A minus arm B on the same eval blocks (nats/token).

    domain_weighted: the mean over domains of each domain's per-token difference (the
    difference of the two arms' domain-weighted losses); domains: per-domain differences
    (domain id -> Interval). pvalue: two-sided sign-flip permutation test of "no
    difference", flipping whole units' differences (a unit: a source document's blocks, or a block).
    """

    domain_weighted: Interval
    domains: dict[int, Interval]
    pvalue: float
    n_permutations: int
    n_blocks: int
    n_units: int

    def to_dict(self, domain_names: list[str] | None = None) -> dict:
        name = (lambda d: domain_names[d]) if domain_names is not None else str
        return {
            "domain_weighted": {k: getattr(self.domain_weighted, k) for k in ("estimate", "low", "high")},
            "domains": {name(d): {k: getattr(iv, k) for k in ("estimate", "low", "high")}
                        for d, iv in self.domains.items()},
            "pvalue": self.pvalue,
            "n_permutations": self.n_permutations,
            "n_blocks": self.n_blocks,
            "n_units": self.n_units,
        }


def paired_loss_difference(
    loss_sum_a: np.ndarray,
    loss_sum_b: np.ndarray,
    block_tokens: np.ndarray,
    block_domain: np.ndarray,
    n_domains: int,
    *,
    block_unit: np.ndarray | None = None,
    n_resamples: int = 1000,
    n_permutations: int = 1000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Paired comparison of two arms' summed block losses [B] on the same blocks (A - B).

    block_unit [B]: each block's resampling unit (None: every block its own). The blocks'
    sums are summed per unit; the interval resamples units within their domain and takes
    the SAME units for both arms (a resample is a set of per-unit differences), so the
    large between-unit spread of loss that both arms share cancels; unpaired intervals of
    the two losses overlap long before this one covers 0. The null flips the sign of each
    unit's difference (exchangeable under "A and B are the same model").
    """
    a = np.asarray(loss_sum_a, dtype=float)
    b = np.asarray(loss_sum_b, dtype=float)
    tokens = np.asarray(block_tokens, dtype=float)
    dom = np.asarray(block_domain, dtype=np.int64)
    if not (a.shape == b.shape == tokens.shape == dom.shape) or a.ndim != 1:
        raise ValueError(f"paired arms need the same blocks: shapes {a.shape}, {b.shape}, {tokens.shape}, {dom.shape}")
    units = Units.of(np.arange(a.size) if block_unit is None else block_unit, dom)
    a, b, tokens = (units.sums(x) for x in (a, b, tokens))
    present = np.flatnonzero(np.bincount(units.domain, minlength=n_domains) > 0)
    one_hot = np.eye(n_domains)[units.domain]  # [U, D]
    domain_tokens = tokens @ one_hot  # [D]

    # Per-unit sums laid out per domain: [U, D, 2] = (difference, tokens) in the unit's domain row.
    sums = np.stack([one_hot * (a - b)[:, None], one_hot * tokens[:, None]], axis=-1)

    def weighted(t: np.ndarray) -> np.ndarray:
        return (t[..., present, 0] / t[..., present, 1]).mean(-1)

    common = dict(strata=units.strata(), n_resamples=n_resamples, confidence_level=confidence_level, seed=seed)
    overall = bootstrap_interval(sums, weighted, **common)
    per_domain = {int(d): bootstrap_interval(sums, lambda t, d=d: t[..., d, 0] / t[..., d, 1], **common)
                  for d in present}

    def flipped(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        # x, y: [..., U] after scipy swapped some pairs (= flipped those units' differences)
        per_domain_diff = (np.asarray(x) - np.asarray(y)) @ one_hot / domain_tokens  # [..., D]
        return per_domain_diff[..., present].mean(-1)

    perm = scipy.stats.permutation_test(
        (a, b), flipped, permutation_type="samples", vectorized=True, n_resamples=n_permutations,
        alternative="two-sided", rng=np.random.default_rng(seed),
    )
    return PairedDifference(overall, per_domain, float(perm.pvalue), int(np.size(perm.null_distribution)),
                            int(dom.size), units.n)
