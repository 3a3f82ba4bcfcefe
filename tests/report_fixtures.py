"""Synthetic routing tables of a released-model shape (many layers, 64 experts, top-8) with planted domains."""

from __future__ import annotations

import numpy as np

from moescope.analysis.table import RoutingTable

DOMAINS = ["code", "math", "m<!--<script>", "prose", "wiki"]  # one hostile name: the page must survive it


def planted_table(seed: int, *, n_blocks: int = 10, block_len: int = 48, n_exp: int = 64, k: int = 8,
                  n_domains: int = 5, strength: float = 2.0) -> RoutingTable:
    """Domain d prefers experts d*8 .. d*8+7 (Gumbel top-k over biased logits); no router_probs kept."""
    rng = np.random.default_rng(seed)
    block_domain = np.arange(n_blocks) % n_domains
    block = np.repeat(np.arange(n_blocks), block_len)
    domain = block_domain[block]
    n = block.size
    logits = rng.normal(size=(n, n_exp))
    for d in range(n_domains):
        logits[domain == d, d * 8:(d + 1) * 8] += strength
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :k]
    w = np.take_along_axis(probs, top, axis=1)
    return RoutingTable(
        token_id=rng.integers(0, 200, n), block=block, position=np.tile(np.arange(block_len), n_blocks),
        domain=domain, expert_index=top, gate_weight=(w / w.sum(axis=1, keepdims=True)).astype(np.float32),
        router_probs=None, router_entropy=-(probs * np.log(probs)).sum(axis=1), expert_count=n_exp,
    )
