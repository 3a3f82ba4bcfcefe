"""What the clustering shows beyond the token-shuffled null (layer 1: arrays in, numbers out).

The MDL merge always returns *some* grouping: with top-1 routing in several layers and
alpha = 1 it pairs components across layers even when the layers route independently,
so k alone says nothing about the data. Every number here is therefore measured twice,
on the captured batches and on token-shuffled copies of them (each component's column
shuffled over tokens on its own, one MoE layer at a time (merge.shuffle_tokens): firing rates
and top-k routing kept, co-activation across layers destroyed):

- stability: the fraction of components that change group between two batches at the
  same k (permutation-invariant Hamming distance / n components), mean over batch pairs;
- co-firing: for every group of two or more components, the tokens on which all of them
  fire over the tokens on which any fires, on the batch and on its shuffle;
- description length: the bits per token the MDL-optimal grouping saves over singletons,
  as a fraction of the singletons' cost.

A pathway claim ("N stable pathways") is made only when the batches' stability beats the
null's by STABILITY_MARGIN and grouped components co-fire more than on shuffled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moescope.cluster.components import group_masks, null_blocks
from moescope.cluster.distances import perm_invariant_hamming
from moescope.cluster.merge import MergeConfig, MergeHistory, merge_iteration, shuffle_tokens

# The batches must disagree on at least this fraction of all components LESS than the
# token-shuffled batches do before the summary speaks of stable pathways. A quarter of the
# components: a smaller gap means that most components are grouped about as (in)consistently
# as in data with no co-activation at all, so any named pathway would mostly be the merge's
# own preference (top-1 routing, alpha) rather than something the model does.
STABILITY_MARGIN = 0.25

ALPHAS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def step_at_k(history_or_n_labels: MergeHistory | int, k: int) -> int:
    """The merge step after which k groups remain (clamped to the history)."""
    n = history_or_n_labels if isinstance(history_or_n_labels, int) else len(history_or_n_labels.labels)
    return int(min(max(n - k, 0), max(n - 1, 0)))


def mean_pair_distance(assignments: Sequence[np.ndarray]) -> float | None:
    """Mean permutation-invariant Hamming distance between every pair of labelings, as a fraction of items."""
    if len(assignments) < 2:
        return None
    n = len(assignments[0])
    d = [perm_invariant_hamming(assignments[i], assignments[j]) / max(n, 1)
         for i in range(len(assignments)) for j in range(i + 1, len(assignments))]
    return float(np.mean(d))


def cofiring(masks: np.ndarray, assignment: np.ndarray) -> list[float]:
    """For each group with >= 2 components: tokens where all fire / tokens where any fires."""
    served = group_masks(masks, assignment)
    out = []
    for g in range(served.shape[1]):
        cols = assignment == g
        if cols.sum() < 2:
            continue
        out.append(float(masks[:, cols].all(axis=1).sum() / max(served[:, g].sum(), 1)))
    return out


def mdl_saving(history: MergeHistory) -> float:
    """Fraction of the singletons' description length the MDL-optimal grouping saves."""
    return float((history.mdl[0] - history.mdl[history.best_step]) / history.mdl[0]) if history.mdl[0] > 0 else 0.0


def recurring_groups(groupings: Sequence[list[list[str]]]) -> list[list[str]]:
    """Groups of >= 2 components found, with exactly the same members, in every grouping."""
    if not groupings:
        return []
    common = {frozenset(g) for g in groupings[0] if len(g) >= 2}
    for grouping in groupings[1:]:
        common &= {frozenset(g) for g in grouping}
    return sorted(sorted(g) for g in common)


@dataclass
class Evidence:
    k: int  # the batches' median MDL-optimal k, where stability is compared
    stability: float | None  # batches: fraction of components changing group at k
    null_stability: float | None  # token-shuffled batches, same k
    cofiring: float | None  # batches: mean co-firing of grouped components at the optimum
    null_cofiring: float | None  # the same groups on token-shuffled batches
    mdl_saving: float  # batches: mean fraction of bits saved at the optimum
    null_mdl_saving: float  # token-shuffled batches
    recurring: list[list[str]]  # groups found identically in every batch at k
    null_recurring: int  # how many the shuffled batches share
    claim: bool
    sentence: str

    def as_dict(self) -> dict:
        return {"k": self.k, "stability_changed_fraction": _r(self.stability),
                "null_stability_changed_fraction": _r(self.null_stability), "stability_margin": STABILITY_MARGIN,
                "cofiring": _r(self.cofiring), "null_cofiring": _r(self.null_cofiring),
                "mdl_saving": _r(self.mdl_saving), "null_mdl_saving": _r(self.null_mdl_saving),
                "recurring_groups": self.recurring, "null_recurring_groups": self.null_recurring,
                "pathway_claim": self.claim, "sentence": self.sentence}


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def _groups(history: MergeHistory, step: int) -> list[list[str]]:
    return history.groups_at(min(step, history.n_steps))


