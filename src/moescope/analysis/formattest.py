"""The format test: does routing follow the content or fixed format markers?

The same math/code content is routed twice, plain (the training format) and with
invariant "Problem:" / "Solution:" markers added. If the router keyed on format,
the content tokens' routing would move when the markers appear. This module is the
computation half (layer 1): align the content tokens of the two versions and
measure how far their routing moved; capture.py runs the model.

Divergence: Jensen-Shannon *divergence* in bits, i.e. the square of
``scipy.spatial.distance.jensenshannon(p, q, base=2)`` (which is the JS
*distance*). It lies in [0, 1]: 0 = identical, 1 = disjoint support.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import jensenshannon


def js_divergence(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits along ``axis`` (inputs are normalized by scipy)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return jensenshannon(p, q, base=2, axis=axis) ** 2


def align_content_tokens(
    offsets_plain: Sequence[tuple[int, int]] | np.ndarray,
    offsets_marked: Sequence[tuple[int, int]] | np.ndarray,
    segments: Sequence[tuple[int, int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of token indices (plain, marked) that cover the same content characters.

    segments: (start_in_plain, start_in_marked, length) character runs that hold
    the same content in both texts (e.g. the problem and the solution). A token
    pairs up when it lies inside one segment in both texts at the same relative
    span; tokens whose boundaries differ (typically the first token after a
    marker) are left out, so only identically tokenized content is compared.
    """

    def keyed(offsets, which: int) -> dict[tuple[int, int, int], int]:
        spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        out = {}
        for t, (start, end) in enumerate(spans):
            if end <= start:
                continue
            for s, seg in enumerate(segments):
                seg_start, length = seg[which], seg[2]
                if seg_start <= start and end <= seg_start + length:
                    out[(s, int(start - seg_start), int(end - seg_start))] = t
                    break
        return out

    plain, marked = keyed(offsets_plain, 0), keyed(offsets_marked, 1)
    common = sorted(set(plain) & set(marked))
    return (
        np.array([plain[k] for k in common], dtype=np.int64),
        np.array([marked[k] for k in common], dtype=np.int64),
    )


@dataclass(frozen=True)
class RoutingShift:
    """How much the content tokens' routing moved when the markers were added (one layer)."""

    n_tokens: int
    js_divergence_of_means: float  # JSD (bits) between the two mean router distributions
    mean_token_js_divergence: float  # mean over tokens of the per-token JSD (bits)
    top1_changed_fraction: float  # share of tokens whose first-choice expert changed
    token_js_divergence: np.ndarray  # [n] per-token JSD, for block/text-level bootstrap
    token_top1_changed: np.ndarray  # [n] bool

    def to_dict(self) -> dict:
        """JSON-ready summary (per-token arrays left out)."""
        return {
            "n_tokens": self.n_tokens,
            "js_divergence_of_means": self.js_divergence_of_means,
            "mean_token_js_divergence": self.mean_token_js_divergence,
            "top1_changed_fraction": self.top1_changed_fraction,
        }


def measure_routing_shift(
    probs_plain: np.ndarray,
    probs_marked: np.ndarray,
    top1_plain: np.ndarray | None = None,
    top1_marked: np.ndarray | None = None,
) -> RoutingShift:
    """Compare aligned router distributions [n, E] of the same content tokens, plain vs marked.

    top1_*: the experts the layer actually chose; default the router's argmax.
    """
    a = np.asarray(probs_plain, dtype=np.float64)
    b = np.asarray(probs_marked, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"router probabilities must be aligned [n, E] arrays, got {a.shape} and {b.shape}")
    if a.shape[0] == 0:
        raise ValueError("no content tokens to compare")
    ta = a.argmax(axis=1) if top1_plain is None else np.asarray(top1_plain)
    tb = b.argmax(axis=1) if top1_marked is None else np.asarray(top1_marked)
    per_token = js_divergence(a, b, axis=1)
    changed = ta != tb
    return RoutingShift(
        n_tokens=int(a.shape[0]),
        js_divergence_of_means=float(js_divergence(a.mean(axis=0), b.mean(axis=0))),
        mean_token_js_divergence=float(per_token.mean()),
        top1_changed_fraction=float(changed.mean()),
        token_js_divergence=per_token,
        token_top1_changed=changed,
    )


def random_pair_js_divergence(
    probs: np.ndarray, group: np.ndarray, *, same_group: bool, seed: int = 0, max_pairs: int = 20_000
) -> float:
    """Mean per-token JSD (bits) between randomly paired tokens: a scale for the per-token shift.

    same_group=True pairs each token with another token of its own group (domain):
    how different two unrelated tokens of one domain are routed. False pairs it with
    a token of another group. A marker-induced per-token shift far below the
    same-domain value means the markers moved routing less than a change of token does.
    """
    probs = np.asarray(probs, dtype=np.float64)
    group = np.asarray(group)
    rng = np.random.default_rng(seed)
    left = rng.choice(group.size, size=min(group.size, max_pairs), replace=False)
    lefts, rights = [], []
    for g in np.unique(group[left]):
        mine = left[group[left] == g]
        pool = np.flatnonzero(group == g) if same_group else np.flatnonzero(group != g)
        if same_group:
            if pool.size < 2:
                continue
            # a uniform draw among the other members: skip over the token's own slot
            slot = np.searchsorted(pool, mine)
            pick = rng.integers(0, pool.size - 1, size=mine.size)
            right = pool[pick + (pick >= slot)]
        else:
            if pool.size == 0:
                continue
            right = pool[rng.integers(0, pool.size, size=mine.size)]
        lefts.append(mine)
        rights.append(right)
    if not lefts:
        return float("nan")
    a, b = np.concatenate(lefts), np.concatenate(rights)
    return float(js_divergence(probs[a], probs[b], axis=1).mean())
