"""In which order held-out blocks are forwarded, and so which blocks share a batch (`batch_order`).

Under token choice a token's routing never looks at the rest of its batch, so the order only
moves floating-point sums. Under expert choice (`moe.routing = "expert_choice"`) every expert
takes its top (capacity) tokens *of the batch*: a batch of one domain forces every expert to take
the same share of that domain, so per-domain statistics (NMI) are forced to ~0 and the loss is
measured under batches unlike training's, which mix the domains. The orders:

    "by_domain"  the blocks as stored: domain after domain (one domain per batch)
    "mixed"      the domains interleaved evenly, each domain's blocks in their stored order
                 (:func:`mixed_order`), so every batch holds the domains in proportion
    "auto"       "mixed" for a model whose routing depends on the batch (expert choice),
                 else "by_domain" (token-choice results stay exactly as before). A token-choice
                 layer with a capacity factor also drops tokens by batch; "auto" keeps it
                 "by_domain" so earlier numbers do not move: ask for "mixed" to compare.

Only the forward order changes: results are put back in the blocks' stored order, so per-block
statistics pair the same blocks across arms whatever order each arm was run in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from moescope.errors import MoescopeError

BatchOrder = Literal["auto", "by_domain", "mixed"]
BATCH_ORDERS = ("auto", "by_domain", "mixed")


def mixed_order(block_domain: np.ndarray) -> np.ndarray:
    """Positions 0..B-1 of the blocks in an order that interleaves the domains evenly.

    Block j of a domain with n blocks is placed at fraction (j + 1/2) / n of the order (ties: lower
    domain id first), so each domain is spread evenly over the whole order and any run of
    consecutive positions holds the domains in proportion to their counts; with equal counts it is
    plain round-robin. Deterministic; each domain keeps its stored order.
    """
    block_domain = np.asarray(block_domain)
    key = np.empty(block_domain.size, dtype=np.float64)
    for d in np.unique(block_domain):
        mine = np.flatnonzero(block_domain == d)
        key[mine] = (np.arange(mine.size) + 0.5) / mine.size  # equal fractions are equal floats (exact division)
    return np.lexsort((block_domain, key))


def routes_by_batch(layers: Iterable[Any]) -> bool:
    """Whether any of these MoE layers routes by expert choice (a token's experts depend on its batch)."""
    return any(getattr(layer, "routing", "token_choice") == "expert_choice" for layer in layers)


def resolve_batch_order(order: str, batch_dependent: bool) -> str:
    """"by_domain" or "mixed": `order`, with "auto" made "mixed" exactly when routing depends on the batch."""
    if order not in BATCH_ORDERS:
        raise MoescopeError(f"batch_order must be one of {list(BATCH_ORDERS)}, got {order!r}")
    if order == "auto":
        return "mixed" if batch_dependent else "by_domain"
    return order


def forward_order(block_domain: np.ndarray, order: str) -> np.ndarray:
    """Positions of the blocks in the order they are forwarded under a resolved `order`."""
    if order == "mixed":
        return mixed_order(block_domain)
    if order == "by_domain":
        return np.arange(np.asarray(block_domain).size)
    raise MoescopeError(f"batch_order must be 'by_domain' or 'mixed' here, got {order!r}")
