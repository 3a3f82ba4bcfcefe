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
from typing import Any

import torch
from torch import nn

from moescope.errors import MoescopeError
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



@torch.no_grad()
def generate_with_routing(model: nn.Module, input_ids: torch.Tensor, **generate_kwargs: Any):
    """`model.generate(...)` plus, per MoE layer, the experts that produced each new token.

    Returns (sequences [B, prompt + new], {block: LongTensor[B, new, k]}): entry t is the
    expert choice at the last position of the forward pass that generated new token t.
    Greedy or sampled decoding only (beam search reorders hypotheses).
    """
    if generate_kwargs.get("num_beams", 1) != 1:
        raise MoescopeError("generate_with_routing supports num_beams=1 only")
    layers = moe_layers(model)
    steps: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = []

    def make_hook(i: int):
        def hook(module: MoELayer, inputs, output) -> None:
            x = inputs[0]
            rec = module.last_record
            idx = rec.expert_index.view(*x.shape[:-1], module.top_k)
            steps[i].append(idx.reshape(-1, idx.shape[-2], module.top_k)[:, -1])

        return hook

    try:
        with record_routing(layers):
            hooks.extend(layer.register_forward_hook(make_hook(i)) for i, layer in layers.items())
            sequences = model.generate(input_ids, **generate_kwargs)
    finally:
        for h in hooks:
            h.remove()
    n_new = sequences.shape[1] - input_ids.shape[1]
    routing = {i: torch.stack(s[:n_new], dim=1) if s else torch.empty(0) for i, s in steps.items()}
    return sequences, routing


__all__ = ["RoutingView", "generate_with_routing", "record_routing"]
