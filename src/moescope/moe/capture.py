"""Listening to the routers of a model's MoE layers: one context manager for every caller.

Every `MoELayer` leaves a `RoutingRecord` of its latest forward in `last_record` (counts,
probability sums, z-loss; what training needs). Per-token detail (each token's experts, gate
weights and router probabilities) costs a copy per forward, so a layer keeps it only while its
`capture` flag is on. `record_routing` switches that flag on for the duration of a block and
restores each layer's previous setting on the way out, even on an exception, so callers nest
and never leave a model capturing by accident::

    with record_routing(model) as rec:
        model(input_ids)
        experts = rec.latest()[layer].expert_index   # [tokens, k]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from moescope.moe.layer import MoELayer, RoutingRecord
from moescope.moe.model import moe_layers


class RoutingView:
    """The MoE layers being listened to ({block index: MoELayer}) and their latest records."""

    def __init__(self, layers: dict[int, MoELayer]) -> None:
        self.layers = layers

    def latest(self) -> dict[int, RoutingRecord]:
        """{block index: RoutingRecord} of each layer's most recent forward."""
        return {i: layer.last_record for i, layer in self.layers.items()}

    def __getitem__(self, layer: int) -> RoutingRecord:
        return self.layers[layer].last_record


@contextlib.contextmanager
def record_routing(model: nn.Module | dict[int, MoELayer], *, per_token: bool = True) -> Iterator[RoutingView]:
    """Listen to the MoE layers of `model` (or to a {block index: MoELayer} dict) within the block.

    With `per_token` (the default) every layer also records each token's experts, gate weights
    and router probabilities; without it only the per-forward sums are read (the cheaper mode
    training uses). Each layer's `capture` flag is restored on exit.
    """
    layers = model if isinstance(model, dict) else moe_layers(model)
    previous = {i: layer.capture for i, layer in layers.items()}
    if per_token:
        for layer in layers.values():
            layer.capture = True
    try:
        yield RoutingView(layers)
    finally:
        for i, layer in layers.items():
            layer.capture = previous[i]


__all__ = ["RoutingView", "record_routing"]
