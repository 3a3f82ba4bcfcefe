"""Model-level helpers for any module holding MoE layers (computation: no files).

Not tied to a model family: a GPT-2 or Llama upcycled by `install_moe`, a BERT encoder with
MoE FFNs, or a model a user built by hand with `MoELayer` all answer to the same three calls.
"""

from __future__ import annotations

import re

from torch import nn

from moescope.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> dict[int, MoELayer]:
    """{block_index: MoELayer} of any module; the index is the last integer in the layer's path."""
    found: dict[int, MoELayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            numbers = [int(part) for part in name.split(".") if re.fullmatch(r"\d+", part)]
            key = numbers[-1] if numbers else len(found)
            while key in found:
                key += 1
            found[key] = module
    return dict(sorted(found.items()))


def set_training_progress(model: nn.Module, progress: float) -> None:
    """Tell every MoE layer how far training is (0..1); the router noise anneals with it."""
    for layer in moe_layers(model).values():
        layer.progress = float(progress)


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routers' weights (e.g. for a separate learning-rate multiplier)."""
    return [p for layer in moe_layers(model).values() for p in layer.router.parameters()]


__all__ = ["moe_layers", "router_parameters", "set_training_progress"]