def measure_evidence(
    masks: Sequence[np.ndarray],
    histories: Sequence[MergeHistory],
    null_masks: Sequence[np.ndarray],
    null_histories: Sequence[MergeHistory],
) -> Evidence:
    """Compare batches with their token-shuffled nulls. masks[i]: bool [N_i, len(histories[i].labels)],
    columns in histories[i]'s label order; null_masks[i]: the shuffled batch, same columns (shuffling keeps
    every component's maximum, so the null drops the same dead components)."""
    k = int(np.median([h.n_groups[h.best_step] for h in histories]))

    def at_k(hists: Sequence[MergeHistory]) -> list[np.ndarray]:
        # comparable only on a shared label order: members that dropped components differ in length
        labels = sorted(set().union(*(h.labels for h in hists)))
        rows = []
        for h in hists:
            groups = _groups(h, step_at_k(h, k))
            lab = {c: g for g, comps in enumerate(groups) for c in comps}
            nxt = len(groups)
            row = []
            for c in labels:
                if c not in lab:
                    lab[c] = nxt
                    nxt += 1
                row.append(lab[c])
            rows.append(np.array(row))
        return rows

    stab = mean_pair_distance(at_k(histories))
    null_stab = mean_pair_distance(at_k(null_histories)) if null_histories else None
    real_cf, null_cf = [], []
    for i, h in enumerate(histories):
        row = h.assignments[h.best_step]
        real_cf += cofiring(masks[i], row)
        if null_masks:
            null_cf += cofiring(null_masks[i], row)  # the same groups, co-activation destroyed
    recurring = recurring_groups([_groups(h, step_at_k(h, k)) for h in histories])
    null_rec = len(recurring_groups([_groups(h, step_at_k(h, k)) for h in null_histories])) if null_histories else 0
    ev = Evidence(
        k=k, stability=stab, null_stability=null_stab,
        cofiring=float(np.mean(real_cf)) if real_cf else None,
        null_cofiring=float(np.mean(null_cf)) if null_cf else None,
        mdl_saving=float(np.mean([mdl_saving(h) for h in histories])),
        null_mdl_saving=float(np.mean([mdl_saving(h) for h in null_histories])) if null_histories else 0.0,
        recurring=recurring, null_recurring=null_rec, claim=False, sentence="",
    )
    ev.claim, ev.sentence = pathway_statement(ev)
    return ev


def pathway_statement(ev: Evidence) -> tuple[bool, str]:
    """(claim?, the sentence a report may print): numbers only, a pathway claim only past the margin."""
    if ev.stability is None or ev.null_stability is None:
        return False, (f"MDL-optimal k = {ev.k}; no null or only one batch, so nothing is claimed about stability.")
    gap = ev.null_stability - ev.stability
    cf = "" if ev.cofiring is None or ev.null_cofiring is None else (
        f" Grouped components fire together on {ev.cofiring:.0%} of the tokens any of them serves "
        f"({ev.null_cofiring:.0%} on shuffled tokens).")
    facts = (f"At the batches' MDL-optimal k = {ev.k}, {ev.stability:.0%} of components change group between batches "
             f"against {ev.null_stability:.0%} for token-shuffled batches (margin required for a pathway claim: "
             f"{STABILITY_MARGIN:.0%} of components).{cf} The grouping saves {ev.mdl_saving:.1%} of the description "
             f"length ({ev.null_mdl_saving:.1%} on shuffled tokens).")
    failed = pathway_failures(ev, gap)
    if not failed:
        return True, (f"{len(ev.recurring)} stable pathways: groups found identically in every batch "
                      f"({ev.null_recurring} in the shuffled batches). " + facts)
    return False, "No stable pathways are claimed: " + "; ".join(failed) + ". " + facts


def pathway_failures(ev: Evidence, gap: float) -> list[str]:
    """The conditions of a pathway claim that fail, each with its numbers (empty: the claim holds), so the
    no-claim sentence names only what actually failed."""
    failed = []
    if gap < STABILITY_MARGIN:
        failed.append(f"stability beats the token-shuffled null by {gap:.0%} of components, less than the "
                      f"{STABILITY_MARGIN:.0%} margin")
    if ev.cofiring is None or ev.null_cofiring is None:
        failed.append("no group of two or more components to measure co-firing on")
    elif ev.cofiring <= ev.null_cofiring:
        failed.append("grouped components do not co-fire more than on shuffled tokens")
    if len(ev.recurring) <= ev.null_recurring:
        failed.append(f"{len(ev.recurring)} groups recur identically in every batch, not more than the "
                      f"{ev.null_recurring} of the shuffled batches")
    return failed


def alpha_sensitivity(
    activations: Sequence[np.ndarray],
    labels: Sequence[str],
    base: MergeConfig,
    alphas: Sequence[float] = ALPHAS,
    null_seed: int = 10_000,
) -> list[dict]:
    """k and stability for each alpha, on the batches and on their token-shuffled copies (re-merged here)."""
    shuffled = [shuffle_tokens(np.asarray(a), np.random.default_rng(null_seed + i), null_blocks(labels))
                for i, a in enumerate(activations)]
    rows = []
    for alpha in alphas:
        def run(batches):
            return [merge_iteration(np.asarray(a), MergeConfig(**{**vars(base), "alpha": float(alpha), "seed": base.seed + i}),
                                    labels=list(labels)) for i, a in enumerate(batches)]

        real, null = run(activations), run(shuffled)
        thr = base.activation_threshold
        ev = measure_evidence([np.asarray(a)[:, [list(labels).index(c) for c in h.labels]] > thr
                               for a, h in zip(activations, real)], real,
                              [np.asarray(a)[:, [list(labels).index(c) for c in h.labels]] > thr
                               for a, h in zip(shuffled, real)], null)
        rows.append({"alpha": float(alpha),
                     "k": [int(h.n_groups[h.best_step]) for h in real],
                     "null_k": [int(h.n_groups[h.best_step]) for h in null],
                     "stability_changed_fraction": _r(ev.stability),
                     "null_stability_changed_fraction": _r(ev.null_stability),
                     "pathway_claim": ev.claim})
    return rows
