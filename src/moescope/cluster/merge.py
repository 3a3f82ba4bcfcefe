"""Greedy MDL merging of components by co-activation (layer 1: arrays in, arrays out).

The algorithm (anchors.md §3): binarize an activation matrix A [tokens, components]
into masks M = A > t, drop dead components, and describe each token by which
*groups* of components fire on it.  A grouping with k groups costs, per token,

    MDL = sum_g s_g * (log2 k + alpha * r_g),      s_g = |OR of the masks in g| / N,

where r_g is the number of components in group g (alpha sets granularity: small
alpha makes one always-on blob, large alpha merges only components that are
nearly always on together).  Starting from singletons, every step computes the
exact change in MDL for merging every pair of groups, picks one pair, ORs the
two group masks and updates one row/column of the co-activation matrix
C = M_g^T M_g, down to ``target_k`` groups.

Exact change for merging a and b (k -> k-1).  With c_ab = C_ab / N, the merged
mask has s_ab = |M_a OR M_b| / N = s_a + s_b - c_ab and size r_a + r_b, so with
S = sum_g s_g:

    dMDL(a, b) = S * (log2(k-1) - log2 k) - c_ab * log2(k-1)
                 + alpha * (s_a * r_b + s_b * r_a - c_ab * (r_a + r_b)).

Written by hand because no maintained library implements this cost; the
linear algebra is numpy.  Group masks are kept bit-packed (uint64 words over
tokens) so that the one-row update is an AND + popcount over k x N/64 words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from moescope.io.config import bounded, check_fields

PairSelection = Literal["range", "mcmc"]


@dataclass
class MergeConfig:
    """How to binarize, which components to keep, how to choose merges, where to stop."""

    activation_threshold: float = 0.0  # a component is active on a token when activation > this
    dead_threshold: float = 0.0  # components whose max activation is <= this are dropped
    alpha: float = bounded(1.0, low=0.0)  # weight of the group-size term (bits per component per active token)
    target_k: int = bounded(1, low=1)  # stop when this many groups remain
    pair_selection: PairSelection = "range"
    range_threshold_bits: float = bounded(0.0, low=0.0)  # `range`: uniform among pairs within this of the min cost; 0 = argmin
    temperature_bits: float = bounded(1.0, low=0.0)  # `mcmc`: P(pair) ~ exp(-cost / temperature)
    seed: int = bounded(0, low=0, high=2**32 - 1)
    # Reference path (tests, benchmark): recompute C from the group masks every
    # step instead of updating one row.  Same results, much slower.
    recompute_coactivation: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "merge")
        if self.pair_selection not in ("range", "mcmc"):
            raise ValueError(f"pair_selection must be 'range' or 'mcmc', got {self.pair_selection!r}")
        if self.pair_selection == "mcmc" and self.temperature_bits <= 0:
            raise ValueError(f"temperature_bits must be > 0 for mcmc, got {self.temperature_bits}")


@dataclass
class MergeHistory:
    """Everything a merge run decided, step by step.

    Group ids at each step are 0..k-1.  At step i the pair merges[i] = (a, b),
    a < b, is merged into a; the group that held the last id k-1 takes id b.
    """

    labels: list[str]  # kept components, the column order of `assignments`
    dropped: list[str]  # dead components (never in any group)
    assignments: np.ndarray  # int32 [n_steps + 1, n_kept]: group of each component after i merges
    merges: np.ndarray  # int32 [n_steps, 2]: group ids merged at step i (numbering of row i)
    costs: np.ndarray  # float64 [n_steps]: dMDL of the chosen merge, bits per token
    mdl: np.ndarray  # float64 [n_steps + 1]: MDL after i merges, bits per token
    n_tokens: int
    config: MergeConfig = field(default_factory=MergeConfig)

    @property
    def n_steps(self) -> int:
        return int(self.merges.shape[0])

    @property
    def n_groups(self) -> np.ndarray:
        """Number of groups after i merges, int [n_steps + 1]."""
        return len(self.labels) - np.arange(self.n_steps + 1)

    @property
    def best_step(self) -> int:
        """The step with the lowest description length: the grouping MDL prefers (first if tied)."""
        return int(np.argmin(self.mdl))

    def groups_at(self, step: int) -> list[list[str]]:
        """The groups after `step` merges, as lists of component labels (ordered by group id)."""
        row = self.assignments[step]
        return [[self.labels[i] for i in np.flatnonzero(row == g)] for g in range(int(row.max()) + 1)]


# ---------------------------------------------------------------- masks and C


def binarize_activations(activations: np.ndarray, config: MergeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool [N, n_kept], kept column indices) after dropping dead components."""
    acts = np.asarray(activations)
    if acts.ndim != 2:
        raise ValueError(f"activations must be [tokens, components], got shape {acts.shape}")
    if acts.shape[0] == 0:
        raise ValueError("activations have no tokens")
    kept = np.flatnonzero(acts.max(axis=0) > config.dead_threshold)
    return acts[:, kept] > config.activation_threshold, kept


