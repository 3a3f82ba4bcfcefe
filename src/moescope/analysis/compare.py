"""Comparing the routing of two analyses of the same tokens (pure computation).

Router saturation (OLMoE, Muennighoff et al. 2024, section 5): the share of a token's
top-k experts at one checkpoint that are also among its top-k at the reference (final)
checkpoint, |TopK_ckpt ∩ TopK_final| / k, averaged over tokens. It needs the same
tokens in both analyses, matched by (eval block, position) and checked by token id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moescope.analysis import metrics


@dataclass(frozen=True)
class TokenKeys:
    """Where each routed token sits: eval block, position in the block, token id [N] each."""

    block: np.ndarray
    position: np.ndarray
    token_id: np.ndarray


def token_order(keys: TokenKeys) -> np.ndarray:
    """Row order sorting tokens by (block, position)."""
    return np.lexsort((np.asarray(keys.position), np.asarray(keys.block)))


def same_tokens(a: TokenKeys, b: TokenKeys) -> tuple[np.ndarray, np.ndarray]:
    """Row orders (order_a, order_b) that line up the same tokens; ValueError naming the first difference."""
    if a.block.shape != b.block.shape:
        raise ValueError(f"{a.block.size} tokens against {b.block.size}")
    oa, ob = token_order(a), token_order(b)
    for name in ("block", "position", "token_id"):
        x, y = np.asarray(getattr(a, name))[oa], np.asarray(getattr(b, name))[ob]
        if not np.array_equal(x, y):
            i = int(np.flatnonzero(x != y)[0])
            raise ValueError(f"{name} differs at sorted token {i} ({x[i]} against {y[i]})")
    return oa, ob


def router_saturation_layer(expert_index: np.ndarray, reference_index: np.ndarray) -> float:
    """Mean over tokens of |TopK ∩ TopK_reference| / k for rows already lined up."""
    return float(metrics.router_saturation([expert_index], reference_index)[0])