def compute_coactivation(masks: np.ndarray, chunk_tokens: int = 8192) -> np.ndarray:
    """C = M^T M as int64 [n, n]: C_ij = number of tokens on which i and j are both active.

    float32 BLAS over token chunks: every partial sum is an integer <= chunk_tokens,
    exact in float32, then accumulated in int64.
    """
    n_tokens, n = masks.shape
    out = np.zeros((n, n), dtype=np.int64)
    for start in range(0, n_tokens, chunk_tokens):
        part = masks[start : start + chunk_tokens].astype(np.float32)
        out += np.rint(part.T @ part).astype(np.int64)
    return out


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool [N, n] -> uint64 [n, ceil(N/64)]: one bit-packed row per component (pad bits are 0)."""
    n_tokens, n = masks.shape
    packed = np.packbits(np.ascontiguousarray(masks.T), axis=1, bitorder="little")
    n_bytes = -(-n_tokens // 64) * 8
    if packed.shape[1] < n_bytes:
        packed = np.pad(packed, ((0, 0), (0, n_bytes - packed.shape[1])))
    return np.ascontiguousarray(packed).view(np.uint64)


def unpack_masks(packed: np.ndarray, n_tokens: int) -> np.ndarray:
    """Inverse of pack_masks: uint64 [n, W] -> bool [N, n]."""
    bits = np.unpackbits(packed.view(np.uint8), axis=1, count=n_tokens, bitorder="little")
    return np.ascontiguousarray(bits.T).view(bool)  # token-major, so C = M^T M reads rows


# ---------------------------------------------------------------- MDL and costs


def compute_mdl(masks: np.ndarray, groups: np.ndarray, alpha: float) -> float:
    """MDL in bits per token of a grouping (brute force from the masks; the reference for tests)."""
    groups = np.asarray(groups)
    n_tokens = masks.shape[0]
    ids = np.unique(groups)
    k = len(ids)
    total = 0.0
    for g in ids:
        members = groups == g
        s_g = np.any(masks[:, members], axis=1).sum() / n_tokens
        total += s_g * (np.log2(k) + alpha * members.sum())
    return float(total)


def compute_merge_costs(coact: np.ndarray, sizes: np.ndarray, n_tokens: int, alpha: float) -> np.ndarray:
    """Exact dMDL (bits per token) of merging every pair of k groups: float64 [k, k], +inf on the diagonal.

    coact: int [k, k] co-activation of the group masks; sizes: int [k] components per group.
    """
    k = coact.shape[0]
    if k < 2:
        return np.full((k, k), np.inf)
    c = coact / float(n_tokens)
    s = np.diagonal(c).copy()
    r = sizes.astype(np.float64)
    log_k, log_k1 = np.log2(k), np.log2(k - 1)
    costs = c * (-log_k1 - alpha * (r[:, None] + r[None, :]))
    costs += alpha * (s[:, None] * r[None, :] + r[:, None] * s[None, :])
    costs += s.sum() * (log_k1 - log_k)
    np.fill_diagonal(costs, np.inf)
    return costs


def choose_pair(costs: np.ndarray, upper: np.ndarray, config: MergeConfig, rng: np.random.Generator) -> tuple[int, int]:
    """Pick (a, b), a < b, from the strict upper triangle of `costs` by the configured rule."""
    k = costs.shape[0]
    flat = np.where(upper, costs, np.inf).ravel()
    best = flat.min()
    if config.pair_selection == "range":
        # ties at the minimum are broken uniformly too, so "argmin" does not favour low ids
        candidates = np.flatnonzero(flat <= best + config.range_threshold_bits)
        idx = int(candidates[rng.integers(len(candidates))]) if len(candidates) > 1 else int(candidates[0])
    else:
        weights = np.exp(-(flat - best) / config.temperature_bits)  # inf -> weight 0
        weights /= weights.sum()
        idx = int(rng.choice(flat.size, p=weights))
    a, b = divmod(idx, k)
    return a, b


# ---------------------------------------------------------------- the loop


def merge_iteration(
    activations: np.ndarray,
    config: MergeConfig,
    labels: list[str] | None = None,
) -> MergeHistory:
    """Merge components greedily by exact dMDL from singletons down to config.target_k groups.

    activations: [tokens, components] (gate weights, 0 where not routed; any numeric or bool).
    labels: one name per component (default "c0", "c1", ...).
    """
    acts = np.asarray(activations)
    n_all = acts.shape[1] if acts.ndim == 2 else 0
    labels = list(labels) if labels is not None else [f"c{i}" for i in range(n_all)]
    if len(labels) != n_all:
        raise ValueError(f"{len(labels)} labels for {n_all} components")
    masks, kept = binarize_activations(acts, config)
    kept_set = set(kept.tolist())
    kept_labels = [labels[i] for i in kept]
    dropped = [labels[i] for i in range(n_all) if i not in kept_set]
    n_tokens, n = masks.shape
    n_steps = max(n - config.target_k, 0)
    rng = np.random.default_rng(config.seed)

    coact = compute_coactivation(masks)
    packed = pack_masks(masks)
    del masks
    sizes = np.ones(n, dtype=np.int64)
    group_of = np.arange(n, dtype=np.int32)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)

    assignments = np.empty((n_steps + 1, n), dtype=np.int32)
    merges = np.empty((n_steps, 2), dtype=np.int32)
    costs_out = np.empty(n_steps, dtype=np.float64)
    mdl = np.empty(n_steps + 1, dtype=np.float64)
    assignments[0] = group_of
    diag = np.diagonal(coact) / n_tokens
    mdl[0] = float(diag.sum() * np.log2(n) + config.alpha * diag.sum()) if n else 0.0

    for step in range(n_steps):
        k = n - step
        costs = compute_merge_costs(coact[:k, :k], sizes[:k], n_tokens, config.alpha)
        a, b = choose_pair(costs, upper[:k, :k], config, rng)
        merges[step] = (a, b)
        costs_out[step] = costs[a, b]
        mdl[step + 1] = mdl[step] + costs[a, b]

        # merge b into a: OR the masks, one new row/column of C
        packed[a] |= packed[b]
        sizes[a] += sizes[b]
        group_of[group_of == b] = a
        if not config.recompute_coactivation:
            row = np.bitwise_count(packed[:k] & packed[a]).sum(axis=1, dtype=np.int64)
            coact[a, :k] = row
            coact[:k, a] = row
        # the last group takes id b, so ids stay 0..k-2
        last = k - 1
        if b != last:
            packed[b] = packed[last]
            sizes[b] = sizes[last]
            coact[b, :k] = coact[last, :k]
            coact[:k, b] = coact[:k, last]
            group_of[group_of == last] = b
        if config.recompute_coactivation:
            coact[: k - 1, : k - 1] = compute_coactivation(unpack_masks(packed[: k - 1], n_tokens))
        assignments[step + 1] = group_of

    return MergeHistory(
        labels=kept_labels,
        dropped=dropped,
        assignments=assignments,
        merges=merges,
        costs=costs_out,
        mdl=mdl,
        n_tokens=int(n_tokens),
        config=config,
    )


def shuffle_tokens(activations: np.ndarray, rng: np.random.Generator, blocks: np.ndarray | None = None) -> np.ndarray:
    """Null model: permute the tokens of every block of columns independently.

    blocks: int [n_components], columns with the same id move together (default: every column
    alone). Keeps each block's per-token pattern and destroys co-activation between blocks, so
    merges on the result show what the algorithm finds without it. With blocks = MoE layers the
    null keeps top-k routing within a layer (exactly k experts per token) and destroys only the
    cross-layer pairing a pathway claim is about; a per-column shuffle also breaks the one-expert-
    per-token structure, which alone changes what the merge does.
    """
    acts = np.asarray(activations)
    blocks = np.arange(acts.shape[1]) if blocks is None else np.asarray(blocks)
    if blocks.shape != (acts.shape[1],):
        raise ValueError(f"blocks has shape {blocks.shape}, expected ({acts.shape[1]},)")
    out = np.empty_like(acts)
    for b in np.unique(blocks):
        cols = np.flatnonzero(blocks == b)
        out[:, cols] = acts[rng.permutation(acts.shape[0])][:, cols]
    return out
